/// How each vCPU is prepared for a Linux guest (and for the test guests, which need a subset):
/// the CPUID table it sees, the MSRs a VMM must initialise, the FPU control words, and the boot
/// CPU's LAPIC local-interrupt pins.
public enum CPUSetup {
    // MARK: CPUID

    /// KVM's paravirtual leaves (Documentation/virt/kvm/x86/cpuid.rst).
    public static let kvmSignatureLeaf: UInt32 = 0x4000_0000
    public static let kvmFeaturesLeaf: UInt32 = 0x4000_0001
    /// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
    public static let kvmSignature: (ebx: UInt32, ecx: UInt32, edx: UInt32) = (0x4B4D_564B, 0x564B_4D56, 0x0000_004D)

    /// The supported table adjusted for a Linux guest, before per-vCPU values are filled in:
    /// the hypervisor bit set, and KVM's signature and feature leaves present (KVM reports them;
    /// they are added if a host's table lacks them, with kvmclock as the one feature assumed).
    public static func prepare(_ supported: CPUIDTable) -> CPUIDTable {
        var table = supported
        table.update(function: 1) { $0.ecx |= 1 << 31 } // running under a hypervisor
        if table.entry(function: kvmSignatureLeaf) == nil {
            table.entries.append(.init(function: kvmSignatureLeaf, eax: kvmFeaturesLeaf, ebx: kvmSignature.ebx,
                                       ecx: kvmSignature.ecx, edx: kvmSignature.edx))
        } else {
            table.update(function: kvmSignatureLeaf) { entry in
                entry.eax = max(entry.eax, kvmFeaturesLeaf)
                (entry.ebx, entry.ecx, entry.edx) = kvmSignature
            }
        }
        if table.entry(function: kvmFeaturesLeaf) == nil {
            // KVM_FEATURE_CLOCKSOURCE2 (bit 3): the kvmclock MSRs at 0x4b564d00/01.
            table.entries.append(.init(function: kvmFeaturesLeaf, eax: 1 << 3))
        }
        return table
    }

    /// Fills in the topology leaves 0xB and 0x1F for `count` vCPUs in one package, one thread per
    /// core: subleaf 0 is the SMT level (1 thread, shift 0), subleaf 1 the core level (`count`
    /// logical CPUs, shift = bits needed for the APIC IDs), subleaf 2 invalid. EDX = x2APIC ID.
    public static func topology(_ table: inout CPUIDTable, vcpu id: UInt32, count: UInt32) {
        let shift = UInt32(count <= 1 ? 0 : (32 - (count - 1).leadingZeroBitCount))
        for leaf: UInt32 in [0xB, 0x1F] where table.entries.contains(where: { $0.function == leaf }) {
            let flags = table.entries.first { $0.function == leaf }?.flags ?? 1
            table.entries.removeAll { $0.function == leaf }
            table.entries.append(.init(function: leaf, index: 0, flags: flags, eax: 0, ebx: 1, ecx: 1 << 8, edx: id))
            table.entries.append(.init(function: leaf, index: 1, flags: flags, eax: shift, ebx: count, ecx: (2 << 8) | 1, edx: id))
            table.entries.append(.init(function: leaf, index: 2, flags: flags, eax: 0, ebx: 0, ecx: 2, edx: id))
        }
        // Leaf 4: cores per package − 1 in EAX[31:26], for each cache subleaf.
        table.update(function: 4) { entry in
            guard entry.eax & 0x1F != 0 else { return }
            entry.eax = (entry.eax & 0x03FF_FFFF) | ((min(count, 64) - 1) << 26)
        }
    }

    // MARK: MSRs

    /// MSRs given a defined value before the first KVM_RUN, as other VMMs do: the SYSCALL/SYSENTER
    /// entry points zeroed (the kernel programs them), fast strings on, and the MTRRs enabled with
    /// write-back as the default type so the guest does not run everything uncached.
    public static let bootMSRs: [(index: UInt32, value: UInt64)] = [
        (0x174, 0),                    // IA32_SYSENTER_CS
        (0x175, 0),                    // IA32_SYSENTER_ESP
        (0x176, 0),                    // IA32_SYSENTER_EIP
        (0xC000_0081, 0),              // STAR
        (0xC000_0082, 0),              // LSTAR
        (0xC000_0083, 0),              // CSTAR
        (0xC000_0084, 0),              // SYSCALL_MASK (FMASK)
        (0xC000_0102, 0),              // KERNEL_GS_BASE
        (0x1A0, 1),                    // IA32_MISC_ENABLE: fast-string operations
        (0x2FF, (1 << 11) | 6),        // IA32_MTRR_DEF_TYPE: MTRRs enabled, default write-back
    ]

