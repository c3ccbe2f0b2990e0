import HyperCore
import Testing

/// Branches that are variations of a recorded host: the facts are edited, then evaluated.
@Suite("HostCheck branches")
struct HostCheckBranchTests {
    private func evaluate(_ fixture: String, _ edit: (inout HostFacts) -> Void) throws -> HostReport {
        var facts = try HostFixtures.facts(fixture)
        edit(&facts)
        return HostCheck.evaluate(facts)
    }

    @Test func statFailureOnDevKVMIsUndetermined() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.device = KVMDeviceFacts(node: .failure(.permissionDenied)) }
        #expect(report.verdict == .undetermined)
        #expect(report.status("device.node") == .warn)
        #expect(report.reason.contains("cannot inspect /dev/kvm"))
    }

    @Test func regularFileAtDevKVMFails() throws {
        let report = try evaluate("intel-bare-metal-ept") { facts in
            facts.device = KVMDeviceFacts(
                node: .success(.init(type: .regularFile, major: 0, minor: 0, mode: 0o644, ownerUID: 0, groupID: 0)))
        }
        #expect(report.verdict == .unusable)
        let node = try #require(report.check(named: "device.node"))
        #expect(node.detail == "/dev/kvm is a regular file, not a character device")
        #expect(node.hint?.contains("sudo rm /dev/kvm") == true)
    }

    @Test func unexpectedDeviceNumberOnlyWarns() throws {
        let report = try evaluate("intel-bare-metal-ept") { facts in
            if case .success(var node) = facts.device.node {
                node.minor = 99
                facts.device.node = .success(node)
            }
        }
        #expect(report.verdict == .usable)
        #expect(report.status("device.node") == .warn)
    }

    @Test func nodeWithoutDriverSuggestsModprobe() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.device = KVMDeviceFacts(node: $0.device.node, open: .failed(.noSuchDeviceOrAddress)) }
        #expect(report.check(named: "device.access")?.hint == "load the KVM module: sudo modprobe kvm_intel")
    }

    @Test func rootDeniedPointsAtTheContainerPolicy() throws {
        let report = try evaluate("permission-denied") { facts in
            facts.caller.uid = 0
            facts.device.open = .failed(.notPermitted)
        }
        let access = try #require(report.check(named: "device.access"))
        #expect(access.status == .fail)
        #expect(access.hint?.contains("--device /dev/kvm") == true)
    }

    @Test func nodeOwnedByAnotherGroupNamesThatGroup() throws {
        let report = try evaluate("permission-denied") { facts in
            facts.caller.groups.append(.init(name: "hypervisor", id: 77, members: []))
            if case .success(var node) = facts.device.node {
                node.groupID = 77
                facts.device.node = .success(node)
            }
        }
        #expect(report.check(named: "device.access")?.hint == "add yourself to group hypervisor: sudo usermod -aG hypervisor $USER, then log in again")
    }

    @Test func missingKVMGroupIsCreatedFirst() throws {
        let report = try evaluate("permission-denied-root-only-node") { $0.caller.groups.removeAll { $0.name == "kvm" } }
        #expect(report.check(named: "device.access")?.hint?.hasPrefix("create the group (sudo groupadd --system kvm), then add yourself") == true)
    }

    @Test func devKVMMissingWhileModuleLoadedPointsAtContainerOrMknod() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.device = KVMDeviceFacts(node: .failure(.noSuchFile)) }
        let node = try #require(report.check(named: "device.node"))
        #expect(node.status == .fail)
        #expect(node.hint?.contains("--device /dev/kvm") == true)
        #expect(node.hint?.contains("mknod") == true)
    }

    @Test(arguments: [
        (ProbeError.busy, "another hypervisor"), (.outOfMemory, "out of memory"), (.permissionDenied, "seccomp"),
        (.inputOutput, "dmesg"),
    ])
    func createVMFailureHints(error: ProbeError, hintFragment: String) throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.device.createVM = .failed(error) }
        #expect(report.verdict == .unusable)
        let create = try #require(report.check(named: "kvm.create_vm"))
        #expect(create.status == .fail)
        #expect(create.hint?.contains(hintFragment) == true)
    }

    @Test func createVCPUFailureFails() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.device.createVCPU = .failed(.outOfMemory) }
        #expect(report.verdict == .unusable)
        #expect(report.check(named: "kvm.create_vm")?.detail.contains("KVM_CREATE_VCPU failed") == true)
    }

    @Test func apiVersionIoctlFailureFails() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.device.apiVersion = .failure(ProbeError(errno: 25)) }
        #expect(report.status("kvm.api_version") == .fail)
        #expect(report.verdict == .unusable)
    }

    @Test func eptPresentButDisabledInKVMIntelWarnsWithReloadHint() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.kvmModules = $0.kvmModules.map { modules in
            var modules = modules
            modules["kvm_intel"]?["ept"] = "N"
            return modules
        } }
        let slat = try #require(report.check(named: "cpu.slat"))
        #expect(slat.status == .warn)
        #expect(slat.detail.contains("kvm_intel has ept=N"))
        #expect(slat.hint == "reload it: sudo modprobe -r kvm_intel && sudo modprobe kvm_intel ept=1")
    }

    @Test func noEPTInMSRWarnsAboutShadowPaging() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.vmxSecondaryControls = .success(0x1_0000_0000) }
        #expect(report.verdict == .usable)
        #expect(report.check(named: "cpu.slat")?.detail.hasPrefix("no EPT (MSR 0x48B): KVM falls back to shadow paging") == true)
        #expect(report.status("cpu.vpid") == .warn)
        #expect(report.status("cpu.unrestricted_guest") == .warn)
    }

    @Test func eptUnknownWhenEverySourceIsMissing() throws {
        let report = try evaluate("sysfs-kvm-intel-parameters-fallback") { $0.kvmModules = .failure(.permissionDenied) }
        let slat = try #require(report.check(named: "cpu.slat"))
        #expect(slat.status == .warn)
        #expect(slat.detail.hasPrefix("cannot tell whether EPT is available"))
        #expect(report.status("kernel.modules") == .warn)
    }

    @Test func legacyCPUInfoFlagsAreUsedBeforeSysfs() throws {
        let report = try evaluate("intel-bare-metal-ept") { facts in
            facts.vmxSecondaryControls = .failure(.noSuchFile)
            facts.cpuinfo = .success(CPUInfo(flags: ["vmx", "nx", "ept"], vmxFlags: nil))
        }
        #expect(report.check(named: "cpu.slat")?.detail == "EPT available (/proc/cpuinfo flags)")
        #expect(report.status("cpu.vpid") == .warn)  // legacy flags had no vpid here
        // unrestricted_guest was never a legacy flag, so it falls through to kvm_intel.
        #expect(report.check(named: "cpu.unrestricted_guest")?.detail == "unrestricted guest available (kvm_intel unrestricted_guest=Y)")
    }

    @Test func firmwareUnlockedFeatureControlPasses() throws {
        let report = try evaluate("intel-bare-metal-ept") { $0.featureControl = .success(0) }
        #expect(report.check(named: "firmware.virtualization")?.detail.contains("unlocked") == true)
        #expect(report.status("firmware.virtualization") == .pass)
    }

    @Test func firmwareDisabledWithoutMSRIsInferredFromCPUInfo() throws {
        let report = try evaluate("intel-vtx-disabled-in-firmware") { $0.featureControl = .failure(.noSuchFile) }
        let firmware = try #require(report.check(named: "firmware.virtualization"))
        #expect(firmware.status == .fail)
        #expect(firmware.detail.contains("kernel cleared the vmx flag"))
    }

    @Test func amdFirmwareFallsBackToCPUInfo() throws {
        let disabled = try evaluate("amd-svm-disabled-in-firmware") { $0.amdVMCR = .failure(.noSuchFile) }
        #expect(disabled.check(named: "firmware.virtualization")?.detail.contains("kernel cleared the svm flag") == true)
        let enabled = try evaluate("amd-npt") { $0.amdVMCR = .failure(.noSuchFile) }
        #expect(enabled.check(named: "firmware.virtualization")?.detail == "AMD-V enabled (the kernel lists svm)")
        let unknown = try evaluate("amd-npt") { facts in
            facts.amdVMCR = .failure(.noSuchFile)
            facts.cpuinfo = .failure(.permissionDenied)
        }
        #expect(unknown.status("firmware.virtualization") == .warn)
    }

    @Test func nptDisabledInKVMAMDWarns() throws {
        let report = try evaluate("amd-npt") { $0.kvmModules = $0.kvmModules.map { modules in
            var modules = modules
            modules["kvm_amd"]?["npt"] = "0"
            return modules
        } }
        #expect(report.status("cpu.slat") == .warn)
        #expect(report.check(named: "cpu.slat")?.hint?.contains("kvm_amd npt=1") == true)
        let noNPT = try evaluate("amd-npt") { $0.cpu?.hasNPT = false }
        #expect(noNPT.check(named: "cpu.slat")?.detail.hasPrefix("no NPT") == true)
    }

    @Test func nxMissingOrDisabledFails() throws {
        let missing = try evaluate("module-not-loaded") { $0.cpu?.hasNX = false }
        #expect(missing.status("cpu.nx") == .fail)
        let disabled = try evaluate("module-not-loaded") { $0.cpuinfo = .success(CPUInfo(flags: ["vmx"], vmxFlags: nil)) }
        #expect(disabled.check(named: "cpu.nx")?.detail.contains("does not list nx") == true)
    }

    @Test func lowerLayerFailuresBecomeWarningsWhenTheDeviceWorks() throws {
        // CPUID shows no VT-x, no PVM module is visible, yet /dev/kvm works (e.g. sysfs hidden).
        let report = try evaluate("intel-bare-metal-ept") { facts in
            facts.cpu?.hasVMX = false
            facts.kvmModules = .success([:])
        }
        #expect(report.verdict == .usable)
        #expect(report.failureCount == 0)
        let cpu = try #require(report.check(named: "cpu.virtualization"))
        #expect(cpu.status == .warn)
        #expect(cpu.detail.hasSuffix("; /dev/kvm works regardless"))
        #expect(report.check(named: "cpu.slat")?.detail.hasPrefix("no EPT/NPT visible") == true)
    }

    @Test func guestWithoutNestedVirtualizationNamesTheOuterHypervisor() throws {
        let report = try evaluate("no-virtualization") { facts in
            facts.cpu?.runsUnderHypervisor = true
            facts.cpu?.hypervisorSignature = "Microsoft Hv"
        }
        let cpu = try #require(report.check(named: "cpu.virtualization"))
        #expect(cpu.status == .fail)
        #expect(cpu.detail == "no VT-x/AMD-V in CPUID: Hyper-V does not expose them to this guest")
        #expect(cpu.hint?.contains("nested virtualization") == true)
    }

    @Test func kvmLoadedWithoutVendorModuleFails() throws {
        let report = try evaluate("module-not-loaded") { $0.kvmModules = .success(["kvm": [:]]) }
        #expect(report.check(named: "kernel.modules")?.detail == "kvm is loaded but no vendor module: kvm_intel is missing")
    }
}

