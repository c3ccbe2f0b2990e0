/// Why a migration failed. Every case leaves the VM where it was: running (or paused, if it was)
/// on the source, nothing on the destination — except ``switchOverUnknown(_:)``, which says so.
public enum MigrationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Bad arguments (an address, a token, an option).
    case usage(String)
    /// A system call on the connection or a file failed.
    case io(operation: String, errno: Int32)
    /// The peer closed the connection.
    case closed(String)
    /// The peer said nothing for too long.
    case timeout(String)
    /// The stream is not what the protocol says: bad checksum, bad length, unexpected section.
    case protocolViolation(String)
    /// The peer speaks another protocol version.
    case unsupportedVersion(found: UInt32, supported: UInt32)
    /// The token did not match (on either side).
    case authentication(String)
    /// The peer aborted, saying why.
    case peerAborted(String)
    /// The machine could not be paused, captured, built or restored.
    case machine(String)
    /// `--timeout` passed (or the migration was cancelled) before the switch-over.
    case cancelled(String)
    /// The connection failed after the source asked the destination to run the VM and before the
    /// destination confirmed it: the VM is paused on the source and may be running on the
    /// destination. Resume it on the source only if it does not run on the destination.
    case switchOverUnknown(String)

    public var description: String {
        switch self {
        case let .usage(message): message
        case let .io(operation, errno): "migration: \(operation) failed: \(SystemError.describe(errno))"
        case let .closed(message): "migration: the peer closed the connection \(message)"
        case let .timeout(message): "migration: \(message)"
        case let .protocolViolation(message): "migration stream is corrupt or not a HyperCore migration: \(message)"
        case let .unsupportedVersion(found, supported):
            "the peer speaks migration protocol version \(found); this hvrun speaks version \(supported): use the same hvrun version on both hosts"
        case let .authentication(message): "migration refused: \(message)"
        case let .peerAborted(message): "the peer aborted the migration: \(message)"
        case let .machine(message): "migration: \(message)"
        case let .cancelled(message): "migration cancelled: \(message)"
        case let .switchOverUnknown(message):
            "migration: the connection failed during the switch-over (\(message)); the VM is paused here and may be running on the destination: check there, and resume it here only if it does not run there"
        }
    }
}
