import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The store's pieces without a VM: names, MACs, UUIDs, vm.json, locks, where the store is.
@Suite("VM store: names, MACs, configuration, locks")
struct VMStoreUnitTests {
    @Test("names: 1-64 of [A-Za-z0-9._-], not starting with . or -")
    func names() {
        for good in ["a", "web-1", "db_2.test", "A9", String(repeating: "x", count: 64), "x-", "1"] { #expect(VMName.isValid(good), "\(good)") }
        for bad in ["", ".hidden", "-opt", "a b", "a/b", "é", String(repeating: "x", count: 65), "..", "a\n"] { #expect(!VMName.isValid(bad), "\(bad)") }
        #expect(throws: StoreError.invalid("invalid VM name '.x': \(VMName.rule)")) { try VMName.validate(".x") }
    }

    @Test("generated MACs are locally administered unicast and avoid the ones taken")
    func macs() {
        var taken: Set<MACAddress> = []
        for _ in 0..<2000 {
            let mac = MACAddress.generate(avoiding: taken)
            #expect(mac.isLocallyAdministered && !mac.isMulticast, "\(mac)")
            #expect(!taken.contains(mac))
            taken.insert(mac)
        }
        #expect(MACAddress("52:54:00:12:34:56")?.description == "52:54:00:12:34:56")
        #expect(MACAddress("52:54:00:12:34") == nil && MACAddress("zz:54:00:12:34:56") == nil)
    }

    @Test("UUIDs are version 4, RFC 4122 variant, and differ")
    func uuids() {
        let ids = (0..<100).map { _ in randomUUIDString() }
        #expect(Set(ids).count == 100)
        for id in ids {
            let bytes = Array(id.utf8)
            #expect(bytes.count == 36 && bytes[14] == UInt8(ascii: "4") && "89ab".utf8.contains(bytes[19]), "\(id)")
        }
    }

    @Test("vm.json round-trips through StateCoder, snake_case keys")
    func configuration() throws {
        let configuration = VMConfiguration(
            id: randomUUIDString(), name: "vm1", cpus: 2, memoryBytes: 512 << 20,
            boot: .init(kernel: "kernel", initrd: nil, cmdline: "console=ttyS0"),
            disks: [.init(path: "disk0.vhdx", readonly: false), .init(path: "/data/x.raw", readonly: true)],
            nics: [.init(switch: "lan", mac: "52:54:00:00:00:01", macGenerated: false)], onReset: .stop)
        let text = try configuration.encoded()
        for key in ["\"memory_bytes\":", "\"on_reset\":\"stop\"", "\"mac_generated\":false", "\"cmdline\":"] { #expect(text.contains(key), "\(text)") }
        #expect(try VMConfiguration.decode(Array(text.utf8), path: "vm.json") == configuration)
        #expect(configuration.disks.map(\.isInBundle) == [true, false])
        #expect(throws: StoreError.self) { try VMConfiguration.decode(Array("{\"id\":1}".utf8), path: "vm.json") }
    }

    @Test("the store root: HVRUN_HOME, else XDG_DATA_HOME/hvrun, else ~/.local/share/hvrun")
    func root() throws {
        #expect(try VMStore.defaultRoot { ["HVRUN_HOME": "/h", "XDG_DATA_HOME": "/x", "HOME": "/home/u"][$0] } == "/h")
        #expect(try VMStore.defaultRoot { ["HVRUN_HOME": "", "XDG_DATA_HOME": "/x", "HOME": "/home/u"][$0] } == "/x/hvrun")
        #expect(try VMStore.defaultRoot { ["HOME": "/home/u"][$0] } == "/home/u/.local/share/hvrun")
    }

    @Test("create: a bundle with vm.json and the kernel; leftovers of a crashed create or delete are removed")
    func createAndLeftovers() throws {
        let directory = try TemporaryDirectory()
        let store = VMStore(root: directory.path + "/store")
        let kernel = directory.file("kernel.elf")
        try StoreFiles.writeAtomically(kernel, Array("not really a kernel".utf8))
        try StoreFiles.makeDirectories(store.vmsPath + "/.old.creating-99999")
        try StoreFiles.writeAtomically(store.vmsPath + "/.old.creating-99999/kernel", [1, 2, 3])
        try StoreFiles.makeDirectories(store.vmsPath + "/.gone.deleting-99998")
        var request = VMCreateRequest(name: "fresh", kernel: kernel)
        request.nics = [("lan", nil), ("lan", MACAddress("52:54:00:00:00:01"))]
        let bundle = try store.create(request) { path, _ throws(StoreError) in Issue.record("no disk asked for: \(path)") }
        #expect(StoreFiles.list(store.vmsPath) == ["fresh"])
        #expect(store.names() == ["fresh"])
        #expect(fileBytes(bundle.path + "/kernel") == fileBytes(kernel))
        let configuration = try bundle.configuration()
        #expect(configuration.nics.map(\.macGenerated) == [true, false])
        #expect(store.status(of: bundle).state == .off)
        #expect(throws: StoreError.refused("a VM named fresh already exists")) { try store.create(request) { _, _ throws(StoreError) in } }
        #expect(throws: StoreError.notFound(name: "other")) { try store.bundle(named: "other") }
        try store.delete(name: "fresh", deleteDisks: false)
        #expect(StoreFiles.list(store.vmsPath).isEmpty)
    }

    @Test("a lock is exclusive between open files, seen by isHeld, and released on close")
    func locks() throws {
        let directory = try TemporaryDirectory()
        let path = directory.file("lock")
        #expect(!FileLock.isHeld(path))
        var first = try FileLock.acquire(path, wait: false)
        #expect(first != nil)
        #expect(FileLock.isHeld(path))
        #expect(try FileLock.acquire(path, wait: false) == nil, "OFD locks conflict even within one process")
        first = nil
        #expect(!FileLock.isHeld(path))
        #expect(try FileLock.acquire(path, wait: false) != nil)
    }
}

/// The VM process's console without a VM: console.log rotation and the console.sock attach protocol.
@Suite("VM console server")
struct VMConsoleServerTests {
    static func write(_ console: VMConsoleServer, _ text: String) {
        Array(text.utf8).withUnsafeBytes { console.write($0) }
    }

    /// Connects to `path`, sends the request line and returns the socket and the answer line.
    static func attach(_ path: String, _ request: String) throws -> (fd: Int32, answer: String) {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw Subprocess.Failure.spawn("connect", errno) }
        let line = Array((request + "\n").utf8)
        _ = send(fd, line, line.count, Int32(MSG_NOSIGNAL))
        return (fd, readUntil(fd, "\n"))
    }

    /// Reads until `needle` arrives, EOF, or 5 seconds pass.
    static func readUntil(_ fd: Int32, _ needle: String) -> String {
        var text = ""
        let deadline = Clock.now + 5
        while !text.contains(needle), Clock.now < deadline {
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 100) > 0 else { continue }
            var byte: UInt8 = 0
            guard read(fd, &byte, 1) == 1 else { return text + "<EOF>" }
            text.append(Character(UnicodeScalar(byte)))
        }
        return text
    }

    @Test("console.log is appended to and rotated to console.log.1 past the limit")
    func rotation() throws {
        let directory = try TemporaryDirectory()
        let log = directory.file("console.log")
        try StoreFiles.writeAtomically(log, Array("earlier run\n".utf8))
        let console = try VMConsoleServer(logPath: log, socketPath: directory.file("console.sock"), rotateBytes: 100)
        Self.write(console, "first line\n")
        #expect(String(decoding: fileBytes(log), as: UTF8.self) == "earlier run\nfirst line\n")
        // 23 + 4 × 22 bytes passes 100 on the fourth line: that write ends the file, which is rotated.
        for index in 0..<5 { Self.write(console, "line \(index) of some output\n") }
        let rotated = String(decoding: fileBytes(log + ".1"), as: UTF8.self)
        let current = String(decoding: fileBytes(log), as: UTF8.self)
        #expect(rotated == "earlier run\nfirst line\n" + (0..<4).map { "line \($0) of some output\n" }.joined(), "\(rotated)")
        #expect(current == "line 4 of some output\n", "\(current)")
    }

    @Test("attach: OK then output; a second client is BUSY; force takes over and the first sees EOF")
    func attachProtocol() throws {
        let directory = try TemporaryDirectory()
        let socketPath = directory.file("console.sock")
        let console = try VMConsoleServer(logPath: directory.file("console.log"), socketPath: socketPath)
        try console.serve()
        defer { console.removeSocket() }
        let first = try Self.attach(socketPath, "attach")
        defer { close(first.fd) }
        #expect(first.answer == "OK\n")
        Self.write(console, "hello\n")
        #expect(Self.readUntil(first.fd, "hello\n") == "hello\n")
        let second = try Self.attach(socketPath, "attach")
        defer { close(second.fd) }
        #expect(second.answer.hasPrefix("BUSY\n"))
        let third = try Self.attach(socketPath, "attach force")
        defer { close(third.fd) }
        #expect(third.answer == "OK\n")
        #expect(Self.readUntil(first.fd, "never").hasSuffix("<EOF>"))
        Self.write(console, "again\n")
        #expect(Self.readUntil(third.fd, "again\n") == "again\n")
        #expect(try Self.attach(socketPath, "x").answer == "<EOF>", "an unknown request is dropped")
        #expect(try Self.attach(socketPath, "attach forcefully").answer == "<EOF>", "an unknown word is dropped")
    }

    @Test("attach replay: the log's end comes first, then live output, nothing lost or repeated; the tail reaches into console.log.1")
    func attachReplay() throws {
        let directory = try TemporaryDirectory()
        let socketPath = directory.file("console.sock")
        let console = try VMConsoleServer(logPath: directory.file("console.log"), socketPath: socketPath, rotateBytes: 64)
        try console.serve()
        defer { console.removeSocket() }
        Self.write(console, String(repeating: "a", count: 60) + "\n")   // 61 bytes: stays
        Self.write(console, "rotated\n")                                 // passes 64: console.log.1
        Self.write(console, "current\n")
        let client = try Self.attach(socketPath, "attach replay")
        defer { close(client.fd) }
        #expect(client.answer == "OK\n")
        Self.write(console, "live\n")
        let text = Self.readUntil(client.fd, "live\n")
        #expect(text == String(repeating: "a", count: 60) + "\nrotated\ncurrent\nlive\n", "\(text)")

        // The tail is bounded: a long log sends only its last replayBytes.
        let long = VMConsoleServer.lastBytes(of: directory.file("console.log"), count: 4)
        #expect(long == Array("ive\n".utf8))
    }
}

/// `hvrun vm` through the CLI, with real guests and the store in a temporary HVRUN_HOME.
@Suite("hvrun vm: VMs in the store", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct VMStoreCLITests {
    /// One store in a temporary directory; `hvrun` runs with HVRUN_HOME set to it.
    final class Store {
        let directory: TemporaryDirectory
        var home: String { directory.path + "/home" }
        init() throws { directory = try TemporaryDirectory() }
        deinit {
            // Never leave a VM process behind: kill whoever holds a VM's lock.
            for name in StoreFiles.list(home + "/vms") {
                if let pid = VMBundle(name: name, path: home + "/vms/" + name).processID, pid > 1 { kill(pid, SIGKILL) }
            }
            usleep(50_000)
            try? StoreFiles.removeTree(home)
        }

        func bundle(_ name: String) -> VMBundle { VMBundle(name: name, path: home + "/vms/" + name) }

        /// Starts `hvrun ARGUMENTS` with this store; `wait()` on the result.
        func spawn(_ arguments: [String]) throws -> VMProcess {
            try VMProcess(arguments, environment: ["HVRUN_HOME=" + home])
        }

        /// Runs `hvrun ARGUMENTS` to its end (with a deadline): status, stdout, stderr.
        @discardableResult
        func run(_ arguments: [String], timeoutSeconds: Double = 60) throws -> (status: Int32, stdout: String, stderr: String) {
            let process = try spawn(arguments)
            let status = process.wait(timeoutSeconds: timeoutSeconds)
            return (status, process.output, process.errors)
        }

        func state(_ name: String) throws -> String? {
            let info = try run(["vm", "info", name, "--json"])
            return try JSONValue.parse(info.stdout)["state"]?.stringValue
        }

        /// Waits until `condition` holds; false at the deadline.
        func waitFor(timeoutSeconds: Double = 30, _ condition: () throws -> Bool) rethrows -> Bool {
            let deadline = Clock.now + timeoutSeconds
            while Clock.now < deadline {
                if try condition() { return true }
                usleep(20_000)
            }
            return try condition()
        }

        func consoleLog(_ name: String) -> String { String(decoding: fileBytes(bundle(name).consoleLogPath), as: UTF8.self) }
    }

    static func stateful(steps: Int, ticks: Int) throws -> [String] {
        ["--kernel", try GuestImages.path("stateful.elf"), "--memory", "128M", "--cmdline", "steps=\(steps) ticks=\(ticks) cpus=1"]
    }

    @Test("create, list, info, start, pause, resume, save, start again (the guest continues), stop, delete",
          .timeLimit(.minutes(3)))
    func lifecycle() throws {
        let store = try Store()
        let steps = 100
        // The reference: the same guest uninterrupted.
        let reference = try TestHost.hvrun(["run"] + Self.stateful(steps: steps, ticks: 3) + ["--timeout", "60"], timeoutSeconds: 90)
        #expect(reference.status == 0x41, "\(reference.stdout)\(reference.stderr)")
        let expected = try #require(SnapshotProcessTests.result(reference.stdout))

        // `none`: a NIC that is not connected (a switch would need CAP_NET_ADMIN and a namespace).
        let created = try store.run(["vm", "create", "web-1"] + Self.stateful(steps: steps, ticks: 3) + ["--new-disk", "16M", "--nic", "none"])
        #expect(created.status == 0, "\(created.stderr)")
        let list = try JSONValue.parse(try store.run(["vm", "list", "--json"]).stdout)
        #expect(list == .array([.object([("name", .string("web-1")), ("id", list[0]?["id"] ?? .null), ("state", .string("off")),
                                          ("cpus", .number(1)), ("memory_bytes", .number(128 << 20)), ("uptime_s", .null), ("checkpoints", .number(0))])]),
                "\(list.rendered())")
        let info = try JSONValue.parse(try store.run(["vm", "info", "web-1", "--json"]).stdout)
        #expect(info["state"]?.stringValue == "off")
        #expect(info["path"]?.stringValue == store.bundle("web-1").path)
        #expect(info["console_log"]?.stringValue == store.bundle("web-1").consoleLogPath)
        #expect(info["disks"]?[0]?["active_path"]?.stringValue == store.bundle("web-1").path + "/disk0.vhdx")
        #expect(info["nics"]?[0]?["mac_generated"] == .bool(true))
        #expect(info["checkpoints"] == .array([]) && info["current_checkpoint"] == .null)
        #expect(StoreFiles.exists(store.bundle("web-1").path + "/disk0.vhdx"))
        let table = try store.run(["vm", "list"]).stdout
        #expect(table.hasPrefix("NAME") && table.contains("web-1") && table.contains("off"), "\(table)")

        let started = try store.run(["vm", "start", "web-1"])
        #expect(started.status == 0, "\(started.stdout)\(started.stderr)")
        #expect(try ["running", "paused"].contains(store.state("web-1")))
        #expect(store.waitFor { store.consoleLog("web-1").contains("step=5\n") }, "\(store.consoleLog("web-1"))")
        #expect(try store.run(["vm", "pause", "web-1"]).status == 0)
        #expect(try store.state("web-1") == "paused")
        #expect(try store.run(["vm", "resume", "web-1"]).status == 0)
        #expect(try store.state("web-1") == "running")
        #expect(store.waitFor { store.consoleLog("web-1").contains("step=10\n") })
        let saved = try store.run(["vm", "save", "web-1"])
        #expect(saved.status == 0, "\(saved.stderr)")
        #expect(try store.state("web-1") == "saved")
        #expect(StoreFiles.exists(store.bundle("web-1").savedPath + "/state"))
        let before = SnapshotProcessTests.steps(store.consoleLog("web-1"))
        #expect(!before.isEmpty && before.last! < steps, "saved before the guest finished: \(before)")

        let again = try store.run(["vm", "start", "web-1"])
        #expect(again.status == 0, "\(again.stdout)\(again.stderr)")
        // The guest runs on to its end (debug exit 0x41), and the VM is off.
        #expect(try store.waitFor(timeoutSeconds: 60) { try store.state("web-1") == "off" })
        let log = store.consoleLog("web-1")
        #expect(SnapshotProcessTests.steps(log) == Array(1...steps), "\(log)")
        #expect(SnapshotProcessTests.result(log) == expected)
        #expect(!StoreFiles.exists(store.bundle("web-1").savedPath), "saved/ is removed once the guest runs")

        #expect(try store.run(["vm", "start", "web-1"]).status == 0)
        let stopped = try store.run(["vm", "stop", "web-1", "--force"])
        #expect(stopped.status == 0, "\(stopped.stderr)")
        #expect(try store.state("web-1") == "off")
        #expect(!StoreFiles.exists(store.bundle("web-1").controlSocketPath))
        let deleted = try store.run(["vm", "delete", "web-1"])
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(!StoreFiles.exists(store.bundle("web-1").path))
        #expect(try store.run(["vm", "info", "web-1"]).status == 1)
    }

    @Test("bad names are refused with the rule, status 1")
    func badNames() throws {
        let store = try Store()
        let kernel = try GuestImages.path("stateful.elf")
        for name in [".hidden", "-x", "a b", "a/b", String(repeating: "n", count: 65)] {
            let result = try store.run(["vm", "create", name, "--kernel", kernel])
            #expect(result.status == 1, "\(name): \(result.stderr)")
            #expect(result.stderr.contains(VMName.rule) || result.stderr.contains("Error"), "\(name): \(result.stderr)")
        }
        #expect(StoreFiles.list(store.home + "/vms").isEmpty)
        #expect(try store.run(["vm", "create", "ok", "--kernel", kernel]).status == 0)
        let duplicate = try store.run(["vm", "create", "ok", "--kernel", kernel])
        #expect(duplicate.status == 2 && duplicate.stderr.contains("already exists"), "\(duplicate.stderr)")
    }

    @Test("refused by state with status 2: delete or start while running, pause or stop while off", .timeLimit(.minutes(1)))
    func refusals() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "r"] + Self.stateful(steps: 2000, ticks: 5)).status == 0)
        #expect(try store.run(["vm", "pause", "r"]).status == 2)
        #expect(try store.run(["vm", "stop", "r", "--force"]).status == 2)
        #expect(try store.run(["vm", "start", "r"]).status == 0)
        let delete = try store.run(["vm", "delete", "r"])
        #expect(delete.status == 2 && delete.stderr.contains("running"), "\(delete.stderr)")
        let start = try store.run(["vm", "start", "r"])
        #expect(start.status == 2 && start.stderr.contains("running"), "\(start.stderr)")
        #expect(try store.state("r") == "running")
        #expect(try store.run(["vm", "stop", "r", "--force"]).status == 0)
        #expect(try store.run(["vm", "delete", "r"]).status == 0)
    }

    @Test("two concurrent starts: exactly one succeeds; a start racing a delete: not both", .timeLimit(.minutes(2)))
    func concurrentStarts() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "c"] + Self.stateful(steps: 2000, ticks: 5)).status == 0)
        for round in 0..<3 {
            let first = try store.spawn(["vm", "start", "c"])
            let second = try store.spawn(["vm", "start", "c"])
            let statuses = [first.wait(timeoutSeconds: 60), second.wait(timeoutSeconds: 60)].sorted()
            #expect(statuses == [0, 2], "round \(round): \(first.errors) | \(second.errors)")
            #expect(try store.state("c") == "running")
            #expect(try store.run(["vm", "stop", "c", "--force"]).status == 0)
        }
        let start = try store.spawn(["vm", "start", "c"])
        let delete = try store.spawn(["vm", "delete", "c"])
        let (started, deleted) = (start.wait(timeoutSeconds: 60), delete.wait(timeoutSeconds: 60))
        #expect(!(started == 0 && deleted == 0), "\(start.errors) | \(delete.errors)")
        #expect(started == 0 || deleted == 0, "one of them wins: \(start.errors) | \(delete.errors)")
    }

    @Test("a SIGKILLed VM process leaves the VM off, or saved if it was saved; never running", .timeLimit(.minutes(1)))
    func killedProcess() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "k"] + Self.stateful(steps: 2000, ticks: 5)).status == 0)
        #expect(try store.run(["vm", "start", "k"]).status == 0)
        let pid = try #require(store.bundle("k").processID)
        kill(pid, SIGKILL)
        #expect(try store.waitFor(timeoutSeconds: 10) { try store.state("k") == "off" })
        // Started again: it boots afresh (the stale control socket is replaced).
        #expect(try store.run(["vm", "start", "k"]).status == 0)
        #expect(try store.run(["vm", "save", "k"]).status == 0)
        #expect(try store.run(["vm", "start", "k"]).status == 0)
        kill(try #require(store.bundle("k").processID), SIGKILL)
        #expect(try store.waitFor(timeoutSeconds: 10) { try ["off", "saved"].contains(store.state("k")) })
        #expect(try store.run(["vm", "delete", "k"]).status == 0)
    }

    @Test("delete keeps disks outside the bundle unless --delete-disks; the bundle's own disks go with it")
    func deleteDisks() throws {
        let store = try Store()
        let kernel = try GuestImages.path("stateful.elf")
        let outside = store.directory.file("outside.raw")
        try RawImage.create(path: outside, size: 1 << 20)
        #expect(try store.run(["vm", "create", "keep", "--kernel", kernel, "--disk", outside, "--new-disk", "4M"]).status == 0)
        let info = try JSONValue.parse(try store.run(["vm", "info", "keep", "--json"]).stdout)
        #expect(info["disks"]?[0]?["path"]?.stringValue == outside && info["disks"]?[0]?["in_bundle"] == .bool(false))
        #expect(info["disks"]?[1]?["in_bundle"] == .bool(true))
        #expect(try store.run(["vm", "delete", "keep"]).status == 0)
        #expect(StoreFiles.exists(outside), "a disk outside the bundle survives a plain delete")
        #expect(try store.run(["vm", "create", "drop", "--kernel", kernel, "--disk", outside + ",readonly"]).status == 0)
        #expect(try store.run(["vm", "delete", "drop", "--delete-disks"]).status == 0)
        #expect(!StoreFiles.exists(outside))
    }

    @Test("stop while paused; vm log --follow shows the guest as it writes", .timeLimit(.minutes(1)))
    func stopPausedAndFollow() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "f"] + Self.stateful(steps: 2000, ticks: 5)).status == 0)
        #expect(try store.run(["vm", "start", "f"]).status == 0)
        let follow = try store.spawn(["vm", "log", "f", "--follow"])
        #expect(follow.waitForLine("step=3", timeoutSeconds: 20), "\(follow.output)")
        follow.signal(SIGKILL)
        _ = follow.wait(timeoutSeconds: 5)
        let plain = try store.run(["vm", "log", "f"])
        #expect(plain.status == 0 && plain.stdout.contains("stateful steps=2000"))
        #expect(try store.run(["vm", "pause", "f"]).status == 0)
        #expect(try store.run(["vm", "stop", "f", "--force"]).status == 0)
        #expect(try store.state("f") == "off")
        let help = try store.run(["vm", "--help"])
        #expect(help.status == 0 && help.stdout.contains("create") && help.stdout.contains("console"), "\(help.stdout)")
    }

    @Test("a VM process that dies at start: status 1 with the tail of its log, and the VM stays off")
    func failedStart() throws {
        let store = try Store()
        let notAKernel = store.directory.file("notes.txt")
        try StoreFiles.writeAtomically(notAKernel, Array("this is not a kernel\n".utf8))
        #expect(try store.run(["vm", "create", "broken", "--kernel", notAKernel]).status == 0)
        let started = try store.run(["vm", "start", "broken"])
        #expect(started.status == 1, "\(started.stderr)")
        #expect(started.stderr.contains("exited with status 1") && started.stderr.contains("hvrun.log"), "\(started.stderr)")
        #expect(started.stderr.contains("ELF") || started.stderr.contains("kernel"), "the loader's reason is quoted: \(started.stderr)")
        #expect(try store.state("broken") == "off")
    }

    @Test("concurrent creates of one name: exactly one succeeds, the other is refused with status 2")
    func concurrentCreates() throws {
        let store = try Store()
        let kernel = try GuestImages.path("stateful.elf")
        for round in 0..<3 {
            let name = "same\(round)"
            let processes = try (0..<2).map { _ in try store.spawn(["vm", "create", name, "--kernel", kernel, "--new-disk", "64M", "--nic", "lan"]) }
            let statuses = processes.map { $0.wait(timeoutSeconds: 30) }.sorted()
            #expect(statuses == [0, 2], "round \(round): \(processes.map(\.errors))")
        }
        #expect(StoreFiles.list(store.home + "/vms") == ["same0", "same1", "same2"],
                "no staging directory is left behind: \(StoreFiles.list(store.home + "/vms"))")
    }

    @Test("Docs/vm.md lists every key vm info --json and vm list --json print")
    func documentedKeys() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "d", "--kernel", try GuestImages.path("stateful.elf"), "--new-disk", "4M", "--nic", "lan"]).status == 0)
        let manual = String(decoding: try ImageFile.read(TestHost.repositoryRoot + "/Docs/vm.md"), as: UTF8.self)
        func keys(_ value: JSONValue) -> [String] {
            switch value {
            case let .object(members): members.flatMap { [$0.0] + keys($0.1) }
            case let .array(elements): elements.flatMap(keys)
            default: []
            }
        }
        let info = try JSONValue.parse(try store.run(["vm", "info", "d", "--json"]).stdout)
        let list = try JSONValue.parse(try store.run(["vm", "list", "--json"]).stdout)
        let all = Set(keys(info) + keys(list))
        #expect(all.count >= 20)
        for key in all { #expect(manual.contains("`\(key)`"), "vm info/list --json print \(key), which Docs/vm.md does not list") }
    }

    @Test("stop --force kills a VM process that does not answer; without --force it is an error", .timeLimit(.minutes(1)))
    func forceStop() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "hung"] + Self.stateful(steps: 2000, ticks: 5)).status == 0)
        #expect(try store.run(["vm", "start", "hung"]).status == 0)
        let pid = try #require(store.bundle("hung").processID)
        kill(pid, SIGSTOP)
        let plain = try store.run(["vm", "stop", "hung", "--timeout", "1"])
        #expect(plain.status == 1 && plain.stderr.contains("--force"), "\(plain.stderr)")
        let forced = try store.run(["vm", "stop", "hung", "--force", "--timeout", "1"])
        #expect(forced.status == 0, "\(forced.stderr)")
        #expect(try store.state("hung") == "off")
    }

    @Test("stop presses the ACPI power button: a guest that handles it powers off; one that does not is turned off after --timeout",
          .timeLimit(.minutes(1)))
    func gracefulStop() throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "pb", "--kernel", try GuestImages.path("powerbtn.elf")]).status == 0)
        #expect(try store.run(["vm", "start", "pb"]).status == 0)
        #expect(store.waitFor { store.consoleLog("pb").contains("ready\n") }, "\(store.consoleLog("pb"))")
        let stopped = try store.run(["vm", "stop", "pb"])
        #expect(stopped.status == 0 && stopped.stdout.contains("shut down"), "\(stopped.stdout)\(stopped.stderr)")
        #expect(try store.state("pb") == "off")
        #expect(store.consoleLog("pb").contains("event=1\npowering off\n"), "\(store.consoleLog("pb"))")
        let processLog = String(decoding: fileBytes(store.bundle("pb").processLogPath), as: UTF8.self)
        #expect(processLog.contains("the guest powered off"), "\(processLog)")

        #expect(try store.run(["vm", "create", "deaf"] + Self.stateful(steps: 2000, ticks: 5)).status == 0)
        #expect(try store.run(["vm", "start", "deaf"]).status == 0)
        let started = Clock.now
        let turnedOff = try store.run(["vm", "stop", "deaf", "--timeout", "1"])
        #expect(turnedOff.status == 0 && turnedOff.stderr.contains("did not shut down within 1"), "\(turnedOff.stderr)")
        #expect(Clock.now - started >= 1, "it waited for the guest first")
        #expect(try store.state("deaf") == "off")
    }

    @Test("a saved VM whose disk changed since the save is refused at start and stays saved", .timeLimit(.minutes(1)))
    func savedDiskChanged() throws {
        let store = try Store()
        let disk = store.directory.file("data.raw")
        try RawImage.create(path: disk, size: 4 << 20)
        #expect(try store.run(["vm", "create", "s"] + Self.stateful(steps: 2000, ticks: 5) + ["--disk", disk]).status == 0)
        #expect(try store.run(["vm", "start", "s"]).status == 0)
        #expect(try store.run(["vm", "save", "s"]).status == 0)
        // Someone writes to the disk while the VM is saved.
        let fd = open(disk, O_WRONLY)
        var byte: UInt8 = 0x55
        #expect(pwrite(fd, &byte, 1, 4096) == 1)
        close(fd)
        let started = try store.run(["vm", "start", "s"])
        #expect(started.status == 1, "\(started.stderr)")
        #expect(started.stderr.contains(disk), "the log tail names the disk: \(started.stderr)")
        #expect(try store.state("s") == "saved")
        #expect(StoreFiles.exists(store.bundle("s").savedPath + "/state"))
        let fresh = try store.run(["vm", "start", "s", "--discard-saved"])
        #expect(fresh.status == 0, "\(fresh.stderr)")
        #expect(!StoreFiles.exists(store.bundle("s").savedPath))
        #expect(store.waitFor { store.consoleLog("s").components("stateful steps=") == 2 }, "booted afresh: \(store.consoleLog("s"))")
        #expect(try store.run(["vm", "stop", "s", "--force"]).status == 0)
    }

    @Test("generated MACs are unique in the store and locally administered unicast; static ones are kept")
    func macs() throws {
        let store = try Store()
        let kernel = try GuestImages.path("stateful.elf")
        var seen: [MACAddress] = []
        for index in 0..<4 {
            #expect(try store.run(["vm", "create", "m\(index)", "--kernel", kernel, "--nic", "lan", "--nic", "lan", "--nic", "wan"]).status == 0)
            let info = try JSONValue.parse(try store.run(["vm", "info", "m\(index)", "--json"]).stdout)
            guard case let .array(nics)? = info["nics"] else { Issue.record("no nics: \(info.rendered())"); continue }
            #expect(nics.count == 3)
            for nic in nics {
                let mac = try #require(nic["mac"]?.stringValue.flatMap(MACAddress.init))
                #expect(nic["mac_generated"] == .bool(true))
                #expect(mac.isLocallyAdministered && !mac.isMulticast, "\(mac)")
                seen.append(mac)
            }
        }
        #expect(Set(seen).count == seen.count)
        #expect(try store.run(["vm", "create", "s", "--kernel", kernel, "--nic", "lan,mac=52:54:00:aa:bb:cc"]).status == 0)
        let info = try JSONValue.parse(try store.run(["vm", "info", "s", "--json"]).stdout)
        #expect(info["nics"]?[0]?["mac"]?.stringValue == "52:54:00:aa:bb:cc" && info["nics"]?[0]?["mac_generated"] == .bool(false))
        #expect(try store.run(["vm", "create", "n", "--kernel", kernel, "--nic", "none"]).status == 0)
        let unconnected = try JSONValue.parse(try store.run(["vm", "info", "n", "--json"]).stdout)["nics"]
        #expect(unconnected?.arrayValue?.count == 1 && unconnected?[0]?["switch"]?.stringValue == "none"
                && unconnected?[0]?["mac_generated"] == .bool(true), "--nic none is a NIC that is not connected")
        #expect(try store.run(["vm", "create", "b", "--kernel", kernel, "--nic", "lan,mac=01:00:5e:00:00:01"]).status == 1, "multicast refused")
    }

    @Test("a guest reset restarts the VM with on_reset=restart, and turns it off with on_reset=stop", .timeLimit(.minutes(1)))
    func onReset() throws {
        let store = try Store()
        let kernel = try GuestImages.path("reset.elf")
        #expect(try store.run(["vm", "create", "again", "--kernel", kernel, "--on-reset", "restart"]).status == 0)
        #expect(try store.run(["vm", "start", "again"]).status == 0)
        #expect(store.waitFor { store.consoleLog("again").components("resetting\n") >= 3 }, "\(store.consoleLog("again"))")
        #expect(try ["running", "starting"].contains(store.state("again")))
        // Plain stop: the VM is at times between a reset and its reboot, with no control socket.
        let stopped = try store.run(["vm", "stop", "again", "--force"])
        #expect(stopped.status == 0, "\(stopped.stderr)")
        #expect(try store.state("again") == "off")

        #expect(try store.run(["vm", "create", "once", "--kernel", kernel, "--on-reset", "stop"]).status == 0)
        let started = try store.run(["vm", "start", "once"])
        #expect(started.status == 0, "\(started.stdout)\(started.stderr)")
        #expect(try store.waitFor(timeoutSeconds: 10) { try store.state("once") == "off" })
        #expect(store.consoleLog("once").components("resetting\n") == 1)
    }
}

