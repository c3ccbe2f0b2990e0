#if canImport(Glibc)
internal import Glibc
#endif

/// An Ethernet MAC address, written `52:54:00:12:34:56` (the store's `vm.json`, `--nic mac=`,
/// virtio-net's configuration).
public struct MACAddress: Sendable, Hashable, Codable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(_ text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let byte = UInt8(part, radix: 16) else { return nil }
            bytes.append(byte)
        }
        self.bytes = bytes
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 6 else { return nil }
        self.bytes = bytes
    }

    /// Parses `52:54:00:12:34:56` (or with `-`); refuses multicast addresses (bit 0 of the first byte).
    public init(parsing text: String) throws(NetworkError) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).count == 6
            ? text.split(separator: ":", omittingEmptySubsequences: false)
            : text.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 6 else { throw .invalidMAC(text) }
        var bytes: [UInt8] = []
        for part in parts {
            guard part.count == 2, let value = UInt8(part, radix: 16) else { throw .invalidMAC(text) }
            bytes.append(value)
        }
        guard bytes[0] & 1 == 0 else { throw .invalidMAC(text) }
        self.bytes = bytes
    }

    /// A random locally administered unicast address.
    public static func random() -> MACAddress { generate(avoiding: []) }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do { self = try MACAddress(parsing: text) } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }

    /// Bit 0 of the first byte: a group (multicast) address, which a NIC cannot have.
    public var isMulticast: Bool { bytes[0] & 1 != 0 }
    /// Bit 1 of the first byte: not from a vendor's (IEEE-assigned) range.
    public var isLocallyAdministered: Bool { bytes[0] & 2 != 0 }

    public var description: String {
        let digits = Array("0123456789abcdef")
        return bytes.map { String([digits[Int($0 >> 4)], digits[Int($0 & 0xF)]]) }.joined(separator: ":")
    }

    /// A random locally administered unicast address (first byte `x2`, `x6`, `xA` or `xE`) not in `taken`.
    public static func generate(avoiding taken: Set<MACAddress>) -> MACAddress {
        while true {
            var bytes = randomBytes(6)
            bytes[0] = (bytes[0] & 0xFC) | 0x02
            let address = MACAddress(bytes: bytes)!
            if !taken.contains(address) { return address }
        }
    }
}

/// Bytes from the kernel's CSPRNG: Swift's `SystemRandomNumberGenerator` is `getrandom(2)` on Linux.
func randomBytes(_ count: Int) -> [UInt8] {
    var generator = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
}

/// A random (version 4) UUID, lower-case with hyphens.
public func randomUUIDString() -> String {
    var bytes = randomBytes(16)
    bytes[6] = (bytes[6] & 0x0F) | 0x40   // version 4
    bytes[8] = (bytes[8] & 0x3F) | 0x80   // RFC 4122 variant
    let digits = Array("0123456789abcdef")
    var text = ""
    for (index, byte) in bytes.enumerated() {
        if [4, 6, 8, 10].contains(index) { text.append("-") }
        text.append(digits[Int(byte >> 4)])
        text.append(digits[Int(byte & 0xF)])
    }
    return text
}
