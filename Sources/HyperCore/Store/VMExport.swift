#if canImport(Glibc)
internal import Glibc
#endif

/// How `import` takes an exported VM (Hyper-V's Import-VM modes).
public enum VMImportMode: String, Sendable, CaseIterable {
    /// Use the files where they are, keeping the VM's ID.
    case register
    /// Copy the files into the store, keeping the ID; the export stays untouched.
    case restore
    /// Copy into the store as a new VM: new ID, new generated MACs, no saved memory.
    case copy
}

/// What an import did, and what the user should know about it.
public struct VMImportResult: Sendable {
    public var bundle: VMBundle
    public var id: String
    public var warnings: [String]
}

extension VMStore {
    // MARK: Export

    /// The configuration an export of a running VM describes: the VM as it was at its temporary
    /// checkpoint `temporary` — the checkpoint's files become the VM's disks, its memory the
    /// saved state, and the checkpoint itself is not exported. Returns the configuration and the
    /// snapshot directory that becomes the export's `saved/`.
    public static func exportConfiguration(_ configuration: VMConfiguration, asOf temporary: VMCheckpoint, bundle: VMBundle) -> (VMConfiguration, saved: String?) {
        var exported = configuration
        exported.checkpoints.removeAll { $0.id == temporary.id }
        for index in exported.checkpoints.indices where exported.checkpoints[index].parent == temporary.id {
            exported.checkpoints[index].parent = temporary.parent
        }
        for index in exported.disks.indices where index < temporary.disks.count {
            exported.disks[index].active = temporary.disks[index] == exported.disks[index].path ? nil : temporary.disks[index]
        }
        exported.currentCheckpoint = temporary.parent
        exported.savedDiskIdentities = temporary.diskIdentities
        exported.pending = []
        return (exported, temporary.hasMemory ? bundle.path + "/checkpoints/" + temporary.id : nil)
    }

    /// Writes `DIRECTORY/NAME/`: `configuration` (the VM as `bundle` describes it, or as
    /// ``exportConfiguration(_:asOf:bundle:)`` made it), the kernel and initrd, every disk file
    /// of every chain (disks from outside the bundle go to `disks/`, and every differencing disk
    /// is re-pointed at its copied parent), the checkpoints' memory, and `saved` as the saved
    /// state. Assembled under a hidden name and renamed into place; refuses to overwrite.
    @discardableResult
    public func export(_ bundle: VMBundle, configuration: VMConfiguration, saved: String?, to directory: String) throws(StoreError) -> String {
        let name = configuration.name
        let directory = StoreFiles.canonical(directory)
        guard StoreFiles.isDirectory(directory) else { throw .invalid("\(directory) is not a directory") }
        let destination = directory + "/" + name
        guard !StoreFiles.exists(destination) else { throw .refused("\(destination) exists; export refuses to overwrite it") }
        guard configuration.pending.isEmpty else { throw .failed("VM \(name) has unfinished checkpoint work; start or stop it first") }
        let source = VMBundle(name: bundle.name, path: StoreFiles.canonical(bundle.path))
        let staging = directory + "/.\(name).exporting-\(getpid())"
        try? StoreFiles.removeTree(staging)
        guard mkdir(staging, 0o755) == 0 else { throw .system(operation: "mkdir", path: staging, errno: errno) }
        do throws(StoreError) {
            let plan = try VMRelocation(bundle: source, configuration: configuration)
            for (file, relative) in plan.placed.sorted(by: { $0.value < $1.value }) {
                try StoreFiles.makeDirectories(staging + "/" + relative.split(separator: "/").dropLast().joined(separator: "/"))
                try StoreFiles.copy(file, to: staging + "/" + relative)
            }
            try VMRelocation.reparent(plan.reparent, under: staging)
            var exported = plan.configuration
            try StoreFiles.copy(source.file(configuration.boot.kernel), to: staging + "/" + configuration.boot.kernel)
            if let initrd = configuration.boot.initrd { try StoreFiles.copy(source.file(initrd), to: staging + "/" + initrd) }
            let memories = exported.checkpoints.filter(\.hasMemory)
            if !memories.isEmpty { try StoreFiles.makeDirectories(staging + "/checkpoints") }
            for checkpoint in memories {
                try StoreFiles.copyTree(source.path + "/checkpoints/" + checkpoint.id, to: staging + "/checkpoints/" + checkpoint.id)
            }
            if let saved { try StoreFiles.copyTree(saved, to: staging + "/saved") } else { exported.savedDiskIdentities = [] }
            try StoreFiles.writeAtomically(staging + "/vm.json", Array(try exported.encoded().utf8))
            guard rename(staging, destination) == 0 else { throw .system(operation: "rename", path: destination, errno: errno) }
            StoreFiles.syncDirectory(of: destination)
        } catch {
            try? StoreFiles.removeTree(staging)
            throw error
        }
        return destination
    }

