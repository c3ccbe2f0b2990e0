internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// The migration wire format: a 16-byte preamble each way, then sections.
///
/// - Preamble: magic `HYPCMIGR`, protocol version (u32 LE), 4 reserved zero bytes. Each side
///   sends its own at once and checks the other's: a version it cannot speak ends the migration
///   with ``MigrationError/unsupportedVersion(found:supported:)`` before anything else is read.
/// - Section: a 24-byte header — type (u32), reserved (u32, zero), payload length (u64),
///   CRC-32C of the payload (u32), CRC-32C of the header's first 20 bytes (u32) — then the
///   payload. The header checksum is checked before the length is believed; every type has a
///   maximum length, checked before anything is allocated; the payload checksum is checked before
///   the payload is used (memory pages are read into the not-yet-running guest's RAM and the
///   whole migration fails if their checksum does not match, before any vCPU runs).
public enum MigrationSection: UInt32, Sendable, CustomStringConvertible {
    case hello = 1, auth = 2, authOK = 3, offer = 4, file = 5, ready = 6
    case memory = 7, disk = 8, pass = 9, state = 10, complete = 11
    case prepared = 12, go = 13, running = 14, abort = 15

    /// The largest payload each type may have.
    var maximumLength: UInt64 {
        switch self {
        case .memory: UInt64(8 + MigrationStream.pagesPerSection * (16 + 4096))
        case .file, .disk: UInt64(24 + MigrationStream.chunkSize)
        case .state: 64 << 20
        default: 1 << 20
        }
    }

    public var description: String {
        switch self {
        case .hello: "hello"
        case .auth: "auth"
        case .authOK: "auth-ok"
        case .offer: "offer"
        case .file: "file"
        case .ready: "ready"
        case .memory: "memory"
        case .disk: "disk"
        case .pass: "pass"
        case .state: "state"
        case .complete: "complete"
        case .prepared: "prepared"
        case .go: "go"
        case .running: "running"
        case .abort: "abort"
        }
    }
}

public final class MigrationStream: @unchecked Sendable {
    public static let version: UInt32 = 3
    static let magic = Array("HYPCMIGR".utf8)
    static let headerSize = 24
    static let pagesPerSection = 256
    static let chunkSize = 1 << 20
    static let pageSize = 4096
    static let hardwareCRC = ckvm_crc32c_hardware() == 1

    public let fd: Int32
    /// How long a read waits for the peer before ``MigrationError/timeout(_:)``.
    public var readTimeoutSeconds: Double = 30
    /// Bytes sent and received, headers included.
    public private(set) var bytesSent: UInt64 = 0
    public private(set) var bytesReceived: UInt64 = 0

    /// Reads go through this buffer: a memory section is hundreds of small pieces (a header, a
    /// table, page runs of a few dozen bytes), and a system call each would cost more than the
    /// bytes. Pieces at least as large as the buffer are read straight into their destination.
    private static let readBufferSize = 256 << 10
    private let readBuffer = UnsafeMutableRawPointer.allocate(byteCount: MigrationStream.readBufferSize, alignment: 64)
    private var readStart = 0, readEnd = 0

    /// Bytes read from the socket that no caller has taken yet. A stream whose descriptor is handed
    /// to another process must have none (the protocol leaves the sender silent there).
    public var bufferedByteCount: Int { readEnd - readStart }

    /// Wraps a connected stream socket (or pipe); the caller keeps ownership of `fd`.
    public init(fd: Int32) { self.fd = fd }

    deinit { readBuffer.deallocate() }

    static func crc(_ pointer: UnsafeRawPointer, _ count: Int, _ crc: UInt32 = 0) -> UInt32 {
        if hardwareCRC { return ckvm_crc32c(crc, pointer, count) }
        return CRC32C.checksum(UnsafeRawBufferPointer(start: pointer, count: count), continuing: crc)
    }

    static func crc(_ bytes: [UInt8], _ start: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { $0.count == 0 ? start : crc($0.baseAddress!, $0.count, start) }
    }

    // MARK: Preamble

    func sendPreamble() throws(MigrationError) {
        var bytes = Self.magic
        append(&bytes, Self.version)
        append(&bytes, UInt32(0))
        try write(bytes)
    }

