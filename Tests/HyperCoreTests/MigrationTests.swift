import Foundation
import Testing
import Synchronization
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The migration protocol's pieces without a VM: hashes, tokens, addresses, framing.
@Suite("Migration: protocol pieces")
struct MigrationProtocolTests {
    static func hex(_ bytes: [UInt8]) -> String { MigrationSender.hex(bytes) }

    @Test("SHA-256 and HMAC-SHA-256 match the published test vectors")
    func hashes() {
        #expect(Self.hex(SHA256.hash([])) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(Self.hex(SHA256.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(Self.hex(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
        // RFC 4231 test cases 1 and 2.
        #expect(Self.hex(SHA256.hmac(key: [UInt8](repeating: 0x0b, count: 20), message: Array("Hi There".utf8)))
                == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7")
        #expect(Self.hex(SHA256.hmac(key: Array("Jefe".utf8), message: Array("what do ya want for nothing?".utf8)))
                == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    }

    @Test("tokens: generated ones are 48 hex digits and differ; bad ones are refused; comparison is exact")
    func tokens() throws {
        let a = MigrationToken.generate(), b = MigrationToken.generate()
        #expect(a.count == 48 && a != b)
        try MigrationToken.validate(a)
        #expect(throws: MigrationError.self) { try MigrationToken.validate("short") }
        #expect(throws: MigrationError.self) { try MigrationToken.validate("has a space in it, which is bad") }
        #expect(MigrationToken.constantTimeEqual([1, 2, 3], [1, 2, 3]))
        #expect(!MigrationToken.constantTimeEqual([1, 2, 3], [1, 2, 4]) && !MigrationToken.constantTimeEqual([1, 2], [1, 2, 3]))
    }

    @Test("endpoints: HOST:PORT, [v6]:PORT and unix:PATH parse; anything else is a usage error")
    func endpoints() throws {
        #expect(try MigrationEndpoint(parsing: "127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: 4444))
        #expect(try MigrationEndpoint(parsing: "tcp:localhost:1") == .tcp(host: "localhost", port: 1))
        #expect(try MigrationEndpoint(parsing: "[::1]:80") == .tcp(host: "::1", port: 80))
        #expect(try MigrationEndpoint(parsing: "unix:/tmp/x.sock") == .unix(path: "/tmp/x.sock"))
        for bad in ["", "host", "host:", ":80", "host:70000", "unix:"] {
            #expect(throws: MigrationError.self, "\(bad)") { try MigrationEndpoint(parsing: bad) }
        }
    }

