#if canImport(Glibc)
internal import Glibc
#endif

/// QMP-style events for the client that asked for a long operation: `{"event": NAME, "data":
/// {…}}` lines on the client's own copy of its connection. The verb replies at once and the
/// operation runs on a thread of its own, so the control socket keeps serving others (`info`,
/// `stop`) meanwhile; the asking client reads the reply, then the events.
public final class ControlEvents: @unchecked Sendable {
    private let fd: Int32

    /// Events to `clientFD` (duplicated: the server may close its copy); none when it is -1.
    init(duplicating clientFD: Int32) {
        fd = clientFD >= 0 ? dup(clientFD) : -1
        if fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    }

    deinit { if fd >= 0 { close(fd) } }

    /// Sends one event line; a client that went away is ignored (MSG_NOSIGNAL: never SIGPIPE).
    public func send(_ name: String, _ data: [(String, JSONValue)]) {
        guard fd >= 0 else { return }
        let line = Array((JSONValue.object([("event", .string(name)), ("data", .object(data))]).rendered() + "\n").utf8)
        var done = 0
        while done < line.count {
            let sent = line.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if sent < 0 { if errno == EINTR { continue } else { return } }
            done += sent
        }
    }
}
