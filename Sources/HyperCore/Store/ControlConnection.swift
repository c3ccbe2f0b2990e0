#if canImport(Glibc)
internal import Glibc
#endif

/// A client of a VM process's control socket (see ``ControlServer``): connect, read the greeting,
/// then one request and one reply at a time, every read bounded by a deadline.
public final class ControlConnection {
    public let path: String
    private let fd: Int32
    private var buffer: [UInt8] = []
    public private(set) var greeting: JSONValue = .null

    public init(path: String, timeoutSeconds: Double = 5) throws(StoreError) {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .system(operation: "socket", path: path, errno: errno) }
        try connectUnixSocket(fd, path: path)
        greeting = try readReply(timeoutSeconds: timeoutSeconds)
    }

    deinit { close(fd) }

    /// Sends `{"execute": verb, "arguments": …}` and returns the `return` object; an error reply
    /// becomes ``StoreError/failed(_:)`` with its description.
    @discardableResult
    public func execute(_ verb: String, arguments: [(String, JSONValue)] = [], timeoutSeconds: Double = 30) throws(StoreError) -> JSONValue {
        var request: [(String, JSONValue)] = [("execute", .string(verb))]
        if !arguments.isEmpty { request.append(("arguments", .object(arguments))) }
        guard sendAll(fd, Array((JSONValue.object(request).rendered() + "\n").utf8)) else {
            throw .system(operation: "send", path: path, errno: errno)
        }
        let reply = try readReply(timeoutSeconds: timeoutSeconds)
        if let result = reply["return"] { return result }
        if reply["error"]?["class"]?.stringValue == "Refused" { throw .refused(reply["error"]?["desc"]?.stringValue ?? "refused") }
        throw .failed(reply["error"]?["desc"]?.stringValue ?? "unexpected reply \(reply.rendered())")
    }

    /// Reads the next line the VM process sends (an event, after a command that sends them).
    public func readLine(timeoutSeconds: Double) throws(StoreError) -> JSONValue { try readReply(timeoutSeconds: timeoutSeconds) }

    private func readReply(timeoutSeconds: Double) throws(StoreError) -> JSONValue {
        let deadline = monotonicSeconds() + timeoutSeconds
        while true {
            if let newline = buffer.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                do throws(JSONParseError) { return try JSONValue.parse(line) } catch { throw .failed("\(path): \(error)") }
            }
            let remaining = deadline - monotonicSeconds()
            guard remaining > 0 else { throw .failed("\(path): no reply within \(timeoutSeconds) s") }
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&entry, 1, Int32(remaining * 1000) + 1)
            if ready < 0, errno != EINTR { throw .system(operation: "poll", path: path, errno: errno) }
            guard ready > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { throw .failed("\(path): the VM process closed the connection") }
            buffer += chunk[0..<count]
        }
    }
}

/// Connects `fd` to the Unix socket at `path`.
func connectUnixSocket(_ fd: Int32, path: String) throws(StoreError) {
    guard var address = unixSocketAddress(path) else {
        throw .failed("\(path) is longer than a Unix socket path may be (107 bytes); choose a shorter HVRUN_HOME")
    }
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard connected == 0 else { throw .system(operation: "connect", path: path, errno: errno) }
}

/// Seconds on the monotonic clock.
public func monotonicSeconds() -> Double {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return Double(spec.tv_sec) + Double(spec.tv_nsec) / 1e9
}
