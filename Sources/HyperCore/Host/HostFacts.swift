/// Everything the capability check knows about the host, gathered once from a ``HostProbe``.
///
/// ``HostCheck/evaluate(_:)`` is a pure function of this value. Each field keeps the failure
/// that hid it, because "unreadable" must stay distinguishable from "absent".
public struct HostFacts: Hashable, Sendable {
    /// Raw CPUID; nil when CPUID could not be executed.
    public var cpu: CPUIDFacts?
    /// The kernel's view of the CPU (`/proc/cpuinfo`).
    public var cpuinfo: Result<CPUInfo, ProbeError>
    /// MSR 0x3A, IA32_FEATURE_CONTROL.
    public var featureControl: Result<UInt64, ProbeError>
    /// MSR 0x48B, IA32_VMX_PROCBASED_CTLS2.
    public var vmxSecondaryControls: Result<UInt64, ProbeError>
    /// MSR 0xC0010114, AMD VM_CR.
    public var amdVMCR: Result<UInt64, ProbeError>
    /// Loaded KVM modules (from ``HostPaths/kvmModules``) and their parameters, from `/sys/module`.
    public var kvmModules: Result<[String: [String: String]], ProbeError>
    public var device: KVMDeviceFacts
    public var caller: CallerIdentity

    public init(
        cpu: CPUIDFacts?, cpuinfo: Result<CPUInfo, ProbeError>, featureControl: Result<UInt64, ProbeError>,
        vmxSecondaryControls: Result<UInt64, ProbeError>, amdVMCR: Result<UInt64, ProbeError>,
        kvmModules: Result<[String: [String: String]], ProbeError>, device: KVMDeviceFacts, caller: CallerIdentity
    ) {
        self.cpu = cpu
        self.cpuinfo = cpuinfo
        self.featureControl = featureControl
        self.vmxSecondaryControls = vmxSecondaryControls
        self.amdVMCR = amdVMCR
        self.kvmModules = kvmModules
        self.device = device
        self.caller = caller
    }

    /// Asks the probe everything the check needs.
    public static func gather(from probe: some HostProbe) -> HostFacts {
        let cpu: CPUIDFacts?
        if probe.cpuid(.vendor) != nil {
            cpu = CPUIDFacts { probe.cpuid($0) ?? .zero }
        } else {
            cpu = nil
        }
        return HostFacts(
            cpu: cpu,
            cpuinfo: probe.readFile(HostPaths.cpuinfo).map(CPUInfo.init(parsing:)),
            featureControl: probe.readMSR(HostMSR.featureControl),
            vmxSecondaryControls: probe.readMSR(HostMSR.vmxSecondaryControls),
            amdVMCR: probe.readMSR(HostMSR.amdVMCR),
            kvmModules: gatherModules(from: probe),
            device: probe.probeKVMDevice(capabilities: KVMCapabilityCatalog.all),
            caller: CallerIdentity(
                processStatus: try? probe.readFile(HostPaths.processStatus).get(),
                passwd: try? probe.readFile(HostPaths.passwd).get(),
                group: try? probe.readFile(HostPaths.group).get()))
    }

    /// `/sys/module/<name>` exists for loaded and for built-in modules alike, unlike `/proc/modules`.
    private static func gatherModules(from probe: some HostProbe) -> Result<[String: [String: String]], ProbeError> {
        probe.listDirectory(HostPaths.sysModule).map { loaded in
            var modules: [String: [String: String]] = [:]
            for name in HostPaths.kvmModules where loaded.contains(name) {
                let directory = "\(HostPaths.sysModule)/\(name)/parameters"
                var parameters: [String: String] = [:]
                for parameter in (try? probe.listDirectory(directory).get()) ?? [] {
                    // Write-only parameters fail to read; they carry nothing the check needs.
                    if case .success(let value) = probe.readFile("\(directory)/\(parameter)") {
                        parameters[parameter] = value.trimmingWhitespace()
                    }
                }
                modules[name] = parameters
            }
            return modules
        }
    }
}

/// The parts of `/proc/cpuinfo` the check uses, taken from the first processor.
public struct CPUInfo: Hashable, Sendable {
    /// The `flags` line: features the kernel has *enabled* (it clears vmx/svm/nx disabled by firmware).
    public var flags: Set<String>
    /// The `vmx flags` line (Linux ≥ 5.8, only when VMX is usable); nil when absent.
    public var vmxFlags: Set<String>?

    public init(flags: Set<String>, vmxFlags: Set<String>?) {
        self.flags = flags
        self.vmxFlags = vmxFlags
    }

    public init(parsing text: String) {
        var flags: Set<String>?
        var vmxFlags: Set<String>?
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let key = String(line[..<colon]).trimmingWhitespace()
            let values = Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
            // Only the first processor counts: a later, different line would mean a hybrid
            // system the kernel itself treats by the boot CPU.
            if key == "flags", flags == nil { flags = values }
            if key == "vmx flags", vmxFlags == nil { vmxFlags = values }
        }
        self.init(flags: flags ?? [], vmxFlags: vmxFlags)
    }
}

/// Who is running the check, for explaining a permission failure on `/dev/kvm`.
public struct CallerIdentity: Hashable, Sendable {
    public struct Group: Hashable, Sendable {
        public var name: String
        public var id: UInt32
        public var members: [String]

        public init(name: String, id: UInt32, members: [String]) {
            self.name = name
            self.id = id
            self.members = members
        }
    }

    /// Real uid; nil when `/proc/self/status` was unreadable.
    public var uid: UInt32?
    /// Primary and supplementary groups of this process (what the kernel checks).
    public var groupIDs: [UInt32]
    public var userName: String?
    /// `/etc/group`; empty when unreadable.
    public var groups: [Group]

    public init(uid: UInt32?, groupIDs: [UInt32], userName: String?, groups: [Group]) {
        self.uid = uid
        self.groupIDs = groupIDs
        self.userName = userName
        self.groups = groups
    }

    public init(processStatus: String?, passwd: String?, group: String?) {
        var uid: UInt32?
        var groupIDs: [UInt32] = []
        for line in (processStatus ?? "").split(separator: "\n") {
            let fields = line.split(whereSeparator: { $0 == "\t" || $0 == " " })
            guard let key = fields.first else { continue }
            switch key {
            case "Uid:": uid = fields.dropFirst().first.flatMap { UInt32($0) }
            case "Gid:": groupIDs += fields.dropFirst().prefix(1).compactMap { UInt32($0) }
            case "Groups:": groupIDs += fields.dropFirst().compactMap { UInt32($0) }
            default: break
            }
        }
        var userName: String?
        for line in (passwd ?? "").split(separator: "\n") {
            let fields = line.split(separator: ":", omittingEmptySubsequences: false)
            if fields.count > 2, let id = UInt32(fields[2]), id == uid { userName = String(fields[0]) }
        }
        var groups: [Group] = []
        for line in (group ?? "").split(separator: "\n") {
            let fields = line.split(separator: ":", omittingEmptySubsequences: false)
            guard fields.count > 3, let id = UInt32(fields[2]) else { continue }
            groups.append(Group(name: String(fields[0]), id: id, members: fields[3].split(separator: ",").map(String.init)))
        }
        self.init(uid: uid, groupIDs: Array(Set(groupIDs)).sorted(), userName: userName, groups: groups)
    }

    public func group(id: UInt32) -> Group? { groups.first { $0.id == id } }
    public func group(named name: String) -> Group? { groups.first { $0.name == name } }
}

extension StringProtocol {
    func trimmingWhitespace() -> String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else {
            return ""
        }
        return String(self[first...last])
    }
}
