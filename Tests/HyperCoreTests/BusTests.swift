import Testing
@testable import HyperCore

/// Remembers the last access it saw.
final class ProbeDevice: BusDevice, @unchecked Sendable {
    func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    func restoreState(_ state: DeviceState) throws(SnapshotError) {}
    var lastWrite: (offset: UInt64, value: UInt64)?
    let readValue: UInt64
    init(readValue: UInt64 = 0) { self.readValue = readValue }
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) { data.storeLittleEndian(readValue &+ offset) }
    func write(offset: UInt64, data: UnsafeRawBufferPointer) { lastWrite = (offset, data.littleEndianValue) }
}

@Suite("Bus")
struct BusTests {
    @Test("overlapping registrations are rejected and name both ranges")
    func overlapRejected() throws {
        var builder = BusBuilder(name: "port I/O")
        try builder.register(ProbeDevice(), at: 0x3F8, size: 8)
        #expect(throws: BusError.overlap(bus: "port I/O", new: BusRange(base: 0x3FF, size: 1), existing: BusRange(base: 0x3F8, size: 8))) {
            try builder.register(ProbeDevice(), at: 0x3FF, size: 1)
        }
        #expect(throws: BusError.self) { try builder.register(ProbeDevice(), at: 0x3F0, size: 0x10) }
        try builder.register(ProbeDevice(), at: 0x400, size: 1) // adjacent is fine
        try builder.register(ProbeDevice(), at: 0x3F7, size: 1)
        #expect(throws: BusError.self) { try builder.register(ProbeDevice(), at: UInt64.max, size: 2) }
        #expect(throws: BusError.self) { try builder.register(ProbeDevice(), at: 0x1000, size: 0) }
    }

    @Test("lookups find the right device and offset; unclaimed reads are all ones")
    func dispatch() throws {
        let a = ProbeDevice(readValue: 0x100), b = ProbeDevice(readValue: 0x200)
        var builder = BusBuilder(name: "MMIO")
        try builder.register(b, at: 0xD000_1000, size: 0x1000)
        try builder.register(a, at: 0xD000_0000, size: 0x1000)
        let bus = builder.build()
        var word: UInt32 = 0
        withUnsafeMutableBytes(of: &word) { bus.read(address: 0xD000_1004, data: $0) }
        #expect(word == 0x204)
        withUnsafeMutableBytes(of: &word) { bus.read(address: 0xD000_0FFC, data: $0) }
        #expect(word == 0x100 + 0xFFC)
        withUnsafeMutableBytes(of: &word) { bus.read(address: 0xD000_2000, data: $0) }
        #expect(word == 0xFFFF_FFFF)
        var value: UInt16 = 0xBEEF
        withUnsafeBytes(of: &value) { bus.write(address: 0xD000_1010, data: $0) }
        #expect(b.lastWrite?.offset == 0x10 && b.lastWrite?.value == 0xBEEF)
        #expect(a.lastWrite == nil)
        #expect(bus.registeredRanges.map(\.base) == [0xD000_0000, 0xD000_1000])
    }
}

@Suite("Guest memory")
struct GuestMemoryTests {
    @Test("RAM splits around the MMIO hole and continues at 4 GiB")
    func layout() {
        #expect(GuestLayout.ramRanges(size: 256 << 20).map { "\($0.0):\($0.1)" } == ["0:\(256 << 20)"])
        let big = GuestLayout.ramRanges(size: 5 << 30)
        #expect(big.count == 2)
        #expect(big[0].0 == 0 && big[0].1 == 0xC000_0000)
        #expect(big[1].0 == 1 << 32 && big[1].1 == (5 << 30) - 0xC000_0000)
    }

    @Test("every access is bounds-checked: past the end, in the hole, straddling, overflowing")
    func boundsChecks() throws {
        let memory = try GuestMemory(size: 4 << 30)
        #expect(memory.regions.count == 2)
        #expect(memory.pointer(at: 0, count: 8) != nil)
        #expect(memory.pointer(at: 0xC000_0000 - 8, count: 8) != nil)
        #expect(memory.pointer(at: 0xC000_0000 - 4, count: 8) == nil)       // runs into the hole
        #expect(memory.pointer(at: 0xD000_0000, count: 1) == nil)           // in the hole
        #expect(memory.pointer(at: 1 << 32, count: 4096) != nil)            // high RAM
        #expect(memory.pointer(at: (1 << 32) + (1 << 30) - 1, count: 2) == nil) // past the end
        #expect(memory.pointer(at: UInt64.max - 2, count: 8) == nil)        // address + count overflows
        #expect(memory.pointer(at: 0, count: -1) == nil)
        #expect(throws: GuestMemoryError.outOfBounds(address: 0xC000_0000, count: 4)) {
            let _: UInt32 = try memory.load(at: 0xC000_0000)
        }
    }

    @Test("typed loads and stores are little-endian and unaligned-safe")
    func typedAccess() throws {
        let memory = try GuestMemory(size: 1 << 20)
        try memory.store(UInt64(0x1122_3344_5566_7788), at: 0x1001)
        #expect(try memory.readBytes(at: 0x1001, count: 8) == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11])
        #expect(try memory.load(UInt32.self, at: 0x1003) == 0x3344_5566)
        try memory.zero(at: 0x1001, count: 8)
        #expect(try memory.load(UInt64.self, at: 0x1001) == 0)
    }

    @Test("sizes that are not whole pages, too small or absurd are refused")
    func invalidSizes() {
        #expect(throws: GuestMemoryError.invalidSize(4096)) { _ = try GuestMemory(size: 4096) }
        #expect(throws: GuestMemoryError.invalidSize((1 << 20) + 1)) { _ = try GuestMemory(size: (1 << 20) + 1) }
        #expect(throws: GuestMemoryError.self) { _ = try GuestMemory(size: 1 << 50) }
    }
}
