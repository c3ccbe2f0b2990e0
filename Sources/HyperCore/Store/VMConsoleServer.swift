internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// The serial console of a store VM's process (`hvrun run --bundle`): output goes to `console.log`
/// (rotated to `console.log.1` past 16 MiB) and to the client attached through `console.sock`,
/// whose bytes go to the guest's UART. One client at a time; a client that asks with force takes
/// the place of the attached one.
///
/// Attach protocol: the client sends one request line, `attach`, optionally followed by the words
/// `force` (detach whoever is attached) and `replay` (first send the end of `console.log`, its
/// last ``replayBytes``), and a newline; the server answers `OK\n` or `BUSY\n`; then the
/// connection is the raw console in both directions until either side closes it. The replay is
/// read and sent under the same lock as guest output, so no byte is lost or shown twice between
/// the log's end and the live stream. Output the client cannot take at once is dropped for it (the
/// log keeps everything): a slow client never stalls the guest.
public final class VMConsoleServer: ConsoleOutput, @unchecked Sendable {
    /// The size past which `console.log` is rotated (16 MiB).
    public static let defaultRotateBytes: Int64 = 16 << 20
    /// How much of the log's end an attach with `replay` sends first (16 KiB).
    public static let replayBytes = 16 << 10
    let rotateBytes: Int64

    private struct State {
        var log: Int32
        var logSize: Int64
        var client: Int32 = -1
        var serial: Serial16550?
    }
    private let state: Mutex<State>
    public let logPath: String
    public let socketPath: String
    private var listener: Int32 = -1

