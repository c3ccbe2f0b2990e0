#if canImport(Glibc)
internal import Glibc
#endif

/// Checkpoints of one stored VM: create, apply, delete, and the crash recovery that makes each of
/// them all-or-nothing.
///
/// The caller holds the VM: either a command holding the bundle's lock while the VM is off or
/// saved (`live` nil), or the VM's own process while it runs (`live` its disks, `machine` its
/// machine). `vm.json` is the single record of what exists: a checkpoint is there when its record
/// is, files no record reaches are leftovers of a crash and are removed, and work that changes
/// files is written into `pending` first (``PendingStoreOperation``) and finished by whoever holds
/// the VM next.
public struct VMCheckpointStore: Sendable {
    public let bundle: VMBundle
    public let live: (any ActiveDisks)?
    /// Polled between steps of ``recover()``: when it returns true, recovery stops after the step
    /// it is in (``StoreError/interrupted``), leaving the rest pending for the next holder. The VM
    /// process sets it when its machine ends, so a merge never outlives the machine it works on.
    public let shouldStop: @Sendable () -> Bool

    public init(bundle: VMBundle, live: (any ActiveDisks)? = nil, shouldStop: @escaping @Sendable () -> Bool = { false }) {
        self.shouldStop = shouldStop
        // Paths are compared after resolving symbolic links: a parent locator's relative path and
        // the configuration's absolute one must meet.
        self.bundle = VMBundle(name: bundle.name, path: StoreFiles.canonical(bundle.path))
        self.live = live
    }

    /// A record's path (bundle-relative or absolute) as a canonical absolute path.
    func resolve(_ path: String) -> String { StoreFiles.canonical(bundle.file(path)) }

    public var checkpointsPath: String { bundle.path + "/checkpoints" }
    public func memoryDirectory(of id: String) -> String { checkpointsPath + "/" + id }

    func load() throws(StoreError) -> VMConfiguration { try bundle.configuration() }

    func commit(_ configuration: VMConfiguration) throws(StoreError) {
        try StoreFiles.writeAtomically(bundle.configurationPath, Array(try configuration.encoded().utf8))
    }

    // MARK: Finding checkpoints

    /// The checkpoint named `reference`: its ID, a unique prefix of its ID (8 or more characters),
    /// or its name when no other checkpoint has that name.
    public static func find(_ reference: String, in configuration: VMConfiguration) throws(StoreError) -> VMCheckpoint {
        if let exact = configuration.checkpoints.first(where: { $0.id == reference }) { return exact }
        let named = configuration.checkpoints.filter { $0.name == reference }
        if named.count == 1 { return named[0] }
        if named.count > 1 {
            throw .invalid("\(named.count) checkpoints of \(configuration.name) are named \"\(reference)\"; name one by its ID (\(named.map(\.id).joined(separator: ", ")))")
        }
        if reference.count >= 8 {
            let prefixed = configuration.checkpoints.filter { $0.id.hasPrefix(reference) }
            if prefixed.count == 1 { return prefixed[0] }
        }
        throw .invalid("VM \(configuration.name) has no checkpoint \"\(reference)\" (hvrun vm checkpoint list \(configuration.name) shows them)")
    }

    /// Every checkpoint below `id` in the tree.
    static func descendants(of id: String, in checkpoints: [VMCheckpoint]) -> [VMCheckpoint] {
        var found: [VMCheckpoint] = []
        var frontier: Set<String> = [id]
        while !frontier.isEmpty {
            let next = checkpoints.filter { $0.parent.map(frontier.contains) ?? false }
            found += next
            frontier = Set(next.map(\.id))
        }
        return found
    }

    // MARK: Create

    /// The result of taking a checkpoint.
    public struct Created: Sendable {
        public var checkpoint: VMCheckpoint
        /// The guest-visible pause (running VM only).
        public var pauseNanoseconds: UInt64?
    }

