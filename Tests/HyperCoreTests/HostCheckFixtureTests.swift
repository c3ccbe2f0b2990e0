import HyperCore
import Testing

/// Every recorded host, end to end through RecordedHostProbe → HostFacts → HostCheck.
@Suite("HostCheck fixtures")
struct HostCheckFixtureTests {
    @Test func intelBareMetalWithEPTIsUsableWithoutWarnings() throws {
        let report = try HostFixtures.report("intel-bare-metal-ept")
        #expect(report.verdict == .usable)
        #expect(report.backend == .intelVMX)
        #expect(report.nested == false)
        #expect(report.checks.allSatisfy { $0.status == .pass }, "\(report.humanText())")
        #expect(report.check(named: "cpu.slat")?.detail == "EPT available (MSR 0x48B)")
        #expect(report.check(named: "cpu.unrestricted_guest")?.status == .pass)
        #expect(report.check(named: "cpu.vpid")?.status == .pass)
        #expect(report.check(named: "firmware.virtualization")?.detail.contains("locked, VMX on") == true)
        #expect(report.check(named: "kvm.vcpu_limits")?.detail == "recommended 16 vCPUs (NR_VCPUS), maximum 4096 (MAX_VCPUS)")
        #expect(report.verdict.exitStatus == 0)
    }

    @Test func intelVTxDisabledInFirmwareFailsWithFirmwareHint() throws {
        let report = try HostFixtures.report("intel-vtx-disabled-in-firmware")
        #expect(report.verdict == .unusable)
        let firmware = try #require(report.check(named: "firmware.virtualization"))
        #expect(firmware.status == .fail)
        #expect(firmware.detail.contains("IA32_FEATURE_CONTROL locked"))
        #expect(firmware.hint?.contains("enable Intel VT-x") == true)
        #expect(firmware.hint?.contains("power the machine off and on") == true)
        #expect(report.status("cpu.virtualization") == .pass)  // the silicon has it
        #expect(report.status("kernel.modules") == .fail)
        #expect(report.status("device.node") == .fail)
        #expect(report.verdict.exitStatus == 1)
    }

    @Test func amdWithNPTIsUsable() throws {
        let report = try HostFixtures.report("amd-npt")
        #expect(report.verdict == .usable)
        #expect(report.backend == .amdSVM)
        #expect(report.checks.allSatisfy { $0.status == .pass }, "\(report.humanText())")
        #expect(report.check(named: "cpu.slat")?.detail == "NPT available (CPUID 0x8000000A)")
        #expect(report.check(named: "firmware.virtualization")?.detail == "AMD-V enabled (VM_CR.SVMDIS clear)")
        // VMX-only checks do not apply to AMD.
        #expect(report.check(named: "cpu.vpid") == nil)
        #expect(report.check(named: "cpu.unrestricted_guest") == nil)
    }

    @Test func amdSVMDisabledInFirmwareFails() throws {
        let report = try HostFixtures.report("amd-svm-disabled-in-firmware")
        #expect(report.verdict == .unusable)
        let firmware = try #require(report.check(named: "firmware.virtualization"))
        #expect(firmware.status == .fail)
        #expect(firmware.detail.contains("SVMDIS"))
        #expect(firmware.hint?.contains("SVM Mode") == true)
        #expect(report.check(named: "kernel.modules")?.hint?.contains("modprobe kvm_amd") == true)
    }

    @Test func noVirtualizationAtAllFails() throws {
        let report = try HostFixtures.report("no-virtualization")
        #expect(report.verdict == .unusable)
        #expect(report.check(named: "cpu.virtualization")?.detail == "this CPU has neither Intel VT-x nor AMD-V")
        #expect(report.status("cpu.virtualization") == .fail)
        #expect(report.check(named: "firmware.virtualization") == nil)
        #expect(report.check(named: "cpu.slat") == nil)
        #expect(report.status("kernel.modules") == .fail)
        #expect(report.check(named: "device.node")?.detail == "/dev/kvm does not exist")
    }

