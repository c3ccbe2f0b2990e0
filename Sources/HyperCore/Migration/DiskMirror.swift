internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// Storage copy (`--storage copy`): each writable disk file of the machine is copied to the
/// destination while the guest keeps writing it, the way pre-copy moves RAM. The file's
/// ``FileChanges`` record what the guest (or the VHDX layer under it) wrote since the last look;
/// the first pass sends every data extent (holes stay holes), later passes what changed, and
/// the switch-over — after the source closed the disk — the rest, the file's final size and its
/// modification time. The destination file is then byte for byte the source's.
///
/// Disk sections (``MigrationSection/disk``): `u32 disk` (index among the mirrored disks, in
/// configuration order), `u32 flags` (bit 0: a zero range), `u64 offset`, then the data, or for
/// a zero range `u64 length` (the destination punches a hole there).
final class DiskMirror {
    let index: Int
    let path: String
    let changes: FileChanges
    /// The file, opened again read-only for the copy (it outlives the disk's own close).
    private let reader: DiskFile
    /// Checked before each piece: true stops the copy (``MigrationError/cancelled(_:)``).
    var shouldStop: (() -> Bool)?
    /// The piece sent at once: one section's worth.
    static let pieceSize = MigrationStream.chunkSize

    /// A mirror of `file`, not yet tracking.
    init(index: Int, file: DiskFile) throws(MigrationError) {
        self.index = index
        path = file.path
        changes = file.changes
        do throws(VHDXError) { reader = try DiskFile(path: file.path, readOnly: true) } catch {
            throw .machine("opening \(file.path) to copy it: \(error)")
        }
    }

    /// A mirror of `backend`'s file (raw or VHDX: the file the guest's writes reach).
    convenience init(index: Int, backend: any BlockBackend) throws(MigrationError) {
        switch backend {
        case let image as VHDXImage: try self.init(index: index, file: image.file)
        case let raw as RawImage: try self.init(index: index, file: raw.file)
        default: throw .machine("a disk of type \(type(of: backend)) cannot be copied: only raw and VHDX files")
        }
    }

    /// The mirrors of `machine`'s writable disks, tracking from now on.
    static func start(_ machine: Machine) throws(MigrationError) -> [DiskMirror] {
        var mirrors: [DiskMirror] = []
        for backend in machine.blockBackends where !backend.isReadOnly {
            let mirror = try DiskMirror(index: mirrors.count, backend: backend)
            mirror.changes.start()
            mirrors.append(mirror)
        }
        return mirrors
    }

    var fileSize: UInt64 { (try? reader.size()) ?? 0 }

    /// Bytes waiting to be sent again (an upper bound: whole chunks).
    var pendingBytes: UInt64 { UInt64(changes.pendingChunks) * FileChanges.chunkSize }

    /// The first pass: every data extent of the file as it is now.
    func sendAll(_ stream: MigrationStream, _ buffer: UnsafeMutableRawPointer) throws(MigrationError) -> UInt64 {
        try copyAll(to: StreamSink(stream: stream, disk: UInt32(index)), buffer)
    }

    /// What changed since the last pass.
    func sendChanged(_ stream: MigrationStream, _ buffer: UnsafeMutableRawPointer) throws(MigrationError) -> UInt64 {
        try copyChanged(to: StreamSink(stream: stream, disk: UInt32(index)), buffer)
    }

    /// Every data extent of the file as it is now, to `sink`; returns the data bytes.
    func copyAll(to sink: some DiskMirrorSink, _ buffer: UnsafeMutableRawPointer) throws(MigrationError) -> UInt64 {
        var copied: UInt64 = 0
        for extent in reader.dataExtents(offset: 0, length: fileSize) { copied += try copy(extent, to: sink, buffer) }
        return copied
    }

    /// What changed since the last look, in ranges of adjacent chunks, to `sink`.
    func copyChanged(to sink: some DiskMirrorSink, _ buffer: UnsafeMutableRawPointer) throws(MigrationError) -> UInt64 {
        var copied: UInt64 = 0
        var run: Range<UInt64>?
        for chunk in changes.take() {
            let start = chunk * FileChanges.chunkSize
            if let current = run, current.upperBound == start { run = current.lowerBound..<start + FileChanges.chunkSize; continue }
            if let current = run { copied += try copy(current, to: sink, buffer) }
            run = start..<start + FileChanges.chunkSize
        }
        if let run { copied += try copy(run, to: sink, buffer) }
        return copied
    }

