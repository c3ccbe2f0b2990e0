#if canImport(Glibc)
internal import Glibc
#endif

/// Named points in the store's multi-step operations where the crash-safety tests kill the
/// process: with `HVRUN_CRASH_AT=NAME` in its environment, a process that reaches point NAME
/// SIGKILLs itself there — exactly what a power cut or `kill -9` at that instant does, so the
/// tests can prove each such instant leaves a VM that opens. Without the variable, nothing happens.
public enum CrashPoint {
    static let armed: String? = getenv("HVRUN_CRASH_AT").map { String(cString: $0) }

    public static func reach(_ name: String) {
        guard let armed, armed == name else { return }
        kill(getpid(), SIGKILL)
        pause()
    }
}
