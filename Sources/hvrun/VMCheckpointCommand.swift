import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun vm checkpoint …`: Hyper-V's standard checkpoints (Checkpoint-VM, Get-VMCheckpoint,
/// Restore-VMCheckpoint, Remove-VMCheckpoint). The work is the library's `VMCheckpointStore`; a
/// running VM's own process does it (over its control socket), else this command, holding the
/// VM's lock.
struct VMCheckpointCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoint",
        abstract: "Create, list, apply and delete a VM's checkpoints (disks, and memory when it runs).",
        subcommands: [VMCheckpointCreate.self, VMCheckpointList.self, VMCheckpointApply.self, VMCheckpointDelete.self])
}

/// Runs `body` holding the VM's lock: refused (exit 2) while a process runs the VM.
func withVMLock<T>(_ store: VMStore, _ bundle: VMBundle, for action: String, _ body: () throws -> T) throws -> T {
    guard let lock = try FileLock.acquire(bundle.lockPath, wait: false) else {
        throw StoreError.refused("cannot \(action) VM \(bundle.name): it is \(store.status(of: bundle).state.rawValue)")
    }
    defer { withExtendedLifetime(lock) {} }
    return try body()
}

struct VMCheckpointCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Take a checkpoint: a running VM's memory and devices (one short pause) and every disk.",
        discussion: "Each VHDX disk continues on a new differencing disk (AVHDX) whose parent is the file it was writing, which stays frozen. A raw disk refuses: convert it first (hvrun disk convert).")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Argument(help: ArgumentHelp("The checkpoint's name (default: \"NAME (YYYY-MM-DD hh:mm:ss)\").", valueName: "checkpoint")) var checkpoint: String?
    @Flag(help: "Print {id, name, has_memory, pause_ms} as JSON.") var json = false

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let state = store.status(of: bundle).state
            var id = "", checkpointName = "", pause: Double?, hasMemory = false
            if state == .running || state == .paused {
                var arguments: [(String, JSONValue)] = []
                if let checkpoint { arguments.append(("name", .string(checkpoint))) }
                let reply = try ControlConnection(path: bundle.controlSocketPath).execute("vm-checkpoint", arguments: arguments, timeoutSeconds: 600)
                id = reply["id"]?.stringValue ?? ""
                checkpointName = reply["name"]?.stringValue ?? ""
                pause = reply["pause_ms"]?.doubleValue
                hasMemory = true
            } else {
                let created = try withVMLock(store, bundle, for: "checkpoint") { try VMCheckpointStore(bundle: bundle).create(name: checkpoint) }
                (id, checkpointName, hasMemory) = (created.checkpoint.id, created.checkpoint.name, created.checkpoint.hasMemory)
            }
            if json {
                printOut(JSONValue.object([("id", .string(id)), ("name", .string(checkpointName)), ("has_memory", .bool(hasMemory)),
                                           ("pause_ms", pause.map(JSONValue.double) ?? .null)]).rendered() + "\n")
            } else {
                printOut("created checkpoint \"\(checkpointName)\" (\(id))\(pause.map { ", guest paused \(($0 * 10).rounded() / 10) ms" } ?? "")\n")
            }
        }
    }
}

struct VMCheckpointList: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "Show a VM's checkpoint tree.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Flag(help: "Print a JSON array of {id, name, parent, created, has_memory, current}, oldest first.") var json = false

    func run() throws {
        try storeCommand { store in
            let configuration = try store.bundle(named: name).configuration()
            if json {
                printOut(JSONValue.array(configuration.checkpoints.map { checkpointJSON($0, current: configuration.currentCheckpoint) }).rendered() + "\n")
                return
            }
            if configuration.checkpoints.isEmpty { printOut("VM \(name) has no checkpoints\n"); return }
            var lines: [String] = []
            func walk(_ parent: String?, depth: Int) {
                for checkpoint in configuration.checkpoints where checkpoint.parent == parent {
                    let indent = String(repeating: "  ", count: depth)
                    lines.append("\(indent)\(checkpoint.name)  [\(checkpoint.id.prefix(8))] \(checkpoint.created)\(checkpoint.hasMemory ? " (memory)" : "")")
                    if checkpoint.id == configuration.currentCheckpoint { lines.append("\(indent)  * Now") }
                    walk(checkpoint.id, depth: depth + 1)
                }
            }
            walk(nil, depth: 0)
            if configuration.currentCheckpoint == nil { lines.append("* Now") }
            printOut(lines.joined(separator: "\n") + "\n")
        }
    }
}

func checkpointJSON(_ checkpoint: VMCheckpoint, current: String?) -> JSONValue {
    .object([("id", .string(checkpoint.id)), ("name", .string(checkpoint.name)),
             ("parent", checkpoint.parent.map(JSONValue.string) ?? .null), ("created", .string(checkpoint.created)),
             ("has_memory", .bool(checkpoint.hasMemory)), ("current", .bool(checkpoint.id == current)),
             ("pause_ms", checkpoint.pauseMilliseconds.map(JSONValue.double) ?? .null)])
}

struct VMCheckpointApply: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apply", abstract: "Take the VM back to a checkpoint (Restore-VMCheckpoint).",
        discussion: "The VM's disks continue on new, empty differencing disks of the checkpoint's files; what was written since is discarded. A checkpoint with memory leaves the VM saved, so `hvrun vm start` continues exactly there. A running VM is turned off first: that needs --yes (or a yes at the prompt).")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Argument(help: ArgumentHelp("The checkpoint: its name or ID.", valueName: "checkpoint")) var checkpoint: String
    @Flag(name: [.short, .long], help: "Turn a running VM off without asking.") var yes = false

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let state = store.status(of: bundle).state
            if [.running, .paused, .starting].contains(state) {
                if !yes {
                    guard isatty(0) == 1 else {
                        throw StoreError.refused("VM \(name) is \(state.rawValue); applying a checkpoint turns it off and discards its current state: add --yes")
                    }
                    printOut("VM \(name) is \(state.rawValue): turn it off and discard its current state? [y/N] ")
                    guard let answer = readLine(), answer.lowercased().hasPrefix("y") else { throw StoreError.refused("not applied") }
                }
                try turnOff(bundle)
            }
            let applied = try withVMLock(store, bundle, for: "apply a checkpoint to") { try VMCheckpointStore(bundle: bundle).apply(checkpoint) }
            printOut("applied checkpoint \"\(applied.name)\" to VM \(name); it is \(applied.hasMemory ? "saved there (hvrun vm start continues it)" : "off")\n")
        }
    }
}

/// Ends a running VM's process now (the control socket's `stop`, else SIGKILL) and waits for it.
func turnOff(_ bundle: VMBundle) throws {
    let pid = bundle.processID
    if (try? ControlConnection(path: bundle.controlSocketPath, timeoutSeconds: 5).execute("stop", timeoutSeconds: 5)) == nil,
       let pid, pid > 1 {
        kill(pid, SIGKILL)
    }
    guard waitUntilUnlocked(bundle, timeoutSeconds: 30) else {
        if let pid, pid > 1 { kill(pid, SIGKILL) }
        guard waitUntilUnlocked(bundle, timeoutSeconds: 10) else { throw StoreError.failed("VM \(bundle.name)'s process does not end") }
        return
    }
}

struct VMCheckpointDelete: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete", abstract: "Delete a checkpoint (Remove-VMCheckpoint): its memory goes, its disk files merge into the chain.",
        discussion: "On a running VM the merge runs in the VM's process while the guest runs (hvrun vm info shows merging: true until it ends); --wait waits for it. A merge interrupted by a crash or a stop is finished by the next command or start.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Argument(help: ArgumentHelp("The checkpoint: its name or ID.", valueName: "checkpoint")) var checkpoint: String
    @Flag(help: "Also delete every checkpoint below it.") var subtree = false
    @Flag(help: "On a running VM, wait until the merge has finished.") var wait = false

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let state = store.status(of: bundle).state
            if state == .running || state == .paused {
                let connection = try ControlConnection(path: bundle.controlSocketPath)
                let reply = try connection.execute("vm-checkpoint-delete", arguments: [("checkpoint", .string(checkpoint)), ("subtree", .bool(subtree))])
                let count = reply["deleted"]?.arrayValue?.count ?? 0
                if wait {
                    while try connection.execute("vm-merging")["merging"]?.boolValue == true { usleep(50_000) }
                    printOut("deleted \(count) checkpoint\(count == 1 ? "" : "s") of VM \(name); merged\n")
                } else {
                    printOut("deleted \(count) checkpoint\(count == 1 ? "" : "s") of VM \(name); merging in the background\n")
                }
                return
            }
            let deleted = try withVMLock(store, bundle, for: "delete a checkpoint of") {
                try VMCheckpointStore(bundle: bundle).delete(checkpoint, subtree: subtree)
            }
            printOut("deleted \(deleted.count) checkpoint\(deleted.count == 1 ? "" : "s") of VM \(name); merged\n")
        }
    }
}
