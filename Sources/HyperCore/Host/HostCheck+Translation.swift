/// Second-level address translation and the VMX features that decide guest speed.
/// Their absence never stops KVM, so these checks WARN at worst.
extension HostCheck {
    /// A VMX secondary control and where each fallback source names it.
    struct VMXFeature {
        let title: String
        /// Bit in the secondary processor-based controls; MSR 0x48B reports it at bit 32 + n.
        let controlBit: UInt64
        let cpuinfoName: String
        /// Older kernels (before the `vmx flags` line) listed some features in `flags` itself.
        let legacyFlag: Bool
        let kvmIntelParameter: String

        static let ept = VMXFeature(title: "EPT", controlBit: 1, cpuinfoName: "ept", legacyFlag: true, kvmIntelParameter: "ept")
        static let vpid = VMXFeature(title: "VPID", controlBit: 5, cpuinfoName: "vpid", legacyFlag: true, kvmIntelParameter: "vpid")
        static let unrestrictedGuest = VMXFeature(
            title: "unrestricted guest", controlBit: 7, cpuinfoName: "unrestricted_guest", legacyFlag: false,
            kvmIntelParameter: "unrestricted_guest")
    }

    struct Finding {
        /// nil: no source could tell.
        let present: Bool?
        let source: String
    }

    /// MSR first (the hardware's own answer), then the kernel's cpuinfo, then what kvm_intel
    /// chose; each later source is weaker, so the detail line names the one used.
    static func find(_ feature: VMXFeature, _ context: Context) -> Finding {
        if case .success(let value) = context.facts.vmxSecondaryControls {
            return Finding(present: value & (1 << (32 + feature.controlBit)) != 0, source: "MSR 0x48B")
        }
        if let cpuinfo = context.cpuinfo {
            if let vmxFlags = cpuinfo.vmxFlags {
                return Finding(present: vmxFlags.contains(feature.cpuinfoName), source: "/proc/cpuinfo vmx flags")
            }
            if feature.legacyFlag && cpuinfo.flags.contains("vmx") {
                return Finding(present: cpuinfo.flags.contains(feature.cpuinfoName), source: "/proc/cpuinfo flags")
            }
        }
        if let value = context.moduleParameter("kvm_intel", feature.kvmIntelParameter) {
            return Finding(present: value.isEnabledParameter, source: "kvm_intel \(feature.kvmIntelParameter)=\(value)")
        }
        var reasons: [String] = []
        if case .failure(let error) = context.facts.vmxSecondaryControls { reasons.append("MSR 0x48B unreadable (\(error))") }
        reasons.append(context.cpuinfo == nil ? "/proc/cpuinfo unreadable" : "no vmx flags in /proc/cpuinfo")
        reasons.append("no kvm_intel parameters")
        return Finding(present: nil, source: reasons.joined(separator: ", "))
    }

    static func translationChecks(_ context: Context) -> [CheckResult] {
        if let cpu = context.cpu, cpu.hasVMX {
            return [
                vmxCheck("cpu.slat", .ept, context, consequence: "KVM falls back to shadow paging, which slows page-table-heavy guests"),
                vmxCheck("cpu.unrestricted_guest", .unrestrictedGuest, context, consequence: "KVM emulates real-mode guest code, which slows booting"),
                vmxCheck("cpu.vpid", .vpid, context, consequence: "the TLB is flushed on every VM exit"),
            ]
        }
        if let cpu = context.cpu, cpu.hasSVM { return [nestedPaging(cpu, context)] }
        // No hardware virtualization visible: only worth a line when some backend runs KVM anyway.
        if context.backend == .pvm {
            return [CheckResult("cpu.slat", .warn, "no EPT/NPT: the PVM backend always uses shadow paging (slower for page-table-heavy guests)")]
        }
        if context.backend != nil || context.deviceWorks {
            return [CheckResult("cpu.slat", .warn, "no EPT/NPT visible: KVM uses shadow paging (slower for page-table-heavy guests)")]
        }
        return []
    }

    private static func vmxCheck(_ name: String, _ feature: VMXFeature, _ context: Context, consequence: String) -> CheckResult {
        let finding = find(feature, context)
        switch finding.present {
        case nil:
            return CheckResult(
                name, .warn, "cannot tell whether \(feature.title) is available: \(finding.source)",
                hint: "run as root with the msr module loaded (sudo modprobe msr)")
        case false?:
            return CheckResult(name, .warn, "no \(feature.title) (\(finding.source)): \(consequence)")
        case true?:
            // The CPU has it, but kvm_intel may have been loaded with it turned off.
            if let value = context.moduleParameter("kvm_intel", feature.kvmIntelParameter), !value.isEnabledParameter {
                return CheckResult(
                    name, .warn, "\(feature.title) is available but kvm_intel has \(feature.kvmIntelParameter)=\(value): \(consequence)",
                    hint: "reload it: sudo modprobe -r kvm_intel && sudo modprobe kvm_intel \(feature.kvmIntelParameter)=1")
            }
            return CheckResult(name, .pass, "\(feature.title) available (\(finding.source))")
        }
    }

    private static func nestedPaging(_ cpu: CPUIDFacts, _ context: Context) -> CheckResult {
        let consequence = "KVM falls back to shadow paging, which slows page-table-heavy guests"
        guard cpu.hasNPT else { return CheckResult("cpu.slat", .warn, "no NPT in CPUID 0x8000000A: \(consequence)") }
        if let value = context.moduleParameter("kvm_amd", "npt"), !value.isEnabledParameter {
            return CheckResult(
                "cpu.slat", .warn, "NPT is available but kvm_amd has npt=\(value): \(consequence)",
                hint: "reload it: sudo modprobe -r kvm_amd && sudo modprobe kvm_amd npt=1")
        }
        return CheckResult("cpu.slat", .pass, "NPT available (CPUID 0x8000000A)")
    }
}
