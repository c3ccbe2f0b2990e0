internal import CKVM

/// A `KVM_CAP_*` the host check asks about, and how much hvrun depends on it.
public struct KVMCapabilityRequirement: Hashable, Sendable {
    public enum Level: Hashable, Sendable {
        /// hvrun cannot build a machine without it: FAIL when absent.
        case required
        /// hvrun works around its absence at some cost: WARN when absent.
        case recommended
        /// Reported only (limits and sizes).
        case informational
    }

    /// The name without the `KVM_CAP_` prefix, as fixtures and JSON spell it.
    public let name: String
    public let number: Int32
    public let level: Level
    /// What hvrun uses it for; shown when it is missing.
    public let purpose: String
}

/// The capabilities hvrun cares about. Required follows Firecracker's and QEMU's x86 lists plus
/// IMMEDIATE_EXIT, which our vCPU kick relies on.
public enum KVMCapabilityCatalog {
    public static let all: [KVMCapabilityRequirement] = [
        .init(name: "IRQCHIP", number: KVM_CAP_IRQCHIP, level: .required, purpose: "in-kernel PIC/IOAPIC/LAPIC"),
        .init(name: "USER_MEMORY", number: KVM_CAP_USER_MEMORY, level: .required, purpose: "guest memory slots"),
        .init(name: "SET_TSS_ADDR", number: KVM_CAP_SET_TSS_ADDR, level: .required, purpose: "VMX real-mode TSS"),
        .init(name: "PIT2", number: KVM_CAP_PIT2, level: .required, purpose: "in-kernel PIT"),
        .init(name: "IOEVENTFD", number: KVM_CAP_IOEVENTFD, level: .required, purpose: "exit-free device notifications"),
        .init(name: "IRQFD", number: KVM_CAP_IRQFD, level: .required, purpose: "interrupts from device threads"),
        .init(name: "IRQ_ROUTING", number: KVM_CAP_IRQ_ROUTING, level: .required, purpose: "MSI routing"),
        .init(name: "IMMEDIATE_EXIT", number: KVM_CAP_IMMEDIATE_EXIT, level: .required, purpose: "race-free vCPU kicks"),
        .init(name: "EXT_CPUID", number: KVM_CAP_EXT_CPUID, level: .required, purpose: "KVM_SET_CPUID2"),
        .init(name: "MP_STATE", number: KVM_CAP_MP_STATE, level: .required, purpose: "SMP bring-up"),
        .init(name: "SIGNAL_MSI", number: KVM_CAP_SIGNAL_MSI, level: .required, purpose: "MSI injection"),
        .init(name: "READONLY_MEM", number: KVM_CAP_READONLY_MEM, level: .recommended, purpose: "ROM slots without MMIO emulation"),
        .init(name: "XSAVE", number: KVM_CAP_XSAVE, level: .recommended, purpose: "saving AVX state"),
        .init(name: "XCRS", number: KVM_CAP_XCRS, level: .recommended, purpose: "saving XCR0"),
        .init(name: "VCPU_EVENTS", number: KVM_CAP_VCPU_EVENTS, level: .recommended, purpose: "pending-event save/restore"),
        .init(name: "ADJUST_CLOCK", number: KVM_CAP_ADJUST_CLOCK, level: .recommended, purpose: "kvmclock save/restore"),
        .init(name: "DEBUGREGS", number: KVM_CAP_DEBUGREGS, level: .recommended, purpose: "debug register save/restore"),
        .init(name: "PIT_STATE2", number: KVM_CAP_PIT_STATE2, level: .recommended, purpose: "PIT save/restore"),
        .init(name: "SET_IDENTITY_MAP_ADDR", number: KVM_CAP_SET_IDENTITY_MAP_ADDR, level: .recommended, purpose: "placing the EPT identity map"),
        .init(name: "TSC_DEADLINE_TIMER", number: KVM_CAP_TSC_DEADLINE_TIMER, level: .recommended, purpose: "TSC-deadline LAPIC timer"),
        .init(name: "NR_VCPUS", number: KVM_CAP_NR_VCPUS, level: .informational, purpose: "recommended vCPU count"),
        .init(name: "MAX_VCPUS", number: KVM_CAP_MAX_VCPUS, level: .informational, purpose: "maximum vCPU count"),
        .init(name: "NR_MEMSLOTS", number: KVM_CAP_NR_MEMSLOTS, level: .informational, purpose: "memory slot count"),
        .init(name: "NESTED_STATE", number: KVM_CAP_NESTED_STATE, level: .informational, purpose: "nested state size"),
    ]

    public static func requirement(named name: String) -> KVMCapabilityRequirement? {
        all.first { $0.name == name }
    }
}