    /// Takes a checkpoint. `machine` is the running VM's machine (its process calls this), nil for
    /// a VM that is off or saved (a saved VM's checkpoint carries its saved memory).
    public func create(name requested: String?, machine: Machine? = nil, now: UInt64 = wallClockSeconds()) throws(StoreError) -> Created {
        try recover()
        let configuration = try load()
        for (index, disk) in configuration.disks.enumerated() where !disk.readonly {
            let path = bundle.file(disk.activeFile)
            guard (try? detectDiskFormat(path: path)) == .vhdx else {
                throw .refused("disk \(index) (\(path)) is not a VHDX disk: checkpoints need VHDX disks; convert it with `hvrun disk convert \(path) NEW.vhdx` and use that one")
            }
        }
        var id = randomUUIDString()
        while configuration.checkpoints.contains(where: { $0.id == id }) { id = randomUUIDString() }
        var name = requested ?? "\(configuration.name) (\(Self.timestamp(now, separator: " ")))"
        if requested == nil, configuration.checkpoints.contains(where: { $0.name == name }) {
            var counter = 2
            while configuration.checkpoints.contains(where: { $0.name == "\(name) (\(counter))" }) { counter += 1 }
            name = "\(name) (\(counter))"
        }
        try CheckpointName.validate(name)
        let children: [String?] = configuration.disks.map { $0.readonly ? nil : Self.childName(of: $0, checkpoint: id) }
        var record = VMCheckpoint(id: id, name: name, parent: configuration.currentCheckpoint,
                                  created: Self.timestamp(now, separator: "T") + "Z", hasMemory: false,
                                  disks: configuration.disks.map(\.activeFile))
        var updated = configuration
        for (index, child) in children.enumerated() { if let child { updated.disks[index].active = child } }
        updated.currentCheckpoint = id

        if let machine {
            record.hasMemory = true
            let directory = memoryDirectory(of: id)
            try StoreFiles.makeDirectories(checkpointsPath)
            let childPaths = children.compactMap { $0.map(bundle.file) }
            var pause: UInt64 = 0
            do throws(SnapshotError) {
                let result = try machine.checkpoint(to: directory, childPaths: childPaths) { (taken: CheckpointResult) throws(SnapshotError) in
                    record.pauseMilliseconds = Double(taken.pauseNanoseconds / 1000) / 1000
                    var saving = record
                    saving.saving = true
                    updated.checkpoints.append(saving)
                    CrashPoint.reach("live-checkpoint-before-commit")
                    do throws(StoreError) { try commit(updated) } catch { throw .machine("\(error)") }
                    CrashPoint.reach("live-checkpoint-after-commit")
                }
                pause = result.pauseNanoseconds
            } catch {
                // If the record was written (its memory failed after the guest resumed), the next
                // recovery removes it and merges its disks back.
                throw .failed("checkpoint of \(configuration.name): \(error)")
            }
            record.pauseMilliseconds = Double(pause / 1000) / 1000
            var complete = try load()
            if let index = complete.checkpoints.firstIndex(where: { $0.id == id }) { complete.checkpoints[index] = record }
            try commit(complete)
            CrashPoint.reach("live-checkpoint-complete")
            return Created(checkpoint: record, pauseNanoseconds: pause)
        }

        // Off or saved: new children made first (a crash leaves only files no record reaches,
        // which the next recovery removes), then one atomic commit.
        var created: [String] = []
        do throws(StoreError) {
            for (index, child) in children.enumerated() {
                guard let child else { continue }
                let path = bundle.file(child)
                do throws(VHDXError) {
                    try VHDXImage.create(path: path, options: VHDXCreateOptions(type: .differencing,
                                                                                 parentPath: bundle.file(configuration.disks[index].activeFile)))
                } catch {
                    throw .failed("creating the differencing disk \(path): \(error)")
                }
                created.append(path)
            }
            if StoreFiles.exists(bundle.savedPath + "/" + SnapshotDirectory.stateFile) {
                // A saved VM's checkpoint holds its saved memory: the same files, linked (neither
                // a snapshot nor a checkpoint is ever written in place).
                try StoreFiles.makeDirectories(checkpointsPath)
                try Self.linkSnapshot(from: bundle.savedPath, to: memoryDirectory(of: id))
                record.hasMemory = true
                record.diskIdentities = configuration.savedDiskIdentities
            }
            updated.checkpoints.append(record)
            CrashPoint.reach("checkpoint-before-commit")
            try commit(updated)
            CrashPoint.reach("checkpoint-after-commit")
        } catch {
            for path in created { unlink(path) }
            try? StoreFiles.removeTree(memoryDirectory(of: id))
            throw error
        }
        return Created(checkpoint: record, pauseNanoseconds: nil)
    }