    /// Sets ``bootMSRs``; an MSR this KVM refuses is skipped (it then keeps KVM's reset value).
    /// Returns the indices that were refused.
    @discardableResult
    public static func setBootMSRs(_ vcpu: VCPU) -> [UInt32] {
        var refused: [UInt32] = []
        for msr in bootMSRs {
            do { try vcpu.setModelSpecificRegisters([msr]) } catch { refused.append(msr.index) }
        }
        return refused
    }

    // MARK: FPU

    /// x87 control word after FNINIT (all exceptions masked, extended precision) and MXCSR after
    /// reset (all SSE exceptions masked): what firmware leaves and what Linux expects to find.
    public static let fpuControlWord: UInt16 = 0x37F
    public static let mxcsr: UInt32 = 0x1F80
    /// Offsets in `struct kvm_fpu`: fpr[8][16], then fcw; mxcsr follows xmm[16][16].
    static let fcwOffset = 128
    static let mxcsrOffset = 408

    public static func setFPU(_ vcpu: VCPU) throws(KVMError) {
        var fpu = try vcpu.opaqueState(.fpu)
        guard fpu.count >= mxcsrOffset + 4 else { return }
        fpu.put(fpuControlWord, at: fcwOffset)
        fpu.put(mxcsr, at: mxcsrOffset)
        try vcpu.setOpaqueState(.fpu, fpu)
    }

    // MARK: LAPIC

    /// LAPIC register offsets (in the 1 KiB `kvm_lapic_state` page) and LVT delivery modes.
    static let lvtLINT0 = 0x350
    static let lvtLINT1 = 0x360
    static let deliveryModeMask: UInt32 = 0x700
    static let deliveryNMI: UInt32 = 0x400
    static let deliveryExtINT: UInt32 = 0x700
    static let lvtMasked: UInt32 = 1 << 16

    /// Virtual-wire mode on the boot CPU, as a PC BIOS leaves it: the 8259 PIC's output arrives on
    /// LINT0 as ExtINT and NMIs on LINT1, both unmasked. Linux checks this wiring when it sets up
    /// its timer (and falls back to it when the IOAPIC path fails). APs are left in their reset
    /// state; Linux programs their LVTs itself.
    public static func setVirtualWire(_ vcpu: VCPU) throws(KVMError) {
        var lapic = try vcpu.opaqueState(.lapic)
        guard lapic.count >= lvtLINT1 + 4 else { return }
        func update(_ offset: Int, _ mode: UInt32) {
            let current = UInt32(lapic[offset]) | UInt32(lapic[offset + 1]) << 8 | UInt32(lapic[offset + 2]) << 16
                | UInt32(lapic[offset + 3]) << 24
            lapic.put((current & ~(deliveryModeMask | lvtMasked)) | mode, at: offset)
        }
        update(lvtLINT0, deliveryExtINT)
        update(lvtLINT1, deliveryNMI)
        try vcpu.setOpaqueState(.lapic, lapic)
    }

    /// Everything above for one vCPU, after its CPUID is set. `isBoot` selects the LAPIC wiring.
    public static func configure(_ vcpu: VCPU, isBoot: Bool) throws(KVMError) {
        setBootMSRs(vcpu)
        try setFPU(vcpu)
        if isBoot {
            // Without the in-kernel irqchip there is no LAPIC to program (KVM_GET_LAPIC fails
            // with ENXIO) and nothing to wire; with it, this does not fail.
            try? setVirtualWire(vcpu)
        }
    }
}

/// A user-settable CPUID policy: features to hide from (or force on for) the guest, applied to
/// every vCPU's table after KVM's supported set is fetched. Hiding is the useful direction (a
/// feature the host's KVM cannot virtualise well, or for migration compatibility); note that
/// PVM-nested hosts show the guest host-derived leaf 1/7 bits whatever the table says.
public struct CPUIDPolicy: Sendable, Equatable {
    public enum Register: String, Sendable, CaseIterable { case eax, ebx, ecx, edx }

    public struct Bit: Sendable, Equatable, CustomStringConvertible {
        public var leaf: UInt32
        public var subleaf: UInt32
        public var register: Register
        public var bit: Int
        public init(leaf: UInt32, subleaf: UInt32 = 0, register: Register, bit: Int) {
            self.leaf = leaf
            self.subleaf = subleaf
            self.register = register
            self.bit = bit
        }
        public var description: String {
            "0x\(String(leaf, radix: 16))" + (subleaf != 0 ? ".\(subleaf)" : "") + ":\(register.rawValue):\(bit)"
        }
    }

