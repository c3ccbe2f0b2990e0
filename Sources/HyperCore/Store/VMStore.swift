#if canImport(Glibc)
internal import Glibc
#endif

/// One VM's directory, `vms/NAME/` under the store root, and the files in it.
public struct VMBundle: Sendable {
    public let name: String
    public let path: String

    public init(name: String, path: String) {
        self.name = name
        self.path = path
    }

    public var configurationPath: String { path + "/vm.json" }
    public var consoleLogPath: String { path + "/console.log" }
    /// The VM process's stdout and stderr (the error a failed start quotes).
    public var processLogPath: String { path + "/hvrun.log" }
    public var controlSocketPath: String { path + "/control.sock" }
    public var consoleSocketPath: String { path + "/console.sock" }
    /// Write-locked (``FileLock``) by the process running the VM, which writes its pid in it.
    public var lockPath: String { path + "/lock" }
    /// The saved state (a snapshot directory) of a saved VM.
    public var savedPath: String { path + "/saved" }
    /// Present while the VM is being received by a live migration (it holds the offer): such a
    /// bundle is not a VM of the store yet, and is removed if the receive fails.
    public var incomingPath: String { path + "/incoming" }

    public func configuration() throws(StoreError) -> VMConfiguration {
        guard StoreFiles.exists(configurationPath) else { throw .notFound(name: name) }
        return try VMConfiguration.decode(try StoreFiles.read(configurationPath), path: configurationPath)
    }

    public func file(_ relative: String) -> String { relative.hasPrefix("/") ? relative : path + "/" + relative }
    /// The file the VM uses for `disk` now (after a checkpoint, the newest AVHDX), as a host path.
    public func activePath(of disk: VMConfiguration.Disk) -> String { file(disk.activeFile) }

    /// The pid the running VM's process wrote into the lock file (nil when none holds it).
    public var processID: Int32? {
        guard FileLock.isHeld(lockPath), let bytes = try? StoreFiles.read(lockPath) else { return nil }
        return Int32(String(decoding: bytes, as: UTF8.self).split(separator: "\n").first ?? "")
    }
}

/// What a VM is doing, derived every time from the lock and the files — never read from a file
/// that a crash could leave stale.
public enum StoredVMState: String, Sendable, Equatable {
    /// No process holds the lock and there is no saved state.
    case off
    /// No process holds the lock; `saved/` holds a snapshot the next start continues from.
    case saved
    /// A process holds the lock and its control socket says so.
    case running, paused
    /// A process holds the lock but its control socket does not answer (yet): booting, or between
    /// a guest reset and the reboot.
    case starting
}

public struct VMStatus: Sendable {
    public var state: StoredVMState
    /// Seconds since the VM process started the machine (running or paused only).
    public var uptimeSeconds: Double?
}

/// What `hvrun vm create` asks for.
public struct VMCreateRequest: Sendable {
    public var name: String
    public var kernel: String
    public var initrd: String?
    public var cmdline = "console=ttyS0"
    public var cpus = 1
    public var memoryBytes: UInt64 = 256 << 20
    public var disks: [(path: String, readonly: Bool)] = []
    public var newDiskSizes: [UInt64] = []
    /// A NIC per entry: the switch name and a static MAC, or nil for a generated one.
    public var nics: [(switchName: String, mac: MACAddress?)] = []
    public var onReset: VMConfiguration.OnReset = .restart

    public init(name: String, kernel: String) {
        self.name = name
        self.kernel = kernel
    }
}

/// The VM store: `ROOT/vms/NAME/` bundles and `ROOT/store.lock`, which guards name and ID
/// uniqueness while a VM is created or deleted.
public struct VMStore: Sendable {
    public let root: String

    public init(root: String) { self.root = root }

    /// `$HVRUN_HOME`, else `$XDG_DATA_HOME/hvrun`, else `~/.local/share/hvrun` (empty variables
    /// count as unset).
    public static func defaultRoot() throws(StoreError) -> String {
        try defaultRoot { getenv($0).map { String(cString: $0) } }
    }

    public static func defaultRoot(environment: (String) -> String?) throws(StoreError) -> String {
        if let home = environment("HVRUN_HOME"), !home.isEmpty { return StoreFiles.absolute(home) }
        if let data = environment("XDG_DATA_HOME"), !data.isEmpty { return StoreFiles.absolute(data) + "/hvrun" }
        if let home = environment("HOME"), !home.isEmpty { return home + "/.local/share/hvrun" }
        throw .failed("cannot tell where the VM store is: set HVRUN_HOME (or HOME)")
    }

