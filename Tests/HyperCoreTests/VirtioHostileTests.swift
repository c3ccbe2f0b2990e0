import Testing
@testable import HyperCore

/// A hostile driver writes broken rings straight into guest memory. The VMM must stay alive, the
/// device must report NEEDS_RESET (or fail the single request), and nothing outside guest memory
/// or the disk's range may be read or written.
@Suite("Virtio hostile guests", .serialized)
struct VirtioHostileTests {
    static let needsReset = VirtioStatus.needsReset.rawValue

    func harness(sectors: Int = 64, readOnly: Bool = false) throws -> (VirtioHarness, MemoryDisk) {
        let disk = MemoryDisk(sectors: sectors, readOnly: readOnly)
        let harness = try VirtioHarness(device: VirtioBlock(backend: disk, queueSize: 16))
        #expect(harness.initialize() == 0xF)
        return (harness, disk)
    }

    /// Submits chain 0 and expects the device to give up with NEEDS_RESET and `error`.
    func expectBroken(_ harness: VirtioHarness, _ disk: MemoryDisk, bump: UInt16 = 1, head: UInt16 = 0,
                      _ check: (VirtqueueError) -> Bool) {
        let before = disk.bytes
        harness.submit(head, bump: bump)
        #expect(harness.waitFor { harness.status & Self.needsReset != 0 }, "device did not report NEEDS_RESET")
        let error = harness.core.lock.withLock { harness.core.lastError }
        #expect(error.map(check) == true, "unexpected error \(String(describing: error))")
        #expect(harness.usedIndex == 0, "a broken chain was completed")
        #expect(disk.accesses.isEmpty, "the disk was touched: \(disk.accesses)")
        #expect(disk.bytes == before)
        // The config-change interrupt announced it (INTx here: MSI-X is off).
        #expect(harness.transport.pendingISR & 2 != 0)
        // Recovery: a reset and a clean request work again.
        #expect(harness.initialize() == 0xF)
        harness.blockRequest(type: VirtioBlock.typeIn, sector: 0, dataLength: 512)
        harness.submit(0)
        #expect(harness.waitFor { harness.usedIndex == 1 })
        #expect(harness.requestStatus == VirtioBlock.statusOK)
    }

    @Test("descriptor loop: chain longer than the queue → NEEDS_RESET")
    func descriptorLoop() throws {
        let (h, disk) = try harness()
        h.setDescriptor(0, address: VirtioHarness.dataAddress, length: 16, flags: Virtqueue.descriptorNext, next: 1)
        h.setDescriptor(1, address: VirtioHarness.dataAddress, length: 16, flags: Virtqueue.descriptorNext, next: 0)
        expectBroken(h, disk) { if case .chainTooLong = $0 { true } else { false } }
    }

    @Test("buffer outside guest memory → NEEDS_RESET, nothing read or written there")
    func outsideMemory() throws {
        let (h, disk) = try harness()
        h.blockRequest(type: VirtioBlock.typeIn, sector: 0, dataLength: 512, dataAddress: VirtioHarness.memorySize - 256)
        expectBroken(h, disk) { if case .descriptorOutsideMemory = $0 { true } else { false } }
    }

    @Test("huge length (4 GiB − 1) → NEEDS_RESET")
    func hugeLength() throws {
        let (h, disk) = try harness()
        h.blockRequest(type: VirtioBlock.typeIn, sector: 0, dataLength: 0xFFFF_FFFF)
        expectBroken(h, disk) { if case .descriptorOutsideMemory = $0 { true } else { false } }
    }

    @Test("address + length wraps around 2^64 → NEEDS_RESET")
    func wrappingAddress() throws {
        let (h, disk) = try harness()
        h.blockRequest(type: VirtioBlock.typeIn, sector: 0, dataLength: 4096, dataAddress: UInt64.max - 100)
        expectBroken(h, disk) { if case .descriptorOutsideMemory = $0 { true } else { false } }
    }

    @Test("buffer in the MMIO hole (PCI BAR window) → NEEDS_RESET")
    func bufferInMMIOHole() throws {
        let (h, disk) = try harness()
        h.blockRequest(type: VirtioBlock.typeIn, sector: 0, dataLength: 512, dataAddress: GuestLayout.pciMMIOStart)
        expectBroken(h, disk) { if case .descriptorOutsideMemory = $0 { true } else { false } }
    }