    func receivePreamble() throws(MigrationError) {
        let bytes = try read(16)
        guard Array(bytes[0..<8]) == Self.magic else {
            throw .protocolViolation("the peer did not start with the HYPCMIGR signature (not an hvrun migration, or wrong port?)")
        }
        let version = load(UInt32.self, bytes, 8)
        guard version == Self.version else { throw .unsupportedVersion(found: version, supported: Self.version) }
    }

    // MARK: Sections

    func header(_ type: MigrationSection, length: Int, crc: UInt32) -> [UInt8] {
        var header: [UInt8] = []
        header.reserveCapacity(Self.headerSize)
        append(&header, type.rawValue)
        append(&header, UInt32(0))
        append(&header, UInt64(length))
        append(&header, crc)
        append(&header, Self.crc(header))
        return header
    }

    public func send(_ type: MigrationSection, _ payload: [UInt8]) throws(MigrationError) {
        try write(header(type, length: payload.count, crc: Self.crc(payload)) + payload)
    }

    public func send(_ type: MigrationSection, json: JSONValue) throws(MigrationError) {
        try send(type, Array(json.rendered().utf8))
    }

    /// Sends buffers as one section's payload without copying them (writev).
    func send(_ type: MigrationSection, buffers: [(UnsafeRawPointer, Int)]) throws(MigrationError) {
        var crc: UInt32 = 0
        var length = 0
        for (pointer, count) in buffers where count > 0 {
            crc = Self.crc(pointer, count, crc)
            length += count
        }
        let head = header(type, length: length, crc: crc)
        let failure: MigrationError? = head.withUnsafeBytes { raw in
            do throws(MigrationError) { try writeVector([(raw.baseAddress!, raw.count)] + buffers.filter { $0.1 > 0 }) } catch { return error }
            return nil
        }
        if let failure { throw failure }
    }

    /// Reads the next section's header: its type and payload length (not yet read).
    public func receiveHeader() throws(MigrationError) -> (MigrationSection, Int, UInt32) {
        let bytes = try read(Self.headerSize)
        guard Self.crc(Array(bytes[0..<20])) == load(UInt32.self, bytes, 20) else {
            throw .protocolViolation("section header checksum mismatch at byte \(bytesReceived - UInt64(Self.headerSize)) of the stream")
        }
        let raw = load(UInt32.self, bytes, 0)
        guard let type = MigrationSection(rawValue: raw), load(UInt32.self, bytes, 4) == 0 else {
            throw .protocolViolation("unknown section type \(raw)")
        }
        let length = load(UInt64.self, bytes, 8)
        guard length <= type.maximumLength else {
            throw .protocolViolation("a \(type) section of \(length) bytes (at most \(type.maximumLength))")
        }
        return (type, Int(length), load(UInt32.self, bytes, 16))
    }

    /// Reads a whole section (type and checked payload).
    public func receive() throws(MigrationError) -> (MigrationSection, [UInt8]) {
        let (type, length, crc) = try receiveHeader()
        let payload = try read(length)
        guard Self.crc(payload) == crc else { throw .protocolViolation("\(type) section payload checksum mismatch") }
        if type == .abort { throw .peerAborted(String(decoding: payload, as: UTF8.self)) }
        return (type, payload)
    }

    /// Reads a section that must be `expected` (an abort becomes ``MigrationError/peerAborted(_:)``).
    public func receive(_ expected: MigrationSection) throws(MigrationError) -> [UInt8] {
        let (type, payload) = try receive()
        guard type == expected else { throw .protocolViolation("expected a \(expected) section, got \(type)") }
        return payload
    }

    public func receiveJSON(_ expected: MigrationSection) throws(MigrationError) -> JSONValue {
        let payload = try receive(expected)
        do throws(JSONParseError) { return try JSONValue.parse(payload) } catch {
            throw .protocolViolation("\(expected) section: \(error)")
        }
    }

    /// Tells the peer why we stop (best effort: the connection may be gone already).
    public func abort(_ reason: String) {
        try? send(.abort, Array(reason.utf8.prefix(4096)))
    }

    // MARK: Bytes

