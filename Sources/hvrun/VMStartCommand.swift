import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun vm start NAME`: spawns the VM's own process, `hvrun run --bundle DIR`, detached (a new
/// session, stdin /dev/null, stdout and stderr appended to hvrun.log in the bundle), and returns
/// once that process holds the VM's lock and its control socket says the guest runs. A process
/// that dies first is reported with the tail of its log.
struct VMStartCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "start", abstract: "Start a VM (continuing from its saved state if it was saved) in its own background process.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Option(help: ArgumentHelp("Seconds to wait for the guest to run.", valueName: "seconds"))
    var timeout: Double = 30
    @Flag(help: "Discard the saved state (if any) and boot afresh.")
    var discardSaved = false
    @Flag(help: "Attach this terminal to the VM's console once it runs (as hvrun vm console --replay; Ctrl-] detaches, the VM keeps running).")
    var attach = false

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let status = try requireState(store, bundle, [.off, .saved], for: "start")
            if discardSaved, status.state == .saved { try store.discardSavedState(of: bundle) }
            let pid = try spawnVMProcess(bundle)
            let deadline = monotonicSeconds() + timeout
            while true {
                var status: Int32 = 0
                if waitpid(pid, &status, WNOHANG) == pid {
                    let code = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
                    if code == 2 { throw StoreError.refused("VM \(name) is running (another command started it)") }
                    if code == 0 {
                        // The guest ran and already ended (powered off, or reset with on_reset=stop).
                        printOut("started VM \(name); it has already stopped (hvrun vm log \(name) shows its console)\n")
                        return
                    }
                    throw StoreError.failed("VM \(name)'s process exited with status \(code) before the guest ran:\n\(logTail(bundle.processLogPath))")
                }
                // Ours only once the lock file names our process: another start may have won.
                if bundle.processID == pid,
                   let connection = try? ControlConnection(path: bundle.controlSocketPath, timeoutSeconds: 2),
                   let state = (try? connection.execute("info", timeoutSeconds: 2))?["state"]?.stringValue,
                   state == "running" || state == "paused" {
                    printOut("started VM \(name)\n")
                    if attach {
                        let console = try VMConsoleCommand.parse([name, "--replay"])
                        try console.run()
                    }
                    return
                }
                if monotonicSeconds() >= deadline {
                    kill(pid, SIGKILL)
                    waitpid(pid, &status, 0)
                    throw StoreError.failed("VM \(name) did not start within \(timeout) s; its process was killed:\n\(logTail(bundle.processLogPath))")
                }
                usleep(10_000)
            }
        }
    }
}

/// Spawns a VM's own process, `hvrun run --bundle DIR` (with `--incoming-fd 3` when `incoming`
/// is given: that descriptor becomes its descriptor 3), detached (see ``spawnDetachedHVRun``),
/// stdout and stderr appended to the bundle's `hvrun.log`.
func spawnVMProcess(_ bundle: VMBundle, incoming: Int32? = nil) throws -> pid_t {
    // The process log keeps growing across starts: past 1 MiB the older part moves to hvrun.log.1.
    if (StoreFiles.size(bundle.processLogPath) ?? 0) > 1 << 20 { rename(bundle.processLogPath, bundle.processLogPath + ".1") }
    return try spawnDetachedHVRun(["run", "--bundle", bundle.path] + (incoming == nil ? [] : ["--incoming-fd", "3"]),
                                  descriptor: incoming, log: bundle.processLogPath)
}

/// Spawns this executable with `arguments`, detached: a new session (no controlling terminal, no
/// SIGHUP/SIGINT from the one we were started from), default signal handling, stdin /dev/null,
/// `descriptor` (if any) as its descriptor 3, stdout and stderr appended to `log` (/dev/null
/// when nil).
func spawnDetachedHVRun(_ arguments: [String], descriptor: Int32?, log: String?) throws -> pid_t {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    guard length > 0 else { throw StoreError.system(operation: "readlink", path: "/proc/self/exe", errno: errno) }
    let executable = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    if let descriptor { posix_spawn_file_actions_adddup2(&actions, descriptor, 3) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, log ?? "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0o644)
    posix_spawn_file_actions_adddup2(&actions, 1, 2)
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    posix_spawnattr_setflags(&attributes, Int16(0x80 /* POSIX_SPAWN_SETSID */ | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attributes, &empty)
    var defaults = sigset_t()
    sigfillset(&defaults)
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    let spawned = posix_spawn(&pid, executable, &actions, &attributes, argv, environ)
    guard spawned == 0 else { throw StoreError.system(operation: "posix_spawn", path: executable, errno: spawned) }
    return pid
}

/// The last lines of a log file, indented, for an error message.
func logTail(_ path: String, lines: Int = 15) -> String {
    guard let bytes = try? StoreFiles.read(path) else { return "  (no log at \(path))" }
    let all = String(decoding: bytes.suffix(8192), as: UTF8.self).split(separator: "\n")
    return all.suffix(lines).map { "  " + $0 }.joined(separator: "\n") + "\n  (log: \(path))"
}