    @Test("nested indirect table → NEEDS_RESET")
    func nestedIndirect() throws {
        let (h, disk) = try harness()
        let table: UInt64 = 0x30000, inner: UInt64 = 0x31000
        h.setDescriptor(0, address: table, length: 32, flags: Virtqueue.descriptorIndirect, next: 0)
        h.setDescriptor(0, address: inner, length: 16, flags: Virtqueue.descriptorIndirect, next: 0, table: table)
        h.setDescriptor(0, address: VirtioHarness.dataAddress, length: 16, flags: 0, next: 0, table: inner)
        expectBroken(h, disk) { $0 == .nestedIndirect }
    }

    @Test("indirect table of 24 bytes (not whole descriptors) → NEEDS_RESET")
    func indirectLength() throws {
        let (h, disk) = try harness()
        h.setDescriptor(0, address: 0x30000, length: 24, flags: Virtqueue.descriptorIndirect, next: 0)
        expectBroken(h, disk) { $0 == .badIndirectLength(24) }
    }

    @Test("indirect table longer than the queue → NEEDS_RESET")
    func indirectTooLong() throws {
        let (h, disk) = try harness()
        h.setDescriptor(0, address: 0x30000, length: 16 * 17, flags: Virtqueue.descriptorIndirect, next: 0)
        expectBroken(h, disk) { $0 == .badIndirectLength(16 * 17) }
    }

    @Test("loop inside an indirect table → NEEDS_RESET")
    func indirectLoop() throws {
        let (h, disk) = try harness()
        let table: UInt64 = 0x30000
        h.setDescriptor(0, address: table, length: 32, flags: Virtqueue.descriptorIndirect, next: 0)
        h.setDescriptor(0, address: VirtioHarness.dataAddress, length: 16, flags: Virtqueue.descriptorNext, next: 1, table: table)
        h.setDescriptor(1, address: VirtioHarness.dataAddress, length: 16, flags: Virtqueue.descriptorNext, next: 0, table: table)
        expectBroken(h, disk) { if case .chainTooLong = $0 { true } else { false } }
    }

    @Test("INDIRECT together with NEXT → NEEDS_RESET")
    func indirectWithNext() throws {
        let (h, disk) = try harness()
        h.setDescriptor(0, address: 0x30000, length: 32, flags: Virtqueue.descriptorIndirect | Virtqueue.descriptorNext, next: 1)
        expectBroken(h, disk) { $0 == .indirectWithNext }
    }

    @Test("avail.idx jumps by more than the queue size → NEEDS_RESET")
    func availJump() throws {
        let (h, disk) = try harness()
        h.blockRequest(type: VirtioBlock.typeIn, sector: 0, dataLength: 512)
        expectBroken(h, disk, bump: 17) { if case .availableIndexJump = $0 { true } else { false } }
    }

    @Test("head index beyond the queue → NEEDS_RESET")
    func headOutOfRange() throws {
        let (h, disk) = try harness()
        expectBroken(h, disk, head: 40) { $0 == .headOutOfRange(40, size: 16) }
    }

    @Test("next index beyond the queue → NEEDS_RESET")
    func nextOutOfRange() throws {
        let (h, disk) = try harness()
        h.setDescriptor(0, address: VirtioHarness.dataAddress, length: 16, flags: Virtqueue.descriptorNext, next: 300)
        expectBroken(h, disk) { if case .nextOutOfRange(300, _) = $0 { true } else { false } }
    }

    @Test("device-readable buffer after a device-writable one → NEEDS_RESET")
    func readableAfterWritable() throws {
        let (h, disk) = try harness()
        h.setDescriptor(0, address: VirtioHarness.dataAddress, length: 16, flags: Virtqueue.descriptorNext | Virtqueue.descriptorWrite, next: 1)
        h.setDescriptor(1, address: VirtioHarness.dataAddress + 16, length: 16, flags: 0, next: 0)
        expectBroken(h, disk) { $0 == .readableAfterWritable }
    }

    @Test("rings outside guest memory at DRIVER_OK → NEEDS_RESET before any request")
    func ringsOutside() throws {
        let disk = MemoryDisk(sectors: 8)
        let h = try VirtioHarness(device: VirtioBlock(backend: disk, queueSize: 16))
        let status = h.initialize(used: VirtioHarness.memorySize - 8)
        #expect(status & Self.needsReset != 0)
        #expect(h.core.lock.withLock { h.core.lastError } == .ringOutsideMemory("used ring", address: VirtioHarness.memorySize - 8, length: 6 + 8 * 16))
        #expect(h.initialize(desc: 0x10008) & Self.needsReset != 0, "a misaligned descriptor table is refused")
        #expect(h.initialize() == 0xF)
    }