    public init(logPath: String, socketPath: String, rotateBytes: Int64 = VMConsoleServer.defaultRotateBytes) throws(StoreError) {
        self.logPath = logPath
        self.socketPath = socketPath
        self.rotateBytes = rotateBytes
        let fd = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .system(operation: "open", path: logPath, errno: errno) }
        state = Mutex(State(log: fd, logSize: StoreFiles.size(logPath) ?? 0))
    }

    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        state.withLock { state in
            var done = 0
            while done < bytes.count {
                let written = Glibc.write(state.log, base + done, bytes.count - done)
                if written < 0 { if errno == EINTR { continue } else { break } }
                done += written
            }
            state.logSize += Int64(bytes.count)
            if state.logSize > rotateBytes {
                rename(logPath, logPath + ".1")
                let fresh = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0o644)
                if fresh >= 0 {
                    close(state.log)
                    state.log = fresh
                    state.logSize = 0
                }
            }
            if state.client >= 0 {
                _ = send(state.client, base, bytes.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            }
        }
    }

    /// The UART that client input goes to (a new one after each reboot).
    public func attach(_ serial: Serial16550) { state.withLock { $0.serial = serial } }

    /// Binds `console.sock` (mode 0600) and serves it on a dedicated thread.
    public func serve() throws(StoreError) {
        unlink(socketPath)
        do throws(ControlError) {
            listener = try ControlServer.listen(socketPath, backlog: 4)
        } catch let .pathTooLong(path) {
            throw .failed("\(path) is longer than a Unix socket path may be (107 bytes); choose a shorter HVRUN_HOME")
        } catch let .system(path, operation, code) {
            throw .system(operation: operation, path: path, errno: code)
        } catch {
            throw .failed(error.description)
        }
        startDetachedThread { [self] in loop() }
    }

    private func loop() {
        var blocked = sigset_t()
        sigfillset(&blocked)
        pthread_sigmask(SIG_BLOCK, &blocked, nil)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let client = state.withLock { $0.client }
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
            if client >= 0 { fds.append(pollfd(fd: client, events: Int16(POLLIN), revents: 0)) }
            let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), 500) }
            if ready < 0 { if errno == EINTR { continue } else { return } }
            if fds.count > 1, fds[1].revents != 0 {
                let count = buffer.withUnsafeMutableBytes { read(client, $0.baseAddress, $0.count) }
                if count > 0 {
                    let input = Array(buffer[0..<count])
                    state.withLock { $0.serial }?.receive(input)
                } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                    detach(client)
                }
            }
            if fds[0].revents & Int16(POLLIN) != 0 { accept() }
        }
    }

    private func detach(_ fd: Int32) {
        state.withLock { state in
            if state.client == fd {
                state.client = -1
                Glibc.close(fd)
            }
        }
    }

    /// What an attach request asks for.
    struct Request: Equatable {
        var force = false
        var replay = false

        /// Parses `attach [force] [replay]` (without the newline); nil for anything else.
        init?(_ line: String) {
            let words = line.split(separator: " ")
            guard words.first == "attach" else { return nil }
            for word in words.dropFirst() {
                switch word {
                case "force": force = true
                case "replay": replay = true
                default: return nil
                }
            }
        }
    }

    /// Reads the request line (at most 64 bytes) within 2 seconds; nil when the client says
    /// nothing, too much, or something else.
    private func readRequest(_ fd: Int32) -> Request? {
        var line: [UInt8] = []
        let deadline = monotonicSeconds() + 2
        while line.count < 64 {
            let left = Int32(max(0, (deadline - monotonicSeconds()) * 1000))
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            var byte: UInt8 = 0
            guard left > 0, poll(&entry, 1, left) == 1, read(fd, &byte, 1) == 1 else { return nil }
            if byte == UInt8(ascii: "\n") { return Request(String(decoding: line, as: UTF8.self)) }
            line.append(byte)
        }
        return nil
    }

    private func accept() {
        let fd = Glibc.accept(listener, nil, nil)
        guard fd >= 0 else { return }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        guard let request = readRequest(fd) else {
            close(fd)
            return
        }
        // The answer and the replay are sent under the lock, so no console output comes before
        // them and none falls between the log's end and the live stream.
        let accepted = state.withLock { state -> Bool in
            if state.client >= 0, !request.force { return false }
            if state.client >= 0 {
                shutdown(state.client, Int32(SHUT_RDWR))
                Glibc.close(state.client)
            }
            _ = "OK\n".withCString { send(fd, $0, 3, Int32(MSG_NOSIGNAL)) }
            if request.replay { sendLogTail(to: fd) }
            state.client = fd
            return true
        }
        if !accepted {
            _ = "BUSY\n".withCString { send(fd, $0, 5, Int32(MSG_NOSIGNAL)) }
            Glibc.close(fd)
        }
    }

    /// Sends the last ``replayBytes`` of what the guest wrote (from `console.log.1` too when the
    /// log was just rotated). Called with the lock held: the log does not grow meanwhile.
    private func sendLogTail(to fd: Int32) {
        var tail: [UInt8] = []
        for path in [logPath, logPath + ".1"] where tail.count < Self.replayBytes {
            tail = Self.lastBytes(of: path, count: Self.replayBytes - tail.count) + tail
        }
        sendAll(fd, tail)
    }

    /// The last `count` bytes of the file at `path` (fewer when it is shorter; none when absent).
    static func lastBytes(of path: String, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { return [] }
        let start = max(0, Int(info.st_size) - count)
        var bytes = [UInt8](repeating: 0, count: Int(info.st_size) - start)
        var done = 0
        while done < bytes.count {
            let got = bytes[done...].withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(start + done)) }
            if got < 0, errno == EINTR { continue }
            guard got > 0 else { break }
            done += got
        }
        return Array(bytes[..<done])
    }

    /// Removes `console.sock` (the process is ending).
    public func removeSocket() {
        if listener >= 0 { unlink(socketPath) }
    }
}

/// Runs `body` on a new detached pthread (blocking work kept off the Swift concurrency pool).
public func startDetachedThread(_ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    var thread = pthread_t()
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    let result = pthread_create(&thread, nil, { argument in
        Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue().body()
        return nil
    }, box)
    if result == 0 { pthread_detach(thread) } else { Unmanaged<Box>.fromOpaque(box).release() }
}