    // MARK: Apply

    /// Puts the VM back to `reference`: every writable disk continues on a new, empty
    /// differencing child of the checkpoint's file; a checkpoint with memory leaves the VM saved
    /// at that point. What the VM had since is discarded; the tree is kept. The VM must be off or
    /// saved (the caller holds its lock).
    public func apply(_ reference: String, now: UInt64 = wallClockSeconds()) throws(StoreError) -> VMCheckpoint {
        precondition(live == nil, "a checkpoint is applied to a VM that is not running")
        try recover()
        var configuration = try load()
        let checkpoint = try Self.find(reference, in: configuration)
        var created: [String] = []
        do throws(StoreError) {
            for (index, disk) in configuration.disks.enumerated() {
                let frozen = index < checkpoint.disks.count ? checkpoint.disks[index] : disk.activeFile
                if disk.readonly {
                    configuration.disks[index].active = frozen == disk.path ? nil : frozen
                    continue
                }
                let child = Self.childName(of: disk, checkpoint: String(randomUUIDString()))
                do throws(VHDXError) {
                    try VHDXImage.create(path: bundle.file(child), options: VHDXCreateOptions(type: .differencing, parentPath: bundle.file(frozen)))
                } catch {
                    throw .failed("creating the differencing disk \(bundle.file(child)) on \(bundle.file(frozen)): \(error)")
                }
                created.append(bundle.file(child))
                configuration.disks[index].active = child
            }
            configuration.currentCheckpoint = checkpoint.id
            configuration.savedDiskIdentities = checkpoint.hasMemory ? checkpoint.diskIdentities : []
            configuration.pending.append(PendingStoreOperation(kind: .replaceSaved, checkpoint: checkpoint.hasMemory ? checkpoint.id : nil))
            CrashPoint.reach("apply-before-commit")
            try commit(configuration)
            CrashPoint.reach("apply-after-commit")
        } catch {
            for path in created { unlink(path) }
            throw error
        }
        // The discarded files (the old children) are now reached by nothing: recovery removes them.
        try recover()
        return checkpoint
    }

    // MARK: Delete

    /// Removes `reference` (and, with `subtree`, every checkpoint below it) from the tree: its
    /// memory is deleted and its frozen disk files are merged with their one remaining child, so
    /// the chains get shorter; a file that two branches still share stays until one goes. Returns
    /// the deleted checkpoints. With `background`, the records are removed (committed) first and
    /// the file work is left pending for ``recover()`` (the VM's process runs it on its own thread).
    @discardableResult
    public func delete(_ reference: String, subtree: Bool, background: Bool = false) throws(StoreError) -> [VMCheckpoint] {
        try recover()
        var configuration = try load()
        let checkpoint = try Self.find(reference, in: configuration)
        let doomed = [checkpoint] + (subtree ? Self.descendants(of: checkpoint.id, in: configuration.checkpoints) : [])
        let doomedIDs = Set(doomed.map(\.id))
        configuration.checkpoints.removeAll { doomedIDs.contains($0.id) }
        for index in configuration.checkpoints.indices where configuration.checkpoints[index].parent == checkpoint.id {
            configuration.checkpoints[index].parent = checkpoint.parent
        }
        if let current = configuration.currentCheckpoint, doomedIDs.contains(current) {
            configuration.currentCheckpoint = checkpoint.parent
        }
        for gone in doomed where gone.hasMemory {
            configuration.pending.append(PendingStoreOperation(kind: .removeDirectory, path: "checkpoints/" + gone.id))
        }
        try commit(configuration)
        CrashPoint.reach("delete-after-commit")
        if !background { try recover() }
        return doomed
    }

    // MARK: Recovery