/// `hvrun vm console` on a pseudo-terminal, as a user's terminal would drive it.
@Suite("hvrun vm console", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct VMConsoleTests {
    /// A pty master; `hvrun vm console` runs on its slave.
    final class Terminal {
        let master: Int32
        let slavePath: String
        var received: [UInt8] = []
        init() throws {
            // posix_openpt/grantpt/unlockpt are not in the Glibc module: /dev/ptmx and its ioctls.
            master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC)
            var unlock: Int32 = 0
            var number: UInt32 = 0
            guard master >= 0, ioctl(master, 0x4004_5431 /* TIOCSPTLCK */, &unlock) == 0,
                  ioctl(master, 0x8004_5430 /* TIOCGPTN */, &number) == 0 else {
                throw Subprocess.Failure.spawn("/dev/ptmx", errno)
            }
            slavePath = "/dev/pts/\(number)"
        }
        deinit { close(master) }
        var text: String { String(decoding: received, as: UTF8.self) }
        func type(_ bytes: [UInt8]) { _ = bytes.withUnsafeBytes { write(master, $0.baseAddress, $0.count) } }
        /// Reads what arrives until `text` contains `needle`; false at the deadline.
        func waitFor(_ needle: String, timeoutSeconds: Double = 20) -> Bool {
            let deadline = Clock.now + timeoutSeconds
            while !text.contains(needle) {
                let remaining = deadline - Clock.now
                if remaining <= 0 { return false }
                var entry = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
                guard poll(&entry, 1, Int32(remaining * 1000) + 1) > 0 else { continue }
                var chunk = [UInt8](repeating: 0, count: 4096)
                let count = chunk.withUnsafeMutableBytes { read(master, $0.baseAddress, $0.count) }
                if count <= 0 { usleep(10_000); continue }
                received += chunk[0..<count]
            }
            return true
        }
    }

    /// Spawns `hvrun vm console NAME` with the store and the terminal as its stdin, stdout and stderr.
    static func attach(_ store: VMStoreCLITests.Store, _ name: String, on terminal: Terminal, force: Bool = false,
                       command: [String]? = nil) throws -> pid_t {
        guard let hvrun = TestHost.hvrunPath else { throw Subprocess.Failure.spawn("hvrun", 2) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, terminal.slavePath, O_RDWR, 0)
        posix_spawn_file_actions_adddup2(&actions, 0, 1)
        posix_spawn_file_actions_adddup2(&actions, 0, 2)
        let words: [String] = [hvrun] + (command ?? (["vm", "console", name] + (force ? ["--force"] : [])))
        let argv = words.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var entries = ["HVRUN_HOME=" + store.home]
        var index = 0
        while let entry = environ[index] {
            let text = String(cString: entry)
            if !text.hasPrefix("HVRUN_HOME=") { entries.append(text) }
            index += 1
        }
        let envp = entries.map { strdup($0) } + [nil]
        defer { envp.forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, hvrun, &actions, nil, argv, envp)
        guard spawned == 0 else { throw Subprocess.Failure.spawn(hvrun, spawned) }
        return pid
    }

    /// The exit status of `pid`, or nil at the deadline (then it is killed).
    static func wait(_ pid: pid_t, timeoutSeconds: Double = 20) -> Int32? {
        let deadline = Clock.now + timeoutSeconds
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) != pid {
            if Clock.now > deadline {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                return nil
            }
            usleep(10_000)
        }
        return (status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F)
    }

    @Test("attach: guest output reaches the terminal, keys reach the guest's UART, a second console is refused", .timeLimit(.minutes(1)))
    func attachAndType() throws {
        let store = try VMStoreCLITests.Store()
        #expect(try store.run(["vm", "create", "u", "--kernel", try GuestImages.path("uartirq.elf"), "--on-reset", "stop"]).status == 0)
        #expect(try store.run(["vm", "start", "u"]).status == 0)
        #expect(store.waitFor { store.consoleLog("u").contains("ready\n") }, "\(store.consoleLog("u"))")
        let terminal = try Terminal()
        let client = try Self.attach(store, "u", on: terminal)
        #expect(terminal.waitFor("attached"), "\(terminal.text)")
        let second = try store.run(["vm", "console", "u"])
        #expect(second.status == 2 && second.stderr.contains("--force"), "\(second.stderr)")
        terminal.type(Array("x".utf8))
        #expect(terminal.waitFor("rx=x"), "\(terminal.text)")
        // The guest ends (debug exit), its process with it, and the console says so and exits.
        #expect(Self.wait(client) == 0, "\(terminal.text)")
        #expect(terminal.waitFor("console closed"), "\(terminal.text)")
        #expect(store.consoleLog("u").contains("rx=x"))
    }

    @Test("vm start --attach: the console from the first line on (replayed from console.log), Ctrl-] leaves the VM running",
          .timeLimit(.minutes(1)))
    func startAttached() throws {
        let store = try VMStoreCLITests.Store()
        #expect(try store.run(["vm", "create", "a"] + VMStoreCLITests.stateful(steps: 2000, ticks: 5)).status == 0)
        let terminal = try Terminal()
        let client = try Self.attach(store, "a", on: terminal, command: ["vm", "start", "a", "--attach"])
        #expect(terminal.waitFor("started VM a"), "\(terminal.text)")
        #expect(terminal.waitFor("attached"), "\(terminal.text)")
        #expect(terminal.waitFor("stateful steps=2000"), "the replay shows the guest's first line: \(terminal.text)")
        #expect(terminal.waitFor("step=3"), "\(terminal.text)")
        // The notice comes before the replay, and the replay joins the live output exactly.
        let text = terminal.text
        let lines = text.split(whereSeparator: { $0 == "\n" || $0 == "\r" || $0 == "\r\n" })
        #expect(lines.filter { $0.hasPrefix("stateful steps=2000") }.count == 1, "the first line whole and once: \(text)")
        for step in 1...2 { #expect(lines.filter { $0 == "step=\(step)" }.count == 1, "step=\(step) once: \(text)") }
        let notice = lines.firstIndex { $0.contains("attached to VM") }, first = lines.firstIndex { $0.hasPrefix("stateful") }
        #expect(notice != nil && first != nil && notice! < first!, "the notice before the replay: \(text)")
        terminal.type([0x1D])
        #expect(Self.wait(client) == 0, "\(terminal.text)")
        #expect(try store.state("a") == "running")
        #expect(try store.run(["vm", "stop", "a", "--force"]).status == 0)
    }

    @Test("Ctrl-] detaches and leaves the VM running; --force takes over an attached console", .timeLimit(.minutes(1)))
    func detach() throws {
        let store = try VMStoreCLITests.Store()
        #expect(try store.run(["vm", "create", "d"] + VMStoreCLITests.stateful(steps: 2000, ticks: 5)).status == 0)
        #expect(try store.run(["vm", "start", "d"]).status == 0)
        let terminal = try Terminal()
        let client = try Self.attach(store, "d", on: terminal)
        #expect(terminal.waitFor("attached"))
        #expect(terminal.waitFor("step="), "\(terminal.text)")
        terminal.type([0x1D])
        #expect(Self.wait(client) == 0, "\(terminal.text)")
        #expect(terminal.waitFor("detached"), "\(terminal.text)")
        #expect(try store.state("d") == "running")

        let first = try Terminal()
        let holder = try Self.attach(store, "d", on: first)
        #expect(first.waitFor("attached"))
        let second = try Terminal()
        let taker = try Self.attach(store, "d", on: second, force: true)
        #expect(second.waitFor("attached"), "\(second.text)")
        // The first console is closed by the server and its client exits; the second sees the guest.
        #expect(Self.wait(holder) == 0, "\(first.text)")
        #expect(first.waitFor("console closed"))
        second.received = []
        #expect(second.waitFor("step="), "\(second.text)")
        kill(taker, SIGKILL)
        _ = Self.wait(taker)
        #expect(try store.run(["vm", "stop", "d", "--force"]).status == 0)
    }
}

extension String {
    /// How many times `needle` occurs.
    func components(_ needle: String) -> Int { split(separator: needle, omittingEmptySubsequences: false).count - 1 }
}

extension JSONValue {
    /// An array's element, nil when out of range or not an array.
    subscript(index: Int) -> JSONValue? {
        guard case let .array(elements) = self, elements.indices.contains(index) else { return nil }
        return elements[index]
    }
}
