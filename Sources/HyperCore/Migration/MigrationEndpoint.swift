internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// Where a migration connects or listens: `HOST:PORT` (TCP; `[v6]:PORT` for an IPv6 literal) or
/// `unix:PATH` (a Unix stream socket; created with mode 0600 by the listener).
public enum MigrationEndpoint: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public init(parsing text: String) throws(MigrationError) {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw .usage("unix: needs a path, as in unix:/run/hvrun-migrate.sock") }
            self = .unix(path: path)
            return
        }
        let stripped = text.hasPrefix("tcp:") ? String(text.dropFirst(4)) : text
        guard let colon = stripped.lastIndex(of: ":"), let port = UInt16(stripped[stripped.index(after: colon)...]) else {
            throw .usage("'\(text)' is not an address: use HOST:PORT (TCP) or unix:PATH")
        }
        var host = String(stripped[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw .usage("'\(text)' has no host: use HOST:PORT, e.g. 127.0.0.1:4444 or 0.0.0.0:4444") }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case let .tcp(host, port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case let .unix(path): "unix:\(path)"
        }
    }

    private func addresses(passive: Bool) throws(MigrationError) -> [(family: Int32, address: [UInt8])] {
        guard case let .tcp(host, port) = self else { return [] }
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var list: UnsafeMutablePointer<addrinfo>?
        let result = getaddrinfo(host, String(port), &hints, &list)
        guard result == 0, let list else {
            throw .usage("cannot resolve \(host): \(String(cString: gai_strerror(result)))")
        }
        defer { freeaddrinfo(list) }
        var found: [(Int32, [UInt8])] = []
        var entry: UnsafeMutablePointer<addrinfo>? = list
        while let current = entry {
            if let address = current.pointee.ai_addr {
                found.append((current.pointee.ai_family, Array(UnsafeRawBufferPointer(start: address, count: Int(current.pointee.ai_addrlen)))))
            }
            entry = current.pointee.ai_next
        }
        return found
    }

    private func unixAddress(_ path: String) throws(MigrationError) -> [UInt8] {
        guard let address = unixSocketAddress(path) else {
            throw .usage("\(path) is longer than a Unix socket path may be (107 bytes)")
        }
        return withUnsafeBytes(of: address) { Array($0) }
    }

    /// Connects, trying each address in turn; returns the connected socket (close-on-exec).
    public func connect(timeoutSeconds: Double = 10) throws(MigrationError) -> Int32 {
        let candidates: [(family: Int32, address: [UInt8])]
        switch self {
        case .tcp: candidates = try addresses(passive: false)
        case let .unix(path): candidates = [(AF_UNIX, try unixAddress(path))]
        }
        var lastError: Int32 = ECONNREFUSED
        for candidate in candidates {
            let fd = socket(candidate.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { lastError = errno; continue }
            let connected = candidate.address.withUnsafeBytes {
                Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
            }
            if connected == 0 {
                Self.tune(fd, tcp: candidate.family != AF_UNIX)
                return fd
            }
            lastError = errno
            close(fd)
        }
        throw .io(operation: "connect to \(self)", errno: lastError)
    }

    /// Listens (backlog 1); returns the listening socket (close-on-exec).
    public func listen() throws(MigrationError) -> Int32 {
        switch self {
        case .tcp:
            var lastError: Int32 = EADDRNOTAVAIL
            for candidate in try addresses(passive: true) {
                let fd = socket(candidate.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { lastError = errno; continue }
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                let bound = candidate.address.withUnsafeBytes {
                    bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
                }
                if bound == 0, Glibc.listen(fd, 1) == 0 { return fd }
                lastError = errno
                close(fd)
            }
            throw .io(operation: "listen on \(self)", errno: lastError)
        case let .unix(path):
            let address = try unixAddress(path)
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw .io(operation: "socket", errno: errno) }
            let previous = umask(0o177)
            let bound = address.withUnsafeBytes { bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
            umask(previous)
            guard bound == 0, Glibc.listen(fd, 1) == 0 else {
                let code = errno
                close(fd)
                throw .io(operation: "listen on \(self)", errno: code)
            }
            return fd
        }
    }

    /// The TCP port a listening socket got (for `HOST:0`).
    public static func boundPort(_ fd: Int32) -> UInt16? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard result == 0 else { return nil }
        return withUnsafeBytes(of: storage) { raw -> UInt16? in
            let family = Int32(raw.load(as: sa_family_t.self))
            guard family == AF_INET || family == AF_INET6 else { return nil }
            return UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        }
    }

    /// Waits up to `timeoutSeconds` for one connection on a listening socket.
    public static func accept(_ listener: Int32, timeoutSeconds: Double) throws(MigrationError) -> Int32 {
        let deadline = monotonicSeconds() + timeoutSeconds
        while true {
            let remaining = deadline - monotonicSeconds()
            guard remaining > 0 else { throw .timeout("no sender connected within \(Int(timeoutSeconds)) s") }
            var entry = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            let ready = poll(&entry, 1, Int32(min(remaining, 3600) * 1000) + 1)
            if ready < 0, errno != EINTR { throw .io(operation: "poll", errno: errno) }
            guard ready > 0 else { continue }
            let fd = Glibc.accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == EAGAIN || errno == ECONNABORTED { continue }
                throw .io(operation: "accept", errno: errno)
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            var family = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            _ = withUnsafeMutablePointer(to: &family) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
            tune(fd, tcp: Int32(family.ss_family) != AF_UNIX)
            return fd
        }
    }

    /// Large socket buffers (pages go out in 1 MiB sections) and no Nagle delay on the small
    /// control sections of the switch-over.
    static func tune(_ fd: Int32, tcp: Bool) {
        var size: Int32 = 4 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        if tcp {
            var one: Int32 = 1
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
    }
}

/// Ties a receiving process's life to the command that started it (prctl `PR_SET_PDEATHSIG`):
/// if `hvrun vm receive` dies before the switch-over, the VM process it spawned dies too, and
/// the migration fails cleanly instead of finishing with nobody to report it.
public enum ParentDeathSignal {
    /// Returns false if the parent is already gone (its pid is no longer our parent).
    public static func kill(whenParentDies expectedParent: Int32) -> Bool {
        _ = ckvm_set_parent_death_signal(SIGKILL)
        return getppid() == expectedParent
    }

    public static func clear() { _ = ckvm_set_parent_death_signal(0) }
}