    // MARK: Import

    /// Everything that would break if the VM at `path` were imported (Compare-VM): every problem
    /// at once, empty when the import can go ahead.
    public func importProblems(_ path: String, configuration: VMConfiguration, mode: VMImportMode, name: String,
                               hostCPUs: Int, hostMemory: UInt64) -> [String] {
        var problems: [String] = []
        let bundle = VMBundle(name: name, path: path)
        do throws(StoreError) { try VMName.validate(name) } catch { problems.append("\(error)") }
        if StoreFiles.exists(vmsPath + "/" + name) { problems.append("a VM named \(name) already exists (choose another with --name)") }
        if mode != .copy {
            for other in names() {
                if let existing = try? VMBundle(name: other, path: vmsPath + "/" + other).configuration(), existing.id == configuration.id {
                    problems.append("VM \(other) already has ID \(configuration.id) (import with --mode copy for a new ID)")
                }
            }
        }
        for file in [configuration.boot.kernel] + (configuration.boot.initrd.map { [$0] } ?? []) where !StoreFiles.exists(bundle.file(file)) {
            problems.append("missing file \(bundle.file(file))")
        }
        var disksOK = true
        for file in configuration.disks.map(\.activeFile) + configuration.checkpoints.flatMap(\.disks) where !StoreFiles.exists(bundle.file(file)) {
            problems.append("missing disk \(bundle.file(file))")
            disksOK = false
        }
        if disksOK {
            do throws(StoreError) { _ = try DiskGraph(bundle: bundle, configuration: configuration) } catch {
                problems.append("a disk chain does not open: \(error)")
            }
        }
        if mode != .copy {
            for checkpoint in configuration.checkpoints where checkpoint.hasMemory
                && !StoreFiles.exists(path + "/checkpoints/" + checkpoint.id + "/" + SnapshotDirectory.stateFile) {
                problems.append("checkpoint \"\(checkpoint.name)\" has no memory state in \(path)/checkpoints/\(checkpoint.id)")
            }
        }
        for nic in configuration.nics where nic.switch != "none" && !StoreFiles.exists(root + "/switches/" + nic.switch + ".json") {
            problems.append("switch \(nic.switch) does not exist on this host (hvrun switch create \(nic.switch) …)")
        }
        if configuration.cpus > hostCPUs { problems.append("it has \(configuration.cpus) vCPUs; this host has \(hostCPUs) CPUs") }
        if configuration.memoryBytes > hostMemory {
            problems.append("it has \(configuration.memoryBytes >> 20) MiB of memory; this host has \(hostMemory >> 20) MiB")
        }
        if !configuration.pending.isEmpty { problems.append("it has unfinished checkpoint work (start it where it was, or export it again)") }
        return problems
    }

