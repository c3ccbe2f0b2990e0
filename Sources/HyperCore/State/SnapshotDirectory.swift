internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// A snapshot on disk: a directory holding
/// - `state`: a 32-byte header (magic `HYPCSNAP`, format version, payload length, CRC-32C of the
///   payload, CRC-32C of the header) and the ``MachineSnapshot`` as JSON. Any flipped byte is
///   caught by one of the two checksums.
/// - `memory`: guest RAM, as large as the RAM, sparse (see ``MemoryFile``).
///
/// Written crash-safely: into a temporary sibling directory, every file and the directory
/// `fsync`ed, then renamed into place (an existing snapshot is swapped out atomically with
/// `renameat2(RENAME_EXCHANGE)` and then removed). A SIGKILL at any point leaves the old snapshot
/// or the new one, never a mix; at worst a `.NAME.partial-PID` directory is left beside it.
public enum SnapshotDirectory {
    public static let formatVersion: UInt32 = 1
    public static let stateFile = "state"
    public static let memoryFile = "memory"
    static let magic = Array("HYPCSNAP".utf8)
    static let headerSize = 32
    /// A state payload larger than this is refused before it is read (a hostile file cannot make
    /// the reader allocate without bound); real ones are tens of KiB per vCPU.
    static let maximumStateSize: UInt64 = 64 << 20

    public struct Written: Sendable {
        public var memoryBytes: UInt64
        public var stateBytes: Int
    }

