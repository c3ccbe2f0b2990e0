internal import CKVM
#if canImport(Glibc)
internal import Glibc
#elseif canImport(Musl)
internal import Musl
#endif

/// Probes the machine this process runs on.
public struct LiveHostProbe: HostProbe {
    public init() {}

    public func cpuid(_ leaf: CPUIDLeaf) -> CPUIDRegisters? {
        #if arch(x86_64)
            let registers = ckvm_host_cpuid(leaf.leaf, leaf.subleaf)
            return CPUIDRegisters(eax: registers.eax, ebx: registers.ebx, ecx: registers.ecx, edx: registers.edx)
        #else
            return nil
        #endif
    }

    public func readMSR(_ index: UInt32) -> Result<UInt64, ProbeError> {
        var value: UInt64 = 0
        let status = ckvm_host_read_msr(0, index, &value)
        return status == 0 ? .success(value) : .failure(ProbeError(errno: -status))
    }

    public func readFile(_ path: String) -> Result<String, ProbeError> { FileAccess.readText(path) }

    public func listDirectory(_ path: String) -> Result<[String], ProbeError> { FileAccess.listDirectory(path) }

    public func probeKVMDevice(capabilities: [KVMCapabilityRequirement]) -> KVMDeviceFacts {
        var facts = KVMDeviceFacts(node: Self.statNode(HostPaths.kvmDevice))
        // Opening anything but a character device would only produce a confusing ENOTTY later.
        guard case .success(let node) = facts.node, node.type == .characterDevice else { return facts }

        let kvm = Glibc.open(HostPaths.kvmDevice, O_RDWR | O_CLOEXEC)
        guard kvm >= 0 else {
            facts.open = .failed(ProbeError(errno: errno))
            return facts
        }
        defer { close(kvm) }
        facts.open = .succeeded

        let version = ckvm_ioctl(kvm, CKVM_GET_API_VERSION)
        facts.apiVersion = version < 0 ? .failure(ProbeError(errno: ckvm_errno())) : .success(version)
        // Any other version means another ABI: the remaining ioctl numbers cannot be trusted.
        guard version == KVMDeviceFacts.expectedAPIVersion else { return facts }

        for capability in capabilities {
            facts.capabilities[capability.name] = max(0, ckvm_ioctl_arg(kvm, CKVM_CHECK_EXTENSION, UInt(capability.number)))
        }

        var vm: Int32
        repeat { vm = ckvm_ioctl_arg(kvm, CKVM_CREATE_VM, 0) } while vm < 0 && ckvm_errno() == EINTR
        guard vm >= 0 else {
            facts.createVM = .failed(ProbeError(errno: ckvm_errno()))
            return facts
        }
        defer { close(vm) }
        facts.createVM = .succeeded

        let vcpu = ckvm_ioctl_arg(vm, CKVM_CREATE_VCPU, 0)
        if vcpu >= 0 {
            close(vcpu)
            facts.createVCPU = .succeeded
        } else {
            facts.createVCPU = .failed(ProbeError(errno: ckvm_errno()))
        }
        return facts
    }

    static func statNode(_ path: String) -> Result<KVMDeviceFacts.Node, ProbeError> {
        var info = stat()
        guard stat(path, &info) == 0 else { return .failure(ProbeError(errno: errno)) }
        let type: KVMDeviceFacts.FileType
        switch info.st_mode & S_IFMT {
        case S_IFCHR: type = .characterDevice
        case S_IFREG: type = .regularFile
        case S_IFDIR: type = .directory
        default: type = .other
        }
        // glibc's major()/minor() are macros Swift cannot import; this is their definition.
        let device = UInt64(info.st_rdev)
        let major = UInt32(truncatingIfNeeded: ((device >> 8) & 0xfff) | ((device >> 32) & ~0xfff))
        let minor = UInt32(truncatingIfNeeded: (device & 0xff) | ((device >> 12) & ~0xff))
        return .success(
            KVMDeviceFacts.Node(
                type: type, major: major, minor: minor, mode: UInt32(info.st_mode) & 0o7777,
                ownerUID: UInt32(info.st_uid), groupID: UInt32(info.st_gid)))
    }
}
