/// Codable to and from ``JSONValue``, without Foundation.
///
/// Snapshot state types are `Codable` structs, so the compiler writes their encoding: a stored
/// property added to a device's state is saved and restored with no further code, and one that
/// is missing from a snapshot fails the restore with the property's path.
public enum StateCoder {
    public static func encode(_ value: some Encodable) throws(StateCodingError) -> JSONValue {
        let node = EncodingNode()
        do {
            try value.encode(to: NodeEncoder(node: node, codingPath: []))
        } catch let error as StateCodingError {
            throw error
        } catch {
            throw StateCodingError(path: "", reason: "\(error)")
        }
        return node.finish()
    }

    public static func decode<T: Decodable>(_ type: T.Type, from value: JSONValue) throws(StateCodingError) -> T {
        do {
            return try T(from: NodeDecoder(value: value, codingPath: []))
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

private final class EncodingNode {
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
            elements.append(child)
            content = .array(elements)
        } else {
            content = .array([child])
        }
        return child
    }

    var count: Int { if case let .array(elements) = content { elements.count } else { 0 } }
}

private struct NodeEncoder: Encoder {
    let node: EncodingNode
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        if case .object = node.content {} else { node.content = .object([]) }
        return KeyedEncodingContainer(KeyedNodeEncoder<Key>(node: node, codingPath: codingPath))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        if case .array = node.content {} else { node.content = .array([]) }
        return UnkeyedNodeEncoder(node: node, codingPath: codingPath)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer { SingleNodeEncoder(node: node, codingPath: codingPath) }
}

/// Primitive values become JSON scalars; everything else recurses through its own `encode(to:)`.
private func encodeValue(_ value: some Encodable, into node: EncodingNode, codingPath: [any CodingKey]) throws {
    switch value {
    case let v as Bool: node.content = .value(.bool(v))
    case let v as String: node.content = .value(.string(v))
    case let v as Double: node.content = .value(.double(v))
    case let v as Float: node.content = .value(.double(Double(v)))
    case let v as Int: node.content = .value(.number(Int64(v)))
    case let v as Int8: node.content = .value(.number(Int64(v)))
    case let v as Int16: node.content = .value(.number(Int64(v)))
    case let v as Int32: node.content = .value(.number(Int64(v)))
    case let v as Int64: node.content = .value(.number(v))
    case let v as UInt: node.content = .value(unsignedJSON(UInt64(v)))
    case let v as UInt8: node.content = .value(.number(Int64(v)))
    case let v as UInt16: node.content = .value(.number(Int64(v)))
    case let v as UInt32: node.content = .value(.number(Int64(v)))
    case let v as UInt64: node.content = .value(unsignedJSON(v))
    default: try value.encode(to: NodeEncoder(node: node, codingPath: codingPath))
    }
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

private struct KeyedNodeEncoder<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let node: EncodingNode
    let codingPath: [any CodingKey]

    mutating func encodeNil(forKey key: Key) throws { node.member(key.stringValue).content = .value(.null) }
    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try encodeValue(value, into: node.member(key.stringValue), codingPath: codingPath + [key])
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type, forKey key: Key) -> KeyedEncodingContainer<NestedKey> {
        NodeEncoder(node: node.member(key.stringValue), codingPath: codingPath + [key]).container(keyedBy: keyType)
    }
    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        NodeEncoder(node: node.member(key.stringValue), codingPath: codingPath + [key]).unkeyedContainer()
    }
    mutating func superEncoder() -> any Encoder { NodeEncoder(node: node.member("super"), codingPath: codingPath) }
    mutating func superEncoder(forKey key: Key) -> any Encoder {
        NodeEncoder(node: node.member(key.stringValue), codingPath: codingPath + [key])
    }
}

private struct UnkeyedNodeEncoder: UnkeyedEncodingContainer {
    let node: EncodingNode
    let codingPath: [any CodingKey]
    var count: Int { node.count }

    mutating func encodeNil() throws { node.element().content = .value(.null) }
    mutating func encode<T: Encodable>(_ value: T) throws {
        let path = codingPath + [IndexKey(count)]
        try encodeValue(value, into: node.element(), codingPath: path)
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy keyType: NestedKey.Type) -> KeyedEncodingContainer<NestedKey> {
        NodeEncoder(node: node.element(), codingPath: codingPath + [IndexKey(count)]).container(keyedBy: keyType)
    }
    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        NodeEncoder(node: node.element(), codingPath: codingPath + [IndexKey(count)]).unkeyedContainer()
    }
    mutating func superEncoder() -> any Encoder { NodeEncoder(node: node.element(), codingPath: codingPath) }
}

private struct SingleNodeEncoder: SingleValueEncodingContainer {
    let node: EncodingNode
    let codingPath: [any CodingKey]
    mutating func encodeNil() throws { node.content = .value(.null) }
    mutating func encode<T: Encodable>(_ value: T) throws { try encodeValue(value, into: node, codingPath: codingPath) }
}

// MARK: - Decoding

