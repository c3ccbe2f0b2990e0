/// A minimal JSON value, writer and parser (`JSONParser.swift`): HyperCore avoids Foundation to
/// keep hvrun's memory footprint small. It carries the host report, machine snapshots' state and
/// the control socket's messages.
public enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    case number(Int64)
    /// An integer above `Int64.max` (MSR values, 64-bit addresses).
    case unsignedNumber(UInt64)
    /// A number with a fraction or exponent.
    case double(Double)
    case string(String)
    case array([JSONValue])
    /// Keys keep their order, so output is stable and reads in a sensible order.
    case object([(String, JSONValue)])

    /// Compact JSON text.
    public func rendered() -> String {
        var output = ""
        write(to: &output)
        return output
    }

    private func write(to output: inout String) {
        switch self {
        case .null: output += "null"
        case .bool(let value): output += value ? "true" : "false"
        case .number(let value): output += String(value)
        case .unsignedNumber(let value): output += String(value)
        case .double(let value): output += value.isFinite ? String(value) : "null"
        case .string(let value): Self.writeString(value, to: &output)
        case .array(let values):
            output += "["
            for (index, value) in values.enumerated() {
                if index > 0 { output += "," }
                value.write(to: &output)
            }
            output += "]"
        case .object(let members):
            output += "{"
            for (index, (key, value)) in members.enumerated() {
                if index > 0 { output += "," }
                Self.writeString(key, to: &output)
                output += ":"
                value.write(to: &output)
            }
            output += "}"
        }
    }

    /// RFC 8259 §7: quote, backslash and the C0 controls must be escaped; all else may pass as UTF-8.
    private static func writeString(_ value: String, to output: inout String) {
        output += "\""
        // Most strings (names, hex-encoded KVM state) need no escape: copy them whole.
        if value.utf8.allSatisfy({ $0 >= 0x20 && $0 != UInt8(ascii: "\"") && $0 != UInt8(ascii: "\\") }) {
            output += value
            output += "\""
            return
        }
        for scalar in value.unicodeScalars {
            switch scalar {
            case "\"": output += "\\\""
            case "\\": output += "\\\\"
            case "\n": output += "\\n"
            case "\r": output += "\\r"
            case "\t": output += "\\t"
            case "\u{08}": output += "\\b"
            case "\u{0C}": output += "\\f"
            case let control where control.value < 0x20:
                let hex = String(control.value, radix: 16)
                output += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: output.unicodeScalars.append(scalar)
            }
        }
        output += "\""
    }
}
