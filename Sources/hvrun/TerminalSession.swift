import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The terminal side of a run: stdin bytes go to the guest's UART (with line editing and echo off,
/// so the guest sees keys as typed), and SIGINT/SIGTERM stop the machine instead of killing hvrun
/// with the terminal left in raw mode.
final class TerminalSession: @unchecked Sendable {
    private var savedAttributes = termios()
    private let isTerminal: Bool
    private var interrupted = false

    init() {
        isTerminal = isatty(0) == 1
        guard isTerminal, tcgetattr(0, &savedAttributes) == 0 else { return }
        var raw = savedAttributes
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO)
        raw.c_iflag &= ~tcflag_t(ICRNL)
        tcsetattr(0, TCSANOW, &raw)
    }

    deinit { restore() }

    var wasInterrupted: Bool { interrupted }

    func restore() {
        guard isTerminal else { return }
        tcsetattr(0, TCSANOW, &savedAttributes)
    }

    /// Forwards stdin to `serial` on a background thread until stdin closes.
    func forwardInput(to serial: Serial16550) {
        startDetachedThread {
            var buffer = [UInt8](repeating: 0, count: 256)
            while true {
                let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
                if count < 0, errno == EINTR { continue }
                guard count > 0 else { return }
                serial.receive(buffer[0..<count])
            }
        }
    }

    /// Calls `handler` with the signal number (on a background thread) on SIGINT or SIGTERM. The
    /// signals are blocked in every thread and collected with sigwait, so no Swift code runs in a
    /// signal handler. Call it before creating other threads, so they inherit the blocked mask.
    func onInterrupt(_ handler: @escaping @Sendable (Int32) -> Void) {
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
        let waited = signals
        startDetachedThread { [self] in
            var received: Int32 = 0
            var set = waited
            guard sigwait(&set, &received) == 0 else { return }
            interrupted = true
            handler(received)
        }
    }
}

/// Writes one line to stderr.
func printError(_ message: String) {
    var line = message
    line.append("\n")
    line.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}
