import HyperCore
import Synchronization

/// The disks of one `hvrun run`, opened together and closed together.
///
/// Every way a run ends — reset, power-off, debug exit, guest failure, --timeout, SIGINT/SIGTERM, a
/// host error, even a failure while opening the next disk — goes through ``closeAll()`` before the
/// process exits: hvrun leaves with `exit`, which runs no deinitializers, so a VHDX that is not
/// closed here keeps a LogGuid that qemu-img refuses to read past. Only SIGKILL or a power cut
/// may leave a log (the next open replays it). Call it only once nothing can issue more I/O: after
/// the machine has stopped (its vCPU and virtio I/O threads joined) or was never started.
final class RunDisks {
    private(set) var opened: [(path: String, backend: any BlockBackend)] = []

    /// Forgets every disk without touching it: after a live migration the source closed them at
    /// the switch-over, and the destination owns them now.
    func abandonAll() { opened = [] }

    /// Opens `disk` and keeps it for ``closeAll()``.
    func open(_ disk: DiskOption) throws(VHDXError) -> any BlockBackend {
        let backend = try openDisk(path: disk.path, readOnly: disk.readOnly)
        opened.append((disk.path, backend))
        return backend
    }

    /// Keeps the disks `machine` uses now for ``closeAll()``: those the library opened for a
    /// restore, and the differencing children a checkpoint moved the guest onto.
    func adoptDisks(of machine: Machine) {
        for backend in machine.blockBackends where !opened.contains(where: { $0.backend === backend }) {
            opened.append(((backend as? VHDXImage)?.path ?? (backend as? RawImage)?.path ?? "a disk", backend))
        }
    }

    /// Flushes and closes every disk (VHDX: applies the log, rewrites both headers with a zero
    /// LogGuid). Returns one message per disk that could not be closed cleanly, naming it; the
    /// others are closed regardless. Calling it again does nothing.
    func closeAll() -> [String] {
        var failures: [String] = []
        for (path, backend) in opened {
            do {
                try backend.close()
            } catch {
                failures.append("cannot close \(path) cleanly: \(error); run `hvrun disk check --repair \(path)` before using it elsewhere")
            }
        }
        opened.removeAll()
        return failures
    }
}

/// Routes SIGINT/SIGTERM (collected by ``TerminalSession`` on its own thread, never in a signal
/// handler) to the run's normal shutdown: the machine is stopped, `Machine.run` returns on the main
/// thread, and the main thread closes the disks. A signal that arrives before the machine exists
/// is remembered, and the run stops as soon as it is attached.
final class StopRequest: Sendable {
    private let state = Mutex<(machine: Machine?, signal: Int32?)>((nil, nil))

    /// Stops the machine if there is one; otherwise remembers the request.
    func request(signal: Int32) {
        let machine = state.withLock { state -> Machine? in
            if state.signal == nil { state.signal = signal }
            return state.machine
        }
        machine?.stop()
    }

    /// Hands over the machine to stop; returns true when a stop was already requested (the caller
    /// then does not start it).
    func attach(_ machine: Machine) -> Bool {
        state.withLock { state in
            state.machine = machine
            return state.signal != nil
        }
    }

    /// The signal that asked for the stop, if one did.
    var signal: Int32? { state.withLock { $0.signal } }

    /// A `stop` over the control socket (no signal): the run must not be restarted after it.
    private let controlStop = Mutex<Bool>(false)
    func requestFromControl() { controlStop.withLock { $0 = true } }
    var stoppedByControl: Bool { controlStop.withLock { $0 } }
}
