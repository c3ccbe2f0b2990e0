internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// A machine's control socket: a Unix stream socket speaking newline-delimited JSON in the shape
/// QEMU's QMP made conventional.
///
/// - On connect the server sends one greeting line: `{"hvrun":{"version":"…","state":"running"}}`.
/// - Each request is one line, `{"execute":"VERB","arguments":{…},"id":ANY}` (`arguments` and
///   `id` optional); each reply is one line, `{"return":{…},"id":…}` or
///   `{"error":{"class":"…","desc":"…"},"id":…}`. A malformed line gets an error reply and the
///   connection stays usable.
/// - Verbs: `info`, `pause`, `resume`, `save` `{"path":DIR}` (pause, write the snapshot durably,
///   reply, then end the run as ``MachineExit/saved(_:)``), `snapshot` `{"path":DIR}` (the same,
///   staying paused), `powerdown` (press the ACPI power button: the guest decides), `stop` (reply,
///   then end the run).
///
/// One dedicated thread serves every client with `poll`, so a slow or silent client delays no
/// one, and a client that disconnects mid-request does not disturb the machine. The socket is
/// created with mode 0600; a path that exists is refused unless it is a stale socket.
public final class ControlServer: @unchecked Sendable {
    public let path: String
    let machine: Machine
    /// The outgoing live migration, if one was asked for.
    public let outgoing = OutgoingMigration()
    private let listener: Int32
    private let wake: Int32
    private let stopped = Atomic<Bool>(false)
    private var thread: pthread_t?
    /// Called (on the server's thread) when a client asks for `stop`, before the run is ended:
    /// lets an owner that restarts machines (a VM that reboots on reset) know the user wants it
    /// off, even if the guest's own reset ends this run first.
    public var onStop: (@Sendable () -> Void)?
    /// Verbs an owner adds (set before ``start()``): each gets the request's `arguments` and
    /// returns the reply's members, or throws ``ControlError/failed(_:)`` with the error to send.
    /// The VM store's process adds the checkpoint verbs this way, which need its `vm.json`.
    public var commands: [String: @Sendable (JSONValue) throws -> [(String, JSONValue)]] = [:]
    /// Asked before a `migrate` starts: a reason to refuse it, when the owner is changing the
    /// machine's disks (hvrun: a checkpoint merge or a storage move in progress).
    public var migrationBlocker: (@Sendable () -> String?)?
    /// The client whose request is being handled (server thread only).
    private var requestingClient: Int32 = -1

    /// Events handed out for the request being handled, held until its reply is sent (server thread only).
    private var eventsAwaitingReply: [ControlEvents] = []

    /// For a verb in ``commands`` that starts a long operation: events to the client that asked
    /// (call it while handling the request, on the server's thread). They reach the client after
    /// the verb's reply, however soon the operation sends them.
    public func eventsForCurrentRequest() -> ControlEvents { events(for: requestingClient) }

    func events(for clientFD: Int32) -> ControlEvents {
        let events = ControlEvents(duplicating: clientFD)
        eventsAwaitingReply.append(events)
        return events
    }
    static let maximumLine = 64 << 10
    static let maximumClients = 16

    public init(path: String, machine: Machine) throws(ControlError) {
        self.path = path
        self.machine = machine
        try Self.clearStaleSocket(path)
        listener = try Self.listen(path, backlog: 8)
        wake = ckvm_eventfd_create()
    }