private struct NodeDecoder: Decoder {
    let value: JSONValue
    let codingPath: [any CodingKey]
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        guard case let .object(members) = value else { throw StateCodingError(codingPath, "expected an object") }
        var table: [String: JSONValue] = [:]
        for (key, value) in members where table[key] == nil { table[key] = value }
        return KeyedDecodingContainer(KeyedNodeDecoder<Key>(members: table, codingPath: codingPath))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        guard case let .array(elements) = value else { throw StateCodingError(codingPath, "expected an array") }
        return UnkeyedNodeDecoder(elements: elements, codingPath: codingPath)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer { SingleNodeDecoder(value: value, codingPath: codingPath) }
}

private func decodeValue<T: Decodable>(_ type: T.Type, from value: JSONValue, codingPath: [any CodingKey]) throws -> T {
    func integer<I: FixedWidthInteger>(_: I.Type) throws -> I {
        let result: I? = switch value {
        case let .number(v): I(exactly: v)
        case let .unsignedNumber(v): I(exactly: v)
        default: nil
        }
        guard let result else { throw StateCodingError(codingPath, "expected an integer that fits \(I.self)") }
        return result
    }
    switch type {
    case is Bool.Type:
        guard case let .bool(v) = value else { throw StateCodingError(codingPath, "expected true or false") }
        return v as! T
    case is String.Type:
        guard case let .string(v) = value else { throw StateCodingError(codingPath, "expected a string") }
        return v as! T
    case is Double.Type:
        guard let v = value.doubleValue else { throw StateCodingError(codingPath, "expected a number") }
        return v as! T
    case is Float.Type:
        guard let v = value.doubleValue else { throw StateCodingError(codingPath, "expected a number") }
        return Float(v) as! T
    case is Int.Type: return try integer(Int.self) as! T
    case is Int8.Type: return try integer(Int8.self) as! T
    case is Int16.Type: return try integer(Int16.self) as! T
    case is Int32.Type: return try integer(Int32.self) as! T
    case is Int64.Type: return try integer(Int64.self) as! T
    case is UInt.Type: return try integer(UInt.self) as! T
    case is UInt8.Type: return try integer(UInt8.self) as! T
    case is UInt16.Type: return try integer(UInt16.self) as! T
    case is UInt32.Type: return try integer(UInt32.self) as! T
    case is UInt64.Type: return try integer(UInt64.self) as! T
    default: return try T(from: NodeDecoder(value: value, codingPath: codingPath))
    }
}

private struct KeyedNodeDecoder<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let members: [String: JSONValue]
    let codingPath: [any CodingKey]

    var allKeys: [Key] { members.keys.compactMap { Key(stringValue: $0) } }
    func contains(_ key: Key) -> Bool { members[key.stringValue] != nil }

    private func member(_ key: Key) throws -> JSONValue {
        guard let value = members[key.stringValue] else { throw StateCodingError(codingPath + [key], "missing") }
        return value
    }

    func decodeNil(forKey key: Key) throws -> Bool { try member(key) == .null }
    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try decodeValue(type, from: try member(key), codingPath: codingPath + [key])
    }
    func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
        try NodeDecoder(value: try member(key), codingPath: codingPath + [key]).container(keyedBy: type)
    }
    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        try NodeDecoder(value: try member(key), codingPath: codingPath + [key]).unkeyedContainer()
    }
    func superDecoder() throws -> any Decoder { NodeDecoder(value: members["super"] ?? .null, codingPath: codingPath) }
    func superDecoder(forKey key: Key) throws -> any Decoder { NodeDecoder(value: try member(key), codingPath: codingPath + [key]) }
}

private struct UnkeyedNodeDecoder: UnkeyedDecodingContainer {
    let elements: [JSONValue]
    let codingPath: [any CodingKey]
    var currentIndex = 0
    var count: Int? { elements.count }
    var isAtEnd: Bool { currentIndex >= elements.count }

    private mutating func next() throws -> (JSONValue, [any CodingKey]) {
        let path = codingPath + [IndexKey(currentIndex)]
        guard !isAtEnd else { throw StateCodingError(path, "missing (the array is too short)") }
        defer { currentIndex += 1 }
        return (elements[currentIndex], path)
    }

    mutating func decodeNil() throws -> Bool {
        guard !isAtEnd, elements[currentIndex] == .null else { return false }
        currentIndex += 1
        return true
    }
    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        let (value, path) = try next()
        return try decodeValue(type, from: value, codingPath: path)
    }
    mutating func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type) throws -> KeyedDecodingContainer<NestedKey> {
        let (value, path) = try next()
        return try NodeDecoder(value: value, codingPath: path).container(keyedBy: type)
    }
    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        let (value, path) = try next()
        return try NodeDecoder(value: value, codingPath: path).unkeyedContainer()
    }
    mutating func superDecoder() throws -> any Decoder {
        let (value, path) = try next()
        return NodeDecoder(value: value, codingPath: path)
    }
}

private struct SingleNodeDecoder: SingleValueDecodingContainer {
    let value: JSONValue
    let codingPath: [any CodingKey]
    func decodeNil() -> Bool { value == .null }
    func decode<T: Decodable>(_ type: T.Type) throws -> T { try decodeValue(type, from: value, codingPath: codingPath) }
}
