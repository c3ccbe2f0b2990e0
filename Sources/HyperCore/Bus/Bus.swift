/// A device that answers guest loads and stores on a bus (port I/O or MMIO).
///
/// `offset` is relative to the start of the range the device was registered at, so one device
/// type works at any base address. `data.count` is the access width (1, 2, 4 or 8 bytes; string
/// I/O arrives one element at a time). Calls come from vCPU threads, possibly several at once:
/// a device guards its own state.
public protocol BusDevice: Snapshottable, Sendable {
    /// A guest load: fill `data` (little-endian). Bytes left untouched read as written by the bus (0xFF).
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer)
    /// A guest store of `data` (little-endian).
    func write(offset: UInt64, data: UnsafeRawBufferPointer)
}

/// A half-open address range on a bus.
public struct BusRange: Sendable, Equatable, CustomStringConvertible {
    public let base: UInt64
    public let size: UInt64

    public init(base: UInt64, size: UInt64) {
        self.base = base
        self.size = size
    }

    public var end: UInt64 { base &+ size }
    public func overlaps(_ other: BusRange) -> Bool { base < other.end && other.base < end }
    public var description: String { "0x\(String(base, radix: 16))–0x\(String(end &- 1, radix: 16))" }
}

public enum BusError: Error, Equatable, Sendable, CustomStringConvertible {
    case overlap(bus: String, new: BusRange, existing: BusRange)
    case emptyRange(bus: String, BusRange)

    public var description: String {
        switch self {
        case let .overlap(bus, new, existing):
            return "\(bus) range \(new) overlaps the device already registered at \(existing)"
        case let .emptyRange(bus, range):
            return "\(bus) range at 0x\(String(range.base, radix: 16)) has size \(range.size)"
        }
    }
}

/// Maps address ranges to devices. Filled while the machine is assembled, then frozen: a lookup
/// on the exit path is a binary search over an immutable sorted array, with no lock and no allocation.
public final class Bus: Sendable {
    public let name: String
    private let entries: [(range: BusRange, device: any BusDevice)]

    fileprivate init(name: String, entries: [(range: BusRange, device: any BusDevice)]) {
        self.name = name
        self.entries = entries.sorted { $0.range.base < $1.range.base }
    }

    /// The device covering `address` and the offset into its range.
    @inline(__always)
    public func device(at address: UInt64) -> (device: any BusDevice, offset: UInt64)? {
        var low = 0
        var high = entries.count
        while low < high {
            let mid = (low + high) / 2
            let range = entries[mid].range
            if address < range.base { high = mid }
            else if address >= range.end { low = mid + 1 }
            else { return (entries[mid].device, address - range.base) }
        }
        return nil
    }

    /// Dispatches a load. Unclaimed addresses read as all ones, as an open bus does on a PC.
    @inline(__always)
    public func read(address: UInt64, data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0xFF)
        guard let (device, offset) = device(at: address) else { return }
        device.read(offset: offset, data: data)
    }

    /// Dispatches a store. Stores to unclaimed addresses are dropped.
    @inline(__always)
    public func write(address: UInt64, data: UnsafeRawBufferPointer) {
        guard let (device, offset) = device(at: address) else { return }
        device.write(offset: offset, data: data)
    }

    public var registeredRanges: [BusRange] { entries.map(\.range) }

    /// Every device with its range, in address order (what a snapshot walks).
    public var registeredDevices: [(range: BusRange, device: any BusDevice)] { entries }
}

/// Collects registrations and rejects overlaps; ``build()`` freezes them into a ``Bus``.
public struct BusBuilder: Sendable {
    public let name: String
    private var entries: [(range: BusRange, device: any BusDevice)] = []

    public init(name: String) { self.name = name }

    public mutating func register(_ device: any BusDevice, at base: UInt64, size: UInt64) throws(BusError) {
        let range = BusRange(base: base, size: size)
        guard size > 0, base.addingReportingOverflow(size).overflow == false else {
            throw .emptyRange(bus: name, range)
        }
        if let clash = entries.first(where: { $0.range.overlaps(range) }) {
            throw .overlap(bus: name, new: range, existing: clash.range)
        }
        entries.append((range, device))
    }

    public func build() -> Bus { Bus(name: name, entries: entries) }
}

extension UnsafeRawBufferPointer {
    /// The access value as an unsigned integer (little-endian, zero-extended).
    @inline(__always)
    public var littleEndianValue: UInt64 {
        var value: UInt64 = 0
        for i in 0..<Swift.min(count, 8) { value |= UInt64(self[i]) << (8 * UInt64(i)) }
        return value
    }
}

extension UnsafeMutableRawBufferPointer {
    /// Stores the low `count` bytes of `value` (little-endian).
    @inline(__always)
    public func storeLittleEndian(_ value: UInt64) {
        for i in 0..<Swift.min(count, 8) { self[i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }
}
