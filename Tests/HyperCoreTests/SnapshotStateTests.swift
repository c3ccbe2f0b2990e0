import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

@Suite("snapshot state: JSON, coding, device state round trips")
struct SnapshotStateTests {
    @Test("JSON parses what it renders, keeps 64-bit integers exact, and rejects malformed text with an offset")
    func json() throws {
        let value = JSONValue.object([("a", .number(-5)), ("big", .unsignedNumber(UInt64.max)), ("s", .string("q\"\\\n\u{1}é")),
                                      ("list", .array([.bool(true), .null, .double(1.5)])), ("empty", .object([]))])
        #expect(try JSONValue.parse(value.rendered()) == value)
        #expect(try JSONValue.parse("\"\\ud83d\\ude00\"") == .string("😀"))
        // Integers are read digit by digit up to 18 digits and through the general path beyond.
        let numbers = "[0, -0, 7, -42, 123456789012345678, -123456789012345678, 9223372036854775807, -9223372036854775808, 18446744073709551615, 1.5e3]"
        #expect(try JSONValue.parse(numbers) == .array([.number(0), .number(0), .number(7), .number(-42), .number(123456789012345678),
                                                        .number(-123456789012345678), .number(.max), .number(.min),
                                                        .unsignedNumber(.max), .double(1500)]))
        #expect(try JSONValue.parse("[\"plain\", \"esc\\taped\"]") == .array([.string("plain"), .string("esc\taped")]))
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "tru", "\"unterminated", "1 2", "{\"a\":1,}", String(repeating: "[", count: 300)] {
            #expect(throws: JSONParseError.self, "\(bad)") { try JSONValue.parse(bad) }
        }
        do {
            _ = try JSONValue.parse("[1, x]")
            Issue.record("accepted [1, x]")
        } catch {
            #expect(error.offset == 4)
        }
    }

    struct Sample: Codable, Equatable {
        var u64: UInt64
        var i8: Int8
        var optional: UInt16?
        var missing: Bool?
        var bytes: HexBytes
        var nested: [Inner]
        struct Inner: Codable, Equatable { var name: String; var flag: Bool }
    }

    @Test("StateCoder round-trips nested Codable state, and a missing or ill-typed field names its path")
    func coder() throws {
        let sample = Sample(u64: UInt64.max, i8: -128, optional: 7, missing: nil, bytes: HexBytes([0, 1, 0xAB, 0xFF]),
                            nested: [.init(name: "x", flag: true), .init(name: "", flag: false)])
        let encoded = try StateCoder.encode(sample)
        #expect(try StateCoder.decode(Sample.self, from: JSONValue.parse(encoded.rendered())) == sample)
        guard case var .object(members) = encoded else { Issue.record("not an object"); return }
        members.removeAll { $0.0 == "i8" }
        #expect(throws: StateCodingError(path: "i8", reason: "missing")) { try StateCoder.decode(Sample.self, from: .object(members)) }
        members.append(("i8", .number(300)))
        do {
            _ = try StateCoder.decode(Sample.self, from: .object(members))
            Issue.record("300 decoded as Int8")
        } catch {
            #expect(error.path == "i8")
        }
        // A bad value deep inside names its whole path (the path is built only for the error).
        guard case var .object(fields) = encoded, let nestedIndex = fields.firstIndex(where: { $0.0 == "nested" }),
              case var .array(inners) = fields[nestedIndex].1, case var .object(inner) = inners[1] else {
            Issue.record("unexpected encoding \(encoded.rendered())")
            return
        }
        inner = inner.map { $0.0 == "flag" ? ($0.0, .number(1)) : $0 }
        inners[1] = .object(inner)
        fields[nestedIndex].1 = .array(inners)
        #expect(throws: StateCodingError(path: "nested.1.flag", reason: "expected true or false")) {
            try StateCoder.decode(Sample.self, from: .object(fields))
        }
        #expect(throws: StateCodingError.self) { try StateCoder.decode(HexBytes.self, from: .string("abc")) }
        #expect(throws: StateCodingError.self) { try StateCoder.decode(HexBytes.self, from: .string("zz")) }
    }

    /// Saves `device`, restores into `fresh`, and checks the fresh device saves the same state.
    func roundTrip(_ device: some Snapshottable, _ fresh: some Snapshottable) throws -> DeviceState {
        let saved = try device.saveState()
        let reparsed = DeviceState(value: try JSONValue.parse(saved.value.rendered()))
        try fresh.restoreState(reparsed)
        #expect(try fresh.saveState() == saved)
        return saved
    }

    func write(_ device: any BusDevice, _ offset: UInt64, _ value: UInt64, width: Int = 1) {
        withUnsafeBytes(of: value.littleEndian) { device.write(offset: offset, data: UnsafeRawBufferPointer(rebasing: $0[0..<width])) }
    }

    func read(_ device: any BusDevice, _ offset: UInt64, width: Int = 1) -> UInt64 {
        var value: UInt64 = 0
        withUnsafeMutableBytes(of: &value) { device.read(offset: offset, data: UnsafeMutableRawBufferPointer(rebasing: $0[0..<width])) }
        return value
    }

    @Test("16550 UART: divisor, FIFO contents, pending interrupt and line level survive a round trip")
    func serial() throws {
        let line = RecordingLine()
        let uart = Serial16550(output: FileDescriptorOutput(fileDescriptor: -1), interrupt: line)
        write(uart, 3, 0x83)          // DLAB, 8N1
        write(uart, 0, 0x01)          // divisor 115200
        write(uart, 3, 0x03)
        write(uart, 2, 0xC7)          // FIFO on, trigger 14
        write(uart, 1, 0x01)          // receive interrupt
        write(uart, 7, 0x5A)          // scratch
        uart.receive(Array("hello".utf8))
        #expect(line.isHigh)
        let restoredLine = RecordingLine()
        let restored = Serial16550(output: FileDescriptorOutput(fileDescriptor: -1), interrupt: restoredLine)
        _ = try roundTrip(uart, restored)
        #expect(restoredLine.isHigh, "the restored UART drives its interrupt line again")
        for offset: UInt64 in [1, 2, 3, 4, 6, 7] { #expect(read(restored, offset) == read(uart, offset), "register \(offset)") }
        #expect(Array((0..<5).map { _ in UInt8(read(restored, 0)) }) == Array("hello".utf8))
    }

    @Test("i8042 and CMOS RTC round-trip; the RTC keeps the time the guest set relative to the host clock")
    func platform() throws {
        let controller = I8042(onReset: {})
        write(controller, 4, 0x60)    // write command byte, next data
        write(controller, 0, 0x20)
        write(controller, 4, 0xAA)    // self test: 0x55 waiting
        let restoredController = I8042(onReset: {})
        _ = try roundTrip(controller, restoredController)
        #expect(read(restoredController, 0) == 0x55)

        let clock: CMOSRTC.Clock = { (1_700_000_000, 0) }
        let rtc = CMOSRTC(memorySize: 64 << 20, clock: clock)
        rtc.writeRegister(0x40, 0x99)
        rtc.writeRegister(CMOSRTC.Register.b, 0x06)          // binary, 24h
        rtc.writeRegister(CMOSRTC.Register.year, 30)
        let restoredRTC = CMOSRTC(clock: clock)
        _ = try roundTrip(rtc, restoredRTC)
        #expect(restoredRTC.readRegister(0x40) == 0x99)
        #expect(restoredRTC.readRegister(CMOSRTC.Register.year) == 30)
        #expect(throws: SnapshotError.self) { try restoredRTC.restoreState(DeviceState(value: .object([]))) }
    }

    @Test("virtio over PCI: configuration space, MSI-X table, negotiated features and queue positions round-trip")
    func virtioPCI() throws {
        let harness = try VirtioHarness(device: VirtioEntropy(), queueSize: 8)
        harness.initialize()
        #expect(harness.status & VirtioStatus.driverOK.rawValue != 0)
        // Program MSI-X vector 0 and enable MSI-X through config space.
        withUnsafeBytes(of: UInt32(0xFEE0_0000)) { harness.transport.msix.tableWrite(offset: 0, from: $0) }
        let saved = try harness.transport.saveState()
        let copy = try VirtioHarness(device: VirtioEntropy(), queueSize: 8)
        try copy.transport.restoreState(saved)
        #expect(try copy.transport.saveState() == saved)
        #expect(copy.status == harness.status)
        #expect(copy.core.driverFeatures == harness.core.driverFeatures)
        #expect(copy.core.queues[0].isActive)
        #expect(copy.core.queues[0].state == harness.core.queues[0].state)
        // A device of another type refuses the state.
        let console = try VirtioHarness(device: VirtioConsole(output: FileDescriptorOutput(fileDescriptor: -1)))
        #expect(throws: SnapshotError.self) { try console.transport.restoreState(saved) }
    }

    @Test("virtio-mmio transport and the console's pending input round-trip")
    func virtioMMIO() throws {
        let memory = try GuestMemory(size: 4 << 20)
        let console = VirtioConsole(output: FileDescriptorOutput(fileDescriptor: -1))
        let core = try VirtioDeviceCore(device: console, memory: memory)
        let line = RecordingLine()
        let transport = VirtioMMIOTransport(core: core, base: 0xD000_0000, gsi: 5, line: line, registrar: nil)
        write(transport, 0x070, 1, width: 4)
        write(transport, 0x030, 1, width: 4)      // queue 1
        write(transport, 0x038, 64, width: 4)
        write(transport, 0x080, 0x1000, width: 4)
        write(transport, 0x090, 0x2000, width: 4)
        let copyCore = try VirtioDeviceCore(device: VirtioConsole(output: FileDescriptorOutput(fileDescriptor: -1)), memory: memory)
        let copy = VirtioMMIOTransport(core: copyCore, base: 0xD000_0000, gsi: 5, line: RecordingLine(), registrar: nil)
        _ = try roundTrip(transport, copy)
        #expect(copyCore.queues[1].size == 64 && copyCore.queues[1].descriptorTableAddress == 0x1000)
        #expect(read(copy, 0x070, width: 4) == 1)
    }

    @Test("every bus device of a machine with every device type has state, except those that say why not",
          .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
    func everyDeviceHasState() throws {
        let disk = try TemporaryFile(bytes: [UInt8](repeating: 0, count: 1 << 20))
        var configuration = try GuestRun.configuration("exit.elf", commandLine: "code=1")
        configuration.bootTimer = BootTimer()
        configuration.virtioDevices = [
            .init(.block(try RawImage(path: disk.path, readOnly: false), identifier: "d"), transport: .pci),
            .init(.console(output: FileDescriptorOutput(fileDescriptor: -1), input: nil), transport: .mmio),
            .init(.entropy, transport: .pci),
        ]
        let machine = try Machine(configuration)
        // Stateless by design: the debug-exit port latches nothing, the boot timer measures this
        // process, the PCI MMIO window forwards to functions whose state the config ports carry.
        let allowed: [any BusDevice.Type] = [DebugExit.self, BootTimer.self, PCIMMIOWindow.self]
        var count = 0
        for bus in [machine.portBus, machine.mmioBus] {
            for (range, device) in bus.registeredDevices {
                count += 1
                let state = try device.saveState()
                if allowed.contains(where: { $0 == type(of: device) }) { continue }
                #expect(state != .stateless, "\(type(of: device)) at \(range) saves no state")
            }
        }
        #expect(count >= 8)
        // The PCI functions (host bridge + two virtio-pci) are inside the config ports' state.
        let ports = try #require(machine.portBus.registeredDevices.first { $0.device is PCIConfigPorts })
        let functions = try ports.device.saveState().value["functions"]
        guard case let .array(list)? = functions else { Issue.record("no functions"); return }
        #expect(list.count == 3)
    }
}

@Suite("snapshot files: bad input is refused, named, and changes nothing", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct SnapshotBadInputTests {
    /// A saved stateful guest with a raw disk, made once per test.
    final class Saved {
        let directory: TemporaryDirectory
        let snapshot: String
        let disk: String
        init() throws {
            directory = try TemporaryDirectory()
            disk = directory.file("disk.raw")
            try RawImage.create(path: disk, size: 4 << 20)
            snapshot = directory.file("snapshot")
            let socket = directory.file("c.sock")
            let process = try VMProcess(["run", "--kernel", try GuestImages.path("stateful.elf"), "--memory", "64M", "--disk", disk,
                                         "--cmdline", "steps=40 ticks=2 blk=1", "--control", socket, "--timeout", "30"])
            guard process.waitForLine("step=4") else { throw Subprocess.Failure.spawn("stateful guest: \(process.errors)", 0) }
            let reply = try ControlClient(path: socket).execute("save", arguments: [("path", .string(snapshot))])
            guard reply["return"] != nil, process.wait(timeoutSeconds: 10) == 0 else {
                throw Subprocess.Failure.spawn("save: \(reply.rendered())", 0)
            }
        }

        /// A copy of the snapshot directory to damage.
        func copy(_ name: String) throws -> String {
            let target = directory.file(name)
            let result = try Subprocess.run("cp", ["-a", "--sparse=always", snapshot, target])
            guard result.status == 0 else { throw Subprocess.Failure.spawn("cp: \(result.stderr)", 0) }
            return target
        }

        /// Restores `path` with extra arguments; checks exit 1, a one-line message containing
        /// every `expected` text, and that the snapshot files and the disk are unchanged.
        func refuse(_ path: String, _ extra: [String] = [], expecting expected: [String],
                    sourceLocation: SourceLocation = #_sourceLocation) throws {
            let files = [path + "/state", path + "/memory", disk]
            let before = files.map(fileBytes)
            let result = try TestHost.hvrun(["run", "--restore", path, "--timeout", "20"] + extra, timeoutSeconds: 30)
            #expect(result.status == 1, "\(result.stdout)\(result.stderr)", sourceLocation: sourceLocation)
            #expect(result.stdout.isEmpty, "the guest must not run: \(result.stdout)", sourceLocation: sourceLocation)
            var message = result.stderr
            while message.hasSuffix("\n") { message.removeLast() }
            #expect(!message.contains("\n"), "one line: \(message)", sourceLocation: sourceLocation)
            for text in expected { #expect(message.contains(text), "\(message) should mention \(text)", sourceLocation: sourceLocation) }
            #expect(files.map(fileBytes) == before, "nothing may change", sourceLocation: sourceLocation)
        }
    }

    @Test("a truncated, corrupted, wrong-version or foreign state file", .timeLimit(.minutes(2)))
    func stateFile() throws {
        let saved = try Saved()
        let truncated = try saved.copy("truncated")
        #expect(truncate(truncated + "/state", 1000) == 0)
        try saved.refuse(truncated, expecting: [truncated + "/state", "truncated"])
        let tiny = try saved.copy("tiny")
        #expect(truncate(tiny + "/state", 10) == 0)
        try saved.refuse(tiny, expecting: ["not a HyperCore snapshot", "header"])

        let original = fileBytes(saved.snapshot + "/state")
        // A flipped byte anywhere is caught: in the signature, the header fields, the payload's start, middle and end.
        for offset in [0, 9, 17, 25, 29, 32, original.count / 2, original.count - 1] {
            let flipped = try saved.copy("flipped\(offset)")
            var bytes = original
            bytes[offset] ^= 0x20
            try writeBytes(bytes, to: flipped + "/state")
            try saved.refuse(flipped, expecting: [flipped + "/state"])
        }

        let newer = try saved.copy("newer")
        var header = original
        header[8] = 99
        let crc = CRC32C.checksum(Array(header[0..<28]))
        withUnsafeBytes(of: crc.littleEndian) { for i in 0..<4 { header[28 + i] = $0[i] } }
        try writeBytes(header, to: newer + "/state")
        try saved.refuse(newer, expecting: ["format 99", "restore it with the hvrun that wrote it"])

        let foreign = saved.directory.file("foreign")
        mkdir(foreign, 0o755)
        try saved.refuse(foreign, expecting: ["not a HyperCore snapshot", "state file is missing"])
        try writeBytes(Array("hello, not a snapshot at all, just some text".utf8), to: foreign + "/state")
        try saved.refuse(foreign, expecting: ["no HYPCSNAP signature"])
        let notDirectory = saved.disk
        let result = try TestHost.hvrun(["run", "--restore", notDirectory])
        #expect(result.status == 1 && result.stderr.contains("not a directory"), "\(result.stderr)")
    }

    @Test("a missing or wrong-size memory file, and a snapshot that does not fit the flags", .timeLimit(.minutes(2)))
    func memoryAndFlags() throws {
        let saved = try Saved()
        let missing = try saved.copy("missing")
        unlink(missing + "/memory")
        try saved.refuse(missing, expecting: ["memory file", "missing"])
        let short = try saved.copy("short")
        #expect(truncate(short + "/memory", 32 << 20) == 0)
        try saved.refuse(short, expecting: [short + "/memory", "33554432 bytes"])
        try saved.refuse(saved.snapshot, ["--cpus", "2"], expecting: ["1 vCPUs, not 2"])
        try saved.refuse(saved.snapshot, ["--memory", "256M"], expecting: ["64 MiB", "not 256 MiB"])
        let kernel = try TestHost.hvrun(["run", "--restore", saved.snapshot, "--kernel", try GuestImages.path("exit.elf")])
        #expect(kernel.status == 1 && kernel.stderr.contains("--kernel cannot be used with --restore"), "\(kernel.stderr)")
    }

    @Test("a disk that changed or vanished since the snapshot; a remapped copy of the same disk restores", .timeLimit(.minutes(2)))
    func disks() throws {
        let saved = try Saved()
        // A copy that keeps its timestamps is the same disk: --disk remaps the snapshot's disk to it.
        let copy = saved.directory.file("copy.raw")
        #expect(try Subprocess.run("cp", ["-p", "--sparse=always", saved.disk, copy]).status == 0)
        let remapped = try TestHost.hvrun(["run", "--restore", saved.snapshot, "--disk", copy, "--timeout", "30"])
        #expect(remapped.status == 0x41, "\(remapped.stderr)")
        #expect(remapped.stdout.contains("disk_ok=40"))
        // A byte written to the raw disk after the snapshot changes its modification time.
        let original = fileBytes(saved.disk)
        var changed = original
        changed[4096] ^= 1
        usleep(10_000)
        try writeBytes(changed, to: saved.disk)
        try saved.refuse(saved.snapshot, expecting: [saved.disk, "has changed since the snapshot was taken"])

        let moved = saved.disk + ".moved"
        rename(saved.disk, moved)
        let vanished = try TestHost.hvrun(["run", "--restore", saved.snapshot])
        #expect(vanished.status == 1 && vanished.stderr.contains(saved.disk) && vanished.stderr.contains("cannot be opened"), "\(vanished.stderr)")
        #expect(fileBytes(moved) == changed)

        // VHDX: a write after the snapshot renews the DataWriteGuid, even in the same open session.
        let vhdx = saved.directory.file("d.vhdx")
        try VHDXImage.create(path: vhdx, options: .init(virtualSize: 4 << 20))
        let image = try VHDXImage(path: vhdx)
        var block = [UInt8](repeating: 7, count: 512)
        try block.withUnsafeBytes { try image.write($0, at: 0) }
        let (_, identity) = try DiskIdentity.of(image)
        #expect(try DiskIdentity.current(path: vhdx) == identity)
        block[0] = 8
        try block.withUnsafeBytes { try image.write($0, at: 512) }
        try image.flush()
        #expect(try DiskIdentity.current(path: vhdx) != identity, "a write after the snapshot must change the identity")
    }

    func writeBytes(_ bytes: [UInt8], to path: String) throws {
        let fd = open(path, O_WRONLY | O_TRUNC | O_CREAT, 0o600)
        guard fd >= 0 else { throw Subprocess.Failure.spawn("open \(path)", errno) }
        defer { close(fd) }
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}

@Suite("Machine pause and resume (library)", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct MachinePauseTests {
    static let pvmHost = access("/sys/module/kvm_pvm", F_OK) == 0

    @Test("pause before start and after the end are typed errors; pausing twice is a no-op; a snapshot needs a pause",
          .timeLimit(.minutes(1)))
    func stateMachine() throws {
        let configuration = try GuestRun.configuration("stateful.elf", commandLine: "steps=20 ticks=1")
        let machine = try Machine(configuration)
        #expect(machine.runState == .created)
        #expect(throws: MachineError.self) { try machine.pause() }
        #expect(throws: MachineError.self) { try machine.resume() }
        try machine.start()
        #expect(machine.runState == .running)
        #expect(throws: SnapshotError.self) { try machine.captureState() }
        try machine.pause()
        try machine.pause()
        #expect(machine.runState == .paused)
        let state = try machine.captureState()
        #expect(state.vcpus.count == 1 && !state.vcpus[0].msrs.isEmpty)
        #expect(state.vcpus[0].msrs.contains { $0.index == 0x10 }, "the TSC is among the saved MSRs")
        #expect(state.vm.interruptControllers.count == 3)
        try machine.resume()
        try machine.resume()
        #expect(machine.runState == .running)
        let exit = machine.wait(timeout: .seconds(30))
        #expect(exit == .debugExit(0x41), "\((configuration.console as! BufferOutput).text)")
        #expect(machine.runState == .ended)
        #expect(throws: MachineError.self) { try machine.pause() }
    }

    @Test("a 1.5 s pause does not show in the guest's TSC (where KVM can offset the TSC)", .timeLimit(.minutes(1)),
          .enabled(if: !pvmHost, "on PVM hosts guest code reads the host's TSC directly: KVM cannot offset it, so a guest's raw TSC advances through a pause"))
    func pauseIsInvisibleToTheTSC() throws {
        func cyclesPerTick(pausing: Bool) throws -> Double {
            let configuration = try GuestRun.configuration("stateful.elf", commandLine: "steps=30 ticks=2")
            let machine = try Machine(configuration)
            try machine.start()
            if pausing {
                usleep(200_000)
                try machine.pause()
                usleep(1_500_000)
                try machine.resume()
            }
            _ = machine.wait(timeout: .seconds(30))
            let text = (configuration.console as! BufferOutput).text
            let line = try #require(text.split(separator: "\n").first { $0.hasPrefix("info tsc_per_tick=") })
            return Double(line.split(separator: "=")[1]) ?? 0
        }
        let plain = try cyclesPerTick(pausing: false)
        let paused = try cyclesPerTick(pausing: true)
        #expect(paused < plain * 1.5, "TSC cycles per tick: \(plain) uninterrupted, \(paused) with a 1.5 s pause")
    }
}

extension String {
    /// The message with its first file path dropped (to group errors by kind).
    func replacingPaths() -> String {
        split(separator: " ").map { $0.hasPrefix("/") ? "PATH" : String($0) }.joined(separator: " ")
    }
}

/// A snapshot whose checksums are right but whose contents are hostile: every restore must end in
/// a typed error or a machine that runs (and is stopped); the host never traps.
@Suite("hostile snapshot contents", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct SnapshotHostileStateTests {
    /// Every number in `value` with its path, depth first.
    static func numberPaths(_ value: JSONValue, _ path: [JSONPathStep] = []) -> [[JSONPathStep]] {
        switch value {
        case .number, .unsignedNumber, .bool: [path]
        case let .array(elements): elements.enumerated().flatMap { numberPaths($0.element, path + [.index($0.offset)]) }
        case let .object(members): members.flatMap { numberPaths($0.1, path + [.key($0.0)]) }
        default: []
        }
    }

    enum JSONPathStep { case key(String), index(Int) }

    static func replacing(_ value: JSONValue, at path: ArraySlice<JSONPathStep>, with new: JSONValue) -> JSONValue {
        guard let step = path.first else { return new }
        switch (value, step) {
        case let (.array(elements), .index(i)):
            var copy = elements
            copy[i] = replacing(elements[i], at: path.dropFirst(), with: new)
            return .array(copy)
        case let (.object(members), .key(k)):
            return .object(members.map { $0.0 == k ? ($0.0, replacing($0.1, at: path.dropFirst(), with: new)) : $0 })
        default:
            return value
        }
    }

    @Test("300 restores of snapshots with one number changed to a boundary value: an error or a run, never a crash",
          .timeLimit(.minutes(3)))
    func mutatedNumbers() throws {
        let directory = try TemporaryDirectory()
        let snapshot = directory.file("snapshot")
        let socket = directory.file("c.sock")
        // No disk: a restore that runs would change it, and every later one would be refused for that.
        let process = try VMProcess(["run", "--kernel", try GuestImages.path("stateful.elf"), "--memory", "64M", "--cpus", "2",
                                     "--rng", "--console", "virtio", "--cmdline", "steps=400 ticks=1 con=1 cpus=2",
                                     "--control", socket, "--timeout", "30"])
        #expect(process.waitForLine("step=3"))
        #expect(try ControlClient(path: socket).execute("save", arguments: [("path", .string(snapshot))])["return"] != nil)
        #expect(process.wait(timeoutSeconds: 10) == 0)

        let original = try SnapshotDirectory.read(snapshot)
        let tree = try StateCoder.encode(original)
        let paths = Self.numberPaths(tree).filter { path in
            // The disk identity is checked against the file first; keep it so the rest is reached.
            !path.contains { if case .key("identity") = $0 { true } else { false } }
        }
        let boundaries: [JSONValue] = [.number(0), .number(1), .number(-1), .number(255), .number(65535), .number(0x1_0000),
                                       .number(Int64.max), .unsignedNumber(UInt64.max), .bool(true), .string("x")]
        var generator = SystemRandomNumberGenerator()
        var errors = 0, runs = 0
        var reasons: [String: Int] = [:]
        for round in 0..<301 {
            // Round 0 is the control: the state re-encoded unchanged restores and runs.
            let mutated = round == 0 ? tree
                : Self.replacing(tree, at: paths.randomElement(using: &generator)![...], with: boundaries.randomElement(using: &generator)!)
            let target = directory.file("m\(round)")
            mkdir(target, 0o700)
            #expect(link(snapshot + "/memory", target + "/memory") == 0)
            let payload = Array(mutated.rendered().utf8)
            let fd = open(target + "/state", O_WRONLY | O_CREAT, 0o600)
            _ = SnapshotDirectory.encodeState(payload).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
            var options = RestoreOptions()
            options.console = BufferOutput()
            do {
                let machine = try Machine(restoring: target, options: options)
                do {
                    try machine.start()
                    usleep(2_000)
                    machine.stop()
                    if round > 0 { runs += 1 }
                } catch {
                    #expect(round > 0, "the unchanged state must restore: \(error)")
                    errors += 1
                    reasons[String(error.description.replacingPaths().prefix(50)), default: 0] += 1
                }
            } catch {
                #expect(round > 0, "the unchanged state must restore: \(error)")
                errors += 1
                reasons[String(error.description.replacingPaths().prefix(50)), default: 0] += 1
            }
            unlink(target + "/state")
            unlink(target + "/memory")
            rmdir(target)
        }
        print("hostile snapshots: \(errors) refused, \(runs) ran; reasons: \(reasons.sorted { $0.value > $1.value }.prefix(8))")
        #expect(errors + runs == 300)
        #expect(errors > 0, "some mutations must be refused")
    }
}
