import HyperCore
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Checkpoints, export and import of stored VMs, through the CLI as a user runs them, on the
/// `stateful` guest with a disk: it counts steps, writes sector k at step k, and at its end checks
/// every page and sector and prints a hash of them, which must equal an uninterrupted run's.
@Suite("hvrun vm checkpoint / export / import", .serialized)
struct VMCheckpointTests {
    typealias Store = VMStoreCLITests.Store

    static let steps = 150

    static func guest(steps: Int = steps) throws -> [String] {
        ["--kernel", try GuestImages.path("stateful.elf"), "--memory", "128M", "--cmdline", "steps=\(steps) ticks=3 cpus=1 blk=1"]
    }

    /// The uninterrupted run's result line and its disk (a fresh 128 MiB dynamic VHDX).
    static func reference(in directory: String, steps: Int = steps) throws -> (result: String, disk: String) {
        let disk = directory + "/reference.vhdx"
        #expect(try TestHost.hvrun(["disk", "create", disk, "--size", "128M"]).status == 0)
        let run = try TestHost.hvrun(["run"] + guest(steps: steps) + ["--disk", disk, "--timeout", "90"], timeoutSeconds: 120)
        #expect(run.status == 0x41, "\(run.stdout)\(run.stderr)")
        return (try #require(SnapshotProcessTests.result(run.stdout)), disk)
    }

    static func json(_ store: Store, _ arguments: [String]) throws -> JSONValue {
        let result = try store.run(arguments)
        #expect(result.status == 0, "\(arguments): \(result.stderr)")
        return try JSONValue.parse(result.stdout)
    }

    /// The sector `k` of the disk chain whose newest file is `path`, flattened by `hvrun disk convert`.
    static func sectors(of path: String, in directory: String) throws -> [UInt8] {
        let raw = directory + "/flat-\(UInt32.random(in: 0...UInt32.max)).raw"
        let converted = try TestHost.hvrun(["disk", "convert", path, raw, "--no-sync"])
        #expect(converted.status == 0, "\(converted.stderr)")
        defer { unlink(raw) }
        return fileBytes(raw)
    }

    static func sectorIsWritten(_ bytes: [UInt8], _ k: Int) -> Bool {
        let start = k * 512
        return start + 512 <= bytes.count && bytes[start..<start + 512].contains { $0 != 0 }
    }

    /// The steps the guest printed, split where the sequence went back (a checkpoint applied):
    /// each run of consecutive steps.
    static func runs(_ log: String) -> [[Int]] {
        var runs: [[Int]] = []
        for step in SnapshotProcessTests.steps(log) {
            if let last = runs.last?.last, step == last + 1 { runs[runs.count - 1].append(step) } else { runs.append([step]) }
        }
        return runs
    }

    @Test("a running VM's checkpoint: one short pause; apply goes back to it (memory and disk), the guest ends with the uninterrupted result",
          .timeLimit(.minutes(4)))
    func checkpointAndApply() throws {
        let store = try Store()
        let reference = try Self.reference(in: store.directory.path)
        #expect(try store.run(["vm", "create", "cp"] + Self.guest() + ["--new-disk", "128M"]).status == 0)
        #expect(try store.run(["vm", "start", "cp"]).status == 0)
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("cp")).count >= 30 })
        let before = SnapshotProcessTests.steps(store.consoleLog("cp")).last!
        let created = try Self.json(store, ["vm", "checkpoint", "create", "cp", "first", "--json"])
        let after = SnapshotProcessTests.steps(store.consoleLog("cp")).last!
        #expect(created["has_memory"] == .bool(true))
        let pause = try #require(created["pause_ms"]?.doubleValue)
        #expect(pause > 0 && pause < 2000, "the guest-visible pause: \(pause) ms")

        // The VM runs on, on a differencing disk whose parent is the frozen disk0.vhdx.
        let info = try Self.json(store, ["vm", "info", "cp", "--json"])
        #expect(info["state"]?.stringValue == "running")
        let active = try #require(info["disks"]?[0]?["active_path"]?.stringValue)
        #expect(active.hasSuffix(".avhdx") && active.hasPrefix(store.bundle("cp").path + "/disk0_"), "\(active)")
        #expect(info["current_checkpoint"] == created["id"])
        #expect(info["checkpoints"]?[0]?["name"]?.stringValue == "first" && info["checkpoints"]?[0]?["has_memory"] == .bool(true))
        #expect(try Self.json(store, ["vm", "list", "--json"])[0]?["checkpoints"] == .number(1))
        let chain = try TestHost.hvrun(["disk", "info", active, "--json"])
        #expect(chain.stdout.contains(store.bundle("cp").path + "/disk0.vhdx"), "\(chain.stdout)")

        // Let it write 15 more sectors, then go back.
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("cp")).last! >= after + 15 })
        let refused = try store.run(["vm", "checkpoint", "apply", "cp", "first"])
        #expect(refused.status == 2 && refused.stderr.contains("--yes"), "\(refused.stderr)")
        let applied = try store.run(["vm", "checkpoint", "apply", "cp", "first", "--yes"])
        #expect(applied.status == 0, "\(applied.stderr)")
        #expect(try store.state("cp") == "saved", "a checkpoint with memory leaves the VM saved")
        // The disk is back at the checkpoint: the sectors written after it are gone.
        let newActive = try #require(try Self.json(store, ["vm", "info", "cp", "--json"])["disks"]?[0]?["active_path"]?.stringValue)
        #expect(newActive != active && !StoreFiles.exists(active), "the discarded differencing disk is deleted")
        let flat = try Self.sectors(of: newActive, in: store.directory.path)
        #expect(Self.sectorIsWritten(flat, before))
        #expect(!Self.sectorIsWritten(flat, after + 12), "sector \(after + 12) was written after the checkpoint")

        // Start: the guest continues from the checkpoint's step and ends as the uninterrupted run.
        #expect(try store.run(["vm", "start", "cp"]).status == 0)
        #expect(try store.waitFor(timeoutSeconds: 90) { try store.state("cp") == "off" })
        let log = store.consoleLog("cp")
        let runs = Self.runs(log)
        #expect(runs.count == 2, "\(runs.map { "\($0.first!)…\($0.last!)" })")
        if runs.count == 2 {
            #expect(runs[0].first == 1)
            let resumedAt = runs[1].first! - 1
            #expect((before...after).contains(resumedAt), "continued after step \(resumedAt); the checkpoint was taken between \(before) and \(after)")
            #expect(runs[1].last == Self.steps)
        }
        #expect(SnapshotProcessTests.result(log) == reference.result, "\(log.suffix(300))")
    }

    @Test("delete merges: on a running VM in the background (the guest runs on), on an off VM at once; the base equals the uninterrupted run's disk (qemu-img compare)",
          .timeLimit(.minutes(4)))
    func deleteMerges() throws {
        let store = try Store()
        let reference = try Self.reference(in: store.directory.path)
        #expect(try store.run(["vm", "create", "m"] + Self.guest() + ["--new-disk", "128M"]).status == 0)
        #expect(try store.run(["vm", "start", "m"]).status == 0)
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("m")).count >= 20 })
        #expect(try store.run(["vm", "checkpoint", "create", "m", "one"]).status == 0)
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("m")).count >= 40 })
        #expect(try store.run(["vm", "checkpoint", "create", "m", "two"]).status == 0)
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("m")).count >= 60 })
        // Deleting the older one while the VM runs: its frozen base takes the data of "one"'s
        // differencing disk; "two" now hangs from the base.
        let deleted = try store.run(["vm", "checkpoint", "delete", "m", "one", "--wait"])
        #expect(deleted.status == 0, "\(deleted.stderr)")
        var info = try Self.json(store, ["vm", "info", "m", "--json"])
        #expect(info["checkpoints"]?.arrayValue?.count == 1 && info["checkpoints"]?[0]?["parent"] == .null)
        #expect(info["merging"] == .bool(false))
        #expect(try store.state("m") == "running")
        // Deleting the newest one while it runs: the guest's own file merges (in rounds, then a
        // short last step) and the VM ends up on disk0.vhdx itself.
        #expect(try store.run(["vm", "checkpoint", "delete", "m", "two", "--wait"]).status == 0)
        info = try Self.json(store, ["vm", "info", "m", "--json"])
        #expect(info["disks"]?[0]?["active_path"]?.stringValue == store.bundle("m").path + "/disk0.vhdx")
        #expect(info["checkpoints"] == .array([]) && info["current_checkpoint"] == .null)
        #expect(StoreFiles.list(store.bundle("m").path).filter { $0.hasSuffix(".avhdx") }.isEmpty)
        #expect(try store.waitFor(timeoutSeconds: 90) { try store.state("m") == "off" })
        let log = store.consoleLog("m")
        #expect(SnapshotProcessTests.steps(log) == Array(1...Self.steps), "no step lost or repeated")
        #expect(SnapshotProcessTests.result(log) == reference.result)
        if TestHost.hasTool("qemu-img") {
            let compare = try Subprocess.run("/usr/bin/env", ["qemu-img", "compare", "-f", "vhdx", "-F", "vhdx", reference.disk,
                                                             store.bundle("m").path + "/disk0.vhdx"], timeoutSeconds: 60)
            #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
        } else {
            print("skipped the qemu-img compare: qemu-img is not installed")
        }

        // Off: a checkpoint of the finished VM (disks only), a start that writes nothing new
        // would be the same; deleting it merges at once.
        let offCheckpoint = try Self.json(store, ["vm", "checkpoint", "create", "m", "--json"])
        #expect(offCheckpoint["has_memory"] == .bool(false))
        #expect(offCheckpoint["name"]?.stringValue?.hasPrefix("m (") == true, "the default name: \(offCheckpoint.rendered())")
        #expect(try store.run(["vm", "checkpoint", "delete", "m", try #require(offCheckpoint["id"]?.stringValue)]).status == 0)
        info = try Self.json(store, ["vm", "info", "m", "--json"])
        #expect(info["disks"]?[0]?["active_path"]?.stringValue == store.bundle("m").path + "/disk0.vhdx")
        #expect(try TestHost.hvrun(["disk", "check", store.bundle("m").path + "/disk0.vhdx"]).status == 0)
    }

    @Test("the tree branches after an apply; --subtree deletes a branch; names, IDs and refusals", .timeLimit(.minutes(2)))
    func tree() throws {
        let store = try Store()
        let raw = store.directory.path + "/data.raw"
        #expect(try TestHost.hvrun(["disk", "create", raw, "--size", "4M"]).status == 0)
        #expect(try store.run(["vm", "create", "t"] + Self.guest() + ["--new-disk", "64M", "--disk", raw + ",readonly"]).status == 0)
        let a = try Self.json(store, ["vm", "checkpoint", "create", "t", "A", "--json"])
        let b = try Self.json(store, ["vm", "checkpoint", "create", "t", "B", "--json"])
        #expect(try store.run(["vm", "checkpoint", "apply", "t", "A"]).status == 0)
        #expect(try store.state("t") == "off", "a checkpoint without memory leaves the VM off")
        let c = try Self.json(store, ["vm", "checkpoint", "create", "t", "C", "--json"])
        let list = try Self.json(store, ["vm", "checkpoint", "list", "t", "--json"])
        let parents = Dictionary(uniqueKeysWithValues: (list.arrayValue ?? []).map { ($0["name"]!.stringValue!, $0["parent"]!) })
        #expect(parents == ["A": .null, "B": a["id"]!, "C": a["id"]!], "\(list.rendered())")
        #expect(list.arrayValue?.first { $0["current"] == .bool(true) }?["id"] == c["id"])
        let text = try store.run(["vm", "checkpoint", "list", "t"]).stdout
        #expect(text.contains("A  [") && text.contains("  B  [") && text.contains("  C  [") && text.contains("* Now"), "\(text)")
        // By ID prefix; an unknown one is an error naming the VM.
        #expect(try store.run(["vm", "checkpoint", "delete", "t", String(try #require(b["id"]?.stringValue).prefix(8))]).status == 0)
        let unknown = try store.run(["vm", "checkpoint", "delete", "t", "nope"])
        #expect(unknown.status == 1 && unknown.stderr.contains("no checkpoint"), "\(unknown.stderr)")
        #expect(try store.run(["vm", "checkpoint", "delete", "t", "A", "--subtree"]).status == 0)
        let info = try Self.json(store, ["vm", "info", "t", "--json"])
        #expect(info["checkpoints"] == .array([]))
        // --disk disks come first, then --new-disk ones.
        #expect(info["disks"]?[0]?["active_path"]?.stringValue == raw, "a read-only disk keeps its file")
        #expect(info["disks"]?[1]?["active_path"]?.stringValue == store.bundle("t").path + "/disk0.vhdx", "every chain merged back")
        #expect(StoreFiles.list(store.bundle("t").path).filter { $0.hasSuffix(".avhdx") || $0 == "checkpoints" }.isEmpty
                || StoreFiles.list(store.bundle("t").path + "/checkpoints").isEmpty)

        // A writable raw disk refuses, saying to convert it.
        let writable = store.directory.path + "/w.raw"
        #expect(try TestHost.hvrun(["disk", "create", writable, "--size", "4M"]).status == 0)
        #expect(try store.run(["vm", "create", "r"] + Self.guest() + ["--disk", writable]).status == 0)
        let refused = try store.run(["vm", "checkpoint", "create", "r"])
        #expect(refused.status == 2 && refused.stderr.contains("hvrun disk convert"), "\(refused.stderr)")
        #expect(try Self.json(store, ["vm", "info", "r", "--json"])["checkpoints"] == .array([]))
    }

    @Test("export of a running VM (it keeps running) and import on another store: restore continues the guest; copy gets a new ID and MACs and no memory; register uses the files in place",
          .timeLimit(.minutes(4)))
    func exportImport() throws {
        let store = try Store()
        let reference = try Self.reference(in: store.directory.path)
        #expect(try store.run(["vm", "create", "x"] + Self.guest() + ["--new-disk", "128M", "--nic", "none",
                                                                   "--nic", "none,mac=52:54:00:12:34:56"]).status == 0)
        let original = try Self.json(store, ["vm", "info", "x", "--json"])
        #expect(try store.run(["vm", "start", "x"]).status == 0)
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("x")).count >= 20 })
        #expect(try store.run(["vm", "checkpoint", "create", "x", "kept"]).status == 0)
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("x")).count >= 40 })
        let exportDirectory = store.directory.path + "/export"
        #expect(mkdir(exportDirectory, 0o755) == 0)
        let atExport = SnapshotProcessTests.steps(store.consoleLog("x")).last!
        let exported = try store.run(["vm", "export", "x", exportDirectory])
        #expect(exported.status == 0, "\(exported.stderr)")
        #expect(try store.state("x") == "running", "the exported VM keeps running")
        #expect(try store.run(["vm", "export", "x", exportDirectory]).status == 2, "refuses to overwrite")
        // The temporary checkpoint is gone again once its merge ends.
        #expect(try store.waitFor { try Self.json(store, ["vm", "info", "x", "--json"])["merging"] == .bool(false) })
        #expect(try Self.json(store, ["vm", "checkpoint", "list", "x", "--json"]).arrayValue?.map { $0["name"]?.stringValue } == ["kept"])
        #expect(try store.run(["vm", "stop", "x", "--force"]).status == 0)

        // Another host: a second store. Problems are all reported at once, nothing imported.
        let other = try Store()
        let exportPath = exportDirectory + "/x"
        let missingKernel = exportPath + "/kernel"
        #expect(rename(missingKernel, missingKernel + ".away") == 0)
        let problems = try other.run(["vm", "import", exportPath, "--mode", "restore", "--name=.bad"])
        #expect(problems.status == 2 && problems.stderr.contains("missing file") && problems.stderr.contains("name"), "\(problems.stderr)")
        #expect(StoreFiles.list(other.home + "/vms").isEmpty)
        #expect(rename(missingKernel + ".away", missingKernel) == 0)

        let restored = try other.run(["vm", "import", exportPath, "--mode", "restore"])
        #expect(restored.status == 0, "\(restored.stderr)")
        let restoredInfo = try Self.json(other, ["vm", "info", "x", "--json"])
        #expect(restoredInfo["id"] == original["id"] && restoredInfo["nics"] == original["nics"], "restore keeps the ID and MACs")
        #expect(restoredInfo["state"]?.stringValue == "saved")
        #expect(try other.run(["vm", "import", exportPath, "--mode", "restore", "--name", "x2"]).status == 2, "the same ID twice")
        #expect(try other.run(["vm", "start", "x"]).status == 0)
        #expect(try other.waitFor(timeoutSeconds: 90) { try other.state("x") == "off" })
        let log = other.consoleLog("x")
        let steps = SnapshotProcessTests.steps(log)
        #expect(steps.first.map { $0 >= atExport - 1 } == true && steps.last == Self.steps
                && steps == Array(steps.first!...Self.steps), "continues from the export: \(steps.prefix(3))…")
        #expect(SnapshotProcessTests.result(log) == reference.result)
        // Its checkpoint came along, with memory: applying it goes back there.
        #expect(try other.run(["vm", "checkpoint", "apply", "x", "kept"]).status == 0)
        #expect(try other.state("x") == "saved")

        // Copy, twice: new IDs, new generated MACs, the static one kept with a warning, no memory.
        for name in ["c1", "c2"] {
            let copied = try other.run(["vm", "import", exportPath, "--mode", "copy", "--name", name])
            #expect(copied.status == 0, "\(copied.stderr)")
            #expect(copied.stderr.contains("52:54:00:12:34:56") && copied.stderr.contains("dropped"), "\(copied.stderr)")
            let info = try Self.json(other, ["vm", "info", name, "--json"])
            #expect(info["id"] != original["id"])
            #expect(info["nics"]?[0]?["mac"] != original["nics"]?[0]?["mac"] && info["nics"]?[0]?["mac_generated"] == .bool(true))
            #expect(info["nics"]?[1]?["mac"]?.stringValue == "52:54:00:12:34:56")
            #expect(info["state"]?.stringValue == "off" && info["checkpoints"]?[0]?["has_memory"] == .bool(false))
        }
        var generated: [String] = []
        for name in ["x", "c1", "c2"] {
            generated.append(try #require(try Self.json(other, ["vm", "info", name, "--json"])["nics"]?[0]?["mac"]?.stringValue))
        }
        #expect(Set(generated).count == 3, "no two VMs share a generated MAC: \(generated)")

        // Register: the files stay where they are, the ID is kept; a second store's delete leaves them.
        let third = try Store()
        #expect(try third.run(["vm", "import", exportPath]).status == 0)
        let registered = try Self.json(third, ["vm", "info", "x", "--json"])
        #expect(registered["id"] == original["id"] && registered["nics"] == original["nics"])
        #expect(StoreFiles.canonical(registered["path"]!.stringValue!) == StoreFiles.canonical(exportPath))
        #expect(try third.run(["vm", "delete", "x"]).status == 0)
        #expect(StoreFiles.exists(exportPath + "/vm.json"), "deleting a registered VM leaves its files")
    }
}