@Suite("HostCheck decoding")
struct HostCheckDecodingTests {
    private static func registers(_ table: [CPUIDLeaf: CPUIDRegisters]) -> (CPUIDLeaf) -> CPUIDRegisters {
        { table[$0] ?? .zero }
    }

    @Test func cpuidDecodesVendorBitsAndSignature() {
        // "GenuineIntel" is EBX "Genu", EDX "ineI", ECX "ntel".
        let facts = CPUIDFacts(cpuid: Self.registers([
            CPUIDLeaf(0): .init(eax: 0x1b, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69),
            CPUIDLeaf(1): .init(eax: 0, ebx: 0, ecx: 1 << 5 | 1 << 31, edx: 0),
            CPUIDLeaf(0x4000_0000): .init(eax: 0x4000_0001, ebx: 0x4b4d_564b, ecx: 0x564b_4d56, edx: 0x4d),
            CPUIDLeaf(0x8000_0000): .init(eax: 0x8000_0008, ebx: 0, ecx: 0, edx: 0),
            CPUIDLeaf(0x8000_0001): .init(eax: 0, ebx: 0, ecx: 0, edx: 1 << 20),
        ]))
        #expect(facts.vendor == .intel)
        #expect(facts.hasVMX && facts.hasNX && facts.runsUnderHypervisor)
        #expect(!facts.hasSVM && !facts.hasNPT)
        #expect(facts.hypervisorSignature == "KVMKVMKVM")
    }