    static func pair() -> (MigrationStream, MigrationStream, () -> Void) {
        var fds: [Int32] = [0, 0]
        socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds)
        let a = MigrationStream(fd: fds[0]), b = MigrationStream(fd: fds[1])
        a.readTimeoutSeconds = 5
        b.readTimeoutSeconds = 5
        return (a, b, { close(fds[0]); close(fds[1]) })
    }

    @Test("sections round-trip; a flipped byte anywhere in a section is caught; an oversized length is refused unread")
    func framing() throws {
        let payload = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        do {
            let (a, b, done) = Self.pair()
            defer { done() }
            try a.send(.file, payload)
            let (type, received) = try b.receive()
            #expect(type == .file && received == payload)
        }
        for position in [0, 5, 12, 18, 22, 24, 100, 24 + 4999] {
            let (a, b, done) = Self.pair()
            defer { done() }
            var bytes = a.header(.file, length: payload.count, crc: MigrationStream.crc(payload)) + payload
            bytes[position] ^= 0x20
            try a.write(bytes)
            #expect(throws: MigrationError.self, "byte \(position)") { _ = try b.receive() }
        }
        let (a, b, done) = Self.pair()
        defer { done() }
        try a.write(a.header(.hello, length: 1 << 40, crc: 0))
        #expect { _ = try b.receive() } throws: { error in
            "\(error)".contains("at most")
        }
    }

    @Test("storage copy: a file written, punched, shrunk and grown while it is mirrored ends byte for byte equal, with its holes and its time")
    func diskMirror() throws {
        let directory = try TemporaryDirectory()
        let sourcePath = directory.file("source.img"), targetPath = directory.file("target.img")
        let file = try DiskFile(creating: sourcePath)
        @Sendable func random(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8.random(in: 0...255) } }
        try file.write(random(2 << 20), at: 0)
        try file.write(random(1 << 20), at: 6 << 20)   // a 4 MiB hole between
        let (a, b, done) = Self.pair()
        defer { done() }
        let mirror = try DiskMirror(index: 0, file: file)
        mirror.changes.start()
        let target = try DiskMirrorTarget(paths: [targetPath])
        let received = DispatchSemaphore(value: 0)
        let failure = Mutex<String?>(nil)
        startDetachedThread {
            do {
                while true {
                    let (type, payload) = try b.receive()
                    if type == .disk { try target.apply(payload, b); continue }
                    guard type == .complete else { throw MigrationError.protocolViolation("\(type)") }
                    try target.finish(try JSONValue.parse(payload)["disks"])
                    break
                }
            } catch { failure.withLock { $0 = "\(error)" } }
            received.signal()
        }
        // A writer as a guest would be: scattered writes, a discard, a shrink, growth past the end.
        let writing = DispatchSemaphore(value: 0)
        startDetachedThread {
            for round in 0..<300 {
                let offset = UInt64.random(in: 0..<(10 << 20) / 4096) * 4096
                try? file.write(random(4096), at: offset)
                if round == 100 { try? file.punchHole(at: 1 << 20, length: 512 << 10) }
                if round == 150 { try? file.truncate(to: 7 << 20) }
                if round == 200 { try? file.write(random(8192), at: 12 << 20) }
            }
            writing.signal()
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: DiskMirror.pieceSize, alignment: 4096)
        defer { buffer.deallocate() }
        _ = try mirror.sendAll(a, buffer)
        for _ in 0..<3 { _ = try mirror.sendChanged(a, buffer) }
        writing.wait()
        _ = try mirror.sendChanged(a, buffer)   // the writer stopped: the last of it
        try a.send(.complete, json: .object([("disks", .array([mirror.finalDescription()]))]))
        received.wait()
        mirror.changes.stop()
        #expect(failure.withLock { $0 } == nil, "\(failure.withLock { $0 } ?? "")")
        let sourceBytes = try StoreFiles.read(sourcePath), targetBytes = try StoreFiles.read(targetPath)
        #expect(sourceBytes.count == targetBytes.count)
        #expect(sourceBytes == targetBytes, "the copy differs from the file")
        var sourceInfo = stat(), targetInfo = stat()
        stat(sourcePath, &sourceInfo)
        stat(targetPath, &targetInfo)
        #expect(sourceInfo.st_mtim.tv_sec == targetInfo.st_mtim.tv_sec && sourceInfo.st_mtim.tv_nsec == targetInfo.st_mtim.tv_nsec)
        // Holes stay holes: the copy allocates what the file has (to the page), not its 12 MiB.
        #expect(targetInfo.st_blocks <= sourceInfo.st_blocks + 256, "\(targetInfo.st_blocks * 512) bytes allocated for \(sourceInfo.st_blocks * 512)")
    }

    /// Pages as a guest leaves them: words set at random places, from one word to a full page.
    static func sparsePage(words: Int) -> [UInt64] {
        var page = [UInt64](repeating: 0, count: 512)
        for _ in 0..<words { page[Int.random(in: 0..<512)] = UInt64.random(in: 1...UInt64.max) }
        return page
    }

    @Test("page runs: every sparse page round-trips over a page that held something else; dense pages stay whole")
    func pageRuns() {
        let output = UnsafeMutableRawPointer.allocate(byteCount: PageEncoding.maximumRunsSize, alignment: 8)
        defer { output.deallocate() }
        // Up to 80 words always fit (80 runs of one word: 960 bytes); 150 words never do (1,200 bytes of data).
        var sparse = (0..<300).map { _ in Self.sparsePage(words: Int.random(in: 1...80)) }
        var edges = [UInt64](repeating: 0, count: 512)
        edges[0] = 1
        edges[511] = .max
        sparse.append(edges)
        let dense = (0..<20).map { _ in Self.sparsePage(words: 400) } + [(0..<512).map { _ in UInt64.random(in: 1...UInt64.max) }]
        for page in sparse {
            let size = page.withUnsafeBytes { PageEncoding.encodeRuns($0.baseAddress!, into: output) }
            let nonZero = page.filter { $0 != 0 }.count
            guard let size else {
                Issue.record("a page of \(nonZero) non-zero words was not encoded as runs")
                continue
            }
            #expect(size <= PageEncoding.maximumRunsSize && size >= nonZero * 8 + 4)
            var rebuilt = (0..<512).map { _ in UInt64.random(in: 0...UInt64.max) }
            let problem = rebuilt.withUnsafeMutableBytes {
                PageEncoding.decodeRuns(UnsafeRawBufferPointer(start: output, count: size), into: $0.baseAddress!)
            }
            let same = rebuilt == page
            #expect(problem == nil && same)
        }
        for page in dense {
            let size = page.withUnsafeBytes { PageEncoding.encodeRuns($0.baseAddress!, into: output) }
            #expect(size == nil, "a dense page became \(size ?? 0) bytes of runs")
        }
    }

    @Test("page runs: overlapping, backwards, unaligned, empty, oversized or cut-off runs are refused and the page is left alone")
    func hostilePageRuns() {
        func run(_ offset: Int, _ length: Int, data: Int? = nil) -> [UInt8] {
            var bytes: [UInt8] = []
            withUnsafeBytes(of: (UInt32(offset) | UInt32(length) << 16).littleEndian) { bytes += $0 }
            return bytes + [UInt8](repeating: 0xAB, count: data ?? length)
        }
        let hostile: [(String, [UInt8])] = [
            ("past the page", run(4088, 16)),
            ("overlapping", run(0, 16) + run(8, 8)),
            ("backwards", run(64, 8) + run(0, 8)),
            ("unaligned offset", run(3, 8)),
            ("unaligned length", run(0, 12)),
            ("empty", run(0, 0)),
            ("cut-off data", run(0, 64, data: 10)),
            ("cut-off header", run(0, 8) + [1, 2]),
            ("too long", [UInt8](repeating: 0, count: PageEncoding.maximumRunsSize + 4)),
        ]
        for (name, bytes) in hostile {
            var page = [UInt8](repeating: 0x5A, count: 4096)
            let problem = bytes.withUnsafeBytes { runs in
                page.withUnsafeMutableBytes { PageEncoding.decodeRuns(runs, into: $0.baseAddress!) }
            }
            #expect(problem != nil, "\(name) was accepted")
            #expect(page.allSatisfy { $0 == 0x5A }, "\(name) wrote into the page")
        }
    }

    @Test("destination pages: runs of 16 or more consecutive pages are found; populate allocates exactly its range and keeps it zero")
    func populatingRuns() throws {
        let page: UInt64 = 4096
        let dense = (0..<20).map { 0x10000 + $0 * page }
        let short = (0..<15).map { 0x100000 + $0 * page }
        let scattered = stride(from: UInt64(0x200000), to: UInt64(0x240000), by: Int(2 * page))
        let runs = MigrationReceiver.consecutiveRuns(of: dense + short + Array(scattered) + dense, pageSize: page, shortest: 16)
        #expect(runs == [0x10000..<(0x10000 + 20 * page), 0x10000..<(0x10000 + 20 * page)])
        #expect(MigrationReceiver.consecutiveRuns(of: [], pageSize: page, shortest: 16).isEmpty)

        let memory = try GuestMemory(size: 1 << 20)
        func resident(_ address: UInt64, _ pages: Int) -> [Bool] {
            var vector = [UInt8](repeating: 0, count: pages)
            #expect(mincore(memory.pointer(at: address, count: pages * 4096)!, pages * 4096, &vector) == 0)
            return vector.map { $0 & 1 == 1 }
        }
        #expect(resident(0x8000, 10).allSatisfy { !$0 }, "fresh guest RAM should not be resident yet")
        #expect(memory.populate(at: 0x8000, count: 8 * 4096))
        #expect(resident(0x8000, 10) == [Bool](repeating: true, count: 8) + [false, false])
        let bytes = UnsafeRawBufferPointer(start: memory.pointer(at: 0x8000, count: 8 * 4096)!, count: 8 * 4096)
        #expect(bytes.allSatisfy { $0 == 0 })
        #expect(!memory.populate(at: (1 << 20) - 4096, count: 2 * 4096), "a range past RAM is refused")
    }

    @Test("a memory section whose table lies (encoding, sizes, address, length) or whose runs are bad is refused")
    func hostileMemorySections() throws {
        let memory = try GuestMemory(size: 1 << 20)
        func entry(_ address: UInt64, _ encoding: UInt32, _ size: UInt32) -> [UInt8] {
            var bytes: [UInt8] = []
            withUnsafeBytes(of: address.littleEndian) { bytes += $0 }
            withUnsafeBytes(of: (UInt64(encoding) | UInt64(size) << 32).littleEndian) { bytes += $0 }
            return bytes
        }
        let count: [UInt8] = [1, 0, 0, 0, 0, 0, 0, 0]
        let goodRuns: [UInt8] = [8, 0, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        let cases: [(String, [UInt8], String)] = [
            ("unknown encoding", count + entry(0x1000, 7, 0), "encoding 7"),
            ("raw page of the wrong size", count + entry(0x1000, 0, 100) + [UInt8](repeating: 1, count: 100), "encoding 0"),
            ("zero page with data", count + entry(0x1000, 1, 8) + [UInt8](repeating: 1, count: 8), "encoding 1"),
            ("runs too long", count + entry(0x1000, 2, 2000) + [UInt8](repeating: 1, count: 2000), "encoding 2"),
            ("page outside RAM", count + entry(2 << 20, 2, 12) + goodRuns, "not guest RAM"),
            ("length that disagrees", count + entry(0x1000, 2, 12) + goodRuns + [0], "bytes of pages"),
            ("runs past the page", count + entry(0x1000, 2, 12) + [0xF8, 0x0F, 16, 0, 1, 2, 3, 4, 5, 6, 7, 8], "runs of page 0x1000"),
        ]
        for (name, payload, message) in cases {
            let (a, b, done) = Self.pair()
            defer { done() }
            try a.send(.memory, payload)
            let (type, length, crc) = try b.receiveHeader()
            #expect(type == .memory)
            #expect("\(name)", performing: {
                try MigrationReceiver(stream: b).receivePages(length: length, crc: crc, into: memory)
            }, throws: { error in
                "\(error)".contains(message)
            })
        }
        // A good section lands: the page holds the run and zeros around it.
        let (a, b, done) = Self.pair()
        defer { done() }
        try a.send(.memory, count + entry(0x3000, 2, 12) + goodRuns)
        let (_, length, crc) = try b.receiveHeader()
        try MigrationReceiver(stream: b).receivePages(length: length, crc: crc, into: memory)
        let page = UnsafeRawBufferPointer(start: memory.pointer(at: 0x3000, count: 4096)!, count: 4096)
        #expect(Array(page[8..<16]) == [1, 2, 3, 4, 5, 6, 7, 8] && page[0..<8].allSatisfy { $0 == 0 } && page[16...].allSatisfy { $0 == 0 })
    }

    @Test("a peer of another protocol version is refused, naming both versions")
    func version() throws {
        let (a, b, done) = Self.pair()
        defer { done() }
        var preamble = MigrationStream.magic
        a.append(&preamble, UInt32(99))
        a.append(&preamble, UInt32(0))
        try a.write(preamble)
        #expect(throws: MigrationError.unsupportedVersion(found: 99, supported: MigrationStream.version)) { try b.receivePreamble() }
    }
}

