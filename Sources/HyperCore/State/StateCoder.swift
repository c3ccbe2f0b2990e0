/// Codable to and from ``JSONValue``, without Foundation.
///
/// Snapshot state types are `Codable` structs, so the compiler writes their encoding: a stored
/// property added to a device's state is saved and restored with no further code, and one that
/// is missing from a snapshot fails the restore with the property's path.
public enum StateCoder {
    public static func encode(_ value: some Encodable) throws(StateCodingError) -> JSONValue {
        let node = EncodingNode()
        do {
            try value.encode(to: NodeEncoder(node: node, link: nil))
        } catch let error as StateCodingError {
            throw error
        } catch {
            throw StateCodingError(path: "", reason: "\(error)")
        }
        return node.finish()
    }

    public static func decode<T: Decodable>(_ type: T.Type, from value: JSONValue) throws(StateCodingError) -> T {
        do {
            return try T(from: NodeDecoder(value: value, link: nil))
        } catch let error as StateCodingError {
            throw error
        } catch {
            throw StateCodingError(path: "", reason: "\(error)")
        }
    }
}

/// A value did not fit its type: `path` names the field (`vcpus.1.lapic`).
public struct StateCodingError: Error, Sendable, Equatable, CustomStringConvertible {
    public let path: String
    public let reason: String
    init(path: String, reason: String) {
        self.path = path
        self.reason = reason
    }
    init(_ codingPath: [any CodingKey], _ reason: String) {
        path = codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        self.reason = reason
    }
    public var description: String { path.isEmpty ? reason : "\(path): \(reason)" }
}

/// Bytes that KVM hands out as fixed-size structs (LAPIC, XSAVE, irqchip …): a hex string in the
/// state, so the file stays text and a length change is caught on restore.
public struct HexBytes: Codable, Sendable, Equatable {
    public var bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public func encode(to encoder: any Encoder) throws {
        let digits = Array("0123456789abcdef".utf8)
        var text = [UInt8]()
        text.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0xF)])
        }
        var container = encoder.singleValueContainer()
        try container.encode(String(decoding: text, as: UTF8.self))
    }

    public init(from decoder: any Decoder) throws {
        let text = Array(try decoder.singleValueContainer().decode(String.self).utf8)
        guard text.count % 2 == 0 else { throw StateCodingError(decoder.codingPath, "odd number of hex digits") }
        func nibble(_ c: UInt8) throws -> UInt8 {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
            default: throw StateCodingError(decoder.codingPath, "not a hex digit")
            }
        }
        var bytes = [UInt8]()
        bytes.reserveCapacity(text.count / 2)
        var index = 0
        while index < text.count {
            bytes.append(try nibble(text[index]) << 4 | nibble(text[index + 1]))
            index += 2
        }
        self.bytes = bytes
    }
}

// MARK: - Encoding

final class EncodingNode {
    enum Content {
        case empty
        case value(JSONValue)
        case object([(String, EncodingNode)])
        case array([EncodingNode])
    }
    var content: Content = .empty

    func finish() -> JSONValue {
        switch content {
        case .empty: .null
        case let .value(value): value
        case let .object(members): .object(members.map { ($0.0, $0.1.finish()) })
        case let .array(elements): .array(elements.map { $0.finish() })
        }
    }

    func member(_ key: String) -> EncodingNode {
        let child = EncodingNode()
        if case var .object(members) = content {
            content = .empty   // the array is now uniquely referenced: the append does not copy it
            members.append((key, child))
            content = .object(members)
        } else {
            content = .object([(key, child)])
        }
        return child
    }

    func element() -> EncodingNode {
        let child = EncodingNode()
        if case var .array(elements) = content {
            content = .empty
            elements.append(child)
            content = .array(elements)
        } else {
            content = .array([child])
        }
        return child
    }

    var count: Int { if case let .array(elements) = content { elements.count } else { 0 } }
}

