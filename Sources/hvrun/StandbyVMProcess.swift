import CKVM
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// A VM process started before a migration arrives, as QEMU's `-incoming` destination is: `hvrun
/// vm receive` spawns it while it waits for the sender, so that the process start (exec, the
/// runtime, a 39 MB binary's first page faults: 3–8 ms here) is not part of the migration. Once
/// the sender is authenticated and the bundle exists, the receive hands it the bundle's path and
/// the connection over a socket pair (the descriptor as SCM_RIGHTS), and from then on it is the
/// VM's process exactly as `hvrun run --bundle DIR --incoming-fd N` would be.
///
/// An unused standby ends with its receive: the socket pair reaches end of stream (or, if the
/// receive is killed, the parent-death signal ends it).
final class StandbyVMProcess {
    let pid: pid_t
    private var socket: Int32

    private init(pid: pid_t, socket: Int32) {
        self.pid = pid
        self.socket = socket
    }

    /// Spawns `hvrun run --standby-fd 3`; nil when it cannot be (the receive then spawns the VM
    /// process when it needs it, as before).
    static func spawn() -> StandbyVMProcess? {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { return nil }
        defer { close(pair[1]) }
        guard let pid = try? spawnDetachedHVRun(["run", "--standby-fd", "3"], descriptor: pair[1], log: nil) else {
            close(pair[0])
            return nil
        }
        return StandbyVMProcess(pid: pid, socket: pair[0])
    }

    /// Makes the standby the VM process of `bundle`, receiving on `connection` (the receive
    /// keeps its own copy). False when the standby is gone (then spawn one the ordinary way).
    func handOver(bundle: VMBundle, connection: Int32) -> Bool {
        guard socket >= 0 else { return false }
        let path = Array(bundle.path.utf8)
        let sent = path.withUnsafeBytes { ckvm_send_descriptor(socket, connection, $0.baseAddress!, $0.count) }
        close(socket)
        socket = -1
        return sent == path.count
    }

    /// Ends a standby that was not handed a VM, and reaps it.
    func discard() {
        if socket >= 0 {
            close(socket)
            socket = -1
        }
        kill(pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0, errno == EINTR {}
    }

    /// The standby's own side (`hvrun run --standby-fd FD`): waits for the hand-over, then runs
    /// the bundle's VM. Returns the process's exit status; 0 when the receive ended without
    /// handing over a VM.
    static func serve(descriptor: Int32) throws -> Int32 {
        // The receive that spawned us may die at any moment: so do we (and a receive killed
        // before this line has left us an orphan, which has nothing to wait for).
        let parent = getppid()
        guard ParentDeathSignal.kill(whenParentDies: parent), parent != 1 else { return 0 }
        var path = [UInt8](repeating: 0, count: 4097)
        var connection: Int32 = -1
        let received = path.withUnsafeMutableBytes { ckvm_receive_descriptor(descriptor, &connection, $0.baseAddress!, $0.count) }
        close(descriptor)
        guard received > 0, received < path.count, connection >= 0 else {
            if connection >= 0 { close(connection) }
            return 0
        }
        let bundle = String(decoding: path[..<received], as: UTF8.self)
        // From here this is the VM's process: its output goes to the bundle's log.
        let log = open(VMBundle(name: "", path: bundle).processLogPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        if log >= 0 {
            dup2(log, 1)
            dup2(log, 2)
            close(log)
        }
        return try BundleRun(path: bundle, incomingFD: connection).run()
    }
}
