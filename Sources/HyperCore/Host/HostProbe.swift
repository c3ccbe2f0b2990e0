/// The host as the capability check sees it: a handful of primitive observations.
///
/// ``LiveHostProbe`` asks the running system; ``RecordedHostProbe`` answers from a fixture tree
/// recorded earlier, so every branch of ``HostCheck`` can be tested on any machine.
public protocol HostProbe: Sendable {
    /// Executes CPUID; nil when CPUID cannot be executed (not x86, or a recording without it).
    func cpuid(_ leaf: CPUIDLeaf) -> CPUIDRegisters?
    /// Reads an MSR of CPU 0 through `/dev/cpu/0/msr`.
    func readMSR(_ index: UInt32) -> Result<UInt64, ProbeError>
    /// Reads a text file by absolute path (`/proc/cpuinfo`, `/sys/module/kvm/parameters/…`).
    func readFile(_ path: String) -> Result<String, ProbeError>
    /// Lists a directory by absolute path.
    func listDirectory(_ path: String) -> Result<[String], ProbeError>
    /// Stats, opens and exercises `/dev/kvm`, asking for the given capabilities.
    func probeKVMDevice(capabilities: [KVMCapabilityRequirement]) -> KVMDeviceFacts
}

/// The model-specific registers the check reads.
public enum HostMSR {
    /// IA32_FEATURE_CONTROL: bit 0 lock, bit 2 "VMXON outside SMX".
    public static let featureControl: UInt32 = 0x3A
    /// IA32_VMX_PROCBASED_CTLS2: allowed-1 settings of the secondary controls in the high dword.
    public static let vmxSecondaryControls: UInt32 = 0x48B
    /// AMD VM_CR: bit 4 SVMDIS.
    public static let amdVMCR: UInt32 = 0xC001_0114

    public static let probed: [UInt32] = [featureControl, vmxSecondaryControls, amdVMCR]
}

/// Paths the check reads; one place, so the recorder copies exactly what the check uses.
public enum HostPaths {
    public static let cpuinfo = "/proc/cpuinfo"
    /// Uid, Gid and Groups of the checking process.
    public static let processStatus = "/proc/self/status"
    public static let passwd = "/etc/passwd"
    public static let group = "/etc/group"
    public static let sysModule = "/sys/module"
    public static let kvmDevice = "/dev/kvm"
    /// The KVM modules whose presence and parameters matter.
    public static let kvmModules = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
}