    @Test("notify for a queue that does not exist is ignored; the device keeps working")
    func unknownQueue() throws {
        let (h, disk) = try harness()
        h.notify(7)
        h.notify(0xFFFF)
        h.blockRequest(type: VirtioBlock.typeIn, sector: 3, dataLength: 512)
        h.submit(0)
        #expect(h.waitFor { h.usedIndex == 1 })
        #expect(h.requestStatus == VirtioBlock.statusOK)
        #expect(h.status == 0xF)
        #expect(disk.accesses.map(\.offset) == [3 * 512])
    }

    @Test("out-of-range, straddling and overflowing sectors answer IOERR and never reach the disk")
    func outOfRangeRequests() throws {
        let (h, disk) = try harness(sectors: 64)
        for (sector, length) in [(UInt64(64), UInt32(512)), (63, 1024), (UInt64.max / 512 + 1, 512), (UInt64.max, 512)] {
            for type in [VirtioBlock.typeIn, VirtioBlock.typeOut] {
                h.blockRequest(type: type, sector: sector, dataLength: length, deviceWrites: type == VirtioBlock.typeIn)
                let before = h.usedIndex
                h.submit(0)
                #expect(h.waitFor { h.usedIndex == before &+ 1 })
                #expect(h.requestStatus == VirtioBlock.statusIOError, "sector \(sector) type \(type)")
            }
        }
        #expect(disk.accesses.isEmpty)
        #expect(h.status == 0xF)
    }

    @Test("write zeroes / discard outside the disk or with bad flags fail without touching it")
    func zeroesOutOfRange() throws {
        let (h, disk) = try harness(sectors: 64)
        // Feature negotiation: write zeroes and discard offered by the device.
        #expect(h.initialize(features: VirtioFeature.version1 | VirtioBlock.featureWriteZeroes | VirtioBlock.featureDiscard) == 0xF)
        for (type, sector, count, flags, expected) in [
            (VirtioBlock.typeWriteZeroes, UInt64(60), UInt32(8), UInt32(0), VirtioBlock.statusIOError),
            (VirtioBlock.typeDiscard, UInt64.max, UInt32(1), UInt32(0), VirtioBlock.statusIOError),
            (VirtioBlock.typeDiscard, 0, 1, 1, VirtioBlock.statusUnsupported),
            (VirtioBlock.typeWriteZeroes, 0, 1, 2, VirtioBlock.statusUnsupported),
        ] {
            let segment: UInt64 = 0x24000
            try h.memory.store(sector, at: segment)
            try h.memory.store(count, at: segment + 8)
            try h.memory.store(flags, at: segment + 12)
            h.blockRequest(type: type, sector: 0, dataLength: 16, dataAddress: segment, deviceWrites: false)
            let before = h.usedIndex
            h.submit(0)
            #expect(h.waitFor { h.usedIndex == before &+ 1 })
            #expect(h.requestStatus == expected)
        }
        #expect(disk.accesses.isEmpty)
    }

    @Test("a request whose status byte is device-readable completes with length 0 and no status write")
    func noStatusByte() throws {
        let (h, disk) = try harness()
        try h.memory.store(VirtioBlock.typeIn, at: VirtioHarness.dataAddress)
        h.setDescriptor(0, address: VirtioHarness.dataAddress, length: 16, flags: 0, next: 0)
        h.submit(0)
        #expect(h.waitFor { h.usedIndex == 1 })
        #expect(h.usedElement(0).length == 0)
        #expect(disk.accesses.isEmpty)
    }

    @Test("features without VERSION_1, or not offered, are refused at FEATURES_OK")
    func featureNegotiation() throws {
        let disk = MemoryDisk(sectors: 8)
        let h = try VirtioHarness(device: VirtioBlock(backend: disk))
        #expect(h.initialize(features: VirtioFeature.indirectDescriptors) & VirtioStatus.featuresOK.rawValue == 0)
        #expect(h.initialize(features: VirtioFeature.version1 | (1 << 50)) & VirtioStatus.featuresOK.rawValue == 0)
        #expect(h.initialize(features: VirtioFeature.version1) == 0xF)
    }
}
