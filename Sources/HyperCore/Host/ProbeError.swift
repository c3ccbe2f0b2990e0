/// Why a probe of the host could not observe something: the errno of the failed system call.
///
/// Probes report failures as values rather than by throwing, because for a capability check a
/// failure is itself a finding ("/dev/kvm: Permission denied" is the answer, not an accident).
public struct ProbeError: Error, Hashable, Sendable, CustomStringConvertible {
    public let errno: Int32

    public init(errno: Int32) { self.errno = errno }

    // The values are fixed by the Linux x86-64 ABI; naming them keeps call sites readable
    // without importing Glibc into every file.
    public static let notPermitted = ProbeError(errno: 1)  // EPERM
    public static let noSuchFile = ProbeError(errno: 2)  // ENOENT
    public static let inputOutput = ProbeError(errno: 5)  // EIO
    public static let noSuchDeviceOrAddress = ProbeError(errno: 6)  // ENXIO
    public static let permissionDenied = ProbeError(errno: 13)  // EACCES
    public static let busy = ProbeError(errno: 16)  // EBUSY
    public static let noSuchDevice = ProbeError(errno: 19)  // ENODEV
    public static let outOfMemory = ProbeError(errno: 12)  // ENOMEM

    /// "Permission denied (errno 13)".
    public var description: String { SystemError.describe(errno) }

    /// True for the errors that mean "you may not", as opposed to "it is not there".
    public var isAccessDenied: Bool { self == .permissionDenied || self == .notPermitted }
}