    public var vmsPath: String { root + "/vms" }
    public var lockPath: String { root + "/store.lock" }

    /// The bundle of the VM `name`; ``StoreError/notFound(name:)`` when there is none.
    public func bundle(named name: String) throws(StoreError) -> VMBundle {
        try VMName.validate(name)
        let bundle = VMBundle(name: name, path: vmsPath + "/" + name)
        guard StoreFiles.exists(bundle.configurationPath), !StoreFiles.exists(bundle.incomingPath) else { throw .notFound(name: name) }
        return bundle
    }

    /// Every VM's name, sorted (directories being created or deleted start with '.', and are skipped).
    public func names() -> [String] {
        StoreFiles.list(vmsPath).filter {
            VMName.isValid($0) && StoreFiles.exists(vmsPath + "/" + $0 + "/vm.json") && !StoreFiles.exists(vmsPath + "/" + $0 + "/incoming")
        }
    }

    public func status(of bundle: VMBundle) -> VMStatus {
        for _ in 0..<3 {
            if FileLock.isHeld(bundle.lockPath) {
                if let connection = try? ControlConnection(path: bundle.controlSocketPath, timeoutSeconds: 2),
                   let info = try? connection.execute("info", timeoutSeconds: 2),
                   let state = info["state"]?.stringValue.flatMap(StoredVMState.init(rawValue:)) {
                    return VMStatus(state: state, uptimeSeconds: info["uptime_s"]?.doubleValue)
                }
                // The process may just have ended: look again before calling it starting.
                if FileLock.isHeld(bundle.lockPath) { return VMStatus(state: .starting) }
                continue
            }
            return VMStatus(state: StoreFiles.exists(bundle.savedPath + "/state") ? .saved : .off)
        }
        return VMStatus(state: .starting)
    }

    /// Runs `body` holding the store-wide lock (waiting for it).
    public func withStoreLock<T>(_ body: () throws(StoreError) -> T) throws(StoreError) -> T {
        try StoreFiles.makeDirectories(vmsPath)
        guard let lock = try FileLock.acquire(lockPath, wait: true) else { throw .failed("\(lockPath): cannot lock") }
        // Creates, deletes and a receive's reservation hold this lock from start to end, so any
        // staging directory seen now was left by one that crashed: finish removing it.
        for name in StoreFiles.list(vmsPath) where name.hasPrefix(".")
            && (name.contains(".creating-") || name.contains(".deleting-") || name.contains(".receiving-")) {
            try? StoreFiles.removeTree(vmsPath + "/" + name)
        }
        removeFailedIncoming()
        let result = try body()
        _ = lock.fileDescriptor   // held until here
        return result
    }