    /// Writes `snapshot` and `memory` to `directory`, replacing a snapshot already there.
    @discardableResult
    public static func write(_ snapshot: MachineSnapshot, memory: GuestMemory, to directory: String) throws(SnapshotError) -> Written {
        let target = normalized(directory)
        let (parent, name) = split(target)
        var existing = stat()
        let exists = lstat(target, &existing) == 0
        if exists {
            guard existing.st_mode & S_IFMT == S_IFDIR else {
                throw .wrongState("\(target) exists and is not a directory; choose another path")
            }
            guard isSnapshotOrEmpty(target) else {
                throw .wrongState("\(target) exists and is not a snapshot; choose another path (hvrun only replaces its own snapshots)")
            }
        }
        let temporary = parent + "/." + name + ".partial-\(getpid())"
        removeSnapshotFiles(temporary)
        guard mkdir(temporary, 0o700) == 0 else { throw .io(path: temporary, operation: "mkdir", errno: errno) }
        var cleanup = true
        defer { if cleanup { removeSnapshotFiles(temporary) } }

        var snapshot = snapshot
        let memoryPath = temporary + "/" + memoryFile
        let memoryFD = open(memoryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard memoryFD >= 0 else { throw .io(path: memoryPath, operation: "create", errno: errno) }
        defer { close(memoryFD) }
        snapshot.memoryBytesWritten = try MemoryFile.write(memory, to: memoryFD, path: memoryPath).bytesWritten

        let payload: [UInt8]
        do throws(StateCodingError) { payload = Array(try StateCoder.encode(snapshot).rendered().utf8) } catch {
            throw .machine("encoding the machine state: \(error)")
        }
        let statePath = temporary + "/" + stateFile
        let stateFD = try writeFile(statePath, encodeState(payload))
        defer { close(stateFD) }
        // Both files are written before either is synced: the first fsync's journal commit then
        // carries the other's metadata too, and the later ones have less left to do.
        guard fsync(memoryFD) == 0 else { throw .io(path: memoryPath, operation: "fsync", errno: errno) }
        guard fsync(stateFD) == 0 else { throw .io(path: statePath, operation: "fsync", errno: errno) }
        try syncDirectory(temporary)

        if exists {
            let result = ckvm_rename_exchange(temporary, target)
            guard result == 0 else { throw .io(path: target, operation: "rename (exchange)", errno: -result) }
            // `temporary` now holds the old snapshot; the new one is in place.
        } else {
            guard rename(temporary, target) == 0 else { throw .io(path: target, operation: "rename", errno: errno) }
            cleanup = false
        }
        try syncDirectory(parent)
        return Written(memoryBytes: snapshot.memoryBytesWritten, stateBytes: payload.count + headerSize)
    }

    /// A snapshot whose memory a child process is writing from a copy-on-write view of guest RAM
    /// (``begin(_:memory:to:)``) while the guest may already run on: ``finish()`` waits for it,
    /// writes the state and puts the directory in place, crash-safely as ``write(_:memory:to:)``.
    public final class Pending: @unchecked Sendable {
        let snapshot: MachineSnapshot
        let temporary: String
        let target: String
        let memoryFD: Int32
        private(set) var child: pid_t
        private var done = false

        init(snapshot: MachineSnapshot, temporary: String, target: String, memoryFD: Int32, child: pid_t) {
            self.snapshot = snapshot
            self.temporary = temporary
            self.target = target
            self.memoryFD = memoryFD
            self.child = child
        }

        deinit { if !done { abandon() } }

        /// Waits for the memory writer, then writes the state file, syncs and renames into place.
        public func finish() throws(SnapshotError) -> Written {
            precondition(!done, "a pending snapshot is finished once")
            done = true
            defer { close(memoryFD) }
            let memoryPath = temporary + "/" + memoryFile
            var status: Int32 = 0
            while waitpid(child, &status, 0) < 0 {
                guard errno == EINTR else { removeSnapshotFiles(temporary); throw .io(path: memoryPath, operation: "waitpid", errno: errno) }
            }
            child = 0
            let exitedCleanly = status & 0x7F == 0
            let code = (status >> 8) & 0xFF
            guard exitedCleanly, code == 0 else {
                removeSnapshotFiles(temporary)
                if !exitedCleanly { throw .machine("the process writing \(memoryPath) was killed by signal \(status & 0x7F)") }
                throw .io(path: memoryPath, operation: "write (copy-on-write writer)", errno: code)
            }
            var snapshot = snapshot
            var info = stat()
            snapshot.memoryBytesWritten = fstat(memoryFD, &info) == 0 ? UInt64(info.st_blocks) * 512 : 0
            let payload: [UInt8]
            do throws(StateCodingError) { payload = Array(try StateCoder.encode(snapshot).rendered().utf8) } catch {
                removeSnapshotFiles(temporary)
                throw .machine("encoding the machine state: \(error)")
            }
            do throws(SnapshotError) {
                let statePath = temporary + "/" + stateFile
                let stateFD = try writeFile(statePath, encodeState(payload))
                defer { close(stateFD) }
                guard fsync(stateFD) == 0 else { throw .io(path: statePath, operation: "fsync", errno: errno) }
                try syncDirectory(temporary)
                guard rename(temporary, target) == 0 else { throw .io(path: target, operation: "rename", errno: errno) }
                try syncDirectory(split(target).parent)
            } catch {
                removeSnapshotFiles(temporary)
                throw error
            }
            return Written(memoryBytes: snapshot.memoryBytesWritten, stateBytes: payload.count + headerSize)
        }

        /// Stops the writer and removes what it wrote.
        public func abandon() {
            done = true
            if child > 0 {
                kill(child, SIGKILL)
                var status: Int32 = 0
                while waitpid(child, &status, 0) < 0 && errno == EINTR {}
                child = 0
                close(memoryFD)
            }
            removeSnapshotFiles(temporary)
        }
    }

    /// Starts writing a snapshot to the new directory `directory` (which must not exist): guest
    /// RAM is written by a forked child from its copy-on-write view, so the machine may be resumed
    /// as soon as this returns — what the guest writes after it lands in the parent's pages only.
    /// The cost in the pause is the fork (copying the page tables of touched memory).
    public static func begin(_ snapshot: MachineSnapshot, memory: GuestMemory, to directory: String) throws(SnapshotError) -> Pending {
        let target = normalized(directory)
        let (parent, name) = split(target)
        var existing = stat()
        guard lstat(target, &existing) != 0 else { throw .wrongState("\(target) exists; a checkpoint's snapshot goes to a new directory") }
        let temporary = parent + "/." + name + ".partial-\(getpid())"
        removeSnapshotFiles(temporary)
        guard mkdir(temporary, 0o700) == 0 else { throw .io(path: temporary, operation: "mkdir", errno: errno) }
        let memoryPath = temporary + "/" + memoryFile
        let memoryFD = open(memoryPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard memoryFD >= 0 else {
            let code = errno
            removeSnapshotFiles(temporary)
            throw .io(path: memoryPath, operation: "create", errno: code)
        }
        guard ftruncate(memoryFD, off_t(memory.size)) == 0 else {
            let code = errno
            close(memoryFD)
            removeSnapshotFiles(temporary)
            throw .io(path: memoryPath, operation: "ftruncate", errno: code)
        }
        let regions = memory.regions.map { ckvm_memory_region(host_address: UInt64($0.hostAddress), size: $0.size, file_offset: $0.fileOffset) }
        let child = regions.withUnsafeBufferPointer {
            ckvm_fork_memory_writer($0.baseAddress!, Int32($0.count), memory.backingFile ?? -1, memoryFD)
        }
        guard child > 0 else {
            close(memoryFD)
            removeSnapshotFiles(temporary)
            throw .io(path: memoryPath, operation: "fork (copy-on-write writer)", errno: -child)
        }
        return Pending(snapshot: snapshot, temporary: temporary, target: target, memoryFD: memoryFD, child: child)
    }

    /// Reads and checks a snapshot: the state file's header, checksums and contents, and that the
    /// memory file is there with the size the state says. Reads only; changes nothing.
    public static func read(_ directory: String) throws(SnapshotError) -> MachineSnapshot {
        let target = normalized(directory)
        var info = stat()
        guard stat(target, &info) == 0 else { throw .io(path: target, operation: "open", errno: errno) }
        guard info.st_mode & S_IFMT == S_IFDIR else { throw .notASnapshot(path: target, reason: "not a directory") }
        let statePath = target + "/" + stateFile
        let bytes = try readFile(statePath)
        let payload = try decodeState(bytes, path: statePath)
        let value: JSONValue
        do throws(JSONParseError) { value = try JSONValue.parse(payload) } catch {
            throw .corrupt(path: statePath, detail: "\(error)")
        }
        let snapshot: MachineSnapshot
        do throws(StateCodingError) { snapshot = try StateCoder.decode(MachineSnapshot.self, from: value) } catch {
            throw .corrupt(path: statePath, detail: "\(error)")
        }
        let memoryPath = target + "/" + memoryFile
        var memoryInfo = stat()
        guard stat(memoryPath, &memoryInfo) == 0 else {
            throw .notASnapshot(path: target, reason: "the memory file \(memoryPath) is missing (\(SystemError.describe(errno)))")
        }
        guard UInt64(memoryInfo.st_size) == snapshot.configuration.memorySize else {
            throw .corrupt(path: memoryPath, detail: "it holds \(memoryInfo.st_size) bytes, the guest has \(snapshot.configuration.memorySize)")
        }
        return snapshot
    }

    /// Opens the memory file for mapping.
    static func openMemory(_ directory: String) throws(SnapshotError) -> Int32 {
        let path = normalized(directory) + "/" + memoryFile
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, operation: "open", errno: errno) }
        return fd
    }