    @Test func nestedGuestWithVMXExposedIsUsableWithNestedWarning() throws {
        let report = try HostFixtures.report("nested-vmx-exposed")
        #expect(report.verdict == .usable)
        #expect(report.nested == true)
        #expect(report.hypervisorSignature == "KVMKVMKVM")
        let hypervisor = try #require(report.check(named: "cpu.hypervisor"))
        #expect(hypervisor.status == .warn)
        #expect(hypervisor.detail.contains("running under KVM"))
        #expect(hypervisor.detail.contains("nested"))
        // No MSR device: EPT, UG and VPID all come from the vmx flags line.
        #expect(report.check(named: "cpu.slat")?.detail == "EPT available (/proc/cpuinfo vmx flags)")
        #expect(report.status("cpu.vpid") == .warn)
        #expect(report.check(named: "firmware.virtualization")?.detail == "VT-x enabled (the kernel lists vmx)")
    }

    @Test func thisMachinesPVMRecordingIsUsableWithPVMWarning() throws {
        let report = try HostFixtures.report("this-machine-pvm")
        #expect(report.verdict == .usable)
        #expect(report.backend == .pvm)
        #expect(report.nested == true)
        let backend = try #require(report.check(named: "kernel.backend"))
        #expect(backend.status == .warn)
        #expect(backend.detail.contains("backend is PVM"))
        #expect(backend.detail.contains("nested"))
        // Where kvm-ok says "does not support KVM extensions", we only warn.
        #expect(report.status("cpu.virtualization") == .warn)
        #expect(report.status("cpu.slat") == .warn)
        #expect(report.failureCount == 0)
        #expect(report.verdictLine.hasPrefix("VERDICT: usable"))
    }

    @Test func missingDeviceWithModuleNotLoadedSaysModprobe() throws {
        let report = try HostFixtures.report("module-not-loaded")
        #expect(report.verdict == .unusable)
        #expect(report.status("firmware.virtualization") == .pass)
        let modules = try #require(report.check(named: "kernel.modules"))
        #expect(modules.status == .fail)
        #expect(modules.detail.contains("kvm_intel is missing"))
        #expect(modules.hint?.hasPrefix("sudo modprobe kvm_intel") == true)
        #expect(report.check(named: "device.node")?.hint == "load the KVM module: sudo modprobe kvm_intel")
    }

    @Test func permissionDeniedFailsWithKVMGroupFix() throws {
        let report = try HostFixtures.report("permission-denied")
        #expect(report.verdict == .unusable)
        let access = try #require(report.check(named: "device.access"))
        #expect(access.status == .fail)
        #expect(access.detail.contains("permission denied"))
        #expect(access.detail.contains("root:kvm, mode 0660"))
        #expect(access.detail.contains("alice (uid 1000"))
        #expect(access.hint == "add yourself to the kvm group: sudo usermod -aG kvm $USER, then log in again")
        // Nothing after a failed open is reported.
        #expect(report.check(named: "kvm.api_version") == nil)
    }

    @Test func permissionDeniedOnRootOnlyNodeSuggestsUdevRule() throws {
        let access = try #require(try HostFixtures.report("permission-denied-root-only-node").check(named: "device.access"))
        #expect(access.status == .fail)
        #expect(access.hint?.contains("sudo usermod -aG kvm $USER") == true)
        #expect(access.hint?.contains(#"KERNEL=="kvm", GROUP="kvm", MODE="0660""#) == true)
        #expect(access.hint?.contains("setfacl") == true)
    }

    @Test func permissionDeniedWithStaleSessionSaysLogInAgain() throws {
        let access = try #require(try HostFixtures.report("permission-denied-stale-session").check(named: "device.access"))
        #expect(access.hint?.contains("log out and in again") == true)
        #expect(access.hint?.contains("newgrp kvm") == true)
    }

    @Test func wrongAPIVersionFails() throws {
        let report = try HostFixtures.report("api-version-wrong")
        #expect(report.verdict == .unusable)
        #expect(report.check(named: "kvm.api_version")?.detail == "KVM API version 11; hvrun needs 12")
        #expect(report.status("kvm.api_version") == .fail)
        #expect(report.check(named: "kvm.required_capabilities") == nil)
        #expect(report.check(named: "kvm.create_vm") == nil)
    }

    @Test func missingRequiredCapabilityFails() throws {
        let report = try HostFixtures.report("required-capability-missing")
        #expect(report.verdict == .unusable)
        let required = try #require(report.check(named: "kvm.required_capabilities"))
        #expect(required.status == .fail)
        #expect(required.detail.contains("IRQFD"))
        #expect(required.detail.contains("SIGNAL_MSI"))  // never recorded counts as absent
        #expect(!required.detail.contains("IRQCHIP"))
        #expect(report.reason == required.detail)
    }

