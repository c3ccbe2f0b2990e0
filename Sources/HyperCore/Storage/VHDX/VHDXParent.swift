#if canImport(Glibc)
internal import Glibc
#elseif canImport(Musl)
internal import Musl
#endif

/// Finding and checking the parent of a differencing disk ([MS-VHDX] 2.6.2.6).
enum ParentResolver {
    /// Candidate host paths for the parent, in the specification's order: relative_path (relative
    /// to the child's directory), then absolute_win32_path. volume_path only means something on
    /// Windows.
    static func candidates(childPath: String, locator: ParentLocator) -> [String] {
        var out: [String] = []
        if let rel = locator["relative_path"] {
            let p = hostPath(rel)
            out.append(p.hasPrefix("/") ? p : directory(of: childPath) + "/" + p)
        }
        if let abs = locator["absolute_win32_path"] {
            let p = hostPath(abs)
            if p.hasPrefix("/") { out.append(p) }
        }
        return out
    }

    /// Windows path → host path: drop a `\\?\` prefix, turn `\` into `/`, drop a leading `./`.
    static func hostPath(_ windows: String) -> String {
        var s = windows
        if s.hasPrefix("\\\\?\\") { s.removeFirst(4) }
        s = String(s.map { $0 == "\\" ? "/" : $0 })
        while s.hasPrefix("./") { s.removeFirst(2) }
        return s
    }

    /// Host path → the Windows form stored in a locator.
    static func windowsPath(_ host: String) -> String { String(host.map { $0 == "/" ? "\\" : $0 }) }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buf = [CChar](repeating: 0, count: 4096)
        guard getcwd(&buf, buf.count) != nil else { return path }
        let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return cwd + "/" + path
    }

    /// `target` relative to the directory `from` (both absolute), e.g. "../base/disk.vhdx".
    static func relative(_ target: String, from dir: String) -> String {
        let t = target.split(separator: "/"), d = dir.split(separator: "/")
        var common = 0
        while common < t.count - 1 && common < d.count && t[common] == d[common] { common += 1 }
        let ups = Array(repeating: "..", count: d.count - common)
        let rest = t[common...].map(String.init)
        let parts = ups + rest
        return parts.first == ".." ? parts.joined(separator: "/") : "./" + parts.joined(separator: "/")
    }

    static func identity(_ path: String) -> FileIdentity? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }
}

struct FileIdentity: Hashable, Sendable {
    let device: UInt64
    let inode: UInt64
}
