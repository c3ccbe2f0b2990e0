/// CPU and firmware layers: what the silicon offers and whether the firmware let the OS have it.
extension HostCheck {
    static func cpuChecks(_ context: Context) -> [CheckResult] {
        guard let cpu = context.cpu else {
            return [CheckResult("cpu.virtualization", .warn, "CPUID is not available; the CPU cannot be inspected")]
        }
        return [virtualizationExtensions(cpu, context), executeDisable(cpu, context), hypervisor(cpu)]
    }

    private static func virtualizationExtensions(_ cpu: CPUIDFacts, _ context: Context) -> CheckResult {
        let name = "cpu.virtualization"
        if cpu.hasVMX { return CheckResult(name, .pass, "Intel VT-x (VMX) in CPUID") }
        if cpu.hasSVM { return CheckResult(name, .pass, "AMD-V (SVM) in CPUID") }
        if context.backend == .pvm {
            // Not a failure: PVM exists precisely to run KVM without VT-x/AMD-V.
            return CheckResult(name, .warn, "no VT-x/AMD-V in CPUID; the kvm_pvm backend does not need them")
        }
        if cpu.runsUnderHypervisor {
            let host = CPUIDFacts.hypervisorName(forSignature: cpu.hypervisorSignature ?? "")
            return CheckResult(
                name, .fail, "no VT-x/AMD-V in CPUID: \(host) does not expose them to this guest",
                hint: "enable nested virtualization on the outer host (e.g. kvm_intel nested=1 and -cpu host), or use a kernel with the kvm_pvm module")
        }
        return CheckResult(
            name, .fail, "this CPU has neither Intel VT-x nor AMD-V",
            hint: "hvrun needs a CPU with hardware virtualization, or a host kernel with the kvm_pvm module")
    }

    /// KVM refuses to load without NX (arch/x86/kvm/x86.c: "NX (Execute Disable) not supported").
    private static func executeDisable(_ cpu: CPUIDFacts, _ context: Context) -> CheckResult {
        let name = "cpu.nx"
        let hint = "enable the Execute Disable Bit (Intel XD / AMD NX) in the firmware setup"
        guard cpu.hasNX else { return CheckResult(name, .fail, "no NX/XD (execute disable) in CPUID; KVM requires it", hint: hint) }
        if let cpuinfo = context.cpuinfo, !cpuinfo.flags.contains("nx") {
            return CheckResult(name, .fail, "NX/XD is in CPUID but the kernel does not list nx: disabled", hint: hint)
        }
        return CheckResult(name, .pass, "NX/XD (execute disable) available")
    }

    private static func hypervisor(_ cpu: CPUIDFacts) -> CheckResult {
        let name = "cpu.hypervisor"
        guard cpu.runsUnderHypervisor else { return CheckResult(name, .pass, "no hypervisor bit: bare metal") }
        let signature = cpu.hypervisorSignature ?? ""
        let host = CPUIDFacts.hypervisorName(forSignature: signature)
        return CheckResult(
            name, .warn, "running under \(host) (signature \"\(signature)\"): nested virtualization",
            hint: "guests run nested: VM exits cost more and features depend on the outer hypervisor; for full speed use bare metal")
    }

    static func firmwareChecks(_ context: Context) -> [CheckResult] {
        guard let cpu = context.cpu else { return [] }
        if cpu.hasVMX { return [intelFirmware(context)] }
        if cpu.hasSVM { return [amdFirmware(context)] }
        return []
    }

    private static func intelFirmware(_ context: Context) -> CheckResult {
        let name = "firmware.virtualization"
        let hint = "enable Intel VT-x (Virtualization Technology) in the firmware setup, then power the machine off and on; a reboot does not reload the lock"
        switch context.facts.featureControl {
        case .success(let value):
            let locked = value & (1 << 0) != 0
            let vmxOutsideSMX = value & (1 << 2) != 0
            if !locked { return CheckResult(name, .pass, "IA32_FEATURE_CONTROL is unlocked; the kernel enables VMX itself") }
            if vmxOutsideSMX { return CheckResult(name, .pass, "VT-x enabled in firmware (IA32_FEATURE_CONTROL locked, VMX on)") }
            return CheckResult(
                name, .fail, "VT-x is disabled in firmware (IA32_FEATURE_CONTROL locked with VMX outside SMX off)", hint: hint)
        case .failure(let error):
            // Without the MSR, the kernel's own decision shows: it drops `vmx` from cpuinfo when
            // the firmware locked VMX off (arch/x86/kernel/cpu/feat_ctl.c).
            guard let cpuinfo = context.cpuinfo else {
                return CheckResult(
                    name, .warn, "cannot tell: MSR 0x3A unreadable (\(error)) and /proc/cpuinfo unreadable",
                    hint: "run as root with the msr module loaded (sudo modprobe msr)")
            }
            if cpuinfo.flags.contains("vmx") { return CheckResult(name, .pass, "VT-x enabled (the kernel lists vmx)") }
            return CheckResult(name, .fail, "VT-x is in CPUID but the kernel cleared the vmx flag: disabled in firmware", hint: hint)
        }
    }

    private static func amdFirmware(_ context: Context) -> CheckResult {
        let name = "firmware.virtualization"
        let hint = "enable SVM Mode (AMD-V) in the firmware setup, then power the machine off and on"
        switch context.facts.amdVMCR {
        case .success(let value):
            if value & (1 << 4) != 0 { return CheckResult(name, .fail, "AMD-V is disabled in firmware (VM_CR.SVMDIS set)", hint: hint) }
            return CheckResult(name, .pass, "AMD-V enabled (VM_CR.SVMDIS clear)")
        case .failure(let error):
            guard let cpuinfo = context.cpuinfo else {
                return CheckResult(
                    name, .warn, "cannot tell: MSR 0xC0010114 unreadable (\(error)) and /proc/cpuinfo unreadable",
                    hint: "run as root with the msr module loaded (sudo modprobe msr)")
            }
            if cpuinfo.flags.contains("svm") { return CheckResult(name, .pass, "AMD-V enabled (the kernel lists svm)") }
            return CheckResult(name, .fail, "AMD-V is in CPUID but the kernel cleared the svm flag: disabled in firmware", hint: hint)
        }
    }
}
