/// A failed KVM call: which ioctl (or open), the errno, and what the user can do about it.
public struct KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The ioctl or system call that failed, e.g. `KVM_CREATE_VM` or `open(/dev/kvm)`.
    public let operation: String
    public let errno: Int32
    /// Extra context (a slot number, an address) or a hint.
    public let detail: String?

    public init(operation: String, errno: Int32, detail: String? = nil) {
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var text = "\(operation) failed: \(SystemError.describe(errno))"
        if let detail { text += " (\(detail))" }
        if let hint = hint { text += ". \(hint)" }
        return text
    }

    /// What to do, for the errors a user can fix.
    public var hint: String? {
        guard operation.hasPrefix("open(") else {
            if errno == 12 /* ENOMEM */ { return "The host is out of memory: lower --memory or free memory" }
            return nil
        }
        switch errno {
        case 2 /* ENOENT */:
            return "KVM is not available: load the module (modprobe kvm_intel or kvm_amd) and enable virtualization in the firmware; `hvrun check` explains what is missing"
        case 13 /* EACCES */, 1 /* EPERM */:
            return "No permission on /dev/kvm: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again) or run as root; `hvrun check` shows the details"
        case 16 /* EBUSY */:
            return "another hypervisor (VirtualBox, VMware) holds the virtualization extensions"
        default:
            return nil
        }
    }
}
