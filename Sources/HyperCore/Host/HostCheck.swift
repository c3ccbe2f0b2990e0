/// The host capability check: a pure function from ``HostFacts`` to a ``HostReport``.
///
/// Layers run CPU → firmware → kernel module → `/dev/kvm` → KVM API. Only the `/dev/kvm` layers
/// decide the verdict: PVM hosts and some nested guests have no VT-x/AMD-V in CPUID yet run KVM
/// fine, which is exactly where kvm-ok goes wrong. The lower layers explain a failure and add
/// warnings; when the device works, none of them may FAIL.
public enum HostCheck {
    public static func evaluate(_ facts: HostFacts) -> HostReport {
        let context = Context(facts: facts)
        var checks = cpuChecks(context) + firmwareChecks(context) + translationChecks(context) + kernelChecks(context)
        let device = deviceChecks(context)

        let verdict: Verdict
        let reason: String
        if context.deviceWorks {
            verdict = .usable
            reason = "/dev/kvm works"
            // The device is the ground truth: a lower-layer problem is now a caveat, not a failure.
            checks = checks.map { check in
                guard check.status == .fail else { return check }
                var caveat = check
                caveat.status = .warn
                caveat.detail += "; /dev/kvm works regardless"
                return caveat
            }
        } else if case .failure(let error) = facts.device.node, error != .noSuchFile {
            verdict = .undetermined
            reason = "cannot inspect /dev/kvm (\(error))"
        } else if context.deviceIsAbsent && context.hostIsInvisible {
            verdict = .undetermined
            reason = "/dev/kvm is absent and CPUID, /proc/cpuinfo and /sys/module are all unavailable; run the check where the host is visible"
        } else {
            verdict = .unusable
            reason = device.first { $0.status == .fail }?.detail ?? "/dev/kvm does not work"
        }

        return HostReport(
            verdict: verdict, reason: reason, checks: checks + device, backend: context.backend,
            nested: facts.cpu?.runsUnderHypervisor, hypervisorSignature: facts.cpu?.hypervisorSignature,
            capabilities: facts.device.capabilities)
    }

    /// Facts derived once and shared by the layers.
    struct Context {
        let facts: HostFacts

        var cpu: CPUIDFacts? { facts.cpu }
        var cpuinfo: CPUInfo? { try? facts.cpuinfo.get() }
        var modules: [String: [String: String]]? { try? facts.kvmModules.get() }

        var backend: KVMBackend? {
            guard let modules else { return nil }
            // kvm_pvm cannot coexist with kvm_intel/kvm_amd; check it first all the same, since a
            // PVM host is the case that needs the explaining.
            return [KVMBackend.pvm, .intelVMX, .amdSVM].first { modules[$0.rawValue] != nil }
        }

        /// The vendor module this CPU would use, if it has hardware virtualization.
        var expectedHardwareModule: KVMBackend? {
            guard let cpu else { return nil }
            if cpu.hasVMX { return .intelVMX }
            if cpu.hasSVM { return .amdSVM }
            return nil
        }

        var deviceIsAbsent: Bool { facts.device.node == .failure(.noSuchFile) }

        /// Nothing but `/dev/kvm` could be observed.
        var hostIsInvisible: Bool {
            facts.cpu == nil && cpuinfo == nil && modules == nil
        }

        var missingRequiredCapabilities: [KVMCapabilityRequirement] {
            KVMCapabilityCatalog.all.filter { $0.level == .required && (facts.device.capabilities[$0.name] ?? 0) <= 0 }
        }

        /// The decisive fact: the device opens, speaks API 12, has what hvrun needs and makes a VM.
        var deviceWorks: Bool {
            let device = facts.device
            return device.open == .succeeded
                && device.apiVersion == .success(KVMDeviceFacts.expectedAPIVersion)
                && missingRequiredCapabilities.isEmpty
                && device.createVM == .succeeded
                && (device.createVCPU ?? .succeeded) == .succeeded
        }

        func moduleParameter(_ module: String, _ parameter: String) -> String? {
            modules?[module]?[parameter]
        }
    }
}

extension String {
    /// Module parameters are Y/N for bools and 1/0 for ints (`nested` on older kernels).
    var isEnabledParameter: Bool { self == "Y" || self == "y" || self == "1" }
}