/// A SIGKILL at every step of every checkpoint operation (the `HVRUN_CRASH_AT` points): the VM
/// still opens, each checkpoint is either fully there or not listed, and the next command
/// finishes or undoes the work.
@Suite("checkpoint crash safety", .serialized)
struct VMCheckpointCrashTests {
    typealias Store = VMStoreCLITests.Store

    struct Crash: CustomStringConvertible, Sendable {
        var point: String
        /// The command that is killed at `point`, after `setup` ran normally.
        var setup: [[String]]
        var command: [String]
        var description: String { point }
    }

    static let crashes: [Crash] = [
        Crash(point: "checkpoint-before-commit", setup: [], command: ["vm", "checkpoint", "create", "k", "B"]),
        Crash(point: "checkpoint-after-commit", setup: [], command: ["vm", "checkpoint", "create", "k", "B"]),
        Crash(point: "apply-before-commit", setup: [["vm", "checkpoint", "create", "k", "B"]], command: ["vm", "checkpoint", "apply", "k", "A"]),
        Crash(point: "apply-after-commit", setup: [["vm", "checkpoint", "create", "k", "B"]], command: ["vm", "checkpoint", "apply", "k", "A"]),
        Crash(point: "delete-after-commit", setup: [], command: ["vm", "checkpoint", "delete", "k", "A"]),
        Crash(point: "merge-halfway", setup: [], command: ["vm", "checkpoint", "delete", "k", "A"]),
        Crash(point: "merge-before-commit", setup: [], command: ["vm", "checkpoint", "delete", "k", "A"]),
        Crash(point: "merge-after-commit", setup: [], command: ["vm", "checkpoint", "delete", "k", "A"]),
        Crash(point: "merge-before-unlink", setup: [["vm", "checkpoint", "create", "k", "B"]], command: ["vm", "checkpoint", "delete", "k", "A"]),
    ]