    /// Finishes every pending operation, then makes the files match `vm.json`: files and
    /// directories no record reaches are removed, and a file no record uses any more is merged
    /// with its only child (or deleted when it has none). Idempotent; safe after a crash at any
    /// point of any operation.
    public func recover() throws(StoreError) {
        var rounds = 0
        try dropIncomplete()
        while true {
            var configuration = try load()
            while let operation = configuration.pending.first {
                if shouldStop() { throw .interrupted }
                try perform(operation, in: &configuration)
                configuration.pending.removeFirst()
                try commit(configuration)
            }
            let planned = try plan(configuration)
            if planned.isEmpty { break }
            configuration.pending = planned
            try commit(configuration)
            rounds += 1
            if rounds > 256 { throw .failed("\(bundle.configurationPath): the checkpoint files do not settle after \(rounds) rounds of merging") }
        }
        try removeLeftovers(try load())
    }

    /// Removes checkpoints whose memory was still being written when their process ended (or
    /// failed): as a delete of each, so their disks merge back.
    func dropIncomplete() throws(StoreError) {
        var configuration = try load()
        let incomplete = configuration.checkpoints.filter { $0.saving == true }
        guard !incomplete.isEmpty else { return }
        for checkpoint in incomplete {
            configuration.checkpoints.removeAll { $0.id == checkpoint.id }
            for index in configuration.checkpoints.indices where configuration.checkpoints[index].parent == checkpoint.id {
                configuration.checkpoints[index].parent = checkpoint.parent
            }
            if configuration.currentCheckpoint == checkpoint.id { configuration.currentCheckpoint = checkpoint.parent }
            configuration.pending.append(PendingStoreOperation(kind: .removeDirectory, path: "checkpoints/" + checkpoint.id))
        }
        try commit(configuration)
    }

    /// Whether `vm.json` lists work not yet done (a merge running in the VM's process, say).
    public func hasPendingWork() -> Bool { ((try? load())?.pending.isEmpty == false) }

    /// What the chains need now: merges and deletions of files nothing references.
    func plan(_ configuration: VMConfiguration) throws(StoreError) -> [PendingStoreOperation] {
        let graph = try DiskGraph(bundle: bundle, configuration: configuration)
        var planned: [PendingStoreOperation] = []
        var claimed: Set<String> = []
        for file in graph.files.sorted() where !graph.referenced.contains(file) && !claimed.contains(file) {
            let children = graph.children(of: file)
            if children.isEmpty {
                // Only our own differencing disks are ever deleted, never a disk the user gave.
                if file.hasPrefix(bundle.path + "/"), file.hasSuffix(".avhdx") {
                    planned.append(PendingStoreOperation(kind: .unlink, path: relative(file)))
                    claimed.insert(file)
                }
            } else if children.count == 1, !claimed.contains(children[0]) {
                planned.append(PendingStoreOperation(kind: .merge, path: relative(children[0]), into: relative(file)))
                claimed.insert(file)
                claimed.insert(children[0])
            }
        }
        return planned
    }

    func relative(_ absolute: String) -> String {
        absolute.hasPrefix(bundle.path + "/") ? String(absolute.dropFirst(bundle.path.count + 1)) : absolute
    }

    private func perform(_ operation: PendingStoreOperation, in configuration: inout VMConfiguration) throws(StoreError) {
        switch operation.kind {
        case .unlink:
            guard let path = operation.path else { return }
            let file = bundle.file(path)
            guard unlink(file) == 0 || errno == ENOENT else { throw .system(operation: "unlink", path: file, errno: errno) }
        case .removeDirectory:
            guard let path = operation.path else { return }
            try StoreFiles.removeTree(bundle.file(path))
        case .replaceSaved:
            let doomed = bundle.path + "/.saved-replaced"
            try StoreFiles.removeTree(doomed)
            if StoreFiles.exists(bundle.savedPath) {
                guard rename(bundle.savedPath, doomed) == 0 else { throw .system(operation: "rename", path: bundle.savedPath, errno: errno) }
                try StoreFiles.removeTree(doomed)
            }
            if let id = operation.checkpoint {
                try Self.linkSnapshot(from: memoryDirectory(of: id), to: bundle.savedPath)
            }
        case .merge:
            guard let child = operation.path, let parent = operation.into else { return }
            try merge(child, into: parent, alreadyMerged: operation.merged == true, configuration: &configuration)
        }
    }