    /// The size and modification time that end the copy (sent with `complete`).
    func finalDescription() -> JSONValue {
        let (size, mtime) = finalSizeAndTime()
        return .object([("size", .number(Int64(size))), ("mtime_ns", .number(mtime))])
    }

    func finalSizeAndTime() -> (size: UInt64, mtimeNanoseconds: Int64) {
        var info = stat()
        _ = fstat(reader.fd, &info)
        return (UInt64(max(0, info.st_size)), Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec))
    }

    /// Copies `range` in pieces: runs of non-zero 4 KiB pages as data, zero pages (and whatever
    /// lies past the end of the file) as zero ranges.
    private func copy(_ range: Range<UInt64>, to sink: some DiskMirrorSink, _ buffer: UnsafeMutableRawPointer) throws(MigrationError) -> UInt64 {
        var copied: UInt64 = 0
        var offset = range.lowerBound
        while offset < range.upperBound {
            if shouldStop?() == true { throw .cancelled("the machine ended while \(path) was being copied") }
            let count = Int(min(UInt64(Self.pieceSize), range.upperBound - offset))
            // Past the end of the file (shrunk since it was noted) it reads as zeros.
            do throws(VHDXError) { try reader.read(into: UnsafeMutableRawBufferPointer(start: buffer, count: count), at: offset) } catch {
                throw .machine("reading \(path): \(error)")
            }
            // Split into data runs and zero runs, page by page: zero pages become holes there.
            let page = 4096
            var start = 0
            while start < count {
                let zero = Self.isZero(buffer + start, min(page, count - start))
                var end = start + page
                while end < count, Self.isZero(buffer + end, min(page, count - end)) == zero { end += page }
                end = min(end, count)
                if zero {
                    try sink.zero(at: offset + UInt64(start), length: UInt64(end - start))
                } else {
                    try sink.data(UnsafeRawBufferPointer(start: buffer + start, count: end - start), at: offset + UInt64(start))
                    copied += UInt64(end - start)
                }
                start = end
            }
            offset += UInt64(count)
        }
        return copied
    }

    static func isZero(_ pointer: UnsafeRawPointer, _ count: Int) -> Bool {
        var index = 0
        while index + 8 <= count {
            if pointer.loadUnaligned(fromByteOffset: index, as: UInt64.self) != 0 { return false }
            index += 8
        }
        while index < count {
            if pointer.load(fromByteOffset: index, as: UInt8.self) != 0 { return false }
            index += 1
        }
        return true
    }
}

/// Where a mirror's bytes go: the migration stream, or a file on this host (storage move).
protocol DiskMirrorSink {
    func data(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(MigrationError)
    /// `length` bytes at `offset` read as zeros (a hole where the file system can punch one).
    func zero(at offset: UInt64, length: UInt64) throws(MigrationError)
}

/// A mirror's bytes as disk sections of the migration stream.
struct StreamSink: DiskMirrorSink {
    let stream: MigrationStream
    let disk: UInt32

    private func head(_ flags: UInt32, _ offset: UInt64) -> [UInt8] {
        var head: [UInt8] = []
        stream.append(&head, disk)
        stream.append(&head, flags)
        stream.append(&head, offset)
        return head
    }

    func data(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(MigrationError) {
        let head = head(0, offset)
        let failure: MigrationError? = head.withUnsafeBytes { raw in
            do throws(MigrationError) {
                try stream.send(.disk, buffers: [(raw.baseAddress!, raw.count), (bytes.baseAddress!, bytes.count)])
            } catch { return error }
            return nil
        }
        if let failure { throw failure }
    }

    func zero(at offset: UInt64, length: UInt64) throws(MigrationError) {
        var section = head(1, offset)
        stream.append(&section, length)
        try stream.send(.disk, section)
    }
}

/// A mirror's bytes written into one of a ``DiskMirrorTarget``'s files.
struct FileSink: DiskMirrorSink {
    let target: DiskMirrorTarget
    let disk: Int
    func data(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(MigrationError) { try target.write(disk, bytes, at: offset) }
    func zero(at offset: UInt64, length: UInt64) throws(MigrationError) { try target.zero(disk, at: offset, length: length) }
}

/// The destination's side of storage copy: the mirrored disks' files, written as sections come.
final class DiskMirrorTarget: @unchecked Sendable {  // used by one thread at a time
    let paths: [String]
    private var files: [DiskFile] = []
    /// Bytes of disk data received.
    private(set) var bytesReceived: UInt64 = 0
    /// No file grows past this (a VHDX's largest size, 64 TiB).
    static let maximumSize: UInt64 = 64 << 40

