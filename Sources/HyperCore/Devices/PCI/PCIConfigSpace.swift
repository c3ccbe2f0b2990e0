/// A memory BAR as the VMM declares it.
public struct PCIBar: Sendable, Equatable {
    public enum Kind: Sendable, Equatable { case memory32, memory64 }
    public let kind: Kind
    /// Size in bytes: a power of two, at least 4 KiB (so BARs stay page-granular for KVM slots and ioeventfds).
    public let size: UInt64
    public init(kind: Kind, size: UInt64) {
        precondition(size >= 0x1000 && size & (size - 1) == 0, "a BAR size is a power of two ≥ 4 KiB")
        self.kind = kind
        self.size = size
    }
}

/// A type-0 PCI configuration space (256 bytes): identity, command/status, BARs with size
/// probing, interrupt line/pin and a capability list. Per-byte write masks decide what the guest
/// can change; BARs get their own handling because their writable bits depend on their size.
///
/// Not thread-safe: the owning device serialises access.
public struct PCIConfigSpace: Sendable {
    public static let commandIO: UInt16 = 1 << 0
    public static let commandMemory: UInt16 = 1 << 1
    public static let commandBusMaster: UInt16 = 1 << 2
    public static let commandINTxDisable: UInt16 = 1 << 10
    static let statusCapabilities: UInt16 = 1 << 4

    public private(set) var bytes = [UInt8](repeating: 0, count: 256)
    private var writable = [UInt8](repeating: 0, count: 256)
    public private(set) var bars: [PCIBar?] = Array(repeating: nil, count: 6)
    private var lastCapability: Int?
    private var nextCapabilityOffset = 0x40

    public init(vendor: UInt16, device: UInt16, revision: UInt8, classCode: UInt32,
                subsystemVendor: UInt16 = 0, subsystem: UInt16 = 0, interruptPin: UInt8 = 0) {
        set16(0x00, vendor)
        set16(0x02, device)
        bytes[0x08] = revision
        bytes[0x09] = UInt8(truncatingIfNeeded: classCode)
        bytes[0x0A] = UInt8(truncatingIfNeeded: classCode >> 8)
        bytes[0x0B] = UInt8(truncatingIfNeeded: classCode >> 16)
        set16(0x2C, subsystemVendor)
        set16(0x2E, subsystem)
        bytes[0x3D] = interruptPin
        // Command: I/O, memory, bus master, INTx disable are the guest's to change.
        writable[0x04] = UInt8(Self.commandIO | Self.commandMemory | Self.commandBusMaster)
        writable[0x05] = UInt8(Self.commandINTxDisable >> 8)
        writable[0x0C] = 0xFF        // cache line size
        writable[0x0D] = 0xFF        // latency timer
        writable[0x3C] = 0xFF        // interrupt line (scratch for the OS)
    }

    // MARK: Building

    mutating func set16(_ offset: Int, _ value: UInt16) {
        bytes[offset] = UInt8(truncatingIfNeeded: value)
        bytes[offset + 1] = UInt8(truncatingIfNeeded: value >> 8)
    }

    mutating func set32(_ offset: Int, _ value: UInt32) {
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }

    func get16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
    func get32(_ offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
    }

    /// Declares BAR `index` at guest-physical `address` (the VMM's placement; the guest may move it).
    public mutating func setBar(_ index: Int, _ bar: PCIBar, address: UInt64) {
        precondition(index >= 0 && index < 6 && (bar.kind == .memory32 || index < 5))
        precondition(address % bar.size == 0, "a BAR is naturally aligned")
        bars[index] = bar
        switch bar.kind {
        case .memory32:
            set32(0x10 + 4 * index, UInt32(truncatingIfNeeded: address))
        case .memory64:
            set32(0x10 + 4 * index, UInt32(truncatingIfNeeded: address) | 0x4)  // type 10b: 64-bit
            set32(0x14 + 4 * index, UInt32(truncatingIfNeeded: address >> 32))
        }
    }

