#if canImport(Glibc)
internal import Glibc
#endif

/// Runs a host networking tool (`ip`, `dnsmasq`) and collects what it printed: the switches'
/// bridges, addresses and routes are made with iproute2, whose error messages are passed on as
/// they are, after the command line that failed.
enum HostCommand {
    struct Result: Sendable {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    /// Where the tools are looked for (a root shell's PATH may lack the sbin directories).
    static let searchPath = ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin"]

    /// The tool's full path, or nil when it is not installed.
    static func find(_ tool: String) -> String? {
        searchPath.map { $0 + "/" + tool }.first { access($0, X_OK) == 0 }
    }

    /// Runs `tool arguments…` and waits for it. `output` (optional) receives stdout and stderr
    /// instead of pipes (for a daemon that keeps them open after its parent exits).
    static func run(_ tool: String, _ arguments: [String], outputFile: String? = nil) throws(SwitchError) -> Result {
        guard let path = find(tool) else { throw .toolMissing(tool) }
        var outPipe: [Int32] = [-1, -1], errPipe: [Int32] = [-1, -1]
        if outputFile == nil {
            guard pipe(&outPipe) == 0, pipe(&errPipe) == 0 else {
                throw .host(command: tool, message: "pipe: \(SystemError.describe(errno))")
            }
            for fd in outPipe + errPipe { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        if let outputFile {
            posix_spawn_file_actions_addopen(&actions, 1, outputFile, O_WRONLY | O_CREAT | O_APPEND, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
        } else {
            posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
            posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        // A clean signal state: hvrun blocks SIGINT/SIGTERM in its threads (a signal thread
        // collects them), and a daemon started from here (dnsmasq) would inherit that mask and
        // never see the SIGTERM that stops it.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGUSR1, SIGUSR2, SIGCHLD] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, path, &actions, &attributes, argv, environ)
        if outputFile == nil { close(outPipe[1]); close(errPipe[1]) }
        guard spawned == 0 else {
            if outputFile == nil { close(outPipe[0]); close(errPipe[0]) }
            throw .host(command: path, message: "cannot run it: \(SystemError.describe(spawned))")
        }
        var out: [UInt8] = [], err: [UInt8] = []
        if outputFile == nil {
            var open = [outPipe[0], errPipe[0]]
            var buffer = [UInt8](repeating: 0, count: 65536)
            while open.contains(where: { $0 >= 0 }) {
                var fds = open.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
                if poll(&fds, nfds_t(fds.count), -1) < 0 { if errno == EINTR { continue } else { break } }
                for (index, entry) in fds.enumerated() where entry.fd >= 0 && entry.revents != 0 {
                    let count = buffer.withUnsafeMutableBytes { read(entry.fd, $0.baseAddress, $0.count) }
                    if count > 0 {
                        if index == 0 { out += buffer[0..<count] } else { err += buffer[0..<count] }
                    } else if count == 0 || errno != EINTR {
                        close(entry.fd)
                        open[index] = -1
                    }
                }
            }
        }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let code = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        return Result(status: code, stdout: String(decoding: out, as: UTF8.self), stderr: String(decoding: err, as: UTF8.self))
    }

    /// Runs `ip arguments…`; a failure becomes ``SwitchError/host(command:message:)`` quoting it.
    @discardableResult
    static func ip(_ arguments: [String]) throws(SwitchError) -> String {
        let result = try run("ip", arguments)
        guard result.status == 0 else {
            throw .host(command: "ip " + arguments.joined(separator: " "), message: result.stderr.trimmingTrailingNewlines)
        }
        return result.stdout
    }

    /// `ip -j …` parsed.
    static func ipJSON(_ arguments: [String]) throws(SwitchError) -> JSONValue {
        let text = try ip(["-j"] + arguments)
        if text.allSatisfy({ $0.isWhitespace }) { return .array([]) }
        do throws(JSONParseError) { return try JSONValue.parse(text) } catch {
            throw .host(command: "ip -j " + arguments.joined(separator: " "), message: "unreadable output: \(error)")
        }
    }
}

extension String {
    var trimmingTrailingNewlines: String {
        var text = self
        while text.last == "\n" || text.last == "\r" { text.removeLast() }
        return text
    }
}
