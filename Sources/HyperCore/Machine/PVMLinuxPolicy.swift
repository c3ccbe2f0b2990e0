/// The CPU policy `hvrun run` applies to a Linux kernel on a PVM host: there the guest sees the
/// host's CPUID whatever `KVM_SET_CPUID2` says, so the only way to keep a kernel away from
/// instructions KVM's emulator lacks is `clearcpuid=` on its command line (Docs/linux-boot.md).
public enum PVMLinuxPolicy {
    /// Features whose instructions the emulator cannot run and the completion layer does not
    /// finish. Not `cx16` (``CompletionExecutor`` completes `cmpxchg16b`); `xsave` stays cleared
    /// because `xsave`/`xrstor`/`xgetbv` are not completed.
    public static let clearedFeatures = [
        "xsave",        // xsave/xrstor/xgetbv (the kernel then uses fxsave)
        "smap",         // stac/clac around every user access
        "popcnt",       // popcnt (hweight)
        "rdtscp", "rdpid",
        "sse4_2",       // crc32, pcmpistri
        "ssse3",        // pshufb
        "aes", "pclmulqdq",
        "avx", "avx2", "avx512f",
    ]

    /// KVM paravirtual features whose guest side is a hypercall (`vmmcall`/`vmcall`). Unlike the
    /// host's own CPUID bits, KVM's leaf 0x40000001 from `KVM_SET_CPUID2` is what the guest sees
    /// here, so these are hidden through CPUID. Measured: with PV send-IPI, Linux's second CPU
    /// sits on `kvm_hypercall4` in `__send_ipi_mask` (its RIP on the hypercall, sampled for
    /// minutes) while the first waits for it, and `smp: Bringing up secondary CPUs` never ends;
    /// without it both CPUs come up (Docs/linux-boot.md). PV unhalt (the spinlock kick) and PV
    /// sched-yield make the same hypercall, so they go too; Linux falls back to native IPIs,
    /// native queued spinlocks and plain waiting.
    public static let hiddenKVMFeatures: [CPUIDPolicy.Bit] = [
        CPUIDPolicy.Bit(leaf: 0x4000_0001, register: .eax, bit: 7),     // KVM_FEATURE_PV_UNHALT
        CPUIDPolicy.Bit(leaf: 0x4000_0001, register: .eax, bit: 11),    // KVM_FEATURE_PV_SEND_IPI
        CPUIDPolicy.Bit(leaf: 0x4000_0001, register: .eax, bit: 13),    // KVM_FEATURE_PV_SCHED_YIELD
    ]

    /// The CPUID policy hvrun gives a Linux kernel on a PVM host (unless `--cpuid` is given).
    public static var cpuidPolicy: CPUIDPolicy { CPUIDPolicy(hidden: hiddenKVMFeatures) }

    /// True where `/dev/kvm` is KVM's PVM backend (`/sys/module/kvm_pvm`, as `hvrun check` sees it).
    public static func hostIsPVM(probe: some HostProbe = LiveHostProbe()) -> Bool {
        (try? probe.listDirectory(HostPaths.sysModule).get())?.contains("kvm_pvm") ?? false
    }

    /// True for a Linux kernel: a bzImage, or an ELF whose segments are linked at kernel virtual
    /// addresses (a vmlinux; the project's test guests link at their physical addresses).
    public static func isLinuxKernel(_ bytes: [UInt8]) -> Bool {
        if BzImageHeader.looksLikeBzImage(bytes) { return true }
        guard let elf = try? ELFImage(bytes: bytes, name: "kernel") else { return false }
        return elf.loadSegments.contains { $0.virtualAddress >= 0xFFFF_8000_0000_0000 }
    }

    /// The command line with `clearcpuid=` added, or nil when it already has one.
    public static func commandLine(_ commandLine: String) -> String? {
        if commandLine.split(separator: " ").contains(where: { $0.hasPrefix("clearcpuid=") }) { return nil }
        let item = "clearcpuid=" + clearedFeatures.joined(separator: ",")
        return commandLine.isEmpty ? item : commandLine + " " + item
    }
}