    /// Imports the exported VM at `path` (an export's `DIRECTORY/NAME`) after checking
    /// everything first (``importProblems(_:configuration:mode:name:hostCPUs:hostMemory:)``):
    /// any problem refuses the whole import, listing them all, and imports nothing.
    public func importVM(from path: String, mode: VMImportMode, name requested: String?) throws(StoreError) -> VMImportResult {
        let path = StoreFiles.canonical(path)
        let configurationPath = path + "/vm.json"
        guard StoreFiles.exists(configurationPath) else { throw .invalid("\(path) is not an exported VM: it has no vm.json") }
        var configuration = try VMConfiguration.decode(try StoreFiles.read(configurationPath), path: configurationPath)
        let name = requested ?? configuration.name
        let hostCPUs = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        let hostMemory = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        return try withStoreLock { () throws(StoreError) -> VMImportResult in
            let problems = importProblems(path, configuration: configuration, mode: mode, name: name, hostCPUs: hostCPUs, hostMemory: hostMemory)
            guard problems.isEmpty else {
                throw .refused("cannot import \(path):\n  " + problems.joined(separator: "\n  ") + "\nnothing was imported")
            }
            let final = VMBundle(name: name, path: vmsPath + "/" + name)
            var warnings: [String] = []
            configuration.name = name
            switch mode {
            case .register:
                // The store's entry is a symbolic link to the files, used where they are.
                if requested != nil { try StoreFiles.writeAtomically(configurationPath, Array(try configuration.encoded().utf8)) }
                guard symlink(path, final.path) == 0 else { throw .system(operation: "symlink", path: final.path, errno: errno) }
                StoreFiles.syncDirectory(of: final.path)
            case .restore, .copy:
                let staging = vmsPath + "/.\(name).creating-\(getpid())"
                try? StoreFiles.removeTree(staging)
                do throws(StoreError) {
                    guard mkdir(staging, 0o755) == 0 else { throw .system(operation: "mkdir", path: staging, errno: errno) }
                    for entry in StoreFiles.list(path) where !entry.hasPrefix(".") && !Self.runtimeFiles.contains(entry) {
                        if mode == .copy, entry == "saved" || entry == "checkpoints" { continue }
                        try StoreFiles.copyTree(path + "/" + entry, to: staging + "/" + entry)
                    }
                    if mode == .copy {
                        warnings += try makeCopy(&configuration, hadSaved: StoreFiles.exists(path + "/saved/" + SnapshotDirectory.stateFile))
                    }
                    try StoreFiles.writeAtomically(staging + "/vm.json", Array(try configuration.encoded().utf8))
                    guard rename(staging, final.path) == 0 else { throw .system(operation: "rename", path: final.path, errno: errno) }
                    StoreFiles.syncDirectory(of: final.path)
                } catch {
                    try? StoreFiles.removeTree(staging)
                    throw error
                }
            }
            return VMImportResult(bundle: final, id: configuration.id, warnings: warnings)
        }
    }

    /// Files of a bundle that belong to a process running it, never part of a VM's description.
    static let runtimeFiles: Set<String> = ["lock", "control.sock", "console.sock", "hvrun.log", "hvrun.log.1", "vm.json"]

    /// A copy is a new VM: new ID, new MACs where hvrun chose them, and no memory (its guest would
    /// still use the old MACs). Returns the warnings to show.
    private func makeCopy(_ configuration: inout VMConfiguration, hadSaved: Bool) throws(StoreError) -> [String] {
        var warnings: [String] = []
        var ids: Set<String> = []
        var macs: Set<MACAddress> = []
        for other in names() {
            guard let existing = try? VMBundle(name: other, path: vmsPath + "/" + other).configuration() else { continue }
            ids.insert(existing.id)
            for nic in existing.nics { if let mac = MACAddress(nic.mac) { macs.insert(mac) } }
        }
        var id = randomUUIDString()
        while ids.contains(id) { id = randomUUIDString() }
        configuration.id = id
        for index in configuration.nics.indices {
            if configuration.nics[index].macGenerated {
                let mac = MACAddress.generate(avoiding: macs)
                macs.insert(mac)
                configuration.nics[index].mac = mac.description
            } else {
                warnings.append("NIC \(index) keeps its static MAC \(configuration.nics[index].mac): two VMs with it must not share a switch")
            }
        }
        let memories = configuration.checkpoints.filter(\.hasMemory).count
        for index in configuration.checkpoints.indices {
            configuration.checkpoints[index].hasMemory = false
            configuration.checkpoints[index].diskIdentities = []
        }
        configuration.savedDiskIdentities = []
        if memories > 0 || hadSaved {
            warnings.append("a copy has new MAC addresses, which the guest in saved memory would not know: \(hadSaved ? "the saved state and " : "")the memory of \(memories) checkpoint\(memories == 1 ? "" : "s") were dropped; the VM and its checkpoints come back without memory (their disks are kept)")
        }
        return warnings
    }
}

