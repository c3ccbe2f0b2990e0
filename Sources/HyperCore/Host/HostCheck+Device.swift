/// Device and API layers: the ones that decide the verdict.
extension HostCheck {
    /// Each step runs only when the one before it succeeded, as the probe does.
    static func deviceChecks(_ context: Context) -> [CheckResult] {
        let device = context.facts.device
        let node: KVMDeviceFacts.Node
        switch device.node {
        case .failure(.noSuchFile):
            return [missingDevice(context)]
        case .failure(let error):
            return [CheckResult("device.node", .warn, "cannot stat /dev/kvm (\(error))", hint: "run the check as the user who will run hvrun")]
        case .success(let found):
            node = found
        }
        let owner = "owner \(context.facts.caller.describeUser(node.ownerUID)):\(context.facts.caller.describeGroup(node.groupID)), mode \(octal(node.mode))"
        guard node.type == .characterDevice else {
            return [
                CheckResult(
                    "device.node", .fail, "/dev/kvm is a \(node.type == .regularFile ? "regular file" : "\(node.type.rawValue)"), not a character device",
                    hint: "remove it (sudo rm /dev/kvm) and reload the KVM module so devtmpfs recreates it")
            ]
        }
        var checks: [CheckResult] = []
        if (node.major, node.minor) == (10, 232) {
            checks.append(CheckResult("device.node", .pass, "/dev/kvm is character device 10:232, \(owner)"))
        } else {
            checks.append(CheckResult("device.node", .warn, "/dev/kvm is character device \(node.major):\(node.minor), expected 10:232; \(owner)"))
        }

        guard let open = device.open else { return checks }
        if case .failed(let error) = open {
            checks.append(openFailure(error, node, context))
            return checks
        }
        checks.append(CheckResult("device.access", .pass, "/dev/kvm opens read/write for \(context.facts.caller.describeCaller())"))

        switch device.apiVersion {
        case nil: return checks
        case .failure(let error)?:
            checks.append(CheckResult("kvm.api_version", .fail, "KVM_GET_API_VERSION failed (\(error))", hint: "/dev/kvm is not KVM; check what driver owns 10:232"))
            return checks
        case .success(let version)? where version != KVMDeviceFacts.expectedAPIVersion:
            checks.append(
                CheckResult(
                    "kvm.api_version", .fail, "KVM API version \(version); hvrun needs \(KVMDeviceFacts.expectedAPIVersion)",
                    hint: "this kernel's KVM speaks a different ABI; use a mainline kernel"))
            return checks
        case .success?:
            checks.append(CheckResult("kvm.api_version", .pass, "KVM API version 12"))
        }

        checks += capabilityChecks(device)
        if let createVM = device.createVM { checks.append(creation(createVM, device.createVCPU)) }
        return checks
    }

    private static func missingDevice(_ context: Context) -> CheckResult {
        let hint: String
        if let backend = context.backend {
            hint = "\(backend.rawValue) is loaded, so the node itself is missing: in a container pass --device /dev/kvm; otherwise sudo mknod -m 0660 /dev/kvm c 10 232 && sudo chgrp kvm /dev/kvm"
        } else if let expected = context.expectedHardwareModule {
            hint = "load the KVM module: sudo modprobe \(expected.rawValue)"
        } else {
            hint = "load a KVM module (kvm_intel, kvm_amd, or kvm_pvm where the CPU has no VT-x/AMD-V)"
        }
        return CheckResult("device.node", .fail, "/dev/kvm does not exist", hint: hint)
    }

    private static func openFailure(_ error: ProbeError, _ node: KVMDeviceFacts.Node, _ context: Context) -> CheckResult {
        let caller = context.facts.caller
        let name = "device.access"
        switch error {
        case .permissionDenied, .notPermitted:
            if caller.uid == 0 {
                // root is never refused by mode bits; a device cgroup or LSM is in the way.
                return CheckResult(
                    name, .fail, "cannot open /dev/kvm as root (\(error)): a container device policy or security module denies it",
                    hint: "run the container with --device /dev/kvm (and --group-add $(stat -c %g /dev/kvm) for non-root)")
            }
            let detail = "permission denied opening /dev/kvm (owner \(caller.describeUser(node.ownerUID)):\(caller.describeGroup(node.groupID)), mode \(octal(node.mode)); you are \(caller.describeCaller()))"
            return CheckResult(name, .fail, detail, hint: permissionHint(node, caller))
        case .noSuchDeviceOrAddress, .noSuchDevice:
            return CheckResult(
                name, .fail, "/dev/kvm exists but no driver answers (\(error))",
                hint: "load the KVM module: sudo modprobe \(context.expectedHardwareModule?.rawValue ?? "kvm_intel (or kvm_amd, kvm_pvm)")")
        default:
            return CheckResult(name, .fail, "cannot open /dev/kvm (\(error))")
        }
    }

