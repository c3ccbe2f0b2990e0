@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// Drives a virtio-pci device the way a (possibly hostile) driver would, without KVM: register
/// accesses go straight to the transport, rings are written into a ``GuestMemory``, and notifies
/// take the bus fallback path to the device's real I/O thread.
final class VirtioHarness {
    static let descAddress: UInt64 = 0x10000
    static let availAddress: UInt64 = 0x11000
    static let usedAddress: UInt64 = 0x12000
    static let dataAddress: UInt64 = 0x20000
    static let memorySize: UInt64 = 4 << 20

    let memory: GuestMemory
    let core: VirtioDeviceCore
    let transport: VirtioPCITransport
    let msi = RecordingMSIDelivery()
    let line = RecordingLine()
    var queueSize: UInt16
    var availIndex: UInt16 = 0

    init(device: any VirtioDevice, queueSize: UInt16 = 16) throws {
        memory = try GuestMemory(size: Self.memorySize)
        core = try VirtioDeviceCore(device: device, memory: memory)
        transport = VirtioPCITransport(core: core, msixDelivery: msi, intx: line, interruptLine: 16,
                                       msixBarAddress: 0xC000_0000, virtioBarAddress: 0xC000_4000, registrar: nil)
        self.queueSize = queueSize
        try core.startIOThread(name: "virtio-test")
    }

    deinit { core.stopIOThread() }

    func write(_ offset: UInt64, _ value: UInt64, width: Int) {
        withUnsafeBytes(of: value.littleEndian) { transport.barWrite(VirtioPCITransport.virtioBar, offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<width])) }
    }

    func read(_ offset: UInt64, width: Int) -> UInt64 {
        var value: UInt64 = 0
        withUnsafeMutableBytes(of: &value) { transport.barRead(VirtioPCITransport.virtioBar, offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<width])) }
        return value
    }

    var status: UInt8 { UInt8(read(0x14, width: 1)) }

    /// The §3.1.1 sequence; returns the status after DRIVER_OK.
    @discardableResult
    func initialize(features: UInt64 = VirtioFeature.version1 | VirtioFeature.indirectDescriptors,
                    desc: UInt64 = descAddress, avail: UInt64 = availAddress, used: UInt64 = usedAddress) -> UInt8 {
        write(0x14, 0, width: 1)
        // Fresh rings before the device can look at them.
        try? memory.zero(at: Self.availAddress, count: 0x2000)
        availIndex = 0
        write(0x14, 1, width: 1)
        write(0x14, 3, width: 1)
        for select in 0..<2 {
            write(0x08, UInt64(select), width: 4)
            write(0x0C, (features >> (32 * UInt64(select))) & 0xFFFF_FFFF, width: 4)
        }
        write(0x14, 0xB, width: 1)
        write(0x16, 0, width: 2)
        write(0x18, UInt64(queueSize), width: 2)
        write(0x20, desc, width: 8)
        write(0x28, avail, width: 8)
        write(0x30, used, width: 8)
        write(0x1C, 1, width: 2)
        write(0x14, 0xF, width: 1)
        return status
    }

    func setDescriptor(_ index: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16, table: UInt64 = descAddress) {
        let base = table + UInt64(16 * index)
        try! memory.store(address, at: base)
        try! memory.store(length, at: base + 8)
        try! memory.store(flags, at: base + 12)
        try! memory.store(next, at: base + 14)
    }

    /// Puts `head` in the avail ring, bumps avail.idx by `bump` (normally 1) and notifies queue `queue`.
    func submit(_ head: UInt16, bump: UInt16 = 1, queue: UInt64 = 0) {
        try! memory.store(head, at: Self.availAddress + 4 + 2 * UInt64(availIndex % queueSize))
        availIndex &+= bump
        try! memory.store(availIndex, at: Self.availAddress + 2)
        notify(queue)
    }

    func notify(_ queue: UInt64) {
        write(VirtioPCITransport.notifyOffset + UInt64(VirtioPCITransport.notifyMultiplier) * queue, queue, width: 2)
    }

    var usedIndex: UInt16 { (try? memory.load(UInt16.self, at: Self.usedAddress + 2)) ?? 0 }

    func usedElement(_ i: Int) -> (id: UInt32, length: UInt32) {
        let base = Self.usedAddress + 4 + 8 * UInt64(i % Int(queueSize))
        return ((try? memory.load(UInt32.self, at: base)) ?? 0, (try? memory.load(UInt32.self, at: base + 4)) ?? 0)
    }

    /// Polls (bounded) until `condition` holds.
    @discardableResult
    func waitFor(seconds: Double = 5, _ condition: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        while monotonicNanoseconds() < deadline {
            if condition() { return true }
            usleep(1000)
        }
        return condition()
    }

    /// A blk request: header at data+0, `data` buffer, status byte at data+0x1000-1.
    func blockRequest(type: UInt32, sector: UInt64, dataLength: UInt32, dataAddress: UInt64 = dataAddress + 0x1000,
                      deviceWrites: Bool = true) {
        try! memory.store(type, at: Self.dataAddress)
        try! memory.store(UInt32(0), at: Self.dataAddress + 4)
        try! memory.store(sector, at: Self.dataAddress + 8)
        try! memory.store(UInt8(0xEE), at: statusAddress)
        setDescriptor(0, address: Self.dataAddress, length: 16, flags: Virtqueue.descriptorNext, next: 1)
        setDescriptor(1, address: dataAddress, length: dataLength,
                      flags: Virtqueue.descriptorNext | (deviceWrites ? Virtqueue.descriptorWrite : 0), next: 2)
        setDescriptor(2, address: statusAddress, length: 1, flags: Virtqueue.descriptorWrite, next: 0)
    }

    var statusAddress: UInt64 { Self.dataAddress + 0xFFF }
    var requestStatus: UInt8 { (try? memory.load(UInt8.self, at: statusAddress)) ?? 0xFF }
}