    /// Merges the differencing disk `child` into its parent and puts the parent in its place.
    private func merge(_ child: String, into parent: String, alreadyMerged: Bool,
                       configuration: inout VMConfiguration) throws(StoreError) {
        let childPath = resolve(child), parentPath = resolve(parent)
        if !alreadyMerged {
            guard StoreFiles.exists(childPath) else {
                throw .failed("\(bundle.configurationPath): a pending merge names \(childPath), which is gone; the chain cannot be finished")
            }
            if let live, let index = configuration.disks.firstIndex(where: { resolve($0.activeFile) == childPath }) {
                try mergeWritten(child, into: parent, disk: index, live: live, configuration: &configuration)
                return
            }
            try Self.mergeFile(childPath, into: parentPath)
            // From here `parent` reads exactly as `child` did: everything that used `child` uses
            // `parent`, and a snapshot that recorded `child` is told what `parent` is now.
            let identity: DiskIdentity
            do throws(SnapshotError) { identity = try DiskIdentity.current(path: parentPath) } catch {
                throw .failed("\(error)")
            }
            let savedExists = StoreFiles.exists(bundle.savedPath + "/" + SnapshotDirectory.stateFile)
            for index in configuration.disks.indices where resolve(configuration.disks[index].activeFile) == childPath {
                configuration.disks[index].active = parentPath == resolve(configuration.disks[index].path) ? nil : parent
                if savedExists {
                    while configuration.savedDiskIdentities.count <= index { configuration.savedDiskIdentities.append(nil) }
                    configuration.savedDiskIdentities[index] = identity
                }
            }
            for c in configuration.checkpoints.indices {
                for d in configuration.checkpoints[c].disks.indices where resolve(configuration.checkpoints[c].disks[d]) == childPath {
                    configuration.checkpoints[c].disks[d] = parent
                    while configuration.checkpoints[c].diskIdentities.count <= d { configuration.checkpoints[c].diskIdentities.append(nil) }
                    configuration.checkpoints[c].diskIdentities[d] = identity
                }
            }
            if let index = configuration.pending.firstIndex(where: { $0.kind == .merge && $0.path == child }) {
                configuration.pending[index].merged = true
            }
            CrashPoint.reach("merge-before-commit")
            try commit(configuration)
            CrashPoint.reach("merge-after-commit")
        }
        // The files whose parent was `child` now hang from `parent` (same contents), then `child`
        // goes. Until then `child` still exists, so every chain opens at every step.
        if StoreFiles.exists(childPath) {
            let graph = try DiskGraph(bundle: bundle, configuration: configuration, extra: [childPath])
            for grandchild in graph.children(of: childPath) {
                let repoint = { () throws(StoreError) in
                    do throws(VHDXError) { try VHDXImage.reparent(childPath: grandchild, to: parentPath) } catch {
                        throw .failed("re-pointing \(grandchild) at \(parentPath): \(error)")
                    }
                }
                if let live, let index = configuration.disks.firstIndex(where: { resolve($0.activeFile) == grandchild }) {
                    try live.reopen(index, around: repoint)
                } else {
                    try repoint()
                }
            }
            CrashPoint.reach("merge-before-unlink")
            guard unlink(childPath) == 0 || errno == ENOENT else { throw .system(operation: "unlink", path: childPath, errno: errno) }
        }
    }