    /// The fix depends on who owns the node: joining a `kvm` group only helps if the node is
    /// group-accessible to `kvm`, and a new group takes effect only in a new login session.
    static func permissionHint(_ node: KVMDeviceFacts.Node, _ caller: CallerIdentity) -> String {
        // Some distributions (and minimal images) ship no kvm group at all.
        let create = caller.groups.isEmpty || caller.group(named: "kvm") != nil ? "" : "create the group (sudo groupadd --system kvm), then "
        let join = "\(create)add yourself to the kvm group: sudo usermod -aG kvm $USER, then log in again"
        let udev = "a udev rule KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\" (e.g. in /etc/udev/rules.d/65-kvm.rules, then sudo udevadm trigger)"
        let group = caller.group(id: node.groupID)
        let groupCanAccess = node.mode & 0o060 == 0o060
        if let group, groupCanAccess {
            if let user = caller.userName, group.members.contains(user) {
                return "you are listed in group \(group.name) but this session predates it: log out and in again (or run newgrp \(group.name))"
            }
            return group.name == "kvm"
                ? join : "add yourself to group \(group.name): sudo usermod -aG \(group.name) $USER, then log in again"
        }
        return "\(join); /dev/kvm is not group-accessible, so also add \(udev); or grant just yourself: sudo setfacl -m u:$USER:rw /dev/kvm"
    }

    private static func capabilityChecks(_ device: KVMDeviceFacts) -> [CheckResult] {
        func value(_ name: String) -> Int32 { device.capabilities[name] ?? 0 }
        func missing(_ level: KVMCapabilityRequirement.Level) -> [KVMCapabilityRequirement] {
            KVMCapabilityCatalog.all.filter { $0.level == level && value($0.name) <= 0 }
        }
        func list(_ requirements: [KVMCapabilityRequirement]) -> String {
            requirements.map { "\($0.name) (\($0.purpose))" }.joined(separator: ", ")
        }
        let required = KVMCapabilityCatalog.all.filter { $0.level == .required }
        let recommended = KVMCapabilityCatalog.all.filter { $0.level == .recommended }
        var checks: [CheckResult] = []

        let missingRequired = missing(.required)
        if missingRequired.isEmpty {
            checks.append(CheckResult("kvm.required_capabilities", .pass, "all \(required.count) present"))
        } else {
            checks.append(
                CheckResult(
                    "kvm.required_capabilities", .fail, "missing: \(list(missingRequired))",
                    hint: "this kernel's KVM is too old or restricted; hvrun needs Linux 4.11 or newer with the full x86 KVM API"))
        }
        let missingRecommended = missing(.recommended)
        if missingRecommended.isEmpty {
            checks.append(CheckResult("kvm.recommended_capabilities", .pass, "all \(recommended.count) present"))
        } else {
            checks.append(CheckResult("kvm.recommended_capabilities", .warn, "missing: \(list(missingRecommended)); hvrun works with reduced fidelity"))
        }
        // api.rst: no NR_VCPUS means "assume 4"; no MAX_VCPUS means "same as NR_VCPUS".
        let recommendedVCPUs = value("NR_VCPUS") > 0 ? value("NR_VCPUS") : 4
        let maximumVCPUs = value("MAX_VCPUS") > 0 ? value("MAX_VCPUS") : recommendedVCPUs
        checks.append(CheckResult("kvm.vcpu_limits", .pass, "recommended \(recommendedVCPUs) vCPUs (NR_VCPUS), maximum \(maximumVCPUs) (MAX_VCPUS)"))
        return checks
    }

    private static func creation(_ createVM: KVMDeviceFacts.Outcome, _ createVCPU: KVMDeviceFacts.Outcome?) -> CheckResult {
        let name = "kvm.create_vm"
        if case .failed(let error) = createVM {
            let hint: String
            switch error {
            case .busy: hint = "another hypervisor (VirtualBox, VMware) holds the virtualization extensions; stop it"
            case .outOfMemory: hint = "the host is out of memory"
            case .permissionDenied, .notPermitted: hint = "a seccomp or security policy blocks KVM_CREATE_VM"
            default: hint = "see the kernel log (dmesg) for the KVM message"
            }
            return CheckResult(name, .fail, "KVM_CREATE_VM failed (\(error))", hint: hint)
        }
        if case .failed(let error)? = createVCPU {
            return CheckResult(name, .fail, "KVM_CREATE_VM works but KVM_CREATE_VCPU failed (\(error))", hint: "see the kernel log (dmesg) for the KVM message")
        }
        return CheckResult(name, .pass, createVCPU == nil ? "KVM_CREATE_VM works" : "KVM_CREATE_VM and KVM_CREATE_VCPU work")
    }

    static func octal(_ mode: UInt32) -> String {
        let digits = String(mode, radix: 8)
        return String(repeating: "0", count: max(0, 4 - digits.count)) + digits
    }
}

extension CallerIdentity {
    func describeUser(_ uid: UInt32) -> String {
        uid == self.uid ? (userName ?? "uid \(uid)") : (uid == 0 ? "root" : "uid \(uid)")
    }

    func describeGroup(_ gid: UInt32) -> String { group(id: gid)?.name ?? "gid \(gid)" }

    /// "alice (uid 1000, groups alice, wheel)".
    func describeCaller() -> String {
        guard let uid else { return "this user" }
        let names = groupIDs.map(describeGroup).joined(separator: ", ")
        return "\(userName ?? "uid \(uid)") (uid \(uid)\(names.isEmpty ? "" : ", groups \(names)"))"
    }
}
