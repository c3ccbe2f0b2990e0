#if canImport(Glibc)
internal import Glibc
#elseif canImport(Musl)
internal import Musl
#endif

/// Helpers for turning errno values into words.
public enum SystemError {
    /// `strerror` text plus the symbolic value, e.g. "Permission denied (errno 13)".
    public static func describe(_ code: Int32) -> String {
        guard let text = strerror(code) else { return "errno \(code)" }
        return "\(String(cString: text)) (errno \(code))"
    }
}