    @Test func nptIsIgnoredAboveTheExtendedMaximumAndWithoutSVM() {
        let svmLeaf = CPUIDRegisters(eax: 1, ebx: 0, ecx: 0, edx: 1)
        let belowMax = CPUIDFacts(cpuid: Self.registers([
            CPUIDLeaf(0x8000_0000): .init(eax: 0x8000_0001, ebx: 0, ecx: 0, edx: 0),
            CPUIDLeaf(0x8000_0001): .init(eax: 0, ebx: 0, ecx: 1 << 2, edx: 0),
            CPUIDLeaf(0x8000_000A): svmLeaf,
        ]))
        #expect(belowMax.hasSVM && !belowMax.hasNPT)
        #expect(belowMax.vendor == .other(""))
        let noSVM = CPUIDFacts(cpuid: Self.registers([
            CPUIDLeaf(0x8000_0000): .init(eax: 0x8000_000A, ebx: 0, ecx: 0, edx: 0),
            CPUIDLeaf(0x8000_000A): svmLeaf,
        ]))
        #expect(!noSVM.hasNPT)
    }

    @Test func hypervisorNames() {
        #expect(CPUIDFacts.hypervisorName(forSignature: "Microsoft Hv") == "Hyper-V")
        #expect(CPUIDFacts.hypervisorName(forSignature: "VMwareVMware") == "VMware")
        #expect(CPUIDFacts.hypervisorName(forSignature: "TCGTCGTCGTCG") == "QEMU TCG")
        #expect(CPUIDFacts.hypervisorName(forSignature: "nope") == "an unknown hypervisor")
    }

