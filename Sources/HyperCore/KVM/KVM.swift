internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// The KVM system handle: an open `/dev/kvm`.
///
/// Each ioctl is one method; the method's documentation names the ioctl. Creating a
/// ``VirtualMachine`` is the way on to VM-level calls.
public final class KVM: Sendable {
    /// The file descriptor of `/dev/kvm`.
    public let fileDescriptor: Int32
    public let path: String

    /// Opens `/dev/kvm` (or another path, for tests) and checks that the API version is 12.
    public init(path: String = "/dev/kvm") throws(KVMError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw KVMError(operation: "open(\(path))", errno: errno) }
        self.fileDescriptor = fd
        self.path = path
        let version = ckvm_ioctl(fd, CKVM_GET_API_VERSION)
        guard version == KVM_API_VERSION else {
            close(fd)
            throw KVMError(operation: "KVM_GET_API_VERSION", errno: version < 0 ? ckvm_errno() : 0,
                           detail: "the kernel reports API version \(version); HyperCore needs \(KVM_API_VERSION)")
        }
    }

    deinit { close(fileDescriptor) }

    /// `KVM_GET_API_VERSION`. Always 12 for an opened handle.
    public var apiVersion: Int32 { ckvm_ioctl(fileDescriptor, CKVM_GET_API_VERSION) }

    /// `KVM_CHECK_EXTENSION`: 0 when absent, otherwise a positive, capability-specific value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, ckvm_ioctl_arg(fileDescriptor, CKVM_CHECK_EXTENSION, UInt(capability)))
    }

    /// `KVM_GET_VCPU_MMAP_SIZE`: the size of each vCPU's `kvm_run` mapping.
    public func vcpuMapSize() throws(KVMError) -> Int {
        let size = ckvm_ioctl(fileDescriptor, CKVM_GET_VCPU_MMAP_SIZE)
        guard size > 0 else { throw KVMError(operation: "KVM_GET_VCPU_MMAP_SIZE", errno: ckvm_errno()) }
        return Int(size)
    }

    /// `KVM_GET_SUPPORTED_CPUID`: the CPUID leaves KVM can present to a guest.
    public func supportedCPUID() throws(KVMError) -> CPUIDTable {
        try fillTable("KVM_GET_SUPPORTED_CPUID", CKVM_GET_SUPPORTED_CPUID, capacity: 128...4096,
                      allocate: ckvm_cpuid2_alloc) { CPUIDTable(copying: $0) }
    }

    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs KVM saves and restores for a vCPU.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        try fillTable("KVM_GET_MSR_INDEX_LIST", CKVM_GET_MSR_INDEX_LIST, capacity: 256...16384,
                      allocate: ckvm_msr_list_alloc) { list in (0..<list.pointee.nmsrs).map { ckvm_msr_list_index(list, $0) } }
    }

    /// Runs an ioctl that fills a variable-length table, doubling the table while KVM answers
    /// E2BIG (it does not say how many entries it has).
    private func fillTable<Table, Result>(_ name: String, _ request: UInt, capacity: ClosedRange<UInt32>,
                                          allocate: (UInt32) -> UnsafeMutablePointer<Table>?,
                                          decode: (UnsafeMutablePointer<Table>) -> Result) throws(KVMError) -> Result {
        var entries = capacity.lowerBound
        while entries <= capacity.upperBound {
            guard let table = allocate(entries) else { throw KVMError(operation: name, errno: ENOMEM) }
            defer { ckvm_free(table) }
            if ckvm_ioctl_ptr(fileDescriptor, request, table) == 0 { return decode(table) }
            let code = ckvm_errno()
            guard code == E2BIG else { throw KVMError(operation: name, errno: code) }
            entries *= 2
        }
        throw KVMError(operation: name, errno: E2BIG, detail: "more than \(capacity.upperBound) entries")
    }

    /// `KVM_CREATE_VM` (type 0: the default x86 VM).
    public func createVirtualMachine() throws(KVMError) -> VirtualMachine {
        var fd: Int32
        repeat { fd = ckvm_ioctl_arg(fileDescriptor, CKVM_CREATE_VM, 0) } while fd < 0 && ckvm_errno() == EINTR
        guard fd >= 0 else { throw KVMError(operation: "KVM_CREATE_VM", errno: ckvm_errno()) }
        return VirtualMachine(fileDescriptor: fd, vcpuMapSize: try vcpuMapSize())
    }
}

/// Capabilities HyperCore cannot run without, checked when a machine is assembled. The list is
/// the host check's catalog, so `hvrun check` and ``Machine`` agree on what "required" means.
public enum RequiredCapabilities {
    public static var all: [KVMCapabilityRequirement] { KVMCapabilityCatalog.all.filter { $0.level == .required } }

    /// `KVM_CAP_*` names of the required capabilities this KVM lacks.
    public static func missing(in kvm: KVM) -> [String] {
        all.filter { kvm.checkExtension($0.number) == 0 }.map { "KVM_CAP_" + $0.name }
    }
}