    func write(_ bytes: [UInt8]) throws(MigrationError) {
        let failure: MigrationError? = bytes.withUnsafeBytes { raw in
            do throws(MigrationError) { try writeVector([(raw.baseAddress!, raw.count)]) } catch { return error }
            return nil
        }
        if let failure { throw failure }
    }

    func writeVector(_ buffers: [(UnsafeRawPointer, Int)]) throws(MigrationError) {
        var remaining = buffers
        while !remaining.isEmpty {
            // A peer that stops reading (hung, or a full pipe nobody drains) must not block the
            // sender forever: wait for room at most as long as a read waits for data.
            guard try waitReady(POLLOUT, silence: "took nothing") else { continue }
            let chunk = Array(remaining.prefix(1024))
            let bases = chunk.map { Optional($0.0) }
            let lengths = chunk.map { $0.1 }
            let written = bases.withUnsafeBufferPointer { basePointer in
                lengths.withUnsafeBufferPointer { lengthPointer in
                    basePointer.withMemoryRebound(to: UnsafeRawPointer.self) {
                        ckvm_writev(fd, $0.baseAddress!, lengthPointer.baseAddress!, Int32(chunk.count))
                    }
                }
            }
            if written < 0 {
                let code = Int32(-written)
                if code == EINTR || code == EAGAIN { continue }
                if code == EPIPE || code == ECONNRESET { throw .closed("while sending (\(SystemError.describe(code)))") }
                throw .io(operation: "write", errno: code)
            }
            bytesSent += UInt64(written)
            var left = written
            while left > 0, !remaining.isEmpty {
                if remaining[0].1 <= left {
                    left -= remaining[0].1
                    remaining.removeFirst()
                } else {
                    remaining[0] = (remaining[0].0 + left, remaining[0].1 - left)
                    left = 0
                }
            }
            while let first = remaining.first, first.1 == 0 { remaining.removeFirst() }
        }
    }

    func read(_ count: Int) throws(MigrationError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let failure: MigrationError? = bytes.withUnsafeMutableBytes { raw in
            do throws(MigrationError) { if count > 0 { try read(into: raw.baseAddress!, count) } } catch { return error }
            return nil
        }
        if let failure { throw failure }
        return bytes
    }

    /// Waits up to ``readTimeoutSeconds`` for `events` on the stream: true when ready, false when
    /// a signal interrupted the wait (poll again); a silent peer is a timeout naming what it did not do.
    private func waitReady(_ events: Int32, silence: String) throws(MigrationError) -> Bool {
        var entry = pollfd(fd: fd, events: Int16(events), revents: 0)
        let ready = poll(&entry, 1, Int32(readTimeoutSeconds * 1000))
        if ready < 0 {
            if errno == EINTR { return false }
            throw .io(operation: "poll", errno: errno)
        }
        guard ready > 0 else { throw .timeout("the peer \(silence) for \(Int(readTimeoutSeconds)) s") }
        return true
    }

    /// Reads exactly `count` bytes into `pointer`, waiting at most ``readTimeoutSeconds`` for each piece.
    func read(into pointer: UnsafeMutableRawPointer, _ count: Int) throws(MigrationError) {
        var done = min(count, bufferedByteCount)
        if done > 0 {
            pointer.copyMemory(from: readBuffer + readStart, byteCount: done)
            readStart += done
        }
        while done < count {
            guard try waitReady(POLLIN, silence: "sent nothing") else { continue }
            let direct = count - done >= Self.readBufferSize
            let got = direct ? Glibc.read(fd, pointer + done, count - done) : Glibc.read(fd, readBuffer, Self.readBufferSize)
            if got < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                if errno == ECONNRESET { throw .closed("(connection reset)") }
                throw .io(operation: "read", errno: errno)
            }
            guard got > 0 else { throw .closed("after \(bytesReceived + UInt64(done)) bytes") }
            if direct {
                done += got
            } else {
                let taken = min(got, count - done)
                (pointer + done).copyMemory(from: readBuffer, byteCount: taken)
                readStart = taken
                readEnd = got
                done += taken
            }
        }
        bytesReceived += UInt64(count)
    }

    // MARK: Little-endian helpers

    func append<T: FixedWidthInteger>(_ bytes: inout [UInt8], _ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    func load<T: FixedWidthInteger>(_: T.Type, _ bytes: [UInt8], _ offset: Int) -> T {
        bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}
