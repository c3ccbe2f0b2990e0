import HyperCore
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The checkpoint verbs a running VM's process adds to its control socket. They run here because
/// this process owns the VM's disks and `vm.json` while it runs:
/// - `vm-checkpoint` `{"name": TEXT?}`: a checkpoint with memory (one short pause), reported
///   with its pause time;
/// - `vm-checkpoint-delete` `{"checkpoint": REF, "subtree": BOOL}`: the records go at once, the
///   merges run on a thread of their own while the guest runs (`vm info` shows `merging`).
/// One piece of checkpoint work at a time: a request while a merge runs is refused (try again),
/// so the control socket never waits behind a merge.
final class BundleCheckpoints: Sendable {
    let store: VMCheckpointStore
    let machine: Machine
    private let busy = Mutex<Bool>(false)

    init(bundle: VMBundle, machine: Machine) {
        self.machine = machine
        store = VMCheckpointStore(bundle: bundle, live: MachineActiveDisks(machine: machine)) { [machine] in
            machine.runState == .ended
        }
    }

    /// Waits until background work has stopped: after the machine ended, a merge stops at its
    /// next step (its disks are about to close); what is left stays pending in `vm.json`.
    func waitUntilIdle() {
        while busy.withLock({ $0 }) { usleep(10_000) }
    }

    func install(on server: ControlServer) {
        server.commands["vm-checkpoint"] = { [self] arguments in try checkpoint(arguments) }
        server.commands["vm-checkpoint-delete"] = { [self] arguments in try delete(arguments) }
        server.commands["vm-merging"] = { [self] _ in [("merging", .bool(busy.withLock { $0 } || store.hasPendingWork()))] }
        server.migrationBlocker = { [self] in
            busy.withLock { $0 } ? "the VM's disks are busy (a checkpoint merge or a storage move); move it once that is done" : nil
        }
    }

    private func checkpoint(_ arguments: JSONValue) throws(ControlError) -> [(String, JSONValue)] {
        try acquire()
        defer { release() }
        let created: VMCheckpointStore.Created
        do throws(StoreError) { created = try store.create(name: arguments["name"]?.stringValue, machine: machine) } catch {
            throw Self.controlError(error)
        }
        return [("id", .string(created.checkpoint.id)), ("name", .string(created.checkpoint.name)),
                ("pause_ms", created.pauseNanoseconds.map { .double(Double($0 / 1000) / 1000) } ?? .null),
                ("state", .string(machine.runState.rawValue))]
    }

    private func delete(_ arguments: JSONValue) throws(ControlError) -> [(String, JSONValue)] {
        guard let reference = arguments["checkpoint"]?.stringValue else {
            throw .failed("vm-checkpoint-delete needs {\"checkpoint\": NAME-OR-ID}")
        }
        try acquire()
        let deleted: [VMCheckpoint]
        do throws(StoreError) {
            deleted = try store.delete(reference, subtree: arguments["subtree"]?.boolValue ?? false, background: true)
        } catch {
            release()
            throw Self.controlError(error)
        }
        release()
        finishInBackground()
        return [("deleted", .array(deleted.map { .string($0.id) })), ("merging", .bool(true))]
    }

    /// Claims this VM's one piece of disk work (no checkpoint, merge or storage move meanwhile);
    /// ``release()`` when it is done.
    func acquire() throws(ControlError) {
        let acquired = busy.withLock { (taken: inout Bool) -> Bool in
            if taken { return false }
            taken = true
            return true
        }
        guard acquired else {
            throw .refused("a checkpoint merge of this VM is still running; try again when `hvrun vm info` no longer shows merging")
        }
    }

    func release() { busy.withLock { $0 = false } }

    private static func controlError(_ error: StoreError) -> ControlError {
        if case .refused = error { return .refused(error.description) }
        return .failed(error.description)
    }

    /// Finishes pending work (a delete's merges) on a thread of its own.
    func finishInBackground() {
        guard busy.withLock({ (taken: inout Bool) -> Bool in
            if taken { return false }
            taken = true
            return true
        }) else { return }
        startDetachedThread { [self] in
            do throws(StoreError) { try store.recover() } catch {
                if case .interrupted = error { printError("hvrun: VM \(store.bundle.name): the machine ended; checkpoint merges resume at the next start or checkpoint command"); busy.withLock { $0 = false }; return }
                printError("hvrun: VM \(store.bundle.name): finishing checkpoint work: \(error) (the next start or checkpoint command resumes it)")
            }
            busy.withLock { $0 = false }
        }
    }
}
