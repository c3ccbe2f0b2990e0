/// Why a VHDX operation failed. Every message names the file and, where there is one, the on-disk
/// structure and its file offset, and says what the user can do.
public enum VHDXError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A system call failed.
    case io(path: String, operation: String, offset: UInt64, errno: Int32)
    /// The file does not start with the `vhdxfile` identifier.
    case notVHDX(path: String)
    /// A structure is damaged: `structure` names it ("header 1", "BAT entry 17", ...), `offset` is
    /// its file offset.
    case corrupt(path: String, structure: String, offset: UInt64, detail: String)
    /// Valid but uses something this implementation refuses (an unknown required region or item).
    case unsupported(path: String, detail: String)
    /// The parent of a differencing disk cannot be used.
    case parent(path: String, detail: String)
    /// A change was requested on an image opened read-only.
    case readOnly(path: String)
    /// A caller passed an impossible value (size, block size, sector size, range).
    case invalidArgument(String)

    public var description: String {
        if case let .corrupt(path, _, _, _) = self {
            return problemDescription + "; run `hvrun disk check \(path)` for a full report"
        }
        return problemDescription
    }

    /// The calls whose failure is about a place in the file; others (open, fstat, fdatasync, …)
    /// concern the whole file and their messages carry no offset.
    static let positionedOperations: Set<String> = ["read", "write", "I/O", "copy_file_range", "fallocate", "fallocate(PUNCH_HOLE)"]

    /// The message without the advice to run `hvrun disk check` (which `check` itself reports with).
    public var problemDescription: String {
        switch self {
        case let .io(path, operation, offset, errno):
            guard Self.positionedOperations.contains(operation) else {
                return "\(path): \(operation) failed: \(SystemError.describe(errno))"
            }
            return "\(path): \(operation) failed at file offset \(offset): \(SystemError.describe(errno))"
        case let .notVHDX(path):
            return "\(path): not a VHDX file (no \"vhdxfile\" identifier at offset 0)"
        case let .corrupt(path, structure, offset, detail):
            return "\(path): corrupt \(structure) at file offset \(offset) (0x\(String(offset, radix: 16))): \(detail)"
        case let .unsupported(path, detail):
            return "\(path): unsupported VHDX feature: \(detail)"
        case let .parent(path, detail):
            return "\(path): differencing disk parent problem: \(detail)"
        case let .readOnly(path):
            return "\(path): the image is open read-only"
        case let .invalidArgument(detail):
            return "invalid argument: \(detail)"
        }
    }

    /// The same failure in the device-facing error type.
    public var blockError: BlockError {
        switch self {
        case let .io(path, _, offset, errno): return .io(path: path, offset: offset, errno: errno)
        case let .readOnly(path): return .readOnly(path: path)
        case let .notVHDX(path): return .corrupt(path: path, detail: "not a VHDX file")
        case let .corrupt(path, _, _, _), let .unsupported(path, _), let .parent(path, _):
            return .corrupt(path: path, detail: description)
        case let .invalidArgument(detail): return .unsupported(detail)
        }
    }
}

extension VHDXError {
    /// A device-level failure reported in VHDX terms (convert reads and writes through BlockBackend).
    init(_ error: BlockError, path: String, offset: UInt64) {
        switch error {
        case let .io(p, o, e): self = .io(path: p, operation: "I/O", offset: o, errno: e)
        case let .readOnly(p): self = .readOnly(path: p)
        case let .corrupt(p, detail): self = .corrupt(path: p, structure: "image", offset: offset, detail: detail)
        case .outOfRange, .misaligned, .unsupported: self = .invalidArgument("\(path) at \(offset): \(error)")
        }
    }
}
