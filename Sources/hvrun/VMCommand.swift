import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun vm …`: VMs that live in the store (see Docs/vm.md). The store logic is the library's
/// (`VMStore`, `VMBundle`); these commands parse, call it, and print.
/// Exit status: 0 success, 1 usage or host error, 2 refused by the VM's state ("VM is running").
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Create, start, save, stop and delete VMs kept in the store.",
        discussion: """
            The store is $HVRUN_HOME, else $XDG_DATA_HOME/hvrun, else ~/.local/share/hvrun; each VM is a \
            directory vms/NAME there. Each running VM is one `hvrun` process. \
            Exit status: 0 success; 1 usage or host error; 2 refused by the VM's state (e.g. "VM is running").
            """,
        subcommands: [VMCreateCommand.self, VMListCommand.self, VMInfoCommand.self, VMStartCommand.self,
                      VMPauseCommand.self, VMResumeCommand.self, VMSaveCommand.self, VMStopCommand.self,
                      VMDeleteCommand.self, VMLogCommand.self, VMConsoleCommand.self, VMCheckpointCommand.self,
                      VMExportCommand.self, VMImportCommand.self, VMMoveCommand.self, VMReceiveCommand.self]
    )
}

/// Runs a store command: a ``StoreError`` becomes one line on stderr and its exit status.
func storeCommand(_ body: (VMStore) throws -> Void) throws {
    do {
        try body(VMStore(root: try VMStore.defaultRoot()))
    } catch let error as StoreError {
        printError("hvrun: \(error)")
        throw ExitCode(error.exitStatus)
    }
}

/// Writes text to stdout as is.
func printOut(_ text: String) {
    var text = text
    text.withUTF8 { writeOut(UnsafeRawBufferPointer($0)) }
}

/// Writes bytes to stdout as they are (console output: a UTF-8 sequence may span two reads).
func writeOut(_ bytes: UnsafeRawBufferPointer) {
    guard let base = bytes.baseAddress else { return }
    var done = 0
    while done < bytes.count {
        let written = write(1, base + done, bytes.count - done)
        if written < 0 { if errno == EINTR { continue } else { return } }
        done += written
    }
}

/// The state (and uptime) a command needs to be in, or a refusal naming the state it is in.
func requireState(_ store: VMStore, _ bundle: VMBundle, _ allowed: [StoredVMState], for action: String) throws -> VMStatus {
    let status = store.status(of: bundle)
    guard allowed.contains(status.state) else {
        throw StoreError.refused("cannot \(action) VM \(bundle.name): it is \(status.state.rawValue)")
    }
    return status
}

/// Waits until no process holds the VM's lock; false at the deadline.
func waitUntilUnlocked(_ bundle: VMBundle, timeoutSeconds: Double) -> Bool {
    let deadline = monotonicSeconds() + timeoutSeconds
    while FileLock.isHeld(bundle.lockPath) {
        if monotonicSeconds() >= deadline { return false }
        usleep(20_000)
    }
    return true
}

struct VMCreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a VM in the store.")

    @Argument(help: ArgumentHelp("The VM's name: 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -.", valueName: "name"))
    var name: String
    @Option(name: [.short, .long], help: ArgumentHelp("Kernel (bzImage or PVH ELF); copied into the VM.", valueName: "file"), completion: .file())
    var kernel: String
    @Option(help: ArgumentHelp("Initial ramdisk; copied into the VM.", valueName: "file"), completion: .file())
    var initrd: String?
    @Option(help: ArgumentHelp("Kernel command line.", valueName: "text"))
    var cmdline: String = "console=ttyS0"
    @Option(name: [.short, .long], help: ArgumentHelp("Guest RAM, e.g. 256M or 2G (a bare number is MiB).", valueName: "size"))
    var memory: ByteCount = ByteCount(bytes: 256 << 20)
    @Option(name: [.short, .long], help: ArgumentHelp("Number of vCPUs.", valueName: "n"))
    var cpus: Int = 1
    @Option(name: .customLong("disk"), help: ArgumentHelp("An existing raw or VHDX disk, used in place (not copied). Repeatable.", valueName: "path[,readonly]"),
            completion: .file(), transform: DiskOption.parse)
    var disks: [DiskOption] = []
    @Option(name: .customLong("new-disk"), help: ArgumentHelp("A new dynamic VHDX of this size inside the VM. Repeatable.", valueName: "size"))
    var newDisks: [ByteCount] = []
    @Option(name: .customLong("nic"), help: ArgumentHelp("A NIC on virtual switch SWITCH (see hvrun switch), or `none` for a NIC that is not connected; mac= gives a static MAC, else one is generated. Repeatable.", valueName: "switch[,mac=MAC]"))
    var nics: [String] = []
    @Option(help: ArgumentHelp("What a guest reset does: restart the VM, or stop it.", valueName: "restart|stop"))
    var onReset: String = "restart"

    func run() throws {
        try storeCommand { store in
            var request = VMCreateRequest(name: name, kernel: kernel)
            request.initrd = initrd
            request.cmdline = cmdline
            request.cpus = cpus
            guard memory.bytes >= 1 << 20, memory.bytes % 4096 == 0, memory.bytes <= GuestLayout.maximumRAM else {
                throw StoreError.invalid("--memory \(memory) is out of range: use a multiple of 4K between 1M and \(ByteCount(bytes: GuestLayout.maximumRAM))")
            }
            request.memoryBytes = memory.bytes
            request.disks = disks.map { ($0.path, $0.readOnly) }
            request.newDiskSizes = newDisks.map(\.bytes)
            // `none` is a NIC that is not connected (Hyper-V allows one): it has a MAC like any other.
            for nic in nics {
                let parts = nic.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
                guard let switchName = parts.first, !switchName.isEmpty else { throw StoreError.invalid("--nic needs a switch name, as in --nic lan or --nic lan,mac=52:54:00:12:34:56") }
                var mac: MACAddress?
                for option in parts.dropFirst() {
                    guard option.hasPrefix("mac="), let parsed = MACAddress(String(option.dropFirst(4))) else {
                        throw StoreError.invalid("bad --nic option '\(option)' in --nic \(nic) (valid: mac=XX:XX:XX:XX:XX:XX)")
                    }
                    mac = parsed
                }
                request.nics.append((switchName, mac))
            }
            guard let onReset = VMConfiguration.OnReset(rawValue: onReset) else { throw StoreError.invalid("--on-reset must be restart or stop") }
            request.onReset = onReset
            let bundle = try store.create(request) { path, size throws(StoreError) in
                do throws(VHDXError) { try VHDXImage.create(path: path, options: .init(virtualSize: size)) } catch {
                    throw .failed("cannot create \(path): \(error)")
                }
            }
            printOut("created VM \(name) in \(bundle.path)\n")
        }
    }
}

struct VMListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the VMs: name, state, CPUs, memory, uptime, checkpoints.")
    @Flag(help: "Print a JSON array of {name, id, state, cpus, memory_bytes, uptime_s, checkpoints}.")
    var json = false

    func run() throws {
        try storeCommand { store in
            var rows: [(VMConfiguration, VMStatus)] = []
            for name in store.names() {
                let bundle = VMBundle(name: name, path: store.vmsPath + "/" + name)
                guard let configuration = try? bundle.configuration() else { continue }
                rows.append((configuration, store.status(of: bundle)))
            }
            if json {
                let array = JSONValue.array(rows.map { configuration, status in
                    .object([("name", .string(configuration.name)), ("id", .string(configuration.id)),
                             ("state", .string(status.state.rawValue)), ("cpus", .number(Int64(configuration.cpus))),
                             ("memory_bytes", .number(Int64(configuration.memoryBytes))),
                             ("uptime_s", status.uptimeSeconds.map { .double(($0 * 1000).rounded() / 1000) } ?? .null),
                             ("checkpoints", .number(Int64(configuration.checkpoints.count)))])
                })
                printOut(array.rendered() + "\n")
                return
            }
            var lines = [["NAME", "STATE", "CPUS", "MEMORY", "UPTIME", "CHECKPOINTS"]]
            for (configuration, status) in rows {
                lines.append([configuration.name, status.state.rawValue, "\(configuration.cpus)",
                              ByteCount(bytes: configuration.memoryBytes).description,
                              status.uptimeSeconds.map(formatUptime) ?? "-", "\(configuration.checkpoints.count)"])
            }
            let widths = (0..<6).map { column in lines.map { $0[column].count }.max()! }
            for line in lines {
                let padded = line.enumerated().map { index, cell in index == 5 ? cell : cell + String(repeating: " ", count: widths[index] - cell.count + 2) }
                printOut(padded.joined() + "\n")
            }
        }
    }
}

func formatUptime(_ seconds: Double) -> String {
    let total = Int(seconds)
    if total < 60 { return "\(total)s" }
    if total < 3600 { return "\(total / 60)m\(total % 60)s" }
    return "\(total / 3600)h\(total % 3600 / 60)m"
}

struct VMInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a VM's configuration and state.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Flag(help: "Print JSON: the configuration, state, path, console_log, disks with their active path, nics, checkpoints, current_checkpoint.")
    var json = false

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let configuration = try bundle.configuration()
            let status = store.status(of: bundle)
            if json {
                var members: [(String, JSONValue)] = [
                    ("name", .string(configuration.name)), ("id", .string(configuration.id)),
                    ("state", .string(status.state.rawValue)),
                    ("uptime_s", status.uptimeSeconds.map { .double(($0 * 1000).rounded() / 1000) } ?? .null),
                    ("path", .string(bundle.path)), ("console_log", .string(bundle.consoleLogPath)),
                    ("cpus", .number(Int64(configuration.cpus))), ("memory_bytes", .number(Int64(configuration.memoryBytes))),
                    ("boot", .object([("kernel", .string(bundle.file(configuration.boot.kernel))),
                                      ("initrd", configuration.boot.initrd.map { .string(bundle.file($0)) } ?? .null),
                                      ("cmdline", .string(configuration.boot.cmdline))])),
                ]
                members.append(("disks", .array(configuration.disks.map { disk in
                    .object([("path", .string(disk.path)), ("readonly", .bool(disk.readonly)),
                             ("active_path", .string(bundle.activePath(of: disk))), ("in_bundle", .bool(disk.isInBundle))])
                })))
                members.append(("nics", .array(configuration.nics.map { nic in
                    .object([("switch", .string(nic.switch)), ("mac", .string(nic.mac)), ("mac_generated", .bool(nic.macGenerated))])
                })))
                members.append(("on_reset", .string(configuration.onReset.rawValue)))
                members.append(("checkpoints", .array(configuration.checkpoints.map { checkpointJSON($0, current: configuration.currentCheckpoint) })))
                members.append(("current_checkpoint", configuration.currentCheckpoint.map(JSONValue.string) ?? .null))
                // Checkpoint work recorded but not finished: a running VM's background merge, or
                // work a crash interrupted (the next command or start finishes it).
                members.append(("merging", .bool(!configuration.pending.isEmpty)))
                printOut(JSONValue.object(members).rendered() + "\n")
                return
            }
            var text = "name:      \(configuration.name)\nid:        \(configuration.id)\nstate:     \(status.state.rawValue)\n"
            if let uptime = status.uptimeSeconds { text += "uptime:    \(formatUptime(uptime))\n" }
            text += "path:      \(bundle.path)\ncpus:      \(configuration.cpus)\nmemory:    \(ByteCount(bytes: configuration.memoryBytes))\n"
            text += "cmdline:   \(configuration.boot.cmdline)\non_reset:  \(configuration.onReset.rawValue)\n"
            for disk in configuration.disks { text += "disk:      \(bundle.activePath(of: disk))\(disk.readonly ? " (readonly)" : "")\n" }
            for nic in configuration.nics { text += "nic:       \(nic.switch) \(nic.mac)\(nic.macGenerated ? " (generated)" : "")\n" }
            text += "checkpoints: \(configuration.checkpoints.count)\(configuration.pending.isEmpty ? "" : " (merging)")\n"
            printOut(text)
        }
    }
}

/// Sends `verb` over the control socket of VM `name`, which must be running or paused.
private func sendToRunningVM(_ name: String, _ verb: String) throws {
    try storeCommand { store in
        let bundle = try store.bundle(named: name)
        _ = try requireState(store, bundle, [.running, .paused], for: verb)
        try ControlConnection(path: bundle.controlSocketPath).execute(verb)
    }
}

struct VMPauseCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "pause", abstract: "Pause a running VM (its vCPUs stop; the process stays).")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    func run() throws { try sendToRunningVM(name, "pause") }
}

struct VMResumeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "resume", abstract: "Resume a paused VM.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    func run() throws { try sendToRunningVM(name, "resume") }
}

struct VMSaveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "save", abstract: "Save a running or paused VM's state into the VM and end its process; `start` continues it.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Option(help: ArgumentHelp("Seconds to wait for the process to end after the save.", valueName: "seconds"))
    var timeout: Double = 60
    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            _ = try requireState(store, bundle, [.running, .paused], for: "save")
            let reply = try ControlConnection(path: bundle.controlSocketPath).execute("save", arguments: [("path", .string(bundle.savedPath))], timeoutSeconds: timeout)
            guard waitUntilUnlocked(bundle, timeoutSeconds: timeout) else {
                throw StoreError.failed("VM \(name) was saved but its process did not end within \(timeout) s")
            }
            let written = reply["memory_bytes_written"]?.int64Value ?? 0
            printOut("saved VM \(name) (\(written >> 10) KiB of memory)\n")
        }
    }
}

struct VMStopCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stop", abstract: "Stop a VM: ask the guest to shut down (ACPI power button), then turn it off.",
        discussion: "Without --force, the VM's ACPI power button is pressed and the guest gets --timeout seconds (default 30) to power off; a guest that has not by then is turned off (its machine ends; hvrun closes the disks cleanly). --force turns it off at once, and kills the VM process (SIGKILL) if it does not answer or end within --timeout.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Flag(help: "Turn the VM off now, without asking the guest; kill its process if it does not end in time.")
    var force = false
    @Option(help: ArgumentHelp("Seconds the guest gets to shut down (and the process to end).", valueName: "seconds"))
    var timeout: Double = 30
    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let state = try requireState(store, bundle, [.running, .paused, .starting], for: "stop").state
            if !force, state == .running {
                do {
                    try ControlConnection(path: bundle.controlSocketPath, timeoutSeconds: 5).execute("powerdown", timeoutSeconds: 5)
                    if waitUntilUnlocked(bundle, timeoutSeconds: timeout) {
                        printOut("VM \(name) shut down\n")
                        return
                    }
                    printError("hvrun: VM \(name) did not shut down within \(timeout) s; turning it off")
                } catch let error as StoreError {
                    if !FileLock.isHeld(bundle.lockPath) { return }   // it ended meanwhile
                    printError("hvrun: VM \(name) cannot be asked to shut down (\(error)); turning it off")
                }
            }
            try turnOff(bundle, force: force, timeout: timeout)
            printOut("VM \(name) turned off\n")
        }
    }

    /// The control socket's `stop` (the machine ends at once; the disks are closed cleanly), with
    /// retries while a rebooting VM has no socket for a moment; `force` kills a process that
    /// does not answer or end in time.
    private func turnOff(_ bundle: VMBundle, force: Bool, timeout: Double) throws {
        let pid = bundle.processID
        let askDeadline = monotonicSeconds() + min(timeout, 5)
        var asked = false
        var lastError: StoreError?
        while !asked, monotonicSeconds() < askDeadline {
            do throws(StoreError) {
                try ControlConnection(path: bundle.controlSocketPath, timeoutSeconds: min(timeout, 5)).execute("stop", timeoutSeconds: min(timeout, 5))
                asked = true
            } catch {
                if !FileLock.isHeld(bundle.lockPath) { return }   // it ended meanwhile
                lastError = error
                usleep(50_000)
            }
        }
        if !asked {
            let reason = lastError.map { "\($0)" } ?? "no answer"
            guard force else {
                throw StoreError.failed("VM \(name) does not answer on its control socket (\(reason)); hvrun vm stop --force \(name) kills its process")
            }
            printError("hvrun: VM \(name) does not answer (\(reason)); killing its process")
        }
        if asked, waitUntilUnlocked(bundle, timeoutSeconds: timeout) { return }
        guard force else {
            throw StoreError.failed("VM \(name) did not stop within \(timeout) s; hvrun vm stop --force \(name) kills its process")
        }
        if let pid, pid > 1 { kill(pid, SIGKILL) }
        guard waitUntilUnlocked(bundle, timeoutSeconds: 10) else { throw StoreError.failed("VM \(name)'s process \(pid.map(String.init) ?? "?") survived SIGKILL") }
    }
}

struct VMDeleteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete a VM that is not running (its bundle, with the disks made by --new-disk).")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Flag(help: "Also delete the disks the VM uses from outside its directory (--disk at create).")
    var deleteDisks = false
    func run() throws {
        try storeCommand { store in
            let deleted = try store.delete(name: name, deleteDisks: deleteDisks)
            printOut("deleted VM \(name)\(deleted.isEmpty ? "" : " and " + deleted.joined(separator: ", "))\n")
        }
    }
}

struct VMLogCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "log", abstract: "Print a VM's console log (console.log in its directory).")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Flag(name: [.short, .long], help: "Keep printing what the VM writes (until Ctrl-C).")
    var follow = false
    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            var offset: Int64 = 0
            var identity = fileIdentity(bundle.consoleLogPath)
            if let bytes = try? StoreFiles.read(bundle.consoleLogPath) {
                bytes.withUnsafeBytes { writeOut($0) }
                offset = Int64(bytes.count)
            }
            guard follow else { return }
            while true {
                usleep(100_000)
                let now = fileIdentity(bundle.consoleLogPath)
                if now != identity { identity = now; offset = 0 }   // rotated: the new file from its start
                guard let size = StoreFiles.size(bundle.consoleLogPath), size > offset else { continue }
                let fd = open(bundle.consoleLogPath, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { continue }
                var buffer = [UInt8](repeating: 0, count: Int(size - offset))
                let count = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
                close(fd)
                if count > 0 {
                    buffer[0..<count].withUnsafeBytes { writeOut($0) }
                    offset += Int64(count)
                }
            }
        }
    }
}

private func fileIdentity(_ path: String) -> UInt64 {
    var info = stat()
    return stat(path, &info) == 0 ? UInt64(info.st_ino) : 0
}