    /// A listening Unix stream socket at `path`, mode 0600: it gets its mode from the umask at bind
    /// time, so there is no window in which others can connect.
    static func listen(_ path: String, backlog: Int32) throws(ControlError) -> Int32 {
        var address = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .system(path: path, operation: "socket", errno: errno) }
        let previous = umask(0o177)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        umask(previous)
        guard bound == 0, Glibc.listen(fd, backlog) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw .system(path: path, operation: "bind", errno: code)
        }
        return fd
    }

    deinit {
        close()
        Glibc.close(listener)
        if wake >= 0 { Glibc.close(wake) }
    }

    /// A path that exists must be a socket nobody listens on any more (a crashed hvrun's).
    static func clearStaleSocket(_ path: String) throws(ControlError) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard info.st_mode & S_IFMT == S_IFSOCK else { throw .exists(path: path) }
        var address = try Self.address(path)
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0 else { throw .system(path: path, operation: "socket", errno: errno) }
        defer { Glibc.close(probe) }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(probe, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected == 0 { throw .inUse(path: path) }
        guard unlink(path) == 0 else { throw .system(path: path, operation: "unlink stale socket", errno: errno) }
    }

    /// A Unix socket address for `path`.
    static func address(_ path: String) throws(ControlError) -> sockaddr_un {
        guard let address = unixSocketAddress(path) else { throw .pathTooLong(path: path) }
        return address
    }

    /// Starts serving on a dedicated thread.
    public func start() throws(ControlError) {
        final class Box: @unchecked Sendable { let server: ControlServer; init(_ s: ControlServer) { server = s } }
        var handle = pthread_t()
        let box = Unmanaged.passRetained(Box(self)).toOpaque()
        let result = pthread_create(&handle, nil, { argument in
            let server = Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue().server
            server.serve()
            return nil
        }, box)
        guard result == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw .system(path: path, operation: "pthread_create", errno: result)
        }
        thread = handle
    }

    /// Stops serving, joins the thread and removes the socket file. Idempotent.
    public func close() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        if wake >= 0 { _ = ckvm_eventfd_signal(wake) }
        if let thread, pthread_equal(thread, pthread_self()) == 0 { _ = ckvm_thread_join(UInt(thread), 10_000) }
        unlink(path)
    }

    // MARK: The loop

    private final class Client {
        let fd: Int32
        var buffer: [UInt8] = []
        init(fd: Int32) { self.fd = fd }
    }

    private func serve() {
        ckvm_thread_set_name("control")
        var blocked = sigset_t()
        sigfillset(&blocked)
        pthread_sigmask(SIG_BLOCK, &blocked, nil)
        var clients: [Client] = []
        defer { clients.forEach { Glibc.close($0.fd) } }
        while !stopped.load(ordering: .acquiring) {
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
            fds += clients.map { pollfd(fd: $0.fd, events: Int16(POLLIN), revents: 0) }
            let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), -1) }
            if ready < 0 { if errno == EINTR { continue } else { return } }
            if fds[1].revents != 0 { return }
            var closed: Set<Int32> = []
            for (index, client) in clients.enumerated() where fds[index + 2].revents != 0 {
                if !readRequests(client) { closed.insert(client.fd) }
                if stopped.load(ordering: .acquiring) { return }
            }
            for fd in closed { Glibc.close(fd) }
            clients.removeAll { closed.contains($0.fd) }
            if fds[0].revents & Int16(POLLIN) != 0 {
                let fd = accept(listener, nil, nil)
                if fd >= 0 {
                    _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                    if clients.count >= Self.maximumClients {
                        Glibc.close(fd)
                    } else {
                        let client = Client(fd: fd)
                        clients.append(client)
                        send(.object([("hvrun", .object([("version", .string(HyperCoreVersion.current)),
                                                          ("state", .string(machine.runState.rawValue))]))]), to: client)
                    }
                }
            }
        }
    }

    /// Reads what the client sent and answers every complete line; false when the client is gone.
    private func readRequests(_ client: Client) -> Bool {
        var chunk = [UInt8](repeating: 0, count: 4096)
        let count = chunk.withUnsafeMutableBytes { read(client.fd, $0.baseAddress, $0.count) }
        if count < 0 { return errno == EINTR || errno == EAGAIN }
        if count == 0 { return false }
        client.buffer += chunk[0..<count]
        while let newline = client.buffer.firstIndex(of: UInt8(ascii: "\n")) {
            let line = Array(client.buffer[..<newline])
            client.buffer.removeSubrange(...newline)
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) { continue }
            let (reply, after) = handle(line, clientFD: client.fd)
            send(reply, to: client)
            eventsAwaitingReply.forEach { $0.release() }
            eventsAwaitingReply = []
            after?()
        }
        if client.buffer.count > Self.maximumLine {
            send(Self.error("GenericError", "request line longer than \(Self.maximumLine) bytes", id: nil), to: client)
            return false
        }
        return true
    }

    private func send(_ value: JSONValue, to client: Client) {
        // A client that went away is dropped by the next read, never a SIGPIPE.
        sendAll(client.fd, Array((value.rendered() + "\n").utf8))
    }

    static func error(_ errorClass: String, _ description: String, id: JSONValue?) -> JSONValue {
        var members: [(String, JSONValue)] = [("error", .object([("class", .string(errorClass)), ("desc", .string(description))]))]
        if let id { members.append(("id", id)) }
        return .object(members)
    }

    static func success(_ value: [(String, JSONValue)], id: JSONValue?) -> JSONValue {
        var members: [(String, JSONValue)] = [("return", .object(value))]
        if let id { members.append(("id", id)) }
        return .object(members)
    }

    /// One request → one reply, and what to do once the reply is sent (end the run).
    /// What a client may ask while an outgoing migration runs.
    static let allowedDuringMigration: Set<String> = ["info", "migrate", "query-migrate", "migrate-cancel", "stop", "powerdown", "vm-merging"]

    func handle(_ line: [UInt8], clientFD: Int32 = -1) -> (JSONValue, (() -> Void)?) {
        requestingClient = clientFD
        defer { requestingClient = -1 }
        let request: JSONValue
        do throws(JSONParseError) { request = try JSONValue.parse(line) } catch {
            return (Self.error("GenericError", "\(error)", id: nil), nil)
        }
        let id = request["id"]
        guard case .object = request, let verb = request["execute"]?.stringValue else {
            return (Self.error("GenericError", "a request is an object with \"execute\": VERB", id: id), nil)
        }
        let arguments = request["arguments"] ?? .object([])
        guard case .object = arguments else { return (Self.error("GenericError", "\"arguments\" must be an object", id: id), nil) }
        do throws(ControlError) {
            // During an outgoing migration the machine's disks and run state belong to it: a
            // checkpoint would switch the files being copied, a pause or save would race its own.
            if outgoing.isActive, !Self.allowedDuringMigration.contains(verb) {
                throw .refused("a live migration is running; \(verb) waits until it ends (or cancel it with migrate-cancel)")
            }
            switch verb {
            case "info":
                return (Self.success(info(), id: id), nil)
            case "pause":
                try run { () throws(MachineError) in try machine.pause() }
                return (Self.success([("state", .string(machine.runState.rawValue))], id: id), nil)
            case "resume":
                // {"clock": "catch-up"} lets the guest's clock jump by the time spent paused.
                let keep = arguments["clock"]?.stringValue != "catch-up"
                try run { () throws(MachineError) in try machine.resume(keepingGuestTime: keep) }
                return (Self.success([("state", .string(machine.runState.rawValue))], id: id), nil)
            case "save", "snapshot":
                guard let path = arguments["path"]?.stringValue, !path.isEmpty else {
                    return (Self.error("GenericError", "\(verb) needs {\"path\": DIRECTORY}", id: id), nil)
                }
                let result = try save(to: path)
                if verb == "save" {
                    return (Self.success(result, id: id), { [machine] in machine.finish(.saved(path)) })
                }
                return (Self.success(result, id: id), nil)
            case "checkpoint":
                // {"path": DIR, "disks": [CHILD, …]}: one new differencing VHDX per writable disk.
                guard let path = arguments["path"]?.stringValue, !path.isEmpty,
                      case let .array(list)? = arguments["disks"], list.allSatisfy({ $0.stringValue != nil }) else {
                    return (Self.error("GenericError", "checkpoint needs {\"path\": DIRECTORY, \"disks\": [CHILD.avhdx, …]}", id: id), nil)
                }
                do throws(SnapshotError) {
                    let result = try machine.checkpoint(to: path, childPaths: list.compactMap(\.stringValue))
                    return (Self.success([("path", .string(path)),
                                          ("memory_bytes_written", .number(Int64(result.written.memoryBytes))),
                                          ("pause_ms", .double(Double(result.pauseNanoseconds / 1000) / 1000)),
                                          ("disks", .array(result.children.map { $0.map(JSONValue.string) ?? .null })),
                                          ("state", .string(machine.runState.rawValue))], id: id), nil)
                } catch {
                    throw .failed(error.description)
                }
            case "powerdown":
                // QMP's system_powerdown: press the ACPI power button; the guest decides.
                try run { () throws(MachineError) in try machine.pressPowerButton() }
                return (Self.success([("state", .string(machine.runState.rawValue))], id: id), nil)
            case "migrate", "query-migrate", "migrate-cancel":
                // Live migration (ControlServer+Migration.swift).
                return migration(verb, arguments, id: id, clientFD: clientFD)
            case "stop":
                onStop?()
                return (Self.success([], id: id), { [machine] in machine.finish(.stopped) })
            default:
                if let command = commands[verb] {
                    do { return (Self.success(try command(arguments), id: id), nil) } catch let error as ControlError {
                        throw error
                    } catch {
                        throw .failed("\(error)")
                    }
                }
                let known = ["info", "pause", "resume", "save", "snapshot", "checkpoint", "powerdown", "migrate", "query-migrate",
                             "migrate-cancel", "stop"] + commands.keys.sorted()
                return (Self.error("CommandNotFound", "unknown command \(verb); known: \(known.joined(separator: ", "))", id: id), nil)
            }
        } catch {
            if case .refused = error { return (Self.error("Refused", error.description, id: id), nil) }
            return (Self.error("GenericError", error.description, id: id), nil)
        }
    }

    private func run(_ body: () throws(MachineError) -> Void) throws(ControlError) {
        do throws(MachineError) { try body() } catch { throw .failed(error.description) }
    }

    private func info() -> [(String, JSONValue)] {
        [("state", .string(machine.runState.rawValue)),
         ("vcpus", .number(Int64(machine.configuration.cpuCount))),
         ("memory_bytes", .number(Int64(machine.configuration.memorySize))),
         ("uptime_s", .double((machine.uptimeSeconds * 1000).rounded() / 1000))]
    }

    /// Pauses (if running), writes the snapshot durably, and reports it; the machine stays paused.
    /// If the snapshot cannot be written, a machine that was running runs on.
    func save(to path: String) throws(ControlError) -> [(String, JSONValue)] {
        let start = monotonicNanoseconds()
        let wasRunning = machine.runState == .running
        try run { () throws(MachineError) in try machine.pause() }
        let paused = monotonicNanoseconds()
        do throws(SnapshotError) {
            let written = try machine.snapshot(to: path)
            let end = monotonicNanoseconds()
            return [("path", .string(path)), ("memory_bytes_written", .number(Int64(written.memoryBytes))),
                    ("state_bytes", .number(Int64(written.stateBytes))),
                    ("pause_ms", .double(Double((paused - start) / 1000) / 1000)),
                    ("total_ms", .double(Double((end - start) / 1000) / 1000))]
        } catch {
            if wasRunning { try? machine.resume() }
            throw .failed(error.description)
        }
    }
}

public enum ControlError: Error, Sendable, CustomStringConvertible {
    case exists(path: String)
    case inUse(path: String)
    case pathTooLong(path: String)
    case system(path: String, operation: String, errno: Int32)
    case failed(String)
    /// The machine's state refuses it (sent with error class `Refused`: `hvrun vm` exits 2).
    case refused(String)

    public var description: String {
        switch self {
        case let .exists(path): "\(path) exists and is not a socket; choose another --control path"
        case let .inUse(path): "\(path) is the control socket of a running hvrun; choose another --control path"
        case let .pathTooLong(path): "\(path) is longer than a Unix socket path may be (107 bytes)"
        case let .system(path, operation, errno): "control socket \(path): \(operation) failed: \(SystemError.describe(errno))"
        case let .failed(message), let .refused(message): message
        }
    }
}

/// The `sockaddr_un` for `path`, or nil when the path does not fit (107 bytes and a NUL): the
/// one place the control socket, its clients and migration endpoints build one.
func unixSocketAddress(_ path: String) -> sockaddr_un? {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return nil }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, byte) in bytes.enumerated() { raw[i] = byte } }
    return address
}
