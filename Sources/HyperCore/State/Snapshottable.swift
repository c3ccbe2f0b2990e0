/// A part of the machine whose guest-visible state a snapshot carries.
///
/// Every bus device, PCI function and virtio device model conforms (the protocols that describe
/// them inherit this one, with no default implementation), so a new device cannot compile until it
/// says what its state is, even if that is ``DeviceState/stateless``. State types are `Codable`
/// structs: the compiler writes their encoding, so a field added to one is saved without more code.
///
/// `saveState` runs on a paused machine (no vCPU in `KVM_RUN`, no virtio request in flight);
/// `restoreState` runs on a freshly assembled machine of the same configuration before any vCPU
/// runs, and re-drives the device's interrupt lines to the levels it saved.
public protocol Snapshottable: AnyObject {
    func saveState() throws(SnapshotError) -> DeviceState
    func restoreState(_ state: DeviceState) throws(SnapshotError)
}

/// One device's saved state: a ``JSONValue`` produced from the device's `Codable` state type.
public struct DeviceState: Sendable, Equatable, Codable {
    public var value: JSONValue

    public init(value: JSONValue) { self.value = value }

    /// For devices with no state a guest can observe (each says why where it uses this).
    public static let stateless = DeviceState(value: .null)

    public init(_ typed: some Encodable) throws(SnapshotError) {
        do throws(StateCodingError) { value = try StateCoder.encode(typed) } catch {
            throw .invalidState("cannot encode: \(error)")
        }
    }

    public func decode<T: Decodable>(_ type: T.Type, device: String) throws(SnapshotError) -> T {
        do throws(StateCodingError) { return try StateCoder.decode(type, from: value) } catch {
            throw .invalidState("\(device): \(error)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(RawJSON(value: value))
    }

    public init(from decoder: any Decoder) throws {
        value = try decoder.singleValueContainer().decode(RawJSON.self).value
    }
}

/// Carries a ``JSONValue`` through ``StateCoder`` unchanged.
struct RawJSON: Codable {
    let value: JSONValue
    init(value: JSONValue) { self.value = value }

    init(from decoder: any Decoder) throws {
        // Through StateCoder (every snapshot and migration) the value is already a JSONValue.
        if let node = decoder as? NodeDecoder {
            value = node.value
            return
        }
        if let container = try? decoder.container(keyedBy: AnyKey.self) {
            var members: [(String, JSONValue)] = []
            for key in container.allKeys.sorted(by: { $0.stringValue < $1.stringValue }) {
                members.append((key.stringValue, try container.decode(RawJSON.self, forKey: key).value))
            }
            value = .object(members)
        } else if var container = try? decoder.unkeyedContainer() {
            var elements: [JSONValue] = []
            while !container.isAtEnd { elements.append(try container.decode(RawJSON.self).value) }
            value = .array(elements)
        } else {
            let single = try decoder.singleValueContainer()
            if single.decodeNil() { value = .null }
            else if let bool = try? single.decode(Bool.self) { value = .bool(bool) }
            else if let int = try? single.decode(Int64.self) { value = .number(int) }
            else if let uint = try? single.decode(UInt64.self) { value = .unsignedNumber(uint) }
            else if let double = try? single.decode(Double.self) { value = .double(double) }
            else { value = .string(try single.decode(String.self)) }
        }
    }

    func encode(to encoder: any Encoder) throws {
        if let node = encoder as? NodeEncoder {
            node.node.content = .value(value)
            return
        }
        switch value {
        case .null:
            var container = encoder.singleValueContainer()
            try container.encodeNil()
        case let .bool(v):
            var container = encoder.singleValueContainer()
            try container.encode(v)
        case let .number(v):
            var container = encoder.singleValueContainer()
            try container.encode(v)
        case let .unsignedNumber(v):
            var container = encoder.singleValueContainer()
            try container.encode(v)
        case let .double(v):
            var container = encoder.singleValueContainer()
            try container.encode(v)
        case let .string(v):
            var container = encoder.singleValueContainer()
            try container.encode(v)
        case let .array(elements):
            var container = encoder.unkeyedContainer()
            for element in elements { try container.encode(RawJSON(value: element)) }
        case let .object(members):
            var container = encoder.container(keyedBy: AnyKey.self)
            for (key, member) in members { try container.encode(RawJSON(value: member), forKey: AnyKey(key)) }
        }
    }

    struct AnyKey: CodingKey {
        let stringValue: String
        var intValue: Int? { nil }
        init(_ string: String) { stringValue = string }
        init?(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { return nil }
    }
}

/// Why a snapshot could not be taken, read or restored. Messages name the file and the problem.
public enum SnapshotError: Error, Sendable, CustomStringConvertible {
    /// The operation needs another machine state ("the machine must be paused").
    case wrongState(String)
    case io(path: String, operation: String, errno: Int32)
    case notASnapshot(path: String, reason: String)
    case unsupportedVersion(path: String, found: UInt32, supported: UInt32)
    case corrupt(path: String, detail: String)
    /// The snapshot does not fit what the restore asks for (vCPUs, memory, devices).
    case mismatch(String)
    /// A disk differs from the one the snapshot was taken with, or is gone.
    case diskChanged(path: String, detail: String)
    /// A device's state does not fit the device.
    case invalidState(String)
    case kvm(KVMError)
    case machine(String)

    public var description: String {
        switch self {
        case let .wrongState(message): message
        case let .io(path, operation, errno): "\(path): \(operation) failed: \(SystemError.describe(errno))"
        case let .notASnapshot(path, reason): "\(path) is not a HyperCore snapshot: \(reason)"
        case let .unsupportedVersion(path, found, supported):
            "\(path) has snapshot format \(found); this hvrun reads format \(supported) — restore it with the hvrun that wrote it"
        case let .corrupt(path, detail): "\(path) is corrupt: \(detail); the snapshot cannot be restored"
        case let .mismatch(message): message
        case let .diskChanged(path, detail): "disk \(path) \(detail); restoring would show the guest a disk that does not match its memory"
        case let .invalidState(message): "invalid device state: \(message)"
        case let .kvm(error): error.description
        case let .machine(message): message
        }
    }
}