    /// What must hold after any crash, once a command has recovered the VM.
    static func checkConsistent(_ store: Store, _ name: String) throws {
        let bundle = store.bundle(name)
        let configuration = try bundle.configuration()
        #expect(configuration.pending.isEmpty, "recovery finished the pending work: \(configuration.pending)")
        for disk in configuration.disks {
            let check = try TestHost.hvrun(["disk", "check", bundle.activePath(of: disk)])
            #expect(check.status == 0, "\(bundle.activePath(of: disk)): \(check.stdout)\(check.stderr)")
        }
        var used: Set<String> = Set(configuration.disks.map(\.activeFile))
        for checkpoint in configuration.checkpoints {
            for file in checkpoint.disks {
                #expect(StoreFiles.exists(bundle.file(file)), "checkpoint \(checkpoint.name) lists \(file), which is missing")
                used.insert(file)
            }
            if checkpoint.hasMemory { #expect(StoreFiles.exists(bundle.path + "/checkpoints/" + checkpoint.id + "/state")) }
        }
        // Linear history here: every differencing disk is a checkpoint's or the VM's, nothing is left over.
        let differencing = Set(StoreFiles.list(bundle.path).filter { $0.hasSuffix(".avhdx") })
        #expect(differencing.isSubset(of: used), "left over: \(differencing.subtracting(used))")
        #expect(Set(StoreFiles.list(bundle.path + "/checkpoints")).isSubset(of: Set(configuration.checkpoints.map(\.id))))
    }

    @Test("a SIGKILL at each step of create, apply and delete leaves a VM that opens and a complete tree",
          .timeLimit(.minutes(3)), arguments: crashes)
    func crash(_ crash: Crash) throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "k"] + VMCheckpointTests.guest(steps: 30) + ["--new-disk", "128M"]).status == 0)
        #expect(try store.run(["vm", "checkpoint", "create", "k", "A"]).status == 0)
        for step in crash.setup { #expect(try store.run(step).status == 0) }
        let killed = try VMProcess(crash.command, environment: ["HVRUN_HOME=" + store.home, "HVRUN_CRASH_AT=" + crash.point])
        #expect(killed.wait(timeoutSeconds: 60) == 128 + SIGKILL, "the command reached \(crash.point): \(killed.output)\(killed.errors)")
        // Reading never changes anything; the next command that holds the VM finishes the work.
        #expect(try store.run(["vm", "checkpoint", "list", "k", "--json"]).status == 0)
        let next = try store.run(["vm", "checkpoint", "create", "k", "after"])
        #expect(next.status == 0, "\(next.stderr)")
        try Self.checkConsistent(store, "k")
        let names = try bundleNames(store)
        if crash.command[2] == "delete" {
            #expect(!names.contains("A"), "the delete was committed before \(crash.point): \(names)")
        } else {
            #expect(names.contains("A"))
        }
        // And the VM still boots and runs its guest to the end on whatever chain it has now.
        #expect(try store.run(["vm", "start", "k"]).status == 0)
        #expect(try store.waitFor(timeoutSeconds: 60) { try store.state("k") == "off" })
        #expect(store.consoleLog("k").contains("disk_ok="), "\(store.consoleLog("k").suffix(200))")
    }

    func bundleNames(_ store: Store) throws -> [String] { try store.bundle("k").configuration().checkpoints.map(\.name) }

    @Test("a SIGKILL of the VM process during a running checkpoint: in the pause before and after vm.json is written, and once it is complete",
          .timeLimit(.minutes(3)), arguments: ["live-checkpoint-before-commit", "live-checkpoint-after-commit", "live-checkpoint-complete"])
    func liveCrash(_ point: String) throws {
        let store = try Store()
        #expect(try store.run(["vm", "create", "l"] + VMCheckpointTests.guest(steps: 2000) + ["--new-disk", "128M"]).status == 0)
        let start = try VMProcess(["vm", "start", "l"], environment: ["HVRUN_HOME=" + store.home, "HVRUN_CRASH_AT=" + point])
        #expect(start.wait(timeoutSeconds: 60) == 0, "\(start.errors)")
        #expect(store.waitFor { SnapshotProcessTests.steps(store.consoleLog("l")).count >= 10 })
        let attempt = try store.run(["vm", "checkpoint", "create", "l", "P"])
        #expect(attempt.status != 0, "the VM process died inside the checkpoint")
        #expect(try store.waitFor { try store.state("l") == "off" })
        #expect(try store.run(["vm", "checkpoint", "create", "l", "after"]).status == 0)
        // Only a checkpoint whose memory reached the disk survives; one still being written when
        // its process died is removed (its disks merged back), never listed half there.
        let listed = try store.bundle("l").configuration().checkpoints.map(\.name)
        #expect(listed == (point == "live-checkpoint-complete" ? ["P", "after"] : ["after"]), "\(listed)")
        try VMCheckpointCrashTests.checkConsistent(store, "l")
        #expect(try store.run(["vm", "start", "l"]).status == 0)
        #expect(store.waitFor { store.consoleLog("l").components("stateful steps=") == 2 }, "booted again")
        #expect(try store.run(["vm", "stop", "l", "--force"]).status == 0)
    }
}