    /// Names accepted by ``parse(_:)`` for common features.
    public static let namedFeatures: [String: Bit] = [
        "x2apic": Bit(leaf: 1, register: .ecx, bit: 21),
        "tsc-deadline": Bit(leaf: 1, register: .ecx, bit: 24),
        "xsave": Bit(leaf: 1, register: .ecx, bit: 26),
        "avx": Bit(leaf: 1, register: .ecx, bit: 28),
        "cx16": Bit(leaf: 1, register: .ecx, bit: 13),
        "hypervisor": Bit(leaf: 1, register: .ecx, bit: 31),
        "pdpe1gb": Bit(leaf: 0x8000_0001, register: .edx, bit: 26),
        "rdtscp": Bit(leaf: 0x8000_0001, register: .edx, bit: 27),
        "kvmclock": Bit(leaf: 0x4000_0001, register: .eax, bit: 3),
        "kvm-pv-eoi": Bit(leaf: 0x4000_0001, register: .eax, bit: 6),
        "kvm-pv-unhalt": Bit(leaf: 0x4000_0001, register: .eax, bit: 7),
        "kvm-steal-time": Bit(leaf: 0x4000_0001, register: .eax, bit: 5),
        "kvm-async-pf": Bit(leaf: 0x4000_0001, register: .eax, bit: 4),
        "kvm-pv-send-ipi": Bit(leaf: 0x4000_0001, register: .eax, bit: 11),
        "kvm-pv-sched-yield": Bit(leaf: 0x4000_0001, register: .eax, bit: 13),
    ]

    public var hidden: [Bit] = []
    public var forced: [Bit] = []

    public init(hidden: [Bit] = [], forced: [Bit] = []) {
        self.hidden = hidden
        self.forced = forced
    }

    /// Parses a comma-separated list: `-name` or `name` hides a feature, `+name` forces it on;
    /// a name is one of ``namedFeatures`` or `LEAF[.SUBLEAF]:REGISTER:BIT` (numbers in decimal or 0x hex).
    public static func parse(_ text: String) throws(CPUIDPolicyError) -> CPUIDPolicy {
        var policy = CPUIDPolicy()
        for item in text.split(separator: ",").map({ $0.trimmingSpaces }) where !item.isEmpty {
            var name = Substring(item)
            var force = false
            if name.first == "+" { force = true; name = name.dropFirst() } else if name.first == "-" { name = name.dropFirst() }
            let bit: Bit
            if let named = namedFeatures[String(name)] {
                bit = named
            } else {
                let parts = name.split(separator: ":")
                guard parts.count == 3, let register = Register(rawValue: String(parts[1]).lowercased()),
                      let bitNumber = Int(parts[2]), (0..<32).contains(bitNumber) else {
                    throw CPUIDPolicyError(item: item)
                }
                let leafParts = parts[0].split(separator: ".")
                guard (1...2).contains(leafParts.count), let leaf = parseNumber(leafParts[0]),
                      let subleaf = leafParts.count == 2 ? parseNumber(leafParts[1]) : 0 else {
                    throw CPUIDPolicyError(item: item)
                }
                bit = Bit(leaf: leaf, subleaf: subleaf, register: register, bit: bitNumber)
            }
            if force { policy.forced.append(bit) } else { policy.hidden.append(bit) }
        }
        return policy
    }

    private static func parseNumber(_ text: Substring) -> UInt32? {
        text.hasPrefix("0x") ? UInt32(text.dropFirst(2), radix: 16) : UInt32(text)
    }

    /// Applies the policy to a table (usable as ``MachineConfiguration/cpuidPolicy``).
    public func apply(to table: inout CPUIDTable) {
        for (bits, set) in [(hidden, false), (forced, true)] {
            for bit in bits {
                for index in table.entries.indices where table.entries[index].function == bit.leaf
                    && (table.entries[index].flags & 1 == 0 || table.entries[index].index == bit.subleaf) {
                    let mask = UInt32(1) << UInt32(bit.bit)
                    func change(_ value: inout UInt32) { value = set ? value | mask : value & ~mask }
                    switch bit.register {
                    case .eax: change(&table.entries[index].eax)
                    case .ebx: change(&table.entries[index].ebx)
                    case .ecx: change(&table.entries[index].ecx)
                    case .edx: change(&table.entries[index].edx)
                    }
                }
            }
        }
    }
}

public struct CPUIDPolicyError: Error, Sendable, Equatable, CustomStringConvertible {
    public let item: String
    public var description: String {
        "unknown CPUID feature \"\(item)\": use one of \(CPUIDPolicy.namedFeatures.keys.sorted().joined(separator: ", ")) or LEAF[.SUBLEAF]:REGISTER:BIT (e.g. 0x1:ecx:21)"
    }
}

private extension Substring {
    var trimmingSpaces: String {
        String(drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
