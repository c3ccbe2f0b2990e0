#if canImport(Glibc)
internal import Glibc
#endif

/// The few file operations the store needs, on plain system calls.
public enum StoreFiles {
    public static func exists(_ path: String) -> Bool {
        var info = stat()
        return lstat(path, &info) == 0
    }

    public static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && info.st_mode & S_IFMT == S_IFDIR
    }

    public static func read(_ path: String) throws(StoreError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .system(operation: "open", path: path, errno: errno) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR { continue }
                throw .system(operation: "read", path: path, errno: errno)
            }
            if count == 0 { return bytes }
            bytes += buffer[0..<count]
        }
    }

    /// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the
    /// directory. With `durable: false` the two fsyncs are left to the caller (``syncTree(_:)``
    /// later): a reader never sees a half file, but a power loss may leave the old one.
    public static func writeAtomically(_ path: String, _ bytes: [UInt8], durable: Bool = true) throws(StoreError) {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .system(operation: "open", path: temporary, errno: errno) }
        do throws(StoreError) {
            try writeAll(fd, bytes, path: temporary)
            guard !durable || fsync(fd) == 0 else { throw .system(operation: "fsync", path: temporary, errno: errno) }
            close(fd)
        } catch {
            close(fd)
            unlink(temporary)
            throw error
        }
        guard rename(temporary, path) == 0 else {
            let code = errno
            unlink(temporary)
            throw .system(operation: "rename", path: path, errno: code)
        }
        if durable { syncDirectory(of: path) }
    }

    /// Makes a directory tree durable: every file and directory in it, then the directory that
    /// holds it (for the tree's own name).
    public static func syncTree(_ path: String) throws(StoreError) {
        func sync(_ path: String, directory: Bool) throws(StoreError) {
            let fd = open(path, (directory ? O_DIRECTORY : 0) | O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw .system(operation: "open", path: path, errno: errno) }
            defer { close(fd) }
            guard fsync(fd) == 0 else { throw .system(operation: "fsync", path: path, errno: errno) }
        }
        func walk(_ directory: String) throws(StoreError) {
            for name in list(directory) {
                let child = directory + "/" + name
                var info = stat()
                guard lstat(child, &info) == 0 else { continue }
                switch info.st_mode & S_IFMT {
                case S_IFDIR: try walk(child)
                case S_IFREG: try sync(child, directory: false)
                default: break
                }
            }
            try sync(directory, directory: true)
        }
        try walk(path)
        syncDirectory(of: path)
    }

    static func writeAll(_ fd: Int32, _ bytes: [UInt8], path: String) throws(StoreError) {
        var done = 0
        while done < bytes.count {
            let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if written < 0 {
                if errno == EINTR { continue }
                throw .system(operation: "write", path: path, errno: errno)
            }
            done += written
        }
    }

    public static func syncDirectory(of path: String) {
        let directory = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let fd = open(directory.isEmpty ? "/" : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if fd >= 0 { fsync(fd); close(fd) }
    }

    /// Copies a regular file byte for byte into a new file (`O_EXCL`), durably: holes stay holes
    /// (`SEEK_DATA`/`SEEK_HOLE`: a sparse memory file or VHDX stays sparse), and the modification
    /// time is kept (a raw disk's snapshot identity includes it).
    public static func copy(_ source: String, to destination: String) throws(StoreError) {
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw .system(operation: "open", path: source, errno: errno) }
        defer { close(input) }
        var info = stat()
        guard fstat(input, &info) == 0 else { throw .system(operation: "stat", path: source, errno: errno) }
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard output >= 0 else { throw .system(operation: "create", path: destination, errno: errno) }
        defer { close(output) }
        let size = Int64(info.st_size)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var position: Int64 = 0
        while position < size {
            let data = lseek(input, off_t(position), 3 /* SEEK_DATA */)
            if data < 0 { if errno == ENXIO { break } else { throw .system(operation: "lseek(SEEK_DATA)", path: source, errno: errno) } }
            let hole = min(Int64(lseek(input, data, 4 /* SEEK_HOLE */)), size)
            var at = Int64(data)
            while at < hole {
                let want = Int(min(Int64(buffer.count), hole - at))
                let count = buffer.withUnsafeMutableBytes { pread(input, $0.baseAddress, want, off_t(at)) }
                if count < 0 {
                    if errno == EINTR { continue }
                    throw .system(operation: "read", path: source, errno: errno)
                }
                if count == 0 { break }
                var done = 0
                while done < count {
                    let written = buffer.withUnsafeBytes { pwrite(output, $0.baseAddress! + done, count - done, off_t(at) + off_t(done)) }
                    if written < 0 {
                        if errno == EINTR { continue }
                        throw .system(operation: "write", path: destination, errno: errno)
                    }
                    done += written
                }
                at += Int64(count)
            }
            position = hole
        }
        guard ftruncate(output, off_t(size)) == 0 else { throw .system(operation: "ftruncate", path: destination, errno: errno) }
        var times = [info.st_atim, info.st_mtim]
        _ = futimens(output, &times)
        guard fsync(output) == 0 else { throw .system(operation: "fsync", path: destination, errno: errno) }
    }

    /// Copies a directory tree (regular files and directories only) into the new `destination`.
    public static func copyTree(_ source: String, to destination: String) throws(StoreError) {
        guard isDirectory(source) else { try copy(source, to: destination); return }
        guard mkdir(destination, 0o755) == 0 else { throw .system(operation: "mkdir", path: destination, errno: errno) }
        for name in list(source) { try copyTree(source + "/" + name, to: destination + "/" + name) }
        syncDirectory(of: destination + "/x")
    }

    /// Creates each missing directory of `path` (mode 0755).
    public static func makeDirectories(_ path: String) throws(StoreError) {
        var current = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            current += "/" + component
            if mkdir(current, 0o755) != 0, errno != EEXIST {
                throw .system(operation: "mkdir", path: current, errno: errno)
            }
        }
    }

    /// The names in a directory, without `.` and `..`; empty when it does not exist.
    public static func list(_ path: String) -> [String] {
        guard let handle = opendir(path) else { return [] }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// Removes a file, or a directory and everything under it (symbolic links are removed, not followed).
    public static func removeTree(_ path: String) throws(StoreError) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        if info.st_mode & S_IFMT == S_IFDIR {
            for name in list(path) { try removeTree(path + "/" + name) }
            guard rmdir(path) == 0 else { throw .system(operation: "rmdir", path: path, errno: errno) }
        } else {
            guard unlink(path) == 0 || errno == ENOENT else { throw .system(operation: "unlink", path: path, errno: errno) }
        }
    }

    /// `path` made absolute against the working directory.
    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        let cwd = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var relative = Substring(path)
        while relative.hasPrefix("./") { relative = relative.dropFirst(2) }
        return (cwd == "/" ? "" : cwd) + "/" + relative
    }

    /// `path` absolute with every symbolic link, `.` and `..` resolved (`realpath`); when it does
    /// not exist, its directory resolved and the name kept; else just made absolute.
    public static func canonical(_ path: String) -> String {
        let full = absolute(path)
        if let resolved = realpath(full, nil) {
            defer { free(resolved) }
            return String(cString: resolved)
        }
        guard let slash = full.lastIndex(of: "/"), slash != full.startIndex else { return full }
        let directory = String(full[..<slash])
        guard let resolved = realpath(directory, nil) else { return full }
        defer { free(resolved) }
        return String(cString: resolved) + String(full[slash...])
    }

    /// The file's size in bytes, or nil.
    public static func size(_ path: String) -> Int64? {
        var info = stat()
        return stat(path, &info) == 0 ? Int64(info.st_size) : nil
    }
}
