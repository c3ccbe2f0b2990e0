/// Just enough ACPI Machine Language (ACPI 6.5, chapter 20) to write our DSDT: the power button,
/// the Generic Event Device that signals it, and the `\_S5` sleep package. Each function returns
/// the encoded bytes of one term.
enum AML {
    static let zero: UInt8 = 0x00
    static let one: UInt8 = 0x01

    /// PkgLength: the length of what follows including the PkgLength bytes themselves.
    static func package(_ contents: [UInt8]) -> [UInt8] {
        for size in 1...4 {
            let total = contents.count + size
            if size == 1, total < 0x40 { return [UInt8(total)] + contents }
            if size > 1, total < 1 << (4 + 8 * (size - 1)) {
                var bytes = [UInt8((size - 1) << 6) | UInt8(total & 0x0F)]
                for index in 0..<(size - 1) { bytes.append(UInt8((total >> (4 + 8 * index)) & 0xFF)) }
                return bytes + contents
            }
        }
        preconditionFailure("AML package of \(contents.count) bytes is too long")
    }

    /// A 4-character name segment (padded with `_`).
    static func name(_ text: String) -> [UInt8] {
        var bytes = Array(text.utf8)
        precondition(bytes.count <= 4)
        while bytes.count < 4 { bytes.append(UInt8(ascii: "_")) }
        return bytes
    }

    static func integer(_ value: UInt64) -> [UInt8] {
        switch value {
        case 0: [0x00]
        case 1: [0x01]
        case ...0xFF: [0x0A, UInt8(value)]
        case ...0xFFFF: [0x0B] + le(value, 2)
        case ...0xFFFF_FFFF: [0x0C] + le(value, 4)
        default: [0x0E] + le(value, 8)
        }
    }

    static func le(_ value: UInt64, _ count: Int) -> [UInt8] { (0..<count).map { UInt8((value >> (8 * $0)) & 0xFF) } }

    static func string(_ text: String) -> [UInt8] { [0x0D] + Array(text.utf8) + [0x00] }

    /// EisaId("PNP0C0C") → the compressed 32-bit ID.
    static func eisaID(_ text: String) -> [UInt8] {
        let c = Array(text.utf8)
        let vendor = (UInt32(c[0] - 0x40) << 10) | (UInt32(c[1] - 0x40) << 5) | UInt32(c[2] - 0x40)
        func hex(_ byte: UInt8) -> UInt32 { UInt32(byte <= 0x39 ? byte - 0x30 : byte - 0x37) }
        let product = (hex(c[3]) << 12) | (hex(c[4]) << 8) | (hex(c[5]) << 4) | hex(c[6])
        let value = ((vendor >> 8) & 0xFF) | ((vendor & 0xFF) << 8) | ((product >> 8) << 16) | ((product & 0xFF) << 24)
        return [0x0C] + le(UInt64(value), 4)
    }

    static func scope(_ path: [UInt8], _ terms: [[UInt8]]) -> [UInt8] { [0x10] + package(path + terms.flatMap { $0 }) }
    static func device(_ segment: String, _ terms: [[UInt8]]) -> [UInt8] { [0x5B, 0x82] + package(name(segment) + terms.flatMap { $0 }) }
    static func nameTerm(_ segment: String, _ value: [UInt8]) -> [UInt8] { [0x08] + name(segment) + value }
    static func packageTerm(_ elements: [[UInt8]]) -> [UInt8] { [0x12] + package([UInt8(elements.count)] + elements.flatMap { $0 }) }
    static func buffer(_ bytes: [UInt8]) -> [UInt8] { [0x11] + package(integer(UInt64(bytes.count)) + bytes) }

    /// OperationRegion(NAME, SystemIO, port, length).
    static func systemIORegion(_ segment: String, port: UInt64, length: UInt64) -> [UInt8] {
        [0x5B, 0x80] + name(segment) + [0x01] + integer(port) + integer(length)
    }

    /// Field(REGION, ByteAcc, NoLock, WriteAsZeros) { NAME, 8 }.
    static func byteField(region: String, field: String) -> [UInt8] {
        [0x5B, 0x81] + package(name(region) + [0x41] + name(field) + [0x08])
    }

    /// Method(NAME, arguments, Serialized) { terms }.
    static func method(_ segment: String, arguments: UInt8, _ terms: [[UInt8]]) -> [UInt8] {
        [0x14] + package(name(segment) + [arguments | 0x08] + terms.flatMap { $0 })
    }

    static let local0: UInt8 = 0x60
    /// Store(source, Local0).
    static func storeToLocal0(_ source: [UInt8]) -> [UInt8] { [0x70] + source + [local0] }
    /// If (And(Local0, mask)) { terms }.
    static func ifLocal0Has(_ mask: UInt64, _ terms: [[UInt8]]) -> [UInt8] {
        [0xA0] + package([0x7B, local0] + integer(mask) + [0x00] + terms.flatMap { $0 })
    }
    /// Notify(NAME, value).
    static func notify(_ segment: String, _ value: UInt64) -> [UInt8] { [0x86] + name(segment) + integer(value) }

    /// ResourceTemplate() { Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } }.
    static func edgeInterruptResource(gsi: UInt32) -> [UInt8] {
        buffer([0x89, 0x06, 0x00, 0x03, 0x01] + le(UInt64(gsi), 4) + [0x79, 0x00])
    }
}
