#if canImport(Glibc)
internal import Glibc
#endif
internal import Synchronization

/// QMP-style events for the client that asked for a long operation: `{"event": NAME, "data":
/// {…}}` lines on the client's own copy of its connection. The verb replies at once and the
/// operation runs on a thread of its own, so the control socket keeps serving others (`info`,
/// `stop`) meanwhile; the asking client reads the reply, then the events.
///
/// That order is the server's to keep, not the operation's: events start out held, and the
/// server releases them once the verb's reply is sent, so an operation that is done (or refused)
/// before then cannot overtake its reply.
public final class ControlEvents: @unchecked Sendable {
    private let fd: Int32
    /// Lines sent before ``release()``; nil once released.
    private let held = Mutex<[[UInt8]]?>([])

    /// Events to `clientFD` (duplicated: the server may close its copy); none when it is -1.
    init(duplicating clientFD: Int32) {
        fd = clientFD >= 0 ? dup(clientFD) : -1
        if fd >= 0 { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    }

    deinit { if fd >= 0 { close(fd) } }

    /// Sends one event line (or keeps it until the reply has gone); a client that went away is ignored.
    public func send(_ name: String, _ data: [(String, JSONValue)]) {
        guard fd >= 0 else { return }
        let line = Array((JSONValue.object([("event", .string(name)), ("data", .object(data))]).rendered() + "\n").utf8)
        // Sent under the lock, so a line sent while ``release()`` flushes cannot pass those held.
        held.withLock { lines in
            if lines != nil { lines!.append(line) } else { sendAll(fd, line) }
        }
    }

    /// The reply has been sent: the held events go, and later ones go at once.
    func release() {
        held.withLock { lines in
            for line in lines ?? [] { sendAll(fd, line) }
            lines = nil
        }
    }
}

/// Sends all of `bytes` on the socket `fd`, retrying short sends and EINTR. MSG_NOSIGNAL: a peer
/// that went away is a failure (false, `errno` set), never a SIGPIPE that ends the process.
@discardableResult
func sendAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
    var done = 0
    while done < bytes.count {
        let sent = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
        if sent < 0, errno == EINTR { continue }
        guard sent > 0 else { return false }
        done += sent
    }
    return true
}