    /// Creates (or empties) the destination files; `exclusive`: refuses files that exist.
    init(paths: [String], exclusive: Bool = false) throws(MigrationError) {
        self.paths = paths
        for path in paths {
            do throws(VHDXError) { files.append(try DiskFile(creating: path, overwrite: !exclusive)) } catch {
                throw .machine("creating \(path): \(error)")
            }
        }
    }

    /// Writes one disk section's payload (checked: its disk, its range, its length).
    func apply(_ payload: [UInt8], _ stream: MigrationStream) throws(MigrationError) {
        guard payload.count >= 16 else { throw .protocolViolation("a disk section of \(payload.count) bytes") }
        let disk = Int(stream.load(UInt32.self, payload, 0))
        let flags = stream.load(UInt32.self, payload, 4)
        let offset = stream.load(UInt64.self, payload, 8)
        guard disk < files.count, flags <= 1 else { throw .protocolViolation("a disk section for disk \(disk) with flags \(flags); \(files.count) disks are copied") }
        if flags == 1 {
            guard payload.count == 24 else { throw .protocolViolation("a zero-range disk section of \(payload.count) bytes") }
            let length = stream.load(UInt64.self, payload, 16)
            guard length > 0, offset <= Self.maximumSize, length <= Self.maximumSize - offset else {
                throw .protocolViolation("a zero range of \(length) bytes at \(offset) in disk \(disk)")
            }
            try zero(disk, at: offset, length: length)
            return
        }
        let count = payload.count - 16
        guard count > 0, offset <= Self.maximumSize, UInt64(count) <= Self.maximumSize - offset else {
            throw .protocolViolation("\(count) bytes at \(offset) in disk \(disk)")
        }
        let failure: MigrationError? = payload.withUnsafeBytes { raw in
            do throws(MigrationError) { try write(disk, UnsafeRawBufferPointer(rebasing: raw[16...]), at: offset) } catch { return error }
            return nil
        }
        if let failure { throw failure }
    }

    /// A hole where the file system can punch one, else zeros (the final size is set at the end).
    func zero(_ disk: Int, at offset: UInt64, length: UInt64) throws(MigrationError) {
        do throws(VHDXError) { try files[disk].punchHole(at: offset, length: length) } catch { throw .machine("\(error)") }
    }

    func write(_ disk: Int, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(MigrationError) {
        do throws(VHDXError) { try files[disk].write(bytes, at: offset) } catch { throw .machine("\(error)") }
        bytesReceived += UInt64(bytes.count)
    }

    /// Sets each file's final size and modification time (from `complete`'s `disks`) and makes
    /// it durable.
    func finish(_ finals: JSONValue?) throws(MigrationError) {
        guard case let .array(entries)? = finals, entries.count == files.count else {
            throw .protocolViolation("the complete section describes \(finals.map { "\($0)" } ?? "no") disks; \(files.count) were copied")
        }
        for (disk, entry) in entries.enumerated() {
            guard let size = entry["size"]?.int64Value, size >= 0, UInt64(size) <= Self.maximumSize,
                  let mtime = entry["mtime_ns"]?.int64Value else {
                throw .protocolViolation("the final description of disk \(disk) has no size or modification time")
            }
            try finish(disk, size: UInt64(size), mtimeNanoseconds: mtime)
        }
    }

    /// Makes what was written so far durable (so that the final sync has little left to do).
    func sync(_ disk: Int) throws(MigrationError) {
        do throws(VHDXError) { try files[disk].sync() } catch { throw .machine("\(error)") }
    }

    func finish(_ disk: Int, size: UInt64, mtimeNanoseconds mtime: Int64) throws(MigrationError) {
        do throws(VHDXError) {
            try files[disk].truncate(to: size)
            try files[disk].sync()
        } catch {
            throw .machine("\(error)")
        }
        let time = timespec(tv_sec: Int(mtime / 1_000_000_000), tv_nsec: Int(mtime % 1_000_000_000))
        var times = [time, time]
        guard futimens(files[disk].fd, &times) == 0 else { throw .io(operation: "futimens \(paths[disk])", errno: errno) }
    }
}
