/// The outcome of one check line.
public enum CheckStatus: String, Hashable, Sendable, Comparable {
    case pass = "PASS", warn = "WARN", fail = "FAIL"

    private var rank: Int { self == .pass ? 0 : self == .warn ? 1 : 2 }
    public static func < (lhs: CheckStatus, rhs: CheckStatus) -> Bool { lhs.rank < rhs.rank }
}

/// One line of `hvrun check`: a stable dotted name, a status, what was found, and what to do.
public struct CheckResult: Hashable, Sendable {
    public var name: String
    public var status: CheckStatus
    public var detail: String
    public var hint: String?

    public init(_ name: String, _ status: CheckStatus, _ detail: String, hint: String? = nil) {
        self.name = name
        self.status = status
        self.detail = detail
        self.hint = hint
    }
}

/// Whether hvrun can run VMs here. The exit status of `hvrun check` is ``exitStatus``.
public enum Verdict: String, Hashable, Sendable {
    /// `/dev/kvm` opens, speaks API 12, has every required capability and creates a VM and a vCPU.
    case usable
    /// A check of `/dev/kvm` failed for a known reason.
    case unusable
    /// The decisive facts could not be observed: `/dev/kvm` could not be stat'ed, or it is absent
    /// and nothing else about the host was readable (no CPUID, `/proc/cpuinfo` or `/sys/module`),
    /// which is what a restricted sandbox looks like, not a verdict on the host.
    case undetermined

    public var exitStatus: Int32 {
        switch self {
        case .usable: 0
        case .unusable: 1
        case .undetermined: 2
        }
    }
}

/// Which KVM implementation backs `/dev/kvm`, from the loaded vendor module.
public enum KVMBackend: String, Hashable, Sendable {
    case intelVMX = "kvm_intel", amdSVM = "kvm_amd", pvm = "kvm_pvm"

    public var summary: String {
        switch self {
        case .intelVMX: "kvm_intel (Intel VT-x)"
        case .amdSVM: "kvm_amd (AMD-V)"
        case .pvm: "kvm_pvm (PVM, software virtualization)"
        }
    }
}

/// The full result of a host check.
public struct HostReport: Hashable, Sendable {
    public var verdict: Verdict
    /// One sentence behind the verdict.
    public var reason: String
    public var checks: [CheckResult]
    public var backend: KVMBackend?
    /// True when this host is itself a guest (CPUID hypervisor bit); nil when CPUID was unavailable.
    public var nested: Bool?
    /// The hypervisor signature at CPUID 0x40000000, e.g. "KVMKVMKVM".
    public var hypervisorSignature: String?
    /// Every capability value that was read, by name.
    public var capabilities: [String: Int32]

    public var warningCount: Int { checks.count { $0.status == .warn } }
    public var failureCount: Int { checks.count { $0.status == .fail } }

    public func check(named name: String) -> CheckResult? { checks.first { $0.name == name } }
}
