/// Kernel layer: which KVM modules `/sys/module` shows, and what backend that means.
extension HostCheck {
    static func kernelChecks(_ context: Context) -> [CheckResult] {
        let name = "kernel.modules"
        guard case .success(let modules) = context.facts.kvmModules else {
            if case .failure(let error) = context.facts.kvmModules {
                return [CheckResult(name, .warn, "cannot read /sys/module (\(error)); loaded KVM modules unknown")]
            }
            return []
        }
        guard let backend = context.backend else {
            let loaded = modules["kvm"] != nil ? "kvm is loaded but no vendor module" : "no KVM module is loaded"
            if let expected = context.expectedHardwareModule {
                return [
                    CheckResult(
                        name, .fail, "\(loaded): \(expected.rawValue) is missing",
                        hint: "sudo modprobe \(expected.rawValue) (if it refuses to load, enable virtualization in the firmware setup)")
                ]
            }
            return [
                CheckResult(
                    name, .fail, "\(loaded) (kvm_intel, kvm_amd or kvm_pvm)",
                    hint: "without VT-x/AMD-V only a kernel with the kvm_pvm module can provide KVM: sudo modprobe kvm_pvm")
            ]
        }
        let loaded = HostPaths.kvmModules.filter { modules[$0] != nil }.joined(separator: ", ")
        return [CheckResult(name, .pass, "loaded: \(loaded)"), backendCheck(backend)]
    }

    private static func backendCheck(_ backend: KVMBackend) -> CheckResult {
        let name = "kernel.backend"
        guard backend == .pvm else { return CheckResult(name, .pass, backend.summary) }
        return CheckResult(
            name, .warn,
            "backend is PVM (kvm_pvm): KVM without VT-x/AMD-V, typically nested; guest kernel code runs in KVM's instruction emulator and memory uses shadow paging",
            hint: "fine for small test guests; unmodified OS kernels need a PVM-aware guest kernel; for full speed use a host with VT-x/AMD-V")
    }
}
