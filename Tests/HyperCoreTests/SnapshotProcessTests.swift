import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// Save a running guest, restore it in a new `hvrun` process, and check the guest cannot tell:
/// the stateful guest (Tests/Guests/stateful.c) keeps state in every device and in RAM, prints one
/// `step=k` line per step and a `result=` hash of everything deterministic; a restored run must
/// print the missing steps exactly once each and finish with the uninterrupted run's result.
@Suite("save and restore in a new process", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct SnapshotProcessTests {
    struct Setup: CustomTestStringConvertible, Sendable {
        var cpus: Int
        var transport: String
        var disk: String?   // "raw" or "vhdx"
        var console: Bool
        var testDescription: String {
            "\(cpus) vCPU\(cpus > 1 ? "s" : ""), \(transport)\(disk.map { ", \($0) disk" } ?? "")\(console ? ", virtio-console" : "")"
        }
    }

    static let setups = [
        Setup(cpus: 1, transport: "pci", disk: "raw", console: false),
        Setup(cpus: 2, transport: "mmio", disk: "raw", console: true),
        Setup(cpus: 4, transport: "pci", disk: "vhdx", console: true),
        Setup(cpus: 1, transport: "mmio", disk: "vhdx", console: false),
    ]

    /// hvrun arguments for the stateful guest.
    static func arguments(_ setup: Setup, steps: Int = 30, ticks: Int = 2, disk: String?) throws -> [String] {
        var guest = "steps=\(steps) ticks=\(ticks) cpus=\(setup.cpus)"
        var arguments = ["run", "--kernel", try GuestImages.path("stateful.elf"), "--memory", "128M", "--cpus", "\(setup.cpus)",
                         "--virtio-transport", setup.transport, "--timeout", "60"]
        if let disk {
            guest += " blk=1"
            arguments += ["--disk", disk]
        }
        if setup.console {
            guest += " con=1"
            arguments += ["--console", "virtio"]
        }
        if setup.transport == "mmio" { guest += " mmio=1" }
        return arguments + ["--cmdline", guest]
    }

    static func makeDisk(_ kind: String?, in directory: TemporaryDirectory, name: String = "disk") throws -> String? {
        guard let kind else { return nil }
        let path = directory.file(name + "." + kind)
        if kind == "vhdx" {
            try VHDXImage.create(path: path, options: .init(virtualSize: 4 << 20))
        } else {
            try RawImage.create(path: path, size: 4 << 20)
        }
        return path
    }

    /// The `step=` numbers in `text`, in order.
    static func steps(_ text: String) -> [Int] {
        text.split(separator: "\n").compactMap { line in line.hasPrefix("step=") ? Int(line.dropFirst(5)) : nil }
    }

    static func result(_ text: String) -> String? {
        text.split(separator: "\n").first { $0.hasPrefix("result=") }.map(String.init)
    }

    @Test("a guest saved mid-run continues in a new process with no lost or repeated step and the same result",
          .timeLimit(.minutes(2)), arguments: setups)
    func saveAndRestore(_ setup: Setup) throws {
        let directory = try TemporaryDirectory()
        // The reference: the same guest, uninterrupted, on its own disk.
        let reference = try TestHost.hvrun(try Self.arguments(setup, disk: try Self.makeDisk(setup.disk, in: directory, name: "reference")),
                                           timeoutSeconds: 60)
        #expect(reference.status == 0x41, "\(reference.stdout)\(reference.stderr)")
        let expected = try #require(Self.result(reference.stdout))

        let disk = try Self.makeDisk(setup.disk, in: directory)
        let socket = directory.file("control.sock")
        let snapshot = directory.file("snapshot")
        let first = try VMProcess(try Self.arguments(setup, disk: disk) + ["--control", socket])
        #expect(first.waitForLine("step=8"), "\(first.output)\(first.errors)")
        let client = try ControlClient(path: socket)
        #expect(client.greeting["hvrun"]?["state"]?.stringValue == "running")
        let reply = try client.execute("save", arguments: [("path", .string(snapshot))], id: 7)
        #expect(reply["id"] == .number(7))
        #expect(reply["return"]?["path"]?.stringValue == snapshot, "\(reply.rendered())")
        #expect(first.wait(timeoutSeconds: 10) == 0, "\(first.errors)")
        let before = first.output

        let second = try VMProcess(["run", "--restore", snapshot, "--timeout", "60"])
        #expect(second.wait(timeoutSeconds: 60) == 0x41, "\(second.output)\(second.errors)")
        let after = second.output
        // Together the two processes printed every step once, in order; the second started where the first stopped.
        #expect(Self.steps(before + after) == Array(1...30), "before:\n\(before)\nafter:\n\(after)")
        #expect(!Self.steps(after).isEmpty && Self.steps(after).first! > 8)
        #expect(Self.result(after) == expected)
        #expect(after.contains("pages_ok=30") && after.contains("uart_irqs=30"))
        if setup.disk != nil { #expect(after.contains("disk_ok=30")) }
        if setup.cpus > 1 { #expect(after.contains("aps_ok=\(setup.cpus - 1)")) }
        if setup.console {
            // virtio-console output continues on stdout too: every `con step=k` once across both runs.
            let console = (before + after).split(separator: "\n").filter { $0.hasPrefix("con step=") }
            #expect(console.count == 30, "\(console)")
        }
    }

    @Test("save and restore 20 times in a row on one guest, into the directory it was restored from", .timeLimit(.minutes(3)))
    func repeatedSaveRestore() throws {
        let directory = try TemporaryDirectory()
        let setup = Setup(cpus: 2, transport: "pci", disk: "raw", console: false)
        let reference = try TestHost.hvrun(try Self.arguments(setup, steps: 80, ticks: 1, disk: try Self.makeDisk("raw", in: directory, name: "reference")))
        let expected = try #require(Self.result(reference.stdout))

        let disk = try Self.makeDisk("raw", in: directory)
        let snapshot = directory.file("snapshot")
        let socket = directory.file("control.sock")
        let first = try VMProcess(try Self.arguments(setup, steps: 80, ticks: 1, disk: disk) + ["--control", socket])
        var (process, output) = try Self.saveAndRestore(first, cycles: 20, snapshot: snapshot, socket: socket)
        #expect(process.wait(timeoutSeconds: 60) == 0x41, "\(process.errors)")
        output += process.output
        #expect(Self.steps(output) == Array(1...80))
        #expect(Self.result(output) == expected)
    }

    /// Saves `first` over its control socket after each new step it prints and continues it from
    /// the snapshot in a new process, `cycles` times (each save `delay()` µs after the step).
    /// Returns the last process, still running, and what the ones before it printed.
    static func saveAndRestore(_ first: VMProcess, cycles: Int, snapshot: String, socket: String,
                               delay: () -> UInt32 = { 0 }) throws -> (VMProcess, String) {
        var output = ""
        var process = first
        for cycle in 0..<cycles {
            // A step line may be split between two processes (the save landed mid-line), so
            // progress is read from everything printed so far.
            let seen = steps(output + process.output).last ?? 0
            let deadline = Clock.now + 20
            while (steps(output + process.output).last ?? 0) <= seen, !process.hasExited, Clock.now < deadline { usleep(2_000) }
            #expect((steps(output + process.output).last ?? 0) > seen, "cycle \(cycle): \(process.output)\(process.errors)")
            usleep(delay())
            #expect(process.waitForSocket(socket))
            let reply = try ControlClient(path: socket).execute("save", arguments: [("path", .string(snapshot))])
            #expect(reply["return"] != nil, "cycle \(cycle): \(reply.rendered())")
            #expect(process.wait(timeoutSeconds: 10) == 0, "cycle \(cycle): \(process.errors)")
            output += process.output
            process = try VMProcess(["run", "--restore", snapshot, "--control", socket, "--timeout", "60"])
        }
        return (process, output)
    }

    @Test("a save while the guest services its UART interrupt (vector in service, line still high): after each restore the interrupt is taken once, not twice",
          .timeLimit(.minutes(2)))
    func saveInsideInterruptHandler() throws {
        let directory = try TemporaryDirectory()
        let setup = Setup(cpus: 1, transport: "pci", disk: "raw", console: false)
        // The handler spends 80% of each 10 ms step before it acknowledges the UART, so most
        // saves land there. A restore that raised the line anew would deliver a second edge:
        // the guest counts it (IIR then says nothing is pending) and fails with `error=uart_irqs`.
        func arguments(disk: String?) throws -> [String] {
            var arguments = try Self.arguments(setup, steps: 60, ticks: 1, disk: disk)
            arguments[arguments.count - 1] += " uarthold=80"
            return arguments
        }
        let reference = try TestHost.hvrun(try arguments(disk: nil), timeoutSeconds: 60)
        #expect(reference.status == 0x41, "\(reference.stdout)\(reference.stderr)")
        let expected = try #require(Self.result(reference.stdout))

        let snapshot = directory.file("snapshot")
        let socket = directory.file("control.sock")
        let first = try VMProcess(try arguments(disk: nil) + ["--control", socket])
        var (process, output) = try Self.saveAndRestore(first, cycles: 8, snapshot: snapshot, socket: socket) {
            UInt32.random(in: 0..<10_000)
        }
        #expect(process.wait(timeoutSeconds: 60) == 0x41, "\(process.errors)\(output.suffix(300))\(process.output.suffix(500))")
        output += process.output
        #expect(Self.steps(output) == Array(1...60))
        #expect(output.contains("uart_irqs=60\n"), "\(output.suffix(600))")
        #expect(Self.result(output) == expected)
    }

    @Test("pause and resume 1,000 times while the guest runs: it finishes with the uninterrupted result", .timeLimit(.minutes(2)))
    func pauseResumeThousandTimes() throws {
        let directory = try TemporaryDirectory()
        let setup = Setup(cpus: 2, transport: "pci", disk: "raw", console: true)
        let reference = try TestHost.hvrun(try Self.arguments(setup, steps: 60, ticks: 1, disk: try Self.makeDisk("raw", in: directory, name: "reference")))
        let expected = try #require(Self.result(reference.stdout))

        let socket = directory.file("control.sock")
        let process = try VMProcess(try Self.arguments(setup, steps: 60, ticks: 1, disk: try Self.makeDisk("raw", in: directory)) + ["--control", socket])
        #expect(process.waitForLine("step=1"))
        let client = try ControlClient(path: socket)
        for round in 0..<1000 {
            // The guest may finish (and its process end) before the loop does, on a slow host.
            guard let paused = try? client.execute("pause"), let resumed = try? client.execute("resume") else {
                // The socket closes as the run ends, a moment before the process exits.
                #expect(process.wait(timeoutSeconds: 10) == 0x41, "round \(round): the control socket closed while the VM ran")
                break
            }
            guard paused["return"]?["state"]?.stringValue == "paused", resumed["return"]?["state"]?.stringValue == "running" else {
                // The guest may finish before the loop does (the machine then says "ended", a moment
                // before its process exits); only a live machine must answer both.
                if process.hasExited || [paused, resumed].contains(where: { $0["return"]?["state"]?.stringValue == "ended" }) { break }
                Issue.record("round \(round): \(paused.rendered()) \(resumed.rendered())")
                break
            }
        }
        #expect(process.wait(timeoutSeconds: 60) == 0x41, "\(process.errors)")
        #expect(Self.steps(process.output) == Array(1...60))
        #expect(Self.result(process.output) == expected)
    }

    @Test("the control socket: greeting, info, malformed lines answered with errors, pause is idempotent, stop ends with 0",
          .timeLimit(.minutes(1)))
    func controlProtocol() throws {
        let directory = try TemporaryDirectory()
        let socket = directory.file("control.sock")
        let process = try VMProcess(try Self.arguments(Setup(cpus: 1, transport: "pci", disk: nil, console: false), steps: 2000, ticks: 1, disk: nil)
                                    + ["--control", socket])
        #expect(process.waitForLine("step=1"))
        let client = try ControlClient(path: socket)
        #expect(client.greeting["hvrun"]?["version"]?.stringValue == HyperCoreVersion.current)
        let info = try client.execute("info", id: 1)["return"]
        #expect(info?["state"]?.stringValue == "running")
        #expect(info?["vcpus"] == .number(1))
        #expect(info?["memory_bytes"] == .number(128 << 20))
        #expect((info?["uptime_s"]?.doubleValue ?? -1) >= 0)

        client.sendLine("{not json")
        #expect(try client.readReply()["error"]?["class"]?.stringValue == "GenericError")
        client.sendLine("[1,2]")
        #expect(try client.readReply()["error"] != nil)
        #expect(try client.execute("reboot-the-world", id: 3)["error"]?["class"]?.stringValue == "CommandNotFound")
        #expect(try client.execute("save", id: 4)["error"]?["desc"]?.stringValue?.contains("path") == true)
        // The connection is still usable, and a second client is served while the first stays open.
        #expect(try client.execute("pause")["return"]?["state"]?.stringValue == "paused")
        #expect(try client.execute("pause")["return"]?["state"]?.stringValue == "paused")
        let second = try ControlClient(path: socket)
        #expect(second.greeting["hvrun"]?["state"]?.stringValue == "paused")
        #expect(try second.execute("info")["return"]?["state"]?.stringValue == "paused")
        // A client that disconnects mid-request does not disturb the machine.
        do {
            let third = try ControlClient(path: socket)
            third.sendLine("{\"execute\": \"resu")
        }
        #expect(try second.execute("resume")["return"]?["state"]?.stringValue == "running")
        #expect(try client.execute("stop")["return"] != nil)
        #expect(process.wait(timeoutSeconds: 10) == 0)
        var info2 = stat()
        #expect(lstat(socket, &info2) != 0, "the socket file is removed when the run ends")
    }

    @Test("--control refuses a path that exists and is not a stale socket; a stale socket is replaced", .timeLimit(.minutes(1)))
    func controlPathChecks() throws {
        let directory = try TemporaryDirectory()
        let plain = directory.file("plain")
        _ = try TemporaryFile(bytes: []).path
        let fd = open(plain, O_CREAT | O_WRONLY, 0o600)
        close(fd)
        let refused = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("exit.elf"), "--cmdline", "code=5", "--control", plain])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains(plain) && refused.stderr.contains("not a socket"), "\(refused.stderr)")
        #expect(fileBytes(plain).isEmpty)

        // A socket left by a killed hvrun: nobody listens, so it is replaced.
        let socket = directory.file("stale.sock")
        let killed = try VMProcess(["run", "--kernel", try GuestImages.path("spin.elf"), "--control", socket, "--timeout", "30"])
        #expect(killed.waitForSocket(socket))
        killed.signal(SIGKILL)
        _ = killed.wait()
        let reused = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("exit.elf"), "--cmdline", "code=5", "--control", socket])
        #expect(reused.status == 5, "\(reused.stderr)")

        // A socket in use by a running hvrun is refused.
        let live = try VMProcess(["run", "--kernel", try GuestImages.path("spin.elf"), "--control", socket, "--timeout", "30"])
        #expect(live.waitForSocket(socket))
        let busy = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("exit.elf"), "--cmdline", "code=5", "--control", socket])
        #expect(busy.status == 1)
        #expect(busy.stderr.contains("running hvrun"), "\(busy.stderr)")
        try ControlClient(path: socket).execute("stop")
        #expect(live.wait(timeoutSeconds: 10) == 0)
    }

    @Test("SIGUSR1 with --save-on-signal saves and exits 0; the snapshot restores", .timeLimit(.minutes(1)))
    func saveOnSignal() throws {
        let directory = try TemporaryDirectory()
        let setup = Setup(cpus: 1, transport: "pci", disk: nil, console: false)
        let snapshot = directory.file("snapshot")
        let process = try VMProcess(try Self.arguments(setup, disk: nil) + ["--save-on-signal", snapshot])
        #expect(process.waitForLine("step=5"))
        process.signal(SIGUSR1)
        #expect(process.wait(timeoutSeconds: 10) == 0, "\(process.errors)")
        #expect(process.errors.contains("saved to \(snapshot)"))
        let restored = try VMProcess(["run", "--restore", snapshot, "--paused", "--control", directory.file("c.sock"), "--timeout", "30"])
        #expect(restored.waitForSocket(directory.file("c.sock")))
        let client = try ControlClient(path: directory.file("c.sock"))
        #expect(client.greeting["hvrun"]?["state"]?.stringValue == "paused")
        usleep(200_000)
        #expect(Self.steps(restored.output).isEmpty, "a --paused restore runs nothing before resume: \(restored.output)")
        #expect(try client.execute("resume")["return"]?["state"]?.stringValue == "running")
        #expect(restored.wait(timeoutSeconds: 30) == 0x41, "\(restored.errors)")
        #expect(Self.steps(process.output + restored.output) == Array(1...30))
    }

    @Test("a checkpoint of a running guest: a short pause, the VHDX frozen under a new differencing child, both futures end alike",
          .timeLimit(.minutes(2)))
    func checkpointRunningGuest() throws {
        let directory = try TemporaryDirectory()
        let setup = Setup(cpus: 2, transport: "pci", disk: "vhdx", console: false)
        let reference = try TestHost.hvrun(try Self.arguments(setup, steps: 40, disk: try Self.makeDisk("vhdx", in: directory, name: "reference")))
        let expected = try #require(Self.result(reference.stdout))

        let base = try #require(try Self.makeDisk("vhdx", in: directory, name: "base"))
        let child = directory.file("child.avhdx")
        let checkpoint = directory.file("checkpoint")
        let socket = directory.file("control.sock")
        let process = try VMProcess(try Self.arguments(setup, steps: 40, disk: base) + ["--control", socket])
        #expect(process.waitForLine("step=10"))
        let client = try ControlClient(path: socket)
        let reply = try client.execute("checkpoint", arguments: [("path", .string(checkpoint)), ("disks", .array([.string(child)]))])
        #expect(reply["return"]?["state"]?.stringValue == "running", "\(reply.rendered())")
        #expect(reply["return"]?["disks"] == .array([.string(child)]))
        #expect((reply["return"]?["pause_ms"]?.doubleValue ?? 0) > 0)
        #expect(process.wait(timeoutSeconds: 60) == 0x41, "\(process.errors)")
        #expect(Self.result(process.output) == expected, "the guest ran on, on the child, to the same end")

        // The base is exactly the disk the checkpoint recorded; the writes after it are in the child.
        let saved = try SnapshotDirectory.read(checkpoint)
        #expect(saved.configuration.virtio.first?.disk?.path == base)
        #expect(try DiskIdentity.current(path: base) == saved.configuration.virtio.first?.disk?.identity)
        let childImage = try VHDXImage(path: child, options: .init(readOnly: true))
        #expect(childImage.isDifferencing)
        // Both files closed cleanly and consistent (qemu-img has no differencing VHDX support; it checks the base).
        let childCheck = try TestHost.hvrun(["disk", "check", child])
        #expect(childCheck.status == 0, "\(childCheck.stdout)\(childCheck.stderr)")
        if TestHost.hasTool("qemu-img") {
            let check = try Subprocess.run("qemu-img", ["check", "-f", "vhdx", base])
            #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        }
        // The checkpoint's own future, on a copy of the base (restoring onto the base itself would
        // invalidate the child): it continues in a new process and ends the same way.
        let copy = directory.file("base-copy.vhdx")
        #expect(try Subprocess.run("cp", [base, copy]).status == 0)
        let restored = try TestHost.hvrun(["run", "--restore", checkpoint, "--disk", copy, "--timeout", "60"])
        #expect(restored.status == 0x41, "\(restored.stderr)")
        #expect(Self.steps(restored.stdout).first.map { $0 > 10 } == true)
        #expect(Self.result(restored.stdout) == expected)

        // A raw disk cannot have a child: the checkpoint is refused and the guest runs on.
        let raw = try #require(try Self.makeDisk("raw", in: directory, name: "raw"))
        let rawProcess = try VMProcess(try Self.arguments(setup, steps: 40, disk: raw) + ["--control", socket])
        #expect(rawProcess.waitForLine("step=5"))
        let refused = try ControlClient(path: socket).execute("checkpoint", arguments: [("path", .string(directory.file("cp2"))), ("disks", .array([.string(directory.file("c2.avhdx"))]))])
        #expect(refused["error"]?["desc"]?.stringValue?.contains("raw disk") == true, "\(refused.rendered())")
        #expect(rawProcess.wait(timeoutSeconds: 60) == 0x41)
        var info = stat()
        #expect(stat(directory.file("cp2"), &info) != 0 && stat(directory.file("c2.avhdx"), &info) != 0)
    }

    @Test("stop during save, and SIGKILL at any moment of a save, leave the old snapshot or the new one, never a broken one",
          .timeLimit(.minutes(3)))
    func interruptedSaves() throws {
        let directory = try TemporaryDirectory()
        let setup = Setup(cpus: 2, transport: "pci", disk: nil, console: false)
        let reference = try TestHost.hvrun(try Self.arguments(setup, disk: nil))
        let expected = try #require(Self.result(reference.stdout))
        let socket = directory.file("control.sock")
        let snapshot = directory.file("snapshot")

        // SIGKILL after a growing delay into the save; an older snapshot is already at the path.
        for delay in [0, 1_000, 3_000, 8_000, 15_000, 30_000, 60_000] {
            removeTree(snapshot)
            let process = try VMProcess(try Self.arguments(setup, disk: nil) + ["--control", socket])
            #expect(process.waitForLine("step=3"))
            let client = try ControlClient(path: socket)
            #expect(try client.execute("snapshot", arguments: [("path", .string(snapshot))])["return"] != nil)
            #expect(try client.execute("resume")["return"] != nil)
            #expect(process.waitForLine("step=6"))
            client.sendLine(#"{"execute":"save","arguments":{"path":"\#(snapshot)"}}"#)
            usleep(useconds_t(delay))
            process.signal(SIGKILL)
            _ = process.wait()
            // Whatever is at the path is a whole snapshot (checksums verified) and restores to the end.
            let state = try SnapshotDirectory.read(snapshot)
            #expect(state.vcpus.count == 2)
            let restored = try TestHost.hvrun(["run", "--restore", snapshot, "--timeout", "30"])
            #expect(restored.status == 0x41, "delay \(delay) µs: \(restored.stderr)")
            #expect(Self.result(restored.stdout) == expected)
            unlink(socket)
        }

        // `stop` on another connection while a save runs: the run ends with 0, and the path holds
        // either nothing or a snapshot that restores.
        removeTree(snapshot)
        let process = try VMProcess(try Self.arguments(setup, disk: nil) + ["--control", socket])
        #expect(process.waitForLine("step=3"))
        let saver = try ControlClient(path: socket)
        let stopper = try ControlClient(path: socket)
        saver.sendLine(#"{"execute":"save","arguments":{"path":"\#(snapshot)"}}"#)
        stopper.sendLine(#"{"execute":"stop"}"#)
        #expect(process.wait(timeoutSeconds: 10) == 0, "\(process.errors)")
        var info = stat()
        if stat(snapshot, &info) == 0 {
            let restored = try TestHost.hvrun(["run", "--restore", snapshot, "--timeout", "30"])
            #expect(restored.status == 0x41, "\(restored.stderr)")
        }
    }
}
