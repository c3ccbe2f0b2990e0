#if canImport(Glibc)
internal import Glibc
#endif

/// A whole-file write lock through `fcntl` open-file-description locks (`F_OFD_SETLK`): held by the
/// open file, not the process, so it is inherited across `fork`/`posix_spawn` with the descriptor,
/// released when the last descriptor of that open file closes — and by the kernel when the
/// process dies, SIGKILL included. State derived from it can never be stuck "running".
public final class FileLock: @unchecked Sendable {
    public let path: String
    public let fileDescriptor: Int32

    // <fcntl.h> defines these only under _GNU_SOURCE.
    static let getLock: Int32 = 36     // F_OFD_GETLK
    static let setLock: Int32 = 37     // F_OFD_SETLK
    static let setLockWait: Int32 = 38 // F_OFD_SETLKW

    /// Opens (creating, mode 0644) `path` and takes the write lock: waiting for it with `wait`,
    /// else returning nil at once when someone else holds it.
    public static func acquire(_ path: String, wait: Bool) throws(StoreError) -> FileLock? {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .system(operation: "open", path: path, errno: errno) }
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        while fcntl(fd, wait ? setLockWait : setLock, &lock) != 0 {
            let code = errno
            if code == EINTR { continue }
            close(fd)
            if code == EAGAIN || code == EACCES { return nil }
            throw .system(operation: "fcntl(F_OFD_SETLK)", path: path, errno: code)
        }
        return FileLock(path: path, fileDescriptor: fd)
    }

    private init(path: String, fileDescriptor: Int32) {
        self.path = path
        self.fileDescriptor = fileDescriptor
    }

    deinit { close(fileDescriptor) }

    /// Whether someone (another open file) holds a write lock on `path`; false if it does not exist.
    public static func isHeld(_ path: String) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var lock = flock()
        lock.l_type = Int16(F_WRLCK)
        lock.l_whence = Int16(SEEK_SET)
        guard fcntl(fd, getLock, &lock) == 0 else { return false }
        return lock.l_type != Int16(F_UNLCK)
    }

    /// Replaces the file's contents with `text` (the holder writes its pid there).
    public func write(_ text: String) {
        _ = ftruncate(fileDescriptor, 0)
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { pwrite(fileDescriptor, $0.baseAddress, $0.count, 0) }
    }
}
