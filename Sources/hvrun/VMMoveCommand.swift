import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun vm move NAME --to ADDR --token T`: live migration of a running VM to another host's
/// store (see Docs/migration.md). The VM's own process does the migration (asked with `migrate`
/// on its control socket); this command shows its progress and, once the destination confirmed
/// the guest runs there, waits for the process to end and the bundle to go.
/// Exit status: 0 moved; 1 failed (the VM runs on here); 2 refused by the VM's state;
/// 3 the connection failed during the switch-over (the VM is paused here; see the message).
struct VMMoveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "move",
        abstract: "Move a running VM to another host (live migration); the VM keeps running throughout.",
        discussion: "The destination runs `hvrun vm receive --listen ADDR`, which prints the one-time token to give here. Exit status: 0 moved, 1 failed (the VM runs on here), 2 refused by the VM's state, 3 the connection broke during the switch-over (the VM is paused here: resume it only if it does not run on the destination).")

    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Option(help: ArgumentHelp("The receiver: HOST:PORT (TCP) or unix:PATH.", valueName: "addr"))
    var to: String?
    @Option(help: ArgumentHelp("The receiver's one-time token.", valueName: "token"))
    var token: String?
    @Option(help: ArgumentHelp("shared: both hosts see the disk files (only memory and state move); copy: the disks move too. Default: shared when every disk is outside the VM's directory, else copy.", valueName: "shared|copy"))
    var storage: String?
    @Option(help: ArgumentHelp("Largest pause the guest may see, in milliseconds (with --storage-only: the longest wait of its disk I/O).", valueName: "ms"))
    var maxDowntime: Double = 50
    @Option(help: ArgumentHelp("Abort (the VM runs on here) if the switch-over has not started after this many seconds.", valueName: "seconds"))
    var timeout: Double?
    @Option(help: ArgumentHelp("Storage migration on this host: move the running VM's disk files (every chain, checkpoints' files included) into this directory while it runs.", valueName: "dir"))
    var storageOnly: String?
    @Option(help: ArgumentHelp("Cap the pre-copy's send rate, in MB/s (the switch-over is never capped).", valueName: "mbps"))
    var maxBandwidth: Double?
    @Flag(help: "Do not slow the guest's vCPUs when it dirties memory faster than the link carries it.")
    var noAutoConverge = false
    @Option(help: ArgumentHelp("manual: KVM's manual dirty-log protection where the kernel offers it (pages write-protected a chunk at a time, as they are copied); classic: the whole of guest RAM write-protected when the move starts, and at each read of the log.", valueName: "manual|classic"))
    var dirtyLog: String = "manual"
    @Flag(help: "Print one JSON object: passes, bytes_sent, total_ms, downtime_ms and more.")
    var json = false

    func validate() throws {
        guard maxDowntime >= 1, maxDowntime <= 60_000 else { throw ValidationError("--max-downtime must be between 1 and 60000 ms") }
        if storageOnly != nil {
            if to != nil || token != nil || storage != nil {
                throw ValidationError("--storage-only moves the disks on this host: it takes no --to, --token or --storage")
            }
            return
        }
        guard to != nil, token != nil else { throw ValidationError("vm move needs --to ADDR and --token TOKEN (hvrun vm receive on the destination prints it)") }
        if let storage, storage != "shared", storage != "copy" { throw ValidationError("--storage must be shared or copy") }
        guard dirtyLog == "manual" || dirtyLog == "classic" else { throw ValidationError("--dirty-log must be manual or classic") }
        if let timeout, !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
    }

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            _ = try requireState(store, bundle, [.running, .paused], for: "move")
            if let storageOnly {
                try moveStorage(bundle, into: StoreFiles.canonical(storageOnly))
                return
            }
            let configuration = try bundle.configuration()
            let mode = storage ?? (configuration.disks.allSatisfy { !$0.isInBundle } ? "shared" : "copy")
            if mode == "shared", let local = configuration.disks.first(where: \.isInBundle) {
                throw StoreError.invalid("disk \(local.path) is inside the VM's directory, which the destination cannot see: use --storage copy")
            }
            guard configuration.pending.isEmpty else {
                throw StoreError.refused("VM \(name) is finishing checkpoint work (a merge); move it once `hvrun vm info \(name)` shows none pending")
            }
            var vm = try JSONValue.parse(try StoreFiles.read(bundle.configurationPath))
            var files: [JSONValue] = [.object([("name", .string("kernel")), ("path", .string(bundle.file(configuration.boot.kernel)))])]
            if let initrd = configuration.boot.initrd {
                files.append(.object([("name", .string("initrd")), ("path", .string(bundle.file(initrd)))]))
            }
            var metadata: [(String, JSONValue)] = [("name", .string(name))]
            if mode == "copy" {
                let plan = try StorageCopyPlan(bundle: bundle, configuration: configuration)
                vm = try JSONValue.parse(Array(try plan.relocation.configuration.encoded().utf8))
                files += plan.files.map { .object([("name", .string($0.name)), ("path", .string($0.path))]) }
                metadata.append(("reparent", .array(plan.relocation.reparent.map { .array([.string($0.child), .string($0.parent)]) })))
            }
            metadata.append(("vm", vm))
            var arguments: [(String, JSONValue)] = [
                ("uri", .string(to!)), ("token", .string(token!)), ("storage", .string(mode)),
                ("max_downtime_ms", .double(maxDowntime)), ("auto_converge", .bool(!noAutoConverge)), ("dirty_log", .string(dirtyLog)),
                ("metadata", .object(metadata)), ("files", .array(files)),
            ]
            if let timeout { arguments.append(("timeout_s", .double(timeout))) }
            if let maxBandwidth { arguments.append(("max_bandwidth_mbps", .double(maxBandwidth))) }
            let connection = try ControlConnection(path: bundle.controlSocketPath)
            try connection.execute("migrate", arguments: arguments)
            let terminal = !json && isatty(1) == 1
            var result: JSONValue = .null
            while true {
                let line = try connection.readLine(timeoutSeconds: (timeout ?? 3600) + 120)
                guard let event = line["event"]?.stringValue, let data = line["data"] else { continue }
                if event == "MIGRATION_PASS" {
                    if terminal {
                        let sent = (data["bytes_sent"]?.int64Value ?? 0) >> 20
                        let throttle = data["throttle_percent"]?.int64Value ?? 0
                        printOut("\r\u{1B}[Kpass \(data["pass"]?.int64Value ?? 0): \(sent) MiB sent, \(data["dirty_pages"]?.int64Value ?? 0) pages dirty" + (throttle > 0 ? ", vCPUs throttled \(throttle)%" : ""))
                    }
                    continue
                }
                if event == "MIGRATION" { result = data; break }
            }
            if terminal { printOut("\r\u{1B}[K") }
            guard result["status"]?.stringValue == "completed" else {
                let message = result["error"]?.stringValue ?? "unknown error"
                if result["switch_over_unknown"] == .bool(true) {
                    printError("hvrun: \(message)")
                    throw ExitCode(3)
                }
                throw StoreError.failed("VM \(name) did not move: \(message); it runs on here")
            }
            // The VM process ends and removes the bundle.
            let deadline = monotonicSeconds() + 30
            while StoreFiles.exists(bundle.configurationPath) || FileLock.isHeld(bundle.lockPath) {
                if monotonicSeconds() > deadline { printError("hvrun: VM \(name) moved, but its process here has not ended yet"); break }
                usleep(10_000)
            }
            if json {
                printOut(result.rendered() + "\n")
            } else {
                let ms = { (key: String) in result[key]?.doubleValue.map { String(($0 * 10).rounded() / 10) } ?? "?" }
                let throttle = result["max_throttle_percent"]?.int64Value ?? 0
                printOut("moved VM \(name) to \(to!): \(result["passes"]?.int64Value ?? 0) passes, \((result["bytes_sent"]?.int64Value ?? 0) >> 10) KiB sent, total \(ms("total_ms")) ms, downtime \(ms("downtime_ms")) ms"
                         + (throttle > 0 ? " (auto-converge throttled the vCPUs up to \(throttle)%)" : "") + "\n")
            }
        }
    }
}

extension VMMoveCommand {
    /// `--storage-only DIR`: the VM's process moves its disk files into DIR while the guest runs.
    func moveStorage(_ bundle: VMBundle, into directory: String) throws {
        guard StoreFiles.isDirectory(directory) else { throw StoreError.invalid("\(directory) is not a directory") }
        let connection = try ControlConnection(path: bundle.controlSocketPath)
        try connection.execute("vm-move-storage", arguments: [("dir", .string(directory)), ("max_stall_ms", .double(maxDowntime))])
        var result: JSONValue = .null
        while true {
            let line = try connection.readLine(timeoutSeconds: timeout ?? 24 * 3600)
            if line["event"]?.stringValue == "STORAGE_MOVE", let data = line["data"] { result = data; break }
        }
        guard result["status"]?.stringValue == "completed" else {
            let message = "VM \(name)'s disks did not move: \(result["error"]?.stringValue ?? "unknown error"); it runs on its old files"
            throw result["refused"] == .bool(true) ? StoreError.refused(message) : StoreError.failed(message)
        }
        if json {
            printOut(result.rendered() + "\n")
            return
        }
        let ms = { (key: String) in result[key]?.doubleValue.map { String(($0 * 10).rounded() / 10) } ?? "?" }
        printOut("moved VM \(name)'s disks to \(directory): \((result["bytes_copied"]?.int64Value ?? 0) >> 10) KiB copied in \(result["rounds"]?.int64Value ?? 0) passes, disk I/O paused \(ms("stall_ms")) ms, total \(ms("total_ms")) ms\n")
        if case let .array(left)? = result["left_in_place"], !left.isEmpty {
            printOut("left in place (outside the VM's directory; delete them if nothing else uses them): \(left.compactMap(\.stringValue).joined(separator: ", "))\n")
        }
    }
}

/// `hvrun vm receive --listen ADDR`: waits for one `hvrun vm move` and takes the VM into this
/// host's store; exits 0 once the guest runs here in its own process, non-zero on any failure,
/// after removing everything it created.
struct VMReceiveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Receive a VM moved with `hvrun vm move`; it runs here in its own process.",
        discussion: "Prints the one-time token (unless --token gives one) and waits for one sender. Exit status: 0 the VM runs here; 1 any failure (nothing is left in the store).")

    @Option(help: ArgumentHelp("Where to listen: HOST:PORT (TCP; port 0 picks one) or unix:PATH.", valueName: "addr"))
    var listen: String
    @Option(help: ArgumentHelp("The one-time token the sender must know (default: a new random one, printed).", valueName: "token"))
    var token: String?
    @Option(help: ArgumentHelp("The VM's name here (default: its name on the source).", valueName: "name"))
    var name: String?
    @Option(help: ArgumentHelp("Seconds to wait for the sender to connect.", valueName: "seconds"))
    var wait: Double = 600

    func run() throws {
        try storeCommand { store in
            do {
                try receive(store)
            } catch let error as MigrationError {
                throw StoreError.failed("\(error)")
            }
        }
    }

    private func receive(_ store: VMStore) throws {
        let endpoint = try MigrationEndpoint(parsing: listen)
        let token = self.token ?? MigrationToken.generate()
        try MigrationToken.validate(token)
        if let name { try VMName.validate(name) }
        let listener = try endpoint.listen()
        defer {
            close(listener)
            if case let .unix(path) = endpoint { unlink(path) }
        }
        var shown = endpoint.description
        if case let .tcp(host, 0) = endpoint, let port = MigrationEndpoint.boundPort(listener) { shown = MigrationEndpoint.tcp(host: host, port: port).description }
        printOut("listening on \(shown)\n")
        if self.token == nil { printOut("token: \(token)\n") }
        // The VM's process starts now, while the sender is not here yet (StandbyVMProcess.swift).
        var standby = StandbyVMProcess.spawn()
        defer { standby?.discard() }
        let fd = try MigrationEndpoint.accept(listener, timeoutSeconds: wait)
        var handedOver = false
        defer { if !handedOver { close(fd) } }
        let stream = MigrationStream(fd: fd)
        let receiver = MigrationReceiver(stream: stream)
        try receiver.authenticate(token: token)
        let offer = try receiver.receiveOffer()
        guard let vm = offer.metadata["vm"] else {
            stream.abort("the offer has no VM configuration (not sent by hvrun vm move?)")
            throw StoreError.failed("the sender offered no VM configuration")
        }
        let finalName = name ?? offer.metadata["name"]?.stringValue ?? ""
        do { try VMName.validate(finalName) } catch {
            stream.abort("\(error)")
            throw error
        }
        var configuration = try VMConfiguration.decode(Array(vm.rendered().utf8), path: "the offer")
        configuration.name = finalName
        let reparent: [(child: String, parent: String)]
        do {
            guard offer.files.allSatisfy({ StorageCopyPlan.isSafeName($0.name) }), Set(offer.files.map(\.name)).count == offer.files.count else {
                throw StoreError.failed("the sender offered a file name that does not belong in a VM's directory: \(offer.files.map(\.name))")
            }
            reparent = try StorageCopyPlan.reparentPairs(offer.metadata)
        } catch {
            stream.abort("\(error)")
            throw error
        }
        // Reserve the name: a bundle with an `incoming` marker is not a VM of the store yet.
        let bundle = VMBundle(name: finalName, path: store.vmsPath + "/" + finalName)
        do {
            try store.withStoreLock { () throws(StoreError) in
                guard !StoreFiles.exists(bundle.path) else { throw .refused("a VM named \(finalName) already exists here (use --name)") }
                // Assembled aside and renamed: the bundle never exists without its marker, so a
                // receive killed at any point leaves something the store's recovery removes.
                let staging = store.vmsPath + "/.\(finalName).receiving-\(getpid())"
                try? StoreFiles.removeTree(staging)
                guard mkdir(staging, 0o755) == 0 else { throw .system(operation: "mkdir", path: staging, errno: errno) }
                try StoreFiles.writeAtomically(staging + "/incoming", Array("\(getpid())\n\(offer.json.rendered())".utf8))
                guard rename(staging, bundle.path) == 0 else {
                    let code = errno
                    try? StoreFiles.removeTree(staging)
                    throw .system(operation: "rename", path: bundle.path, errno: code)
                }
                // The marker is durable before the rename; the rename itself, the files below and
                // vm.json are made durable by the VM process while memory flows, before it makes
                // the VM this store's (BundleIncoming): a power loss before then leaves at most a
                // marked bundle, which recovery removes.
            }
        } catch {
            stream.abort("\(error)")
            throw error
        }
        var spawned: pid_t = 0
        defer {
            // Nothing stays behind unless the VM runs here.
            if StoreFiles.exists(bundle.incomingPath) {
                if spawned > 0 { kill(spawned, SIGKILL); var status: Int32 = 0; waitpid(spawned, &status, 0) }
                store.removeBundle(bundle)
            }
        }
        do {
            var open: [Int: Int32] = [:]
            defer { open.values.forEach { close($0) } }
            try receiver.receiveFiles(offer) { (index, offset, bytes) throws(MigrationError) in
                let path = bundle.path + "/" + offer.files[index].name
                if open[index] == nil {
                    do throws(StoreError) { try StoreFiles.makeDirectories(String(path[..<path.lastIndex(of: "/")!])) } catch {
                        throw .machine("\(error)")
                    }
                    let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                    guard fd >= 0 else { throw .io(operation: "create \(path)", errno: errno) }
                    open[index] = fd
                }
                let failed = bytes.withUnsafeBytes { raw in pwrite(open[index]!, raw.baseAddress, raw.count, off_t(offset)) != raw.count }
                if failed { throw .io(operation: "write \(path)", errno: errno) }
            }
            for (index, file) in offer.files.enumerated() where open[index] == nil {
                try StoreFiles.makeDirectories(bundle.path + "/" + file.name.split(separator: "/").dropLast().joined(separator: "/"))
                try StoreFiles.writeAtomically(bundle.path + "/" + file.name, [], durable: false)
            }
            // As the source had them: raw disks are known by size and modification time.
            for (index, file) in offer.files.enumerated() {
                let path = bundle.path + "/" + file.name
                if let time = offer.fileTimes[index] {
                    var times = [timespec(tv_sec: Int(time / 1_000_000_000), tv_nsec: Int(time % 1_000_000_000)),
                                 timespec(tv_sec: Int(time / 1_000_000_000), tv_nsec: Int(time % 1_000_000_000))]
                    guard utimensat(AT_FDCWD, path, &times, 0) == 0 else { throw MigrationError.io(operation: "utimensat \(path)", errno: errno) }
                }
            }
            // Frozen differencing disks come whole: re-point them at their copied parents now
            // (the files the guest writes are re-pointed by the VM process once they are copied).
            let names = Set(offer.files.map(\.name))
            try StorageCopyPlan.reparent(reparent.filter { names.contains($0.child) }, in: bundle)
            try StoreFiles.writeAtomically(bundle.configurationPath, Array(try configuration.encoded().utf8), durable: false)
            // The VM process reads on from the socket: nothing may be left in this stream's buffer
            // (the sender waits for `ready` after the files, so a byte here breaks the protocol).
            guard stream.bufferedByteCount == 0 else {
                throw MigrationError.protocolViolation("the sender sent \(stream.bufferedByteCount) bytes before the destination said ready")
            }
        } catch {
            stream.abort("\(error)")
            throw error
        }
        if let waiting = standby, waiting.handOver(bundle: bundle, connection: fd) {
            spawned = waiting.pid
            standby = nil
        } else {
            spawned = try spawnVMProcess(bundle, incoming: fd)
        }
        handedOver = true
        close(fd)
        let deadline = monotonicSeconds() + 3600
        while true {
            var status: Int32 = 0
            if waitpid(spawned, &status, WNOHANG) == spawned {
                spawned = 0
                let code = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
                if !StoreFiles.exists(bundle.incomingPath), StoreFiles.exists(bundle.configurationPath) {
                    printOut("received VM \(finalName); it ran here and has already ended (status \(code))\n")
                    return
                }
                throw StoreError.failed("receiving VM \(finalName) failed (its process exited with status \(code)):\n\(logTail(bundle.processLogPath))")
            }
            if !StoreFiles.exists(bundle.incomingPath), bundle.processID == spawned,
               let connection = try? ControlConnection(path: bundle.controlSocketPath, timeoutSeconds: 2),
               let state = (try? connection.execute("info", timeoutSeconds: 2))?["state"]?.stringValue,
               state == "running" || state == "paused" {
                printOut("received VM \(finalName); it runs here (pid \(spawned))\n")
                return
            }
            if monotonicSeconds() > deadline { throw StoreError.failed("receiving VM \(finalName) did not finish within an hour") }
            usleep(5_000)
        }
    }
}
