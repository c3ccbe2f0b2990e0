import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// An `hvrun` running in the background, as a user's would: its stdout and stderr go to files the
/// test reads while it runs. Every wait has a deadline; `deinit` kills a process still running.
final class VMProcess {
    let pid: pid_t
    let outputPath: String
    let errorPath: String
    private var exitStatus: Int32?

    /// `environment`: `NAME=value` entries added to (or replacing those of) this process's environment.
    /// `prefix` runs hvrun through another program that execs it (as `ip netns exec NS`).
    init(_ arguments: [String], environment: [String] = [], prefix: [String] = []) throws {
        guard let hvrunPath = TestHost.hvrunPath else { throw Subprocess.Failure.spawn("hvrun (not built next to the tests)", 2) }
        let hvrun = prefix.first ?? hvrunPath
        let arguments = prefix.isEmpty ? arguments : Array(prefix.dropFirst()) + [hvrunPath] + arguments
        let base = "/tmp/hypercore-vm-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        outputPath = base + ".out"
        errorPath = base + ".err"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, errorPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let argv = ([hvrun] + arguments).map { strdup($0) } + [nil]  // (prefix[0] or hvrun) + the rest
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        var entries: [String] = []
        var index = 0
        while let entry = environ[index] {
            let text = String(cString: entry)
            if !environment.contains(where: { text.hasPrefix(String($0.prefix { $0 != "=" }) + "=") }) { entries.append(text) }
            index += 1
        }
        let envp = (entries + environment).map { strdup($0) } + [nil]
        defer { envp.forEach { free($0) } }
        let spawned = posix_spawn(&pid, hvrun, &actions, nil, argv, envp)
        guard spawned == 0 else { throw Subprocess.Failure.spawn(hvrun, spawned) }
        self.pid = pid
    }

    deinit {
        if exitStatus == nil {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        unlink(outputPath)
        unlink(errorPath)
    }

    var output: String { (try? String(decoding: readAll(outputPath), as: UTF8.self)) ?? "" }
    var errors: String { (try? String(decoding: readAll(errorPath), as: UTF8.self)) ?? "" }
    var outputLines: [String] { output.split(separator: "\n").map(String.init) }

    /// Waits until stdout has a line equal to `line`; false at the deadline or if the process ended first.
    func waitForLine(_ line: String, timeoutSeconds: Double = 30) -> Bool {
        let deadline = Clock.now + timeoutSeconds
        while Clock.now < deadline {
            if outputLines.contains(line) { return true }
            if hasExited { return outputLines.contains(line) }
            usleep(5_000)
        }
        return false
    }

    /// Waits until a Unix socket at `path` accepts connections.
    func waitForSocket(_ path: String, timeoutSeconds: Double = 10) -> Bool {
        let deadline = Clock.now + timeoutSeconds
        while Clock.now < deadline {
            if (try? ControlClient(path: path)) != nil { return true }
            if hasExited { return false }
            usleep(5_000)
        }
        return false
    }

    var hasExited: Bool {
        if exitStatus != nil { return true }
        var status: Int32 = 0
        let result = waitpid(pid, &status, WNOHANG)
        guard result == pid else { return false }
        exitStatus = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
        return true
    }

    /// The exit status, waiting up to the deadline (then SIGKILL, and status 137 is returned).
    func wait(timeoutSeconds: Double = 60) -> Int32 {
        let deadline = Clock.now + timeoutSeconds
        while !hasExited {
            if Clock.now >= deadline {
                kill(pid, SIGKILL)
                var status: Int32 = 0
                waitpid(pid, &status, 0)
                exitStatus = 137
                break
            }
            usleep(2_000)
        }
        return exitStatus!
    }

    func signal(_ number: Int32) { kill(pid, number) }

    private func readAll(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count <= 0 { break }
            bytes += buffer[0..<count]
        }
        return bytes
    }
}

/// A client of hvrun's control socket: one connection, one request at a time, each read with a deadline.
final class ControlClient {
    let fd: Int32
    private var buffer: [UInt8] = []
    private(set) var greeting: JSONValue = .null

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw Subprocess.Failure.spawn("socket", errno) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else {
            let code = errno
            close(fd)
            throw Subprocess.Failure.spawn("connect \(path)", code)
        }
        greeting = try readReply()
    }

    deinit { close(fd) }

    /// Sends one raw line.
    func sendLine(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Sends `{"execute": verb, "arguments": …, "id": …}` and returns the reply.
    @discardableResult
    func execute(_ verb: String, arguments: [(String, JSONValue)] = [], id: Int64? = nil, timeoutSeconds: Double = 30) throws -> JSONValue {
        var request: [(String, JSONValue)] = [("execute", .string(verb))]
        if !arguments.isEmpty { request.append(("arguments", .object(arguments))) }
        if let id { request.append(("id", .number(id))) }
        sendLine(JSONValue.object(request).rendered())
        return try readReply(timeoutSeconds: timeoutSeconds)
    }

    struct Closed: Error {}

    func readReply(timeoutSeconds: Double = 30) throws -> JSONValue {
        let deadline = Clock.now + timeoutSeconds
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                return try JSONValue.parse(line)
            }
            let remaining = deadline - Clock.now
            guard remaining > 0 else { throw Closed() }
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, Int32(remaining * 1000) + 1) > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            guard count > 0 else { throw Closed() }
            buffer += chunk[0..<count]
        }
    }
}

/// The command line of process `pid`, its arguments joined by spaces; "" when it is gone.
func commandLine(of pid: pid_t) -> String {
    let bytes = (try? StoreFiles.read("/proc/\(pid)/cmdline")) ?? []
    return String(decoding: bytes.map { $0 == 0 ? 0x20 : $0 }, as: UTF8.self)
}

enum Clock {
    static var now: Double {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
    }
}

/// A scratch directory removed (with what the tests put in it, one level deep) when the value goes away.
final class TemporaryDirectory {
    let path: String
    init() throws {
        var template = Array("/tmp/hypercore-dir-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw Subprocess.Failure.spawn("mkdtemp", errno) }
        path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    deinit { removeTree(path) }

    func file(_ name: String) -> String { path + "/" + name }
}

/// Removes a directory tree (files and directories only).
func removeTree(_ path: String) {
    var info = stat()
    guard lstat(path, &info) == 0 else { return }
    if info.st_mode & S_IFMT == S_IFDIR, let handle = opendir(path) {
        var names: [String] = []
        while let entry = readdir(handle) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        closedir(handle)
        for name in names { removeTree(path + "/" + name) }
        rmdir(path)
    } else {
        unlink(path)
    }
}

/// A file's bytes (for "nothing changed" checks).
func fileBytes(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return [] }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    while true {
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if count <= 0 { break }
        bytes += buffer[0..<count]
    }
    return bytes
}
