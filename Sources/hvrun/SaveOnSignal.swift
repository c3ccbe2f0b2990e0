import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `--save-on-signal DIR`: SIGUSR1 saves the machine into DIR and ends the run, as `save` on the
/// control socket does. The signal is blocked from construction on (before any thread exists, so
/// every thread inherits the mask) and collected by one thread with sigwait; no Swift code runs in
/// a signal handler. A save that fails is reported and the machine keeps running.
final class SaveOnSignal: @unchecked Sendable {
    let directory: String
    private let signals: sigset_t

    init(directory: String) {
        self.directory = directory
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGUSR1)
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signals = set
    }

    func watch(_ machine: Machine) {
        startDetachedThread { [self] in loop(machine) }
    }

    private func loop(_ machine: Machine) {
        var set = signals
        var received: Int32 = 0
        while sigwait(&set, &received) == 0 {
            do {
                try machine.pause()
                let written = try machine.snapshot(to: directory)
                printError("hvrun: saved to \(directory) (\(written.memoryBytes >> 10) KiB of memory)")
                machine.finish(.saved(directory))
                return
            } catch {
                printError("hvrun: SIGUSR1: save to \(directory) failed: \(error); the guest keeps running")
                try? machine.resume()
            }
        }
    }
}