/// A machine moved inside this process over a socketpair: the library API end to end.
@Suite("Migration: library end to end", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct MigrationLibraryTests {
    static func statefulMachine(_ commandLine: String, memory: UInt64, console: any ConsoleOutput) throws -> Machine {
        var configuration = MachineConfiguration(boot: .pvh(kernel: try GuestImages.bytes("stateful.elf"), kernelName: "stateful.elf",
                                                            initrd: nil, commandLine: commandLine))
        configuration.memorySize = memory
        configuration.console = console
        return try Machine(configuration)
    }

    final class Outcome: @unchecked Sendable {
        var machine: Machine?
        var error: (any Error)?
        let done = DispatchSemaphore(value: 0)
    }

    /// Runs the receiver's steps on a thread; the returned outcome holds the running machine.
    static func receive(_ stream: MigrationStream, token: String, console: any ConsoleOutput) -> Outcome {
        let outcome = Outcome()
        Thread.detachNewThread {
            do {
                let receiver = MigrationReceiver(stream: stream)
                try receiver.authenticate(token: token)
                let offer = try receiver.receiveOffer()
                try receiver.receiveFiles(offer) { _, _, _ throws(MigrationError) in }
                var options = RestoreOptions()
                options.console = console
                let machine = try receiver.receiveMachine(offer, options: options)
                _ = try receiver.switchOver(machine)
                outcome.machine = machine
            } catch {
                outcome.error = error
            }
            outcome.done.signal()
        }
        return outcome
    }

    @Test("a guest dirtying 256 pages a tick moves and continues: every step once, every page right, same result",
          .timeLimit(.minutes(2)), arguments: [true, false])
    func moveInProcess(manualDirtyLog: Bool) throws {
        let line = "steps=150 ticks=1 dirty=256 dirtymb=32"
        let reference = BufferOutput()
        let exit = try Self.statefulMachine(line, memory: 256 << 20, console: reference).run(timeout: .seconds(60))
        #expect(exit == .debugExit(0x41), "\(reference.text)")
        let expected = try #require(SnapshotProcessTests.result(reference.text))

        let (a, b, done) = MigrationProtocolTests.pair()
        defer { done() }
        let sourceConsole = BufferOutput(), destinationConsole = BufferOutput()
        let source = try Self.statefulMachine(line, memory: 256 << 20, console: sourceConsole)
        try source.start()
        defer { source.stop() }
        while !sourceConsole.text.contains("step=30\n") { usleep(5_000); if source.exit != nil { break } }
        let token = MigrationToken.generate()
        let outcome = Self.receive(b, token: token, console: destinationConsole)
        var options = MigrationOptions()
        options.maxDowntimeMilliseconds = 20
        options.manualDirtyLogProtection = manualDirtyLog
        let offered = source.vm.supportedDirtyLogProtection
        let report = try MigrationSender(machine: source, stream: a, token: token, options: options).run()
        #expect(report.dirtyLog == (!manualDirtyLog || !offered.contains(.manual) ? "get-and-clear"
            : offered.contains(.initiallySet) ? "manual-protect+initially-set" : "manual-protect"))
        source.finish(.stopped)
        outcome.done.wait()
        #expect(outcome.error == nil, "\(String(describing: outcome.error))")
        let destination = try #require(outcome.machine)
        let destinationExit = destination.wait(timeout: .seconds(60))
        let combined = sourceConsole.text + destinationConsole.text
        #expect(destinationExit == .debugExit(0x41), "\(combined.suffix(2000))")
        #expect(SnapshotProcessTests.steps(combined) == Array(1...150), "\(combined.suffix(2000))")
        #expect(SnapshotProcessTests.result(destinationConsole.text) == expected)
        #expect(destinationConsole.text.contains("dirty_ok="), "\(destinationConsole.text.suffix(500))")
        #expect(report.passes >= 2 && report.pagesSent > 0 && report.downtimeNanoseconds > 0)
        print("moved (\(report.dirtyLog)): \(report.passes) passes, \(report.pagesSent) pages, \(report.bytesSent) bytes, total \(Double(report.totalNanoseconds) / 1e6) ms, downtime \(Double(report.downtimeNanoseconds) / 1e6) ms (destination resume \(Double(report.destinationResumeNanoseconds) / 1e6) ms), final pages \(report.finalPages)")
    }

    @Test("a wrong token is refused on both sides; the source guest keeps running", .timeLimit(.minutes(1)))
    func wrongToken() throws {
        let (a, b, done) = MigrationProtocolTests.pair()
        defer { done() }
        let console = BufferOutput()
        let source = try Self.statefulMachine("steps=1000 ticks=1", memory: 64 << 20, console: console)
        try source.start()
        defer { source.stop() }
        let outcome = Self.receive(b, token: MigrationToken.generate(), console: BufferOutput())
        #expect(throws: MigrationError.self) { _ = try MigrationSender(machine: source, stream: a, token: MigrationToken.generate()).run() }
        outcome.done.wait()
        #expect(outcome.error as? MigrationError == .authentication("the sender does not know the token"))
        #expect(source.runState == .running)
        let before = SnapshotProcessTests.steps(console.text).last ?? 0
        usleep(300_000)
        #expect((SnapshotProcessTests.steps(console.text).last ?? 0) > before, "the source guest goes on")
    }
}
