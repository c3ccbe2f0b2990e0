internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// Why a network backend could not be set up.
public enum NetworkError: Error, Sendable, Equatable, CustomStringConvertible {
    case tapOpen(name: String, errno: Int32)
    case tapAdopt(fd: Int32, errno: Int32)
    case invalidMAC(String)

    public var description: String {
        switch self {
        case let .tapOpen(name, errno):
            "cannot open TAP interface '\(name)': \(SystemError.describe(errno))"
                + (errno == EPERM || errno == EACCES ? " (creating or attaching a TAP needs CAP_NET_ADMIN, or a TAP owned by this user)" : "")
        case let .tapAdopt(fd, errno):
            errno == EINVAL ? "descriptor \(fd) is not a TAP opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
                : "descriptor \(fd) cannot be used as a TAP: \(SystemError.describe(errno))"
        case let .invalidMAC(text): "invalid MAC address '\(text)' (expected six hex bytes, as 52:54:00:12:34:56)"
        }
    }
}

/// A TAP interface the VMM reads and writes Ethernet frames on, each preceded by a 12-byte
/// `virtio_net_hdr_v1` (IFF_VNET_HDR + TUNSETVNETHDRSZ 12), non-blocking.
///
/// Opening by name needs CAP_NET_ADMIN (or a persistent TAP owned by this user). The privileged
/// part can also be done elsewhere: a helper that opens the TAP (as qemu-bridge-helper does)
/// passes the descriptor over a Unix socket and ``init(adopting:)`` takes it. The TAP's
/// descriptor is closed when the value goes away.
public final class TapDevice: Sendable {
    public let fileDescriptor: Int32
    /// The interface's name (as the kernel chose it when opened with an empty name).
    public let name: String
    /// Whether TUNSETOFFLOAD works on the descriptor (false only for test stand-ins).
    let supportsOffload: Bool

    /// Opens (or creates) the TAP interface `name`; an empty name lets the kernel pick `tapN`.
    public init(name: String) throws(NetworkError) {
        var actual = [CChar](repeating: 0, count: 16)
        let fd = ckvm_tap_open(name, &actual)
        guard fd >= 0 else { throw .tapOpen(name: name, errno: -fd) }
        fileDescriptor = fd
        self.name = Self.string(actual)
        supportsOffload = true
    }

    /// Takes over an already-open TAP descriptor (from a privileged helper). It must have been
    /// opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; the header size, O_NONBLOCK and
    /// close-on-exec are set here. The descriptor is closed when the value goes away.
    public init(adopting fd: Int32) throws(NetworkError) {
        var actual = [CChar](repeating: 0, count: 16)
        let result = ckvm_tap_adopt(fd, &actual)
        guard result == 0 else { throw .tapAdopt(fd: fd, errno: -result) }
        fileDescriptor = fd
        name = Self.string(actual)
        supportsOffload = true
    }

    /// A stand-in for tests: any datagram descriptor (a socketpair end) that keeps frame boundaries.
    init(testingDescriptor fd: Int32, name: String) {
        fileDescriptor = fd
        self.name = name
        supportsOffload = false
    }

    deinit { close(fileDescriptor) }

    /// TUNSETOFFLOAD: which offloads the kernel may hand us (CKVM_TUN_F_*). Returns 0 or -errno.
    @discardableResult
    func setOffload(_ flags: UInt32) -> Int32 {
        guard supportsOffload else { return 0 }
        return ckvm_tap_set_offload(fileDescriptor, flags)
    }

    private static func string(_ bytes: [CChar]) -> String {
        String(decoding: bytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Where a virtio-net device's frames go.
public enum NetworkBackend: Sendable {
    /// A TAP interface on the host.
    case tap(TapDevice)
    /// A NIC that is not connected: link down, frames the guest sends are dropped.
    case disconnected
}

