/// The four registers one CPUID leaf returns.
public struct CPUIDRegisters: Hashable, Sendable {
    public var eax, ebx, ecx, edx: UInt32

    public init(eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    public static let zero = CPUIDRegisters(eax: 0, ebx: 0, ecx: 0, edx: 0)
}

/// A CPUID leaf and subleaf.
public struct CPUIDLeaf: Hashable, Sendable, Comparable {
    public var leaf, subleaf: UInt32

    public init(_ leaf: UInt32, _ subleaf: UInt32 = 0) {
        self.leaf = leaf
        self.subleaf = subleaf
    }

    public static func < (lhs: CPUIDLeaf, rhs: CPUIDLeaf) -> Bool {
        (lhs.leaf, lhs.subleaf) < (rhs.leaf, rhs.subleaf)
    }

    static let vendor = CPUIDLeaf(0x0)
    static let features = CPUIDLeaf(0x1)
    static let hypervisor = CPUIDLeaf(0x4000_0000)
    static let extendedMax = CPUIDLeaf(0x8000_0000)
    static let extendedFeatures = CPUIDLeaf(0x8000_0001)
    static let svmFeatures = CPUIDLeaf(0x8000_000A)

    /// Every leaf the check reads; the recorder stores exactly these.
    public static let probed: [CPUIDLeaf] = [vendor, features, hypervisor, extendedMax, extendedFeatures, svmFeatures]
}

public enum CPUVendor: Hashable, Sendable {
    case intel
    /// AMD and Hygon: both implement SVM the same way.
    case amd
    case other(String)
}

/// What raw CPUID says about the silicon (or about what a hypervisor chose to show us).
///
/// Raw CPUID, not `/proc/cpuinfo`, answers "does the CPU have it": the kernel clears `vmx`/`svm`
/// from cpuinfo when the firmware disabled them, which is a different question.
public struct CPUIDFacts: Hashable, Sendable {
    public var vendor: CPUVendor
    /// CPUID.1:ECX[5].
    public var hasVMX: Bool
    /// CPUID.80000001h:ECX[2].
    public var hasSVM: Bool
    /// CPUID.80000001h:EDX[20] (Intel XD / AMD NX).
    public var hasNX: Bool
    /// CPUID.8000000Ah:EDX[0]; only defined when SVM is present.
    public var hasNPT: Bool
    /// CPUID.1:ECX[31]: set by every mainstream hypervisor for its guests.
    public var runsUnderHypervisor: Bool
    /// The 12-byte signature at CPUID.40000000h (EBX, ECX, EDX), e.g. "KVMKVMKVM".
    public var hypervisorSignature: String?

    public init(
        vendor: CPUVendor, hasVMX: Bool, hasSVM: Bool, hasNX: Bool, hasNPT: Bool,
        runsUnderHypervisor: Bool, hypervisorSignature: String?
    ) {
        self.vendor = vendor
        self.hasVMX = hasVMX
        self.hasSVM = hasSVM
        self.hasNX = hasNX
        self.hasNPT = hasNPT
        self.runsUnderHypervisor = runsUnderHypervisor
        self.hypervisorSignature = hypervisorSignature
    }

    /// Decodes the facts from a CPUID function; leaves above the reported maxima are not read.
    public init(cpuid: (CPUIDLeaf) -> CPUIDRegisters) {
        let leaf0 = cpuid(.vendor)
        let vendorName = Self.text(leaf0.ebx, leaf0.edx, leaf0.ecx)
        switch vendorName {
        case "GenuineIntel": vendor = .intel
        case "AuthenticAMD", "HygonGenuine": vendor = .amd
        default: vendor = .other(vendorName)
        }
        let basic = leaf0.eax >= 1 ? cpuid(.features) : .zero
        hasVMX = basic.ecx & (1 << 5) != 0
        runsUnderHypervisor = basic.ecx & (1 << 31) != 0

        let extendedMax = cpuid(.extendedMax).eax
        let extended = extendedMax >= 0x8000_0001 ? cpuid(.extendedFeatures) : .zero
        hasSVM = extended.ecx & (1 << 2) != 0
        hasNX = extended.edx & (1 << 20) != 0
        hasNPT = hasSVM && extendedMax >= 0x8000_000A && cpuid(.svmFeatures).edx & 1 != 0

        if runsUnderHypervisor {
            let leaf = cpuid(.hypervisor)
            let signature = Self.text(leaf.ebx, leaf.ecx, leaf.edx)
            hypervisorSignature = signature.isEmpty ? nil : signature
        } else {
            hypervisorSignature = nil
        }
    }

    /// Registers as little-endian ASCII, NULs dropped ("KVMKVMKVM\0\0\0" → "KVMKVMKVM").
    private static func text(_ registers: UInt32...) -> String {
        var bytes: [UInt8] = []
        for register in registers {
            for shift in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: register >> shift)) }
        }
        return String(decoding: bytes.filter { $0 != 0 }, as: UTF8.self)
    }

    /// A readable name for a hypervisor signature (systemd's table, src/basic/virt.c).
    public static func hypervisorName(forSignature signature: String) -> String {
        switch signature {
        case "KVMKVMKVM", "Linux KVM Hv": return "KVM"
        case "TCGTCGTCGTCG": return "QEMU TCG"
        case "Microsoft Hv": return "Hyper-V"
        case "VMwareVMware": return "VMware"
        case "XenVMMXenVMM": return "Xen"
        case "VBoxVBoxVBox": return "VirtualBox"
        case "bhyve bhyve ": return "bhyve"
        case "ACRNACRNACRN": return "ACRN"
        default: return "an unknown hypervisor"
        }
    }
}