    /// Creates the VM: a bundle with the kernel and initrd copied in, new disks made, NICs' MACs
    /// chosen, and `vm.json`; assembled in a hidden directory and renamed into place, so a crash
    /// leaves no half VM behind.
    @discardableResult
    public func create(_ request: VMCreateRequest, makeDisk: (String, UInt64) throws(StoreError) -> Void) throws(StoreError) -> VMBundle {
        try VMName.validate(request.name)
        guard (1...MachineConfiguration.maximumCPUs).contains(request.cpus) else {
            throw .invalid("--cpus must be between 1 and \(MachineConfiguration.maximumCPUs)")
        }
        for (path, _) in request.disks where !StoreFiles.exists(path) { throw .invalid("disk \(path) does not exist") }
        for path in [request.kernel] + (request.initrd.map { [$0] } ?? []) where !StoreFiles.exists(path) {
            throw .invalid("\(path) does not exist")
        }
        return try withStoreLock { () throws(StoreError) -> VMBundle in
            let final = VMBundle(name: request.name, path: vmsPath + "/" + request.name)
            guard !StoreFiles.exists(final.path) else { throw .refused("a VM named \(request.name) already exists") }
            var ids: Set<String> = []
            var macs: Set<MACAddress> = []
            for name in names() {
                guard let configuration = try? VMBundle(name: name, path: vmsPath + "/" + name).configuration() else { continue }
                ids.insert(configuration.id)
                for nic in configuration.nics { if let mac = MACAddress(nic.mac) { macs.insert(mac) } }
                // A static MAC twice on one switch: refused, naming both VMs.
                for nic in configuration.nics where nic.switch != "none" {
                    if let taken = request.nics.first(where: { $0.switchName == nic.switch && $0.mac != nil && $0.mac == MACAddress(nic.mac) }) {
                        throw .refused("MAC \(taken.mac!) is already VM \(name)'s on switch \(nic.switch); VM \(request.name) cannot have it there too")
                    }
                }
            }
            var id = randomUUIDString()
            while ids.contains(id) { id = randomUUIDString() }
            var nics: [VMConfiguration.NIC] = []
            for nic in request.nics {
                if let mac = nic.mac {
                    guard !mac.isMulticast else { throw .invalid("MAC \(mac) is a multicast address; a NIC needs a unicast one") }
                    nics.append(.init(switch: nic.switchName, mac: mac.description, macGenerated: false))
                    macs.insert(mac)
                } else {
                    let mac = MACAddress.generate(avoiding: macs)
                    macs.insert(mac)
                    nics.append(.init(switch: nic.switchName, mac: mac.description, macGenerated: true))
                }
            }
            let staging = VMBundle(name: request.name, path: vmsPath + "/.\(request.name).creating-\(getpid())")
            try? StoreFiles.removeTree(staging.path)
            do throws(StoreError) {
                guard mkdir(staging.path, 0o755) == 0 else { throw .system(operation: "mkdir", path: staging.path, errno: errno) }
                try StoreFiles.copy(request.kernel, to: staging.path + "/kernel")
                if let initrd = request.initrd { try StoreFiles.copy(initrd, to: staging.path + "/initrd") }
                var disks = request.disks.map { VMConfiguration.Disk(path: StoreFiles.absolute($0.path), readonly: $0.readonly) }
                for (index, size) in request.newDiskSizes.enumerated() {
                    let name = "disk\(index).vhdx"
                    try makeDisk(staging.path + "/" + name, size)
                    disks.append(.init(path: name, readonly: false))
                }
                let configuration = VMConfiguration(
                    id: id, name: request.name, cpus: request.cpus, memoryBytes: request.memoryBytes,
                    boot: .init(kernel: "kernel", initrd: request.initrd == nil ? nil : "initrd", cmdline: request.cmdline),
                    disks: disks, nics: nics, onReset: request.onReset)
                try StoreFiles.writeAtomically(staging.configurationPath, Array(try configuration.encoded().utf8))
                guard rename(staging.path, final.path) == 0 else { throw .system(operation: "rename", path: final.path, errno: errno) }
                StoreFiles.syncDirectory(of: final.path)
            } catch {
                try? StoreFiles.removeTree(staging.path)
                throw error
            }
            return final
        }
    }

    /// Removes a saved VM's `saved/` (refused while a process runs the VM): the next start boots afresh.
    public func discardSavedState(of bundle: VMBundle) throws(StoreError) {
        guard let lock = try FileLock.acquire(bundle.lockPath, wait: false) else {
            throw .refused("VM \(bundle.name) is running")
        }
        let doomed = bundle.path + "/.saved-discarded-\(getpid())"
        if rename(bundle.savedPath, doomed) == 0 { try StoreFiles.removeTree(doomed) }
        _ = lock.fileDescriptor   // held until here
    }

    /// Deletes the VM: refused (``StoreError/refused(_:)``) while a process runs it. Disks outside
    /// the bundle are left alone unless `deleteDisks`. Returns the disks it deleted outside the bundle.
    @discardableResult
    public func delete(name: String, deleteDisks: Bool) throws(StoreError) -> [String] {
        try withStoreLock { () throws(StoreError) -> [String] in
            let bundle = try bundle(named: name)
            // Holding the VM's lock while deleting: a start racing with the delete fails to take it.
            guard let lock = try FileLock.acquire(bundle.lockPath, wait: false) else {
                throw .refused("VM \(name) is running; stop it (hvrun vm stop \(name)) before deleting it")
            }
            defer { withExtendedLifetime(lock) {} }
            let configuration = try bundle.configuration()
            var deleted: [String] = []
            if deleteDisks {
                for disk in configuration.disks where !disk.isInBundle {
                    guard unlink(disk.path) == 0 || errno == ENOENT else { throw .system(operation: "unlink", path: disk.path, errno: errno) }
                    deleted.append(disk.path)
                }
            }
            let doomed = vmsPath + "/.\(name).deleting-\(getpid())"
            guard rename(bundle.path, doomed) == 0 else { throw .system(operation: "rename", path: bundle.path, errno: errno) }
            try StoreFiles.removeTree(doomed)
            StoreFiles.syncDirectory(of: bundle.path)
            return deleted
        }
    }
}
