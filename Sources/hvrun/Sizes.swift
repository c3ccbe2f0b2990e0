import ArgumentParser

/// A byte count written the way people write them: `256M`, `2G`, `512K`, `1T`, or plain bytes
/// with a `B` suffix. A bare number means MiB (as QEMU's -m does).
struct ByteCount: ExpressibleByArgument, CustomStringConvertible, Sendable, Equatable {
    let bytes: UInt64

    init(bytes: UInt64) { self.bytes = bytes }

    init?(argument: String) {
        guard let value = Self.parse(argument, bareUnit: 1 << 20) else { return nil }
        bytes = value
    }

    /// Parses `text`; `bareUnit` is the multiplier for a number without a suffix.
    static func parse(_ text: String, bareUnit: UInt64) -> UInt64? {
        var digits = Substring(text.uppercased())
        var unit = bareUnit
        // "256MB" and "256MiB" mean "256M"; "4096B" means bytes.
        if digits.hasSuffix("IB") { digits = digits.dropLast(2) }
        else if digits.hasSuffix("B") {
            digits = digits.dropLast()
            if digits.last?.isNumber == true { unit = 1 }
        }
        let units: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        if let last = digits.last, let multiplier = units[last] {
            unit = multiplier
            digits = digits.dropLast()
        }
        guard let number = UInt64(digits) else { return nil }
        let (product, overflow) = number.multipliedReportingOverflow(by: unit)
        return overflow ? nil : product
    }

    static var defaultCompletionKind: CompletionKind { .default }

    /// How `--help` shows a default: `256M`, not the struct's fields.
    var defaultValueDescription: String { description }

    /// The largest binary unit that divides the count: `256M`, `2G`, `1536K`, `100B`.
    var description: String {
        for (suffix, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes != 0 && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(suffix)"
        }
        return bytes == 0 ? "0" : "\(bytes)B"
    }
}