/// Internal (not private) so that ``RawJSON`` can hand its value over as it is.
struct NodeEncoder: Encoder {
    let node: EncodingNode
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        if case .object = node.content {} else { node.content = .object([]) }
        return KeyedEncodingContainer(KeyedNodeEncoder<Key>(node: node, link: link))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        if case .array = node.content {} else { node.content = .array([]) }
        return UnkeyedNodeEncoder(node: node, link: link)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer { SingleNodeEncoder(node: node, link: link) }
}

private func unsignedJSON(_ value: UInt64) -> JSONValue {
    value <= UInt64(Int64.max) ? .number(Int64(value)) : .unsignedNumber(value)
}

private struct IndexKey: CodingKey {
    let intValue: Int?
    let stringValue: String
    init(_ index: Int) { intValue = index; stringValue = String(index) }
    init?(stringValue: String) { return nil }
    init?(intValue: Int) { self.init(intValue) }
}

/// Primitives become JSON scalars through the containers' concrete overloads; everything else
/// recurses through its own `encode(to:)`.
private struct KeyedNodeEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let node: EncodingNode
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }

    private func set(_ value: JSONValue, _ key: Key) { node.member(key.stringValue).content = .value(value) }
    mutating func encodeNil(forKey key: Key) throws { set(.null, key) }
    mutating func encode(_ value: Bool, forKey key: Key) throws { set(.bool(value), key) }
    mutating func encode(_ value: String, forKey key: Key) throws { set(.string(value), key) }
    mutating func encode(_ value: Double, forKey key: Key) throws { set(.double(value), key) }
    mutating func encode(_ value: Float, forKey key: Key) throws { set(.double(Double(value)), key) }
    mutating func encode(_ value: Int, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { set(.number(value), key) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { set(unsignedJSON(UInt64(value)), key) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { set(.number(Int64(value)), key) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { set(unsignedJSON(value), key) }
    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try value.encode(to: NodeEncoder(node: node.member(key.stringValue), link: CodingPathLink(parent: link, key: key)))
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        NodeEncoder(node: node.member(key.stringValue), link: CodingPathLink(parent: link, key: key)).container(keyedBy: keyType)
    }
    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        NodeEncoder(node: node.member(key.stringValue), link: CodingPathLink(parent: link, key: key)).unkeyedContainer()
    }
    mutating func superEncoder() -> any Encoder { NodeEncoder(node: node.member("super"), link: link) }
    mutating func superEncoder(forKey key: Key) -> any Encoder {
        NodeEncoder(node: node.member(key.stringValue), link: CodingPathLink(parent: link, key: key))
    }
}

private struct UnkeyedNodeEncoder: UnkeyedEncodingContainer {
    let node: EncodingNode
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }
    var count: Int { node.count }

    private func next() -> NodeEncoder { NodeEncoder(node: node.element(), link: CodingPathLink(parent: link, key: IndexKey(count))) }
    mutating func encodeNil() throws { node.element().content = .value(.null) }
    mutating func encode<T: Encodable>(_ value: T) throws { try value.encode(to: next()) }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        next().container(keyedBy: keyType)
    }
    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer { next().unkeyedContainer() }
    mutating func superEncoder() -> any Encoder { NodeEncoder(node: node.element(), link: link) }
}

private struct SingleNodeEncoder: SingleValueEncodingContainer {
    let node: EncodingNode
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }
    mutating func encodeNil() throws { node.content = .value(.null) }
    mutating func encode(_ value: Bool) throws { node.content = .value(.bool(value)) }
    mutating func encode(_ value: String) throws { node.content = .value(.string(value)) }
    mutating func encode(_ value: Double) throws { node.content = .value(.double(value)) }
    mutating func encode(_ value: Float) throws { node.content = .value(.double(Double(value))) }
    mutating func encode(_ value: Int) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: Int8) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: Int16) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: Int32) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: Int64) throws { node.content = .value(.number(value)) }
    mutating func encode(_ value: UInt) throws { node.content = .value(unsignedJSON(UInt64(value))) }
    mutating func encode(_ value: UInt8) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: UInt16) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: UInt32) throws { node.content = .value(.number(Int64(value))) }
    mutating func encode(_ value: UInt64) throws { node.content = .value(unsignedJSON(value)) }
    mutating func encode<T: Encodable>(_ value: T) throws { try value.encode(to: NodeEncoder(node: node, link: link)) }
}