/// Where a VM's disk files go when they move: every file of every disk chain, the checkpoints'
/// included. To a new bundle (export, live migration with storage copy): files in the bundle
/// keep their relative names, others go to `disks/` under their own name (made unique). Into a
/// directory (storage move): every file goes there under its own name (made unique), by
/// absolute path.
public struct VMRelocation: Sendable {
    /// Canonical source path → its new path (relative to the new bundle, or absolute).
    public var placed: [String: String] = [:]
    /// Differencing disks to re-point once copied, by new path: (child, parent).
    public var reparent: [(child: String, parent: String)] = []
    /// The configuration with every disk path as it will be.
    public var configuration: VMConfiguration

    /// Re-points each copied differencing disk in `pairs` at its copied parent, in order (the
    /// order of ``reparent``: parents first); relative paths are taken under `root`.
    public static func reparent(_ pairs: [(child: String, parent: String)], under root: String? = nil) throws(StoreError) {
        for (child, parent) in pairs {
            let childPath = root.map { $0 + "/" + child } ?? child, parentPath = root.map { $0 + "/" + parent } ?? parent
            do throws(VHDXError) { try VHDXImage.reparent(childPath: childPath, to: parentPath) } catch {
                throw .failed("re-pointing the copied \(child) at \(parent): \(error)")
            }
        }
    }

    public init(bundle: VMBundle, configuration: VMConfiguration, into directory: String? = nil) throws(StoreError) {
        let graph = try DiskGraph(bundle: bundle, configuration: configuration)
        var taken: Set<String> = []
        for file in graph.files.sorted() {
            var relative: String
            if directory == nil, file.hasPrefix(bundle.path + "/") {
                relative = String(file.dropFirst(bundle.path.count + 1))
            } else {
                let base = file.split(separator: "/").last.map(String.init) ?? "disk"
                let folder = directory.map { $0 + "/" } ?? "disks/"
                relative = folder + base
                var counter = 2
                while taken.contains(relative) { relative = folder + "\(counter)-" + base; counter += 1 }
            }
            taken.insert(relative)
            placed[file] = relative
        }
        // Parents first: re-pointing a child opens its parent's chain, which must already resolve
        // among the copies.
        var left = graph.parentOf.sorted(by: { $0.key < $1.key })
        while !left.isEmpty {
            let children = Set(left.map(\.key))
            let ready = left.filter { !children.contains($0.value) }
            left.removeAll { !children.contains($0.value) }
            for (child, parent) in ready {
                guard let childCopy = placed[child], let parentCopy = placed[parent] else { continue }
                reparent.append((childCopy, parentCopy))
            }
            if ready.isEmpty { break }   // a loop: DiskGraph would not have opened it
        }
        let placed = self.placed
        func mapped(_ path: String) -> String { placed[StoreFiles.canonical(bundle.file(path))] ?? path }
        var moved = configuration
        for index in moved.disks.indices {
            moved.disks[index].path = mapped(moved.disks[index].path)
            moved.disks[index].active = moved.disks[index].active.map(mapped)
        }
        for index in moved.checkpoints.indices {
            moved.checkpoints[index].disks = moved.checkpoints[index].disks.map(mapped)
        }
        self.configuration = moved
    }
}