    /// Merges the file a running guest writes into its parent, with no long pause: rounds of
    /// "move the guest onto a fresh child, merge the file it left (the guest reads through it,
    /// never writes it), re-point the fresh child at the parent" shrink what is left; the last,
    /// small file is merged with the disk's requests waiting (milliseconds), and the guest goes
    /// on writing the parent itself. Each round is recorded in `pending` before the next, so a
    /// crash anywhere leaves a chain that opens and a merge the next holder finishes.
    private func mergeWritten(_ child: String, into parent: String, disk index: Int, live: any ActiveDisks,
                              configuration: inout VMConfiguration) throws(StoreError) {
        let parentPath = resolve(parent)
        var current = child
        for round in 0... {
            if shouldStop() { throw .interrupted }
            let currentPath = resolve(current)
            let written: UInt64
            do throws(VHDXError) {
                let image = try VHDXImage(path: currentPath, options: .init(readOnly: true, openParents: false))
                written = image.allocatedBytes
                try? image.close()
            } catch {
                throw .failed("\(currentPath): \(error)")
            }
            if written <= Self.finalMergeBytes || round >= Self.maximumMergeRounds {
                var updated = configuration
                updated.disks[index].active = parentPath == resolve(updated.disks[index].path) ? nil : parent
                if let entry = updated.pending.firstIndex(where: { $0.kind == .merge && $0.path == current }) {
                    updated.pending[entry].merged = true
                }
                try live.reopen(index, as: parentPath) { () throws(StoreError) in
                    try Self.mergeFile(currentPath, into: parentPath)
                    try commit(updated)
                }
                configuration = updated
                guard unlink(currentPath) == 0 || errno == ENOENT else { throw .system(operation: "unlink", path: currentPath, errno: errno) }
                return
            }
            let moved = Self.childName(of: configuration.disks[index], checkpoint: randomUUIDString())
            var updated = configuration
            updated.disks[index].active = moved
            try live.moveToChild(index, childPath: resolve(moved)) { () throws(StoreError) in try commit(updated) }
            configuration = updated
            try Self.mergeFile(currentPath, into: parentPath)
            CrashPoint.reach("live-merge-round")
            try live.reopen(index) { () throws(StoreError) in
                do throws(VHDXError) { try VHDXImage.reparent(childPath: resolve(moved), to: parentPath) } catch {
                    throw .failed("re-pointing \(resolve(moved)) at \(parentPath): \(error)")
                }
            }
            guard unlink(currentPath) == 0 || errno == ENOENT else { throw .system(operation: "unlink", path: currentPath, errno: errno) }
            if let entry = configuration.pending.firstIndex(where: { $0.kind == .merge && $0.path == current }) {
                configuration.pending[entry].path = moved
            }
            try commit(configuration)
            current = moved
        }
    }

    /// The last round of a running disk's merge happens with its requests waiting: only when what
    /// is left is this small (or after this many rounds, for a guest that writes faster than the
    /// merge).
    static let finalMergeBytes: UInt64 = 64 << 20
    static let maximumMergeRounds = 4

    /// The crash-safe VHDX merge of `childPath` into its parent `parentPath` (resumable).
    static func mergeFile(_ childPath: String, into parentPath: String) throws(StoreError) {
        do throws(VHDXError) {
            let image = try VHDXImage(path: childPath)
            do throws(VHDXError) {
                try image.mergeIntoParent { done, total in if total > 1, done == total / 2 { CrashPoint.reach("merge-halfway") } }
            } catch {
                image.abandon()
                throw error
            }
            try image.close()
        } catch {
            throw .failed("merging \(childPath) into \(parentPath): \(error)")
        }
    }

    /// Removes what no record reaches: checkpoint directories of no checkpoint, and differencing
    /// disks of the bundle that are in no chain (a crash between making them and the commit).
    func removeLeftovers(_ configuration: VMConfiguration) throws(StoreError) {
        let ids = Set(configuration.checkpoints.map(\.id))
        let pendingPaths = Set(configuration.pending.flatMap { [$0.path, $0.into].compactMap { $0 } })
        for name in StoreFiles.list(checkpointsPath) where !ids.contains(name) && !pendingPaths.contains("checkpoints/" + name) {
            try StoreFiles.removeTree(checkpointsPath + "/" + name)
        }
        let graph = try DiskGraph(bundle: bundle, configuration: configuration)
        for name in StoreFiles.list(bundle.path) where name.hasSuffix(".avhdx") && !name.hasPrefix(".") {
            let path = bundle.path + "/" + name
            if !graph.files.contains(StoreFiles.canonical(path)) && !pendingPaths.contains(name) { unlink(path) }
        }
    }