// MARK: - Decoding
//
// Restores and migrations decode a state on their critical path, so this side avoids what
// makes generic decoders slow: primitives go through the containers' concrete overloads (no
// dynamic casts), objects are searched in place (no dictionary per struct), and the coding path
// is a chain of links turned into an array only for an error message.

/// One step of a coding path; the array form is built only when an error names the path.
final class CodingPathLink {
    let parent: CodingPathLink?
    let key: any CodingKey
    init(parent: CodingPathLink?, key: any CodingKey) {
        self.parent = parent
        self.key = key
    }

    static func path(_ link: CodingPathLink?, _ last: (any CodingKey)? = nil) -> [any CodingKey] {
        var keys: [any CodingKey] = last.map { [$0] } ?? []
        var current = link
        while let step = current {
            keys.append(step.key)
            current = step.parent
        }
        return keys.reversed()
    }
}

/// Internal (not private) so that ``RawJSON`` can take its value as it is.
struct NodeDecoder: Decoder {
    let value: JSONValue
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case let .object(members) = value else { throw StateCodingError(codingPath, "expected an object") }
        return KeyedDecodingContainer(KeyedNodeDecoder<Key>(members: members, link: link))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        guard case let .array(elements) = value else { throw StateCodingError(codingPath, "expected an array") }
        return UnkeyedNodeDecoder(elements: elements, link: link)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { SingleNodeDecoder(value: value, link: link) }
}

/// The scalar decodings every container shares; `path` is called only to report an error.
private enum Scalar {
    static func integer<I: FixedWidthInteger>(_: I.Type, _ value: JSONValue, _ path: () -> [any CodingKey]) throws -> I {
        let result: I? = switch value {
        case let .number(v): I(exactly: v)
        case let .unsignedNumber(v): I(exactly: v)
        default: nil
        }
        guard let result else { throw StateCodingError(path(), "expected an integer that fits \(I.self)") }
        return result
    }

    static func bool(_ value: JSONValue, _ path: () -> [any CodingKey]) throws -> Bool {
        guard case let .bool(v) = value else { throw StateCodingError(path(), "expected true or false") }
        return v
    }

    static func string(_ value: JSONValue, _ path: () -> [any CodingKey]) throws -> String {
        guard case let .string(v) = value else { throw StateCodingError(path(), "expected a string") }
        return v
    }

    static func double(_ value: JSONValue, _ path: () -> [any CodingKey]) throws -> Double {
        guard let v = value.doubleValue else { throw StateCodingError(path(), "expected a number") }
        return v
    }
}

