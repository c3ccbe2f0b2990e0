#if canImport(Glibc)
internal import Glibc
#endif

/// Reads kernel, initrd and firmware files whole, without Foundation.
public enum ImageFile {
    /// 2 GiB: larger than any kernel or initrd a micro-VM boots, small enough to refuse a mistake
    /// (a disk image passed as --kernel) before allocating for it.
    public static let defaultLimit: UInt64 = 2 << 30

    public static func read(_ path: String, limit: UInt64 = defaultLimit) throws(BootError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .cannotRead(file: path, errno: errno) }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .cannotRead(file: path, errno: errno) }
        guard info.st_mode & S_IFMT == S_IFREG else { throw .cannotRead(file: path, errno: EISDIR) }
        let size = UInt64(info.st_size)
        guard size <= limit else { throw .tooLarge(file: path, size: size, maximum: limit) }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var total = 0
        var failure: Int32 = 0
        bytes.withUnsafeMutableBytes { buffer in
            while total < buffer.count {
                let count = pread(fd, buffer.baseAddress! + total, buffer.count - total, off_t(total))
                if count < 0 {
                    if errno == EINTR { continue }
                    failure = errno
                    return
                }
                if count == 0 { break } // the file shrank while we read it
                total += count
            }
        }
        guard failure == 0 else { throw .cannotRead(file: path, errno: failure) }
        return total == bytes.count ? bytes : Array(bytes[0..<total])
    }
}