    @Test func missingRecommendedCapabilityOnlyWarns() throws {
        let report = try HostFixtures.report("recommended-capability-missing")
        #expect(report.verdict == .usable)
        let recommended = try #require(report.check(named: "kvm.recommended_capabilities"))
        #expect(recommended.status == .warn)
        #expect(recommended.detail.hasPrefix("missing: READONLY_MEM"))
        #expect(recommended.detail.contains("XSAVE"))
        #expect(report.warningCount == 1)
    }

    @Test func cpuinfoVMXFlagsStandInForTheMSR() throws {
        let report = try HostFixtures.report("cpuinfo-vmx-flags-without-msr")
        #expect(report.verdict == .usable)
        #expect(report.check(named: "firmware.virtualization")?.detail == "VT-x enabled (the kernel lists vmx)")
        #expect(report.check(named: "cpu.slat")?.detail == "EPT available (/proc/cpuinfo vmx flags)")
        #expect(report.check(named: "cpu.vpid")?.detail == "VPID available (/proc/cpuinfo vmx flags)")
        let unrestricted = try #require(report.check(named: "cpu.unrestricted_guest"))
        #expect(unrestricted.status == .warn)
        #expect(unrestricted.detail.hasPrefix("no unrestricted guest (/proc/cpuinfo vmx flags)"))
    }

    @Test func sysfsKVMIntelParametersAreTheLastFallback() throws {
        let report = try HostFixtures.report("sysfs-kvm-intel-parameters-fallback")
        #expect(report.verdict == .usable)
        #expect(report.check(named: "cpu.slat")?.detail == "EPT available (kvm_intel ept=Y)")
        #expect(report.check(named: "cpu.vpid")?.detail == "VPID available (kvm_intel vpid=Y)")
        #expect(report.check(named: "cpu.unrestricted_guest")?.detail.hasPrefix("no unrestricted guest (kvm_intel unrestricted_guest=N)") == true)
        let firmware = try #require(report.check(named: "firmware.virtualization"))
        #expect(firmware.status == .warn)
        #expect(firmware.detail.hasPrefix("cannot tell"))
        #expect(firmware.hint?.contains("modprobe msr") == true)
    }

    @Test func unreadableEverythingIsUndeterminedWithExitStatus2() throws {
        let report = try HostFixtures.report("unreadable-everything")
        #expect(report.verdict == .undetermined)
        #expect(report.verdict.exitStatus == 2)
        #expect(report.nested == nil)
        #expect(report.backend == nil)
        #expect(report.status("cpu.virtualization") == .warn)
        #expect(report.status("kernel.modules") == .warn)
        #expect(report.verdictLine.hasPrefix("VERDICT: undetermined"))
    }

    /// Guards the fixture set itself: every folder is used by a test above, and vice versa.
    @Test(arguments: [
        ("amd-npt", Verdict.usable), ("amd-svm-disabled-in-firmware", .unusable), ("api-version-wrong", .unusable),
        ("cpuinfo-vmx-flags-without-msr", .usable), ("intel-bare-metal-ept", .usable),
        ("intel-vtx-disabled-in-firmware", .unusable), ("module-not-loaded", .unusable),
        ("nested-vmx-exposed", .usable), ("no-virtualization", .unusable), ("permission-denied", .unusable),
        ("permission-denied-root-only-node", .unusable), ("permission-denied-stale-session", .unusable),
        ("recommended-capability-missing", .usable), ("required-capability-missing", .unusable),
        ("sysfs-kvm-intel-parameters-fallback", .usable), ("this-machine-pvm", .usable),
        ("unreadable-everything", .undetermined),
    ])
    func verdictPerFixture(fixture: String, verdict: Verdict) throws {
        let report = try HostFixtures.report(fixture)
        #expect(report.verdict == verdict, "\(fixture):\n\(report.humanText())")
        // A usable host never shows a FAIL line: the device is the ground truth.
        if verdict == .usable { #expect(report.failureCount == 0) }
        if verdict == .unusable { #expect(report.failureCount > 0) }
    }
}