    @Test func cpuinfoUsesTheFirstProcessorsLines() {
        let info = CPUInfo(parsing: """
            processor\t: 0
            flags\t\t: fpu vmx nx
            vmx flags\t: ept vpid
            processor\t: 1
            flags\t\t: fpu
            vmx flags\t: ept
            """)
        #expect(info.flags == ["fpu", "vmx", "nx"])
        #expect(info.vmxFlags == ["ept", "vpid"])
        #expect(CPUInfo(parsing: "flags : fpu\n").vmxFlags == nil)
    }

    @Test func callerIdentityParsesStatusPasswdAndGroup() {
        let caller = CallerIdentity(
            processStatus: "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t36 100 \n",
            passwd: "root:x:0:0::/root:/bin/sh\nbob:x:1000:100::/home/bob:/bin/sh\n",
            group: "kvm:x:36:bob,carol\nusers:x:100:\nbroken line\n")
        #expect(caller.uid == 1000)
        #expect(caller.groupIDs == [36, 100])
        #expect(caller.userName == "bob")
        #expect(caller.group(named: "kvm")?.members == ["bob", "carol"])
        #expect(caller.group(id: 100)?.name == "users")
        #expect(CallerIdentity(processStatus: nil, passwd: nil, group: nil).uid == nil)
    }
}
