/// VM names: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`. A name is a
/// directory under `vms/`, so it can be neither hidden nor taken for an option.
public enum VMName {
    public static let rule = "a VM name is 1 to 64 characters of A-Z a-z 0-9 . _ - and does not start with '.' or '-'"

    public static func isValid(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...64).contains(bytes.count), bytes[0] != UInt8(ascii: "."), bytes[0] != UInt8(ascii: "-") else { return false }
        return bytes.allSatisfy { byte in
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"): true
            default: false
            }
        }
    }

    /// Throws ``StoreError/invalid(_:)`` quoting the name and the rule.
    public static func validate(_ name: String) throws(StoreError) {
        guard isValid(name) else { throw .invalid("invalid VM name '\(name)': \(rule)") }
    }
}
