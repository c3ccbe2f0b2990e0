/// Why a store operation did not happen. ``exitStatus`` is what `hvrun vm` exits with: 2 when the
/// VM's state refuses it ("VM is running"), 1 for everything else (usage, host, missing VM).
public enum StoreError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Bad input from the user: a name, a size, a MAC address.
    case invalid(String)
    /// No VM of that name.
    case notFound(name: String)
    /// The VM's state (or another command working on it) refuses the operation.
    case refused(String)
    /// A system call failed.
    case system(operation: String, path: String, errno: Int32)
    /// Anything else, already phrased for the user.
    case failed(String)
    /// Stopped on request between two steps; the rest stays pending (``VMCheckpointStore/recover()``).
    case interrupted

    public var exitStatus: Int32 {
        if case .refused = self { return 2 }
        return 1
    }

    public var description: String {
        switch self {
        case let .invalid(message), let .refused(message), let .failed(message): message
        case let .notFound(name): "no VM named \(name) (hvrun vm list shows the VMs)"
        case .interrupted: "interrupted; the rest of the work is finished by the next command or start"
        case let .system(operation, path, errno): "\(path): \(operation) failed: \(SystemError.describe(errno))"
        }
    }
}