    // MARK: Helpers

    /// `disk0_1A2B3C4D.avhdx` for a child of disk 0 made by checkpoint `1a2b3c4d-…` (Hyper-V's
    /// naming), always in the bundle.
    static func childName(of disk: VMConfiguration.Disk, checkpoint: String) -> String {
        let base = disk.path.split(separator: "/").last.map(String.init) ?? "disk"
        let stem = base.split(separator: ".", omittingEmptySubsequences: false).dropLast().joined(separator: ".")
        return "\(stem.isEmpty ? base : stem)_\(checkpoint.prefix(8).uppercased()).avhdx"
    }

    /// Hard-links a snapshot directory's files into a new directory `destination` (staged under a
    /// hidden name, then renamed): snapshots are never written in place, so sharing is safe.
    static func linkSnapshot(from source: String, to destination: String) throws(StoreError) {
        let slash = destination.lastIndex(of: "/") ?? destination.startIndex
        let staging = String(destination[..<slash]) + "/." + String(destination[destination.index(after: slash)...]) + ".linking-\(getpid())"
        try StoreFiles.removeTree(staging)
        guard mkdir(staging, 0o755) == 0 else { throw .system(operation: "mkdir", path: staging, errno: errno) }
        do throws(StoreError) {
            for file in StoreFiles.list(source) where !file.hasPrefix(".") {
                guard link(source + "/" + file, staging + "/" + file) == 0 else {
                    throw .system(operation: "link", path: source + "/" + file, errno: errno)
                }
            }
            StoreFiles.syncDirectory(of: staging + "/x")
            guard rename(staging, destination) == 0 else { throw .system(operation: "rename", path: destination, errno: errno) }
            StoreFiles.syncDirectory(of: destination)
        } catch {
            try? StoreFiles.removeTree(staging)
            throw error
        }
    }

    static func timestamp(_ seconds: UInt64, separator: String) -> String {
        var time = time_t(seconds)
        var parts = tm()
        gmtime_r(&time, &parts)
        func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
        return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))\(separator)\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))"
    }
}

public func wallClockSeconds() -> UInt64 { UInt64(time(nil)) }

/// Checkpoint names: what a user types, printable, 1–100 characters.
enum CheckpointName {
    static func validate(_ name: String) throws(StoreError) {
        guard (1...100).contains(name.count), !name.contains(where: { $0.isNewline || $0 == "\0" }) else {
            throw .invalid("a checkpoint name is 1 to 100 characters on one line")
        }
    }
}

/// The VM's disk files and how they hang together: every file a record references (each disk's
/// active file, each checkpoint's frozen files, pending work) and every file in their chains,
/// each with its parent (read from the VHDX parent locators).
struct DiskGraph {
    var files: Set<String> = []
    var referenced: Set<String> = []
    var parentOf: [String: String] = [:]

    init(bundle: VMBundle, configuration: VMConfiguration, extra: [String] = []) throws(StoreError) {
        func resolve(_ path: String) -> String { StoreFiles.canonical(bundle.file(path)) }
        var roots = configuration.disks.map { resolve($0.activeFile) }
        roots += configuration.checkpoints.flatMap { $0.disks.map(resolve) }
        roots += configuration.pending.filter { $0.kind == .merge || $0.kind == .unlink }
            .flatMap { [$0.path, $0.into].compactMap { $0 } }.map(resolve)
        referenced = Set(roots)
        for root in roots + extra where !files.contains(root) {
            guard StoreFiles.exists(root) else { continue }
            guard (try? detectDiskFormat(path: root)) == .vhdx else { files.insert(root); continue }
            let image: VHDXImage
            do throws(VHDXError) { image = try VHDXImage(path: root, options: .init(readOnly: true)) } catch {
                throw .failed("\(root): \(error)")
            }
            let chain = image.chainPaths.map(StoreFiles.canonical)
            for (index, path) in chain.enumerated() {
                files.insert(path)
                if index + 1 < chain.count { parentOf[path] = chain[index + 1] }
            }
        }
    }

    func children(of file: String) -> [String] { parentOf.filter { $0.value == file }.map(\.key).sorted() }
}