    // MARK: The state file

    static func encodeState(_ payload: [UInt8]) -> [UInt8] {
        var header = magic
        func append<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { header.append(contentsOf: $0) } }
        append(formatVersion)
        append(UInt32(0))
        append(UInt64(payload.count))
        append(CRC32C.checksum(payload))
        append(CRC32C.checksum(header))
        return header + payload
    }

    static func decodeState(_ bytes: [UInt8], path: String) throws(SnapshotError) -> ArraySlice<UInt8> {
        guard bytes.count >= headerSize else {
            throw .notASnapshot(path: path, reason: "the state file has \(bytes.count) bytes, less than its \(headerSize)-byte header")
        }
        guard Array(bytes[0..<8]) == magic else { throw .notASnapshot(path: path, reason: "no HYPCSNAP signature") }
        func load<T: FixedWidthInteger>(_: T.Type, _ offset: Int) -> T {
            bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
        }
        guard CRC32C.checksum(Array(bytes[0..<28])) == load(UInt32.self, 28) else {
            throw .corrupt(path: path, detail: "header checksum mismatch")
        }
        let version = load(UInt32.self, 8)
        guard version == formatVersion else { throw .unsupportedVersion(path: path, found: version, supported: formatVersion) }
        let length = load(UInt64.self, 16)
        guard length == UInt64(bytes.count - headerSize) else {
            throw .corrupt(path: path, detail: "the header announces \(length) bytes of state, the file holds \(bytes.count - headerSize) (truncated?)")
        }
        let payload = bytes[headerSize...]
        guard CRC32C.checksum(Array(payload)) == load(UInt32.self, 24) else {
            throw .corrupt(path: path, detail: "state checksum mismatch")
        }
        return payload
    }

    // MARK: Files

    static func normalized(_ path: String) -> String {
        var path = path
        while path.count > 1, path.hasSuffix("/") { path.removeLast() }
        return path
    }

    static func split(_ path: String) -> (parent: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let parent = String(path[..<slash])
        return (parent.isEmpty ? "/" : parent, String(path[path.index(after: slash)...]))
    }

    static func isSnapshotOrEmpty(_ directory: String) -> Bool {
        guard let entries = listDirectory(directory) else { return false }
        return entries.allSatisfy { $0 == stateFile || $0 == memoryFile }
    }

    static func listDirectory(_ directory: String) -> [String]? {
        guard let handle = opendir(directory) else { return nil }
        defer { closedir(handle) }
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// Removes a snapshot directory this code wrote (its two files, then the directory).
    static func removeSnapshotFiles(_ directory: String) {
        unlink(directory + "/" + stateFile)
        unlink(directory + "/" + memoryFile)
        rmdir(directory)
    }

    /// Creates `path` with `bytes` and returns the open descriptor (not yet synced).
    static func writeFile(_ path: String, _ bytes: [UInt8]) throws(SnapshotError) -> Int32 {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .io(path: path, operation: "create", errno: errno) }
        let failure: SnapshotError? = bytes.withUnsafeBytes { raw in
            do throws(SnapshotError) {
                try MemoryFile.writeAll(fd, raw.baseAddress!, count: raw.count, at: 0, path: path)
                return nil
            } catch { return error }
        }
        if let failure {
            close(fd)
            throw failure
        }
        return fd
    }

    static func readFile(_ path: String) throws(SnapshotError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let code = errno
            if code == ENOENT { throw .notASnapshot(path: path, reason: "the state file is missing") }
            throw .io(path: path, operation: "open", errno: code)
        }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .io(path: path, operation: "stat", errno: errno) }
        guard UInt64(info.st_size) <= maximumStateSize + UInt64(headerSize) else {
            throw .corrupt(path: path, detail: "\(info.st_size) bytes is more state than any snapshot holds")
        }
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size))
        var done = 0
        while done < bytes.count {
            let got = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
            if got < 0, errno == EINTR { continue }
            guard got > 0 else { throw .io(path: path, operation: "read", errno: got < 0 ? errno : EIO) }
            done += got
        }
        return bytes
    }

    static func syncDirectory(_ path: String) throws(SnapshotError) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(path: path, operation: "open directory", errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw .io(path: path, operation: "fsync", errno: errno) }
    }
}
