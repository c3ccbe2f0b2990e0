import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

@Suite("Virtio and PCI building blocks")
struct VirtioUnitTests {
    func configRead(_ device: any PCIDevice, _ offset: Int, _ width: Int = 4) -> UInt32 {
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { device.configRead(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<width])) }
        return value
    }

    func configWrite(_ device: any PCIDevice, _ offset: Int, _ value: UInt32, _ width: Int = 4) {
        withUnsafeBytes(of: value) { device.configWrite(offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<width])) }
    }

    @Test("console input that arrives after the guest posted receive buffers is delivered (the poll loop must not spin on them)")
    func consoleInputAfterReceiveBuffers() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]); close(fds[1]) }
        let harness = try VirtioHarness(device: VirtioConsole(output: BufferOutput(), input: fds[0]))
        #expect(harness.initialize(features: VirtioFeature.version1) == 0xF)
        // Receive buffer first, then nothing to read: the device must leave it in the ring…
        harness.setDescriptor(0, address: VirtioHarness.dataAddress, length: 64, flags: Virtqueue.descriptorWrite, next: 0)
        harness.submit(0)
        usleep(50_000)
        #expect(harness.usedIndex == 0)
        // …and still notice the host input that comes later.
        _ = "ping".withCString { write(fds[1], $0, 4) }
        #expect(harness.waitFor(seconds: 5) { harness.usedIndex == 1 })
        #expect(harness.usedElement(0).length == 4)
        #expect(try harness.memory.readBytes(at: VirtioHarness.dataAddress, count: 4) == Array("ping".utf8))
    }

    @Test("a queue counts as having work only when the driver published something new")
    func pollingSeesOnlyNewBuffers() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let queue = Virtqueue(maximumSize: 8, memory: memory)
        queue.descriptorTableAddress = 0x1000; queue.availableRingAddress = 0x2000; queue.usedRingAddress = 0x3000
        queue.enabled = true
        try queue.activate(eventIndex: false, indirect: false)
        #expect(!queue.hasNewAvailable())
        try memory.store(UInt16(1), at: 0x2002)   // the driver publishes one chain
        #expect(queue.hasNewAvailable())
        queue.noteProcessed()                     // the device looked and left it there
        #expect(!queue.hasNewAvailable())
        #expect(try queue.pendingCount() == 1)
        try memory.store(UInt16(2), at: 0x2002)
        #expect(queue.hasNewAvailable())
    }

    @Test("virtio-pci config space: IDs, BAR size probing (32- and 64-bit), capability chain, relocation")
    func pciConfigSpace() throws {
        let harness = try VirtioHarness(device: VirtioBlock(backend: MemoryDisk(sectors: 8)))
        let device = harness.transport
        #expect(configRead(device, 0) == 0x1042_1AF4)
        #expect(configRead(device, 8) >> 8 == 0x01_8000 && configRead(device, 8) & 0xFF == 1)
        #expect(configRead(device, 0x10) == 0xC000_0000)
        configWrite(device, 0x10, 0xFFFF_FFFF)
        #expect(configRead(device, 0x10) == 0xFFFF_F000, "4 KiB 32-bit BAR")
        configWrite(device, 0x10, 0xC000_0000)
        #expect(configRead(device, 0x18) == 0xC000_4004, "64-bit BAR type bits")
        configWrite(device, 0x18, 0xFFFF_FFFF)
        configWrite(device, 0x1C, 0xFFFF_FFFF)
        #expect(configRead(device, 0x18) == 0xFFFF_C004 && configRead(device, 0x1C) == 0xFFFF_FFFF, "16 KiB 64-bit BAR")
        configWrite(device, 0x18, 0xC010_0000)
        configWrite(device, 0x1C, 0)
        // Decoding only with memory enabled, at the new place.
        #expect(device.decode(0xC010_0000) == nil)
        configWrite(device, 4, 0x6, 2)
        #expect(device.decode(0xC010_0010)?.bar == 2 && device.decode(0xC010_0010)?.offset == 0x10)
        #expect(device.decode(0xC000_4000) == nil)
        // Capabilities: MSI-X first, then the virtio ones (types 1, 2, 3, 4, 5).
        var types: [UInt32] = []
        var cap = Int(configRead(device, 0x34, 1))
        while cap != 0, types.count < 16 {
            let id = configRead(device, cap, 1)
            types.append(id == 0x09 ? configRead(device, cap + 3, 1) : 0x100 | id)
            cap = Int(configRead(device, cap + 1, 1))
        }
        #expect(types == [0x111, 1, 2, 3, 4, 5])
        // Unwritable identity.
        configWrite(device, 0, 0)
        #expect(configRead(device, 0) == 0x1042_1AF4)
    }

    @Test("config mechanism #1: enable bit, absent slots and functions read as all ones")
    func configPorts() throws {
        let harness = try VirtioHarness(device: VirtioEntropy())
        let root = PCIRoot(devices: [harness.transport])
        let ports = PCIConfigPorts(root: root)
        func select(_ value: UInt32) { withUnsafeBytes(of: value) { ports.write(offset: 0, data: $0) } }
        func data() -> UInt32 {
            var value: UInt32 = 0xFFFF_FFFF
            withUnsafeMutableBytes(of: &value) { ports.read(offset: 4, data: $0) }
            return value
        }
        select(0x8000_0000)
        #expect(data() == 0x0D57_8086, "host bridge at 00.0")
        select(0x8000_0800)
        #expect(data() == 0x1044_1AF4, "virtio-rng at 01.0")
        select(0x8000_0900)
        #expect(data() == 0xFFFF_FFFF, "function 1 is absent")
        select(0x8000_1000)
        #expect(data() == 0xFFFF_FFFF, "slot 2 is empty")
        select(0x0000_0800)
        #expect(data() == 0xFFFF_FFFF, "enable bit clear")
    }

    @Test("MSI-X: routes only when unmasked, masked vectors pend and fire on unmask, function mask, disabled → INTx")
    func msix() {
        let delivery = RecordingMSIDelivery()
        let vectors = MSIXVectors(count: 2, delivery: delivery)
        func table(_ offset: UInt64, _ value: UInt32) { withUnsafeBytes(of: value) { vectors.tableWrite(offset: offset, from: $0) } }
        #expect(vectors.signal(1) == false, "MSI-X disabled: caller uses INTx")
        vectors.controlWritten(0x8000)
        table(16, 0xFEE0_0000)
        table(24, 0x41)
        #expect(vectors.signal(1) == true)
        #expect(delivery.fired.isEmpty, "masked at reset")
        var pba: UInt64 = 0
        withUnsafeMutableBytes(of: &pba) { vectors.pbaRead(offset: 0, into: $0) }
        #expect(pba == 2)
        table(28, 0)  // unmask → the pending message goes out
        #expect(delivery.fired == [1])
        #expect(delivery.message(vector: 1)?.0 == 0xFEE0_0000 && delivery.message(vector: 1)?.1 == 0x41)
        vectors.controlWritten(0xC000)  // function mask
        vectors.signal(1)
        #expect(delivery.fired == [1])
        vectors.controlWritten(0x8000)
        #expect(delivery.fired == [1, 1])
        vectors.signal(0xFFFF)  // NO_VECTOR: nothing
        #expect(delivery.fired == [1, 1])
    }

    @Test("GSI routing keeps the PIC and IOAPIC routes when MSI routes are added")
    func gsiRoutes() {
        let routes = GSIRouter.defaultRoutes
        #expect(routes.count == 15 + 24)
        #expect(!routes.contains(.irqchip(gsi: 2, chip: 0, pin: 2)))
        #expect(routes.contains(.irqchip(gsi: 9, chip: 1, pin: 1)))
        #expect(routes.contains(.irqchip(gsi: 23, chip: 2, pin: 23)))
        let router = GSIRouter(vm: nil)
        #expect(router.allocateGSI() == 24 && router.allocateGSI() == 25)
    }

    @Test("virtqueue: EVENT_IDX suppression and NO_INTERRUPT decide interrupts")
    func eventIndex() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let queue = Virtqueue(maximumSize: 8, memory: memory)
        queue.descriptorTableAddress = 0x1000
        queue.availableRingAddress = 0x2000
        queue.usedRingAddress = 0x3000
        queue.enabled = true
        try queue.activate(eventIndex: true, indirect: false)
        try memory.store(UInt16(2), at: 0x2000 + 4 + 2 * 8)  // used_event = 2
        queue.pushUsed(head: 0, length: 0)
        #expect(queue.shouldSignal() == false, "used idx 1 has not passed used_event 2")
        queue.pushUsed(head: 0, length: 0)
        queue.pushUsed(head: 0, length: 0)
        #expect(queue.shouldSignal() == true, "crossed 2")
        #expect(queue.rearm() == false)
        #expect(try memory.load(UInt16.self, at: 0x3000 + 4 + 8 * 8) == 0, "avail_event published")

        let plain = Virtqueue(maximumSize: 8, memory: memory)
        plain.descriptorTableAddress = 0x1000
        plain.availableRingAddress = 0x4000
        plain.usedRingAddress = 0x5000
        plain.enabled = true
        try plain.activate(eventIndex: false, indirect: false)
        try memory.store(UInt16(1), at: 0x4000)  // NO_INTERRUPT
        plain.pushUsed(head: 0, length: 0)
        #expect(plain.shouldSignal() == false)
        try memory.store(UInt16(0), at: 0x4000)
        plain.pushUsed(head: 0, length: 0)
        #expect(plain.shouldSignal() == true)
    }

    @Test("fuzz corpus and regression inputs replay cleanly through the walker and virtio-blk")
    func fuzzReplay() throws {
        let root = TestHost.repositoryRoot + "/Tests/Fuzz"
        var files: [String] = []
        for directory in ["corpus", "regressions"] {
            guard let dir = opendir(root + "/" + directory) else { continue }
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix(while: { $0 != 0 }), as: UTF8.self) }
                if !name.hasPrefix(".") { files.append(root + "/" + directory + "/" + name) }
            }
            closedir(dir)
        }
        #expect(!files.isEmpty)
        // Same layout as Tests/Fuzz/VirtqueueFuzz: byte 0 size-1, byte 1 flags, byte 2 pops, then RAM at 0.
        let memory = try GuestMemory(size: 1 << 20)
        let block = VirtioBlock(backend: MemoryDisk(sectors: 64), queueSize: 64)
        var chain = DescriptorChain()
        for file in files {
            let bytes = try ImageFile.read(file)
            guard bytes.count >= 3 else { continue }
            try memory.zero(at: 0, count: 65536 + 4096)
            try memory.write(at: 0, bytes: bytes[3..<min(bytes.count, 3 + 65536)])
            let queue = Virtqueue(maximumSize: 64, memory: memory)
            queue.size = UInt16(bytes[0] % 64) + 1
            queue.descriptorTableAddress = 0
            queue.availableRingAddress = 0x400
            queue.usedRingAddress = 0x800
            queue.enabled = true
            do {
                try queue.activate(eventIndex: bytes[1] & 2 != 0, indirect: bytes[1] & 1 != 0)
                for _ in 0..<(Int(bytes[2] % 8) + 1) {
                    guard try queue.pop(into: &chain) else { break }
                    for segment in chain.segments { #expect(memory.pointer(at: segment.address, count: Int(segment.length)) == segment.pointer) }
                    queue.pushUsed(head: chain.head, length: block.handle(chain))
                }
            } catch {
                // A broken ring is a valid outcome.
            }
        }
    }
}