    /// Appends a capability (`body` starts with the capability ID; the next pointer is filled in).
    /// `writableMask` has one entry per byte of `body`. Returns the capability's offset.
    @discardableResult
    public mutating func addCapability(_ body: [UInt8], writableMask: [UInt8]? = nil) -> Int {
        let offset = nextCapabilityOffset
        precondition(offset + body.count <= 256 && body.count >= 2)
        for (i, byte) in body.enumerated() { bytes[offset + i] = byte }
        if let writableMask { for (i, mask) in writableMask.enumerated() { writable[offset + i] = mask } }
        bytes[offset + 1] = 0
        if let last = lastCapability { bytes[last + 1] = UInt8(offset) } else { bytes[0x34] = UInt8(offset) }
        lastCapability = offset
        set16(0x06, get16(0x06) | Self.statusCapabilities)
        nextCapabilityOffset = (offset + body.count + 3) & ~3
        return offset
    }

    // MARK: Snapshot

    /// What the guest can change is all in `bytes` (BAR addresses, command, capability registers);
    /// the write masks and BAR sizes come from construction, so a restore checks them unchanged.
    struct State: Codable, Equatable {
        var bytes: HexBytes
    }

    var state: State { State(bytes: HexBytes(bytes)) }

    /// Takes the saved bytes. Read-only bytes (identity, capability layout) must match: a
    /// snapshot of another device type or layout is refused.
    mutating func restore(_ state: State, device: String) throws(SnapshotError) {
        let saved = state.bytes.bytes
        guard saved.count == 256 else { throw .invalidState("\(device): configuration space of \(saved.count) bytes") }
        for offset in 0..<256 where offset < 0x10 || offset >= 0x28 {
            let fixed = ~writable[offset]
            guard saved[offset] & fixed == bytes[offset] & fixed || offset == 0x06 || offset == 0x07 else {
                throw .invalidState("\(device): configuration byte 0x\(String(offset, radix: 16)) is 0x\(String(saved[offset], radix: 16)) in the snapshot, 0x\(String(bytes[offset], radix: 16)) here (another device?)")
            }
        }
        bytes = saved
    }

    // MARK: Guest access

    public var command: UInt16 { get16(0x04) }
    public var memoryEnabled: Bool { command & Self.commandMemory != 0 }

    /// The address BAR `index` decodes at (whether or not memory decoding is on).
    public func barAddress(_ index: Int) -> UInt64? {
        guard let bar = bars[index] else { return nil }
        let low = UInt64(get32(0x10 + 4 * index) & ~0xF)
        switch bar.kind {
        case .memory32: return low
        case .memory64: return low | UInt64(get32(0x14 + 4 * index)) << 32
        }
    }

    /// Reads `data.count` bytes (1, 2 or 4) at `offset`. Out-of-range bytes read as 0xFF.
    public func read(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count {
            data[i] = offset + i < 256 ? bytes[offset + i] : 0xFF
        }
    }

    /// Writes bytes at `offset`; returns the BAR indices whose address changed.
    @discardableResult
    public mutating func write(offset: Int, from data: UnsafeRawBufferPointer) -> [Int] {
        if offset >= 0x10 && offset < 0x28 {
            return writeBar(offset: offset, data: data)
        }
        for i in 0..<data.count where offset + i < 256 {
            let mask = writable[offset + i]
            bytes[offset + i] = (bytes[offset + i] & ~mask) | (data[i] & mask)
        }
        return []
    }

    /// BAR registers: the low bits below the size are read-only zeroes (that is how a guest probes
    /// the size: write all ones, read back), and the type bits never change.
    private mutating func writeBar(offset: Int, data: UnsafeRawBufferPointer) -> [Int] {
        let register = (offset - 0x10) / 4
        // Which BAR owns this register: itself, or the 64-bit BAR below whose upper half it is.
        var index = register
        var upper = false
        if bars[register] == nil, register > 0, let below = bars[register - 1], below.kind == .memory64 {
            index = register - 1
            upper = true
        }
        guard let bar = bars[index] else { return [] }
        let before = barAddress(index)
        let base = 0x10 + 4 * register
        var value = get32(base)
        for i in 0..<data.count where offset + i < base + 4 {
            let shift = UInt32(8 * (offset + i - base))
            value = (value & ~(0xFF << shift)) | UInt32(data[i]) << shift
        }
        if upper {
            // Sizes below 4 GiB leave the whole upper half writable.
            let mask = UInt32(truncatingIfNeeded: ~(bar.size - 1) >> 32)
            set32(base, value & mask)
        } else {
            let typeBits: UInt32 = bar.kind == .memory64 ? 0x4 : 0x0
            let mask = UInt32(truncatingIfNeeded: ~(bar.size - 1)) & ~0xF
            set32(base, (value & mask) | typeBits)
        }
        return barAddress(index) != before ? [index] : []
    }
}
