#if canImport(Glibc)
internal import Glibc
#elseif canImport(Musl)
internal import Musl
#endif
internal import CKVM

/// An open file used with positioned I/O only (`pread`/`pwrite`), so any number of threads may use
/// it at once without sharing a file offset. Short transfers and `EINTR` are retried here.
public final class DiskFile: Sendable {
    public let path: String
    public let fd: Int32
    public let isReadOnly: Bool
    /// Sees every write, truncate and sync (the power-loss tests rebuild crash states from it).
    let recorder: IORecorder?
    /// The parts written while a copier tracks them (storage copy during live migration).
    public let changes = FileChanges()

    /// Opens an existing file.
    public init(path: String, readOnly: Bool) throws(VHDXError) {
        let fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, operation: "open", offset: 0, errno: errno) }
        self.path = path
        self.fd = fd
        self.isReadOnly = readOnly
        self.recorder = nil
    }

    /// Opens an existing file read-write and reports every change to `recorder`.
    init(path: String, recorder: IORecorder) throws(VHDXError) {
        let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, operation: "open", offset: 0, errno: errno) }
        self.path = path
        self.fd = fd
        self.isReadOnly = false
        self.recorder = recorder
    }

    /// Creates a file; fails if it exists unless `overwrite`.
    public init(creating path: String, overwrite: Bool = false) throws(VHDXError) {
        let flags = O_RDWR | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL)
        let fd = Glibc.open(path, flags, 0o644)
        guard fd >= 0 else { throw .io(path: path, operation: "create", offset: 0, errno: errno) }
        self.path = path
        self.fd = fd
        self.isReadOnly = false
        self.recorder = nil
    }

    /// Wraps a descriptor the caller owns (the fuzzer's memfd); it is closed with this object.
    public init(adopting fd: Int32, path: String, readOnly: Bool) {
        self.fd = fd
        self.path = path
        self.isReadOnly = readOnly
        self.recorder = nil
    }

    deinit { Glibc.close(fd) }

    public func size() throws(VHDXError) -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .io(path: path, operation: "fstat", offset: 0, errno: errno) }
        return UInt64(st.st_size)
    }

    /// Bytes the file occupies on the host (its allocated blocks).
    public func allocatedBytes() throws(VHDXError) -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .io(path: path, operation: "fstat", offset: 0, errno: errno) }
        return UInt64(st.st_blocks) * 512
    }

    /// Fills `buffer` from `offset`. Bytes past the end of the file read as zeros; returns how many
    /// bytes came from the file.
    @discardableResult
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VHDXError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, operation: "read", offset: offset + UInt64(done), errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        if done < buffer.count {
            (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
        }
        return done
    }

    public func read(count: Int, at offset: UInt64) throws(VHDXError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        if count > 0 {
            let result: Result<Int, VHDXError> = bytes.withUnsafeMutableBytes { buf in
                do throws(VHDXError) { return .success(try read(into: buf, at: offset)) } catch { return .failure(error) }
            }
            _ = try result.get()
        }
        return bytes
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(VHDXError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        recorder?.record(.write(offset: offset, bytes: Array(buffer)))
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, operation: "write", offset: offset + UInt64(done), errno: errno)
            }
            done += n
        }
        changes.note(offset: offset, length: UInt64(buffer.count))
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(VHDXError) {
        let result: Result<Void, VHDXError> = bytes.withUnsafeBytes { buf in
            do throws(VHDXError) { try write(buf, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try result.get()
    }

    /// Writes `length` zero bytes at `offset` in bounded pieces.
    public func writeZeros(at offset: UInt64, length: UInt64) throws(VHDXError) {
        let piece = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(piece.count), length - done))
            let result: Result<Void, VHDXError> = piece.withUnsafeBytes { buf in
                do throws(VHDXError) { try write(UnsafeRawBufferPointer(rebasing: buf[0..<n]), at: offset + done); return .success(()) }
                catch { return .failure(error) }
            }
            try result.get()
            done += UInt64(n)
        }
    }

    public func truncate(to size: UInt64) throws(VHDXError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        recorder?.record(.truncate(size: size))
        let before = (try? self.size()) ?? size
        while ftruncate(fd, off_t(size)) != 0 {
            if errno == EINTR { continue }
            throw .io(path: path, operation: "ftruncate", offset: size, errno: errno)
        }
        // A copy must not keep what a shrink cut off (the file may grow back over it as zeros).
        if before > size { changes.note(offset: size, length: before - size) }
    }

    /// Reserves real disk space for `offset..<offset+length` (falls back to growing the file when the
    /// file system cannot preallocate).
    public func preallocate(offset: UInt64, length: UInt64) throws(VHDXError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        let rc = posix_fallocate(fd, off_t(offset), off_t(length))
        if rc == 0 { return }
        if rc == EOPNOTSUPP || rc == EINVAL {
            if try size() < offset + length { try truncate(to: offset + length) }
            return
        }
        throw .io(path: path, operation: "fallocate", offset: offset, errno: rc)
    }

    /// Makes completed writes and the file size durable.
    public func sync() throws(VHDXError) {
        guard !isReadOnly else { return }
        recorder?.record(.sync)
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw .io(path: path, operation: "fdatasync", offset: 0, errno: errno)
        }
    }
}

