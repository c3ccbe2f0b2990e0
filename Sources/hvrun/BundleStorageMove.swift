import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `vm-move-storage` `{"dir": DIR, "max_stall_ms": N}` on a running VM's control socket replies
/// `{"status": "active"}` and sends the asking client one `STORAGE_MOVE` event at the end
/// (`status` completed or failed, and what was moved): storage migration on this host (`hvrun vm move NAME --storage-only DIR`). Every file of every disk
/// chain moves into DIR while the guest runs: frozen files (checkpoints' parents, read-only disks)
/// are copied whole; the files the guest writes are copied live and switched with a short wait
/// of the disk's I/O (``Machine/moveDisks(_:maxStallMilliseconds:commit:)``), during which
/// `vm.json` is rewritten to name the new files. Then the old files inside the VM's directory are
/// deleted; old files outside it are left where they are (another VM may share them) and named in
/// the answer. On failure the VM keeps its files and the copies are removed.
final class BundleStorageMove: Sendable {
    let bundle: VMBundle
    let machine: Machine
    let checkpoints: BundleCheckpoints

    init(bundle: VMBundle, machine: Machine, checkpoints: BundleCheckpoints) {
        self.bundle = bundle
        self.machine = machine
        self.checkpoints = checkpoints
    }

    func install(on server: ControlServer) {
        server.commands["vm-move-storage"] = { [self, weak server] arguments in
            guard let directory = arguments["dir"]?.stringValue, directory.hasPrefix("/") else {
                throw ControlError.failed("vm-move-storage needs {\"dir\": ABSOLUTE-DIRECTORY}")
            }
            let target = StoreFiles.canonical(directory)
            guard StoreFiles.isDirectory(target) else { throw ControlError.failed("\(target) is not a directory") }
            let stall = arguments["max_stall_ms"]?.doubleValue ?? 50
            guard let events = server?.eventsForCurrentRequest() else { throw ControlError.failed("the VM is ending") }
            try checkpoints.acquire()
            // The copy may take long: on a thread of its own, the result as an event (which the
            // server holds until this reply is sent, however soon a refusal comes).
            startDetachedThread { [self] in
                let result: [(String, JSONValue)]
                do throws(ControlError) {
                    result = [("status", .string("completed"))] + (try move(into: target, maxStall: stall))
                } catch {
                    result = [("status", .string("failed")), ("error", .string(error.description)),
                              ("refused", .bool({ if case .refused = error { true } else { false } }()))]
                }
                checkpoints.release()
                events.send("STORAGE_MOVE", result)
            }
            return [("status", .string("active"))]
        }
    }

    private func move(into directory: String, maxStall: Double) throws(ControlError) -> [(String, JSONValue)] {
        guard StoreFiles.isDirectory(directory) else { throw .failed("\(directory) is not a directory") }
        let source = VMBundle(name: bundle.name, path: StoreFiles.canonical(bundle.path))
        let configuration: VMConfiguration
        let plan: VMRelocation
        do throws(StoreError) {
            configuration = try source.configuration()
            guard configuration.pending.isEmpty else { throw StoreError.refused("checkpoint work (a merge) is pending; move the disks once it is done") }
            plan = try VMRelocation(bundle: source, configuration: configuration, into: directory)
        } catch {
            if case .refused = error { throw .refused(error.description) }
            throw .failed(error.description)
        }
        if let clash = plan.placed.values.sorted().first(where: StoreFiles.exists) {
            throw .refused("\(clash) exists; the disks are not moved over an existing file")
        }
        let live = configuration.disks.enumerated().filter { !$0.element.readonly }
            .map { (index: $0.offset, file: StoreFiles.canonical(source.activePath(of: $0.element))) }
        let liveFiles = Set(live.map(\.file))
        let destinations = plan.placed.values.sorted()
        let oldBundleFiles = plan.placed.keys.sorted().filter { $0.hasPrefix(source.path + "/") }
        // Crash safety through vm.json's pending list: first the copies are written down as
        // files to delete (a crash before the switch leaves the VM on its old files, and the next
        // start removes the copies); the switch's commit names the new files and lists the old
        // ones of the VM's directory instead, deleted right after (or by the next start).
        func record(_ value: VMConfiguration) throws(ControlError) {
            do throws(StoreError) { try StoreFiles.writeAtomically(source.configurationPath, Array(try value.encoded().utf8)) } catch {
                throw .failed("writing \(source.configurationPath): \(error)")
            }
        }
        var copying = configuration
        copying.pending = destinations.map { PendingStoreOperation(kind: .unlink, path: $0) }
        try record(copying)
        var created: [String] = []
        do throws(ControlError) {
            // Frozen files: copied whole, then re-pointed at their parents' copies (parents first).
            for (file, destination) in plan.placed.sorted(by: { $0.value < $1.value }) where !liveFiles.contains(file) {
                created.append(destination)
                do throws(StoreError) { try StoreFiles.copy(file, to: destination) } catch { throw .failed("copying \(file): \(error)") }
            }
            let copied = Set(created)
            do throws(StoreError) { try VMRelocation.reparent(plan.reparent.filter { copied.contains($0.child) }) } catch {
                throw .failed(error.description)
            }
            CrashPoint.reach("storage-move-copied")
            // The files the guest writes: copied live and switched.
            let moves = live.map { disk -> DiskMove in
                let destination = plan.placed[disk.file]!
                return DiskMove(index: disk.index, destination: destination, parent: plan.reparent.first { $0.child == destination }?.parent)
            }
            created += moves.map(\.destination)
            var moved = plan.configuration
            moved.pending = oldBundleFiles.map { PendingStoreOperation(kind: .unlink, path: $0) }
            let report: StorageMoveReport
            do throws(MigrationError) {
                report = try machine.moveDisks(moves, maxStallMilliseconds: maxStall) { () throws(MigrationError) in
                    CrashPoint.reach("storage-move-before-commit")
                    do throws(ControlError) { try record(moved) } catch { throw .machine("recording the new disk paths: \(error)") }
                    CrashPoint.reach("storage-move-committed")
                }
            } catch {
                throw .failed("\(error)")
            }
            // Moved: the old files of the VM's own directory go; others stay where they are.
            for file in oldBundleFiles { unlink(file) }
            CrashPoint.reach("storage-move-old-files-deleted")
            moved.pending = []
            try record(moved)
            let left = plan.placed.keys.sorted().filter { !$0.hasPrefix(source.path + "/") }
            return [("dir", .string(directory)), ("files", .array(destinations.map(JSONValue.string))),
                    ("bytes_copied", .number(Int64(report.bytesCopied))), ("rounds", .number(Int64(report.rounds))),
                    ("stall_ms", .double(Double(report.stallNanoseconds / 1000) / 1000)),
                    ("total_ms", .double(Double(report.totalNanoseconds / 1000) / 1000)),
                    ("left_in_place", .array(left.map(JSONValue.string)))]
        } catch {
            for file in created { unlink(file) }
            try? record(configuration)
            throw error
        }
    }
}