private struct KeyedNodeDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let members: [(String, JSONValue)]
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }

    var allKeys: [Key] { members.compactMap { Key(stringValue: $0.0) } }
    func contains(_ key: Key) -> Bool { find(key) != nil }

    /// The first member named `key` (state objects are small: a scan beats hashing every name).
    private func find(_ key: Key) -> JSONValue? {
        let name = key.stringValue
        for (memberName, value) in members where memberName == name { return value }
        return nil
    }

    private func member(_ key: Key) throws -> JSONValue {
        guard let value = find(key) else { throw StateCodingError(CodingPathLink.path(link, key), "missing") }
        return value
    }

    private func child(_ key: Key) -> CodingPathLink { CodingPathLink(parent: link, key: key) }

    func decodeNil(forKey key: Key) throws -> Bool { try member(key) == .null }
    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool { try Scalar.bool(member(key)) { CodingPathLink.path(link, key) } }
    func decode(_ type: String.Type, forKey key: Key) throws -> String { try Scalar.string(member(key)) { CodingPathLink.path(link, key) } }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double { try Scalar.double(member(key)) { CodingPathLink.path(link, key) } }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float { Float(try Scalar.double(member(key)) { CodingPathLink.path(link, key) }) }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int { try integer(type, key) }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 { try integer(type, key) }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 { try integer(type, key) }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 { try integer(type, key) }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 { try integer(type, key) }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt { try integer(type, key) }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 { try integer(type, key) }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 { try integer(type, key) }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 { try integer(type, key) }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 { try integer(type, key) }
    private func integer<I: FixedWidthInteger>(_ type: I.Type, _ key: Key) throws -> I {
        try Scalar.integer(type, member(key)) { CodingPathLink.path(link, key) }
    }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try T(from: NodeDecoder(value: try member(key), link: child(key)))
    }
    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        try NodeDecoder(value: try member(key), link: child(key)).container(keyedBy: type)
    }
    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        try NodeDecoder(value: try member(key), link: child(key)).unkeyedContainer()
    }
    func superDecoder() throws -> any Decoder {
        NodeDecoder(value: members.first { $0.0 == "super" }?.1 ?? .null, link: link)
    }
    func superDecoder(forKey key: Key) throws -> any Decoder { NodeDecoder(value: try member(key), link: child(key)) }
}

private struct UnkeyedNodeDecoder: UnkeyedDecodingContainer {
    let elements: [JSONValue]
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }
    var currentIndex = 0
    var count: Int? { elements.count }
    var isAtEnd: Bool { currentIndex >= elements.count }

    private mutating func next() throws -> (JSONValue, CodingPathLink) {
        let step = CodingPathLink(parent: link, key: IndexKey(currentIndex))
        guard !isAtEnd else { throw StateCodingError(CodingPathLink.path(step), "missing (the array is too short)") }
        defer { currentIndex += 1 }
        return (elements[currentIndex], step)
    }

    mutating func decodeNil() throws -> Bool {
        guard !isAtEnd, elements[currentIndex] == .null else { return false }
        currentIndex += 1
        return true
    }
    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        let (value, step) = try next()
        return try T(from: NodeDecoder(value: value, link: step))
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        let (value, step) = try next()
        return try NodeDecoder(value: value, link: step).container(keyedBy: type)
    }
    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let (value, step) = try next()
        return try NodeDecoder(value: value, link: step).unkeyedContainer()
    }
    mutating func superDecoder() throws -> any Decoder {
        let (value, step) = try next()
        return NodeDecoder(value: value, link: step)
    }
}

private struct SingleNodeDecoder: SingleValueDecodingContainer {
    let value: JSONValue
    let link: CodingPathLink?
    var codingPath: [any CodingKey] { CodingPathLink.path(link) }
    func decodeNil() -> Bool { value == .null }
    func decode(_ type: Bool.Type) throws -> Bool { try Scalar.bool(value) { codingPath } }
    func decode(_ type: String.Type) throws -> String { try Scalar.string(value) { codingPath } }
    func decode(_ type: Double.Type) throws -> Double { try Scalar.double(value) { codingPath } }
    func decode(_ type: Float.Type) throws -> Float { Float(try Scalar.double(value) { codingPath }) }
    func decode(_ type: Int.Type) throws -> Int { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: Int8.Type) throws -> Int8 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: Int16.Type) throws -> Int16 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: Int32.Type) throws -> Int32 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: Int64.Type) throws -> Int64 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: UInt.Type) throws -> UInt { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: UInt8.Type) throws -> UInt8 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: UInt16.Type) throws -> UInt16 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: UInt32.Type) throws -> UInt32 { try Scalar.integer(type, value) { codingPath } }
    func decode(_ type: UInt64.Type) throws -> UInt64 { try Scalar.integer(type, value) { codingPath } }
    func decode<T: Decodable>(_ type: T.Type) throws -> T { try T(from: NodeDecoder(value: value, link: link)) }
}