extension DiskFile {
    /// Frees the host blocks of a range so it reads as zeros; falls back to writing zeros where the
    /// file system cannot punch holes.
    public func punchHole(at offset: UInt64, length: UInt64) throws(VHDXError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        if let recorder {
            // Recorded as a plain zero write, so crash states can drop it like any other write.
            recorder.record(.write(offset: offset, bytes: [UInt8](repeating: 0, count: Int(length))))
        }
        if cstorage_punch_hole(fd, Int64(offset), Int64(length)) == 0 {
            changes.note(offset: offset, length: length)
            return
        }
        let e = errno
        guard e == EOPNOTSUPP || e == ENOSYS else { throw .io(path: path, operation: "fallocate(PUNCH_HOLE)", offset: offset, errno: e) }
        try writeZeros(at: offset, length: length)
    }
}

extension DiskFile {
    /// An anonymous in-memory file holding `bytes` (the fuzzer's inputs). Its path is the
    /// `/proc/self/fd` link, so path-based tools such as `check` can open it too.
    public static func inMemory(_ bytes: [UInt8], readOnly: Bool = false) throws(VHDXError) -> DiskFile {
        let fd = cstorage_memfd("vhdx-input")
        guard fd >= 0 else { throw .io(path: "memfd", operation: "memfd_create", offset: 0, errno: errno) }
        let file = DiskFile(adopting: fd, path: "/proc/self/fd/\(fd)", readOnly: false)
        try file.write(bytes, at: 0)
        return readOnly ? DiskFile(adopting: dup(fd), path: file.path, readOnly: true) : file
    }
}

extension DiskFile {
    /// The parts of `offset..<offset+length` that hold data (`SEEK_DATA`/`SEEK_HOLE`), in order;
    /// the rest are holes and read as zeros. Where the file system cannot tell, the whole range.
    public func dataExtents(offset: UInt64, length: UInt64) -> [Range<UInt64>] {
        let seekData: Int32 = 3, seekHole: Int32 = 4  // <unistd.h> with _GNU_SOURCE
        let end = offset + length
        var extents: [Range<UInt64>] = []
        var position = offset
        while position < end {
            let data = lseek(fd, off_t(position), seekData)
            if data < 0 {
                // ENXIO: no data from here to the end of the file. Anything else: cannot tell.
                return errno == ENXIO ? extents : extents + [position..<end]
            }
            guard UInt64(data) < end else { break }
            let hole = lseek(fd, data, seekHole)
            let stop = hole < 0 ? end : min(end, UInt64(hole))
            extents.append(UInt64(data)..<stop)
            position = stop
        }
        return extents
    }

    /// Copies `length` bytes from `source` at `sourceOffset` to this file at `offset` inside the
    /// kernel; falls back to read/write where the file systems cannot.
    public func copy(from source: DiskFile, at sourceOffset: UInt64, to offset: UInt64, length: UInt64) throws(VHDXError) {
        var done: UInt64 = 0
        while done < length {
            let n = cstorage_copy_range(source.fd, Int64(sourceOffset + done), fd, Int64(offset + done), Int64(length - done))
            if n > 0 {
                changes.note(offset: offset + done, length: UInt64(n))
                done += UInt64(n)
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno != EXDEV && errno != ENOSYS && errno != EOPNOTSUPP && errno != EINVAL {
                throw .io(path: path, operation: "copy_file_range", offset: offset + done, errno: errno)
            }
            // Not supported here, or the source ended: copy the rest by hand.
            let rest = try source.read(count: Int(length - done), at: sourceOffset + done)
            try write(rest, at: offset + done)
            return
        }
    }
}

/// The changes made through a file, in order, for tests that rebuild what a power loss at any
/// point could have left on disk (only what an `fdatasync` covered is certain to be there).
final class IORecorder: @unchecked Sendable {
    enum Event {
        case write(offset: UInt64, bytes: [UInt8])
        case truncate(size: UInt64)
        case sync
        /// Test marker: the caller's flush returned after this many operations.
        case acknowledged(Int)
    }

    private let lock = PthreadLock()
    private var log: [Event] = []

    func record(_ event: Event) { lock.withLock { log.append(event) } }
    var events: [Event] { lock.withLock { log } }
}
