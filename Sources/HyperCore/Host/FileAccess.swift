#if canImport(Glibc)
internal import Glibc
#elseif canImport(Musl)
internal import Musl
#endif

/// The few file operations the host check needs, on Glibc and without Foundation.
enum FileAccess {
    /// Reads a whole file. Reads to end of file rather than trusting `st_size`, because
    /// procfs and sysfs files report a size of 0 or 4096 whatever they hold.
    static func readText(_ path: String) -> Result<String, ProbeError> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(ProbeError(errno: errno)) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16384)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                return .failure(ProbeError(errno: errno))
            }
            if count == 0 { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return .success(String(decoding: bytes, as: UTF8.self))
    }

    /// Names in a directory, without `.`, `..` and hidden entries, sorted for stable output.
    static func listDirectory(_ path: String) -> Result<[String], ProbeError> {
        guard let directory = opendir(path) else { return .failure(ProbeError(errno: errno)) }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if !name.hasPrefix(".") { names.append(name) }
        }
        return .success(names.sorted())
    }

    /// Creates a directory and its missing parents (`mkdir -p`).
    static func makeDirectories(_ path: String) throws(ProbeError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST { throw ProbeError(errno: errno) }
        }
    }

    /// Writes (creating or truncating) a file, making its parent directories first.
    static func writeText(_ text: String, to path: String) throws(ProbeError) {
        if let slash = path.lastIndex(of: "/"), slash != path.startIndex {
            try makeDirectories(String(path[..<slash]))
        }
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ProbeError(errno: errno) }
        defer { close(fd) }
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if written < 0 {
                if errno == EINTR { continue }
                throw ProbeError(errno: errno)
            }
            bytes = bytes.dropFirst(written)
        }
    }
}
