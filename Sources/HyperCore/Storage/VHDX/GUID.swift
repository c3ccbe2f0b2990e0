/// A GUID in the Microsoft mixed-endian layout VHDX stores: Data1 (u32 LE), Data2 (u16 LE),
/// Data3 (u16 LE), Data4 (8 bytes as-is). The 16 bytes are kept exactly as on disk.
public struct GUID: Hashable, Sendable, CustomStringConvertible {
    public var bytes: [UInt8]

    public static let zero = GUID(bytes: [UInt8](repeating: 0, count: 16))

    public init(bytes: [UInt8]) {
        precondition(bytes.count == 16)
        self.bytes = bytes
    }

    init(_ buffer: [UInt8], at offset: Int) {
        self.bytes = Array(buffer[offset..<offset + 16])
    }

    /// Parses "8B7CA206-4790-4B9A-B8FE-575F050F886E", with or without braces, in any case.
    public init?(_ text: String) {
        var hex = Array(text.utf8)
        if hex.first == UInt8(ascii: "{") && hex.last == UInt8(ascii: "}") { hex = Array(hex.dropFirst().dropLast()) }
        guard hex.count == 36 else { return nil }
        for dash in [8, 13, 18, 23] where hex[dash] != UInt8(ascii: "-") { return nil }
        var nibbles: [UInt8] = []
        for (i, c) in hex.enumerated() where ![8, 13, 18, 23].contains(i) {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): nibbles.append(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): nibbles.append(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): nibbles.append(c - UInt8(ascii: "A") + 10)
            default: return nil
            }
        }
        var be = [UInt8](repeating: 0, count: 16)
        for i in 0..<16 { be[i] = nibbles[2 * i] << 4 | nibbles[2 * i + 1] }
        self.bytes = GUID.swapMixed(be)
    }

    /// Converts between the text (big-endian) order and the stored mixed-endian order; it is its own inverse.
    private static func swapMixed(_ b: [UInt8]) -> [UInt8] {
        [b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6]] + b[8..<16]
    }

    /// A random (version 4) GUID from the system's secure generator.
    public static func random() -> GUID {
        var rng = SystemRandomNumberGenerator()
        var b = [UInt8](repeating: 0, count: 16)
        for i in 0..<16 { b[i] = UInt8.random(in: 0...255, using: &rng) }
        b[7] = (b[7] & 0x0F) | 0x40   // Data3's high nibble holds the version (stored little-endian)
        b[8] = (b[8] & 0x3F) | 0x80
        return GUID(bytes: b)
    }

    public var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

    /// Lowercase, without braces: "8b7ca206-4790-4b9a-b8fe-575f050f886e".
    public var description: String {
        let be = GUID.swapMixed(bytes)
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        for (i, byte) in be.enumerated() {
            if i == 4 || i == 6 || i == 8 || i == 10 { out.append(UInt8(ascii: "-")) }
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0xF)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// "{8b7ca206-...}", the form parent locators use.
    public var braced: String { "{\(description)}" }
}

extension Array where Element == UInt8 {
    mutating func putGUID(_ guid: GUID, at offset: Int) {
        replaceSubrange(offset..<offset + 16, with: guid.bytes)
    }
}
