import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The decoder of the emulation-completion layer: exactly its three instructions, in every
/// addressing form, and nothing else.
@Suite("Emulation completion: decoder")
struct CompletionDecoderTests {
    private func operand(_ bytes: [UInt8]) -> (MemoryOperand, Int)? {
        guard let decoded = CompletionDecoder.decode(bytes), case let .cmpxchg16b(operand) = decoded.operation else { return nil }
        return (operand, decoded.length)
    }

    @Test("int3 and fwait are one byte; the exit's trailing bytes are ignored")
    func oneByteInstructions() {
        #expect(CompletionDecoder.decode([0xCC, 0x90, 0x90, 0x90, 0x90]) == DecodedInstruction(operation: .int3, length: 1))
        #expect(CompletionDecoder.decode([0x9B, 0xDB, 0xE3]) == DecodedInstruction(operation: .fwait, length: 1))
    }

    @Test("cmpxchg16b: disp8, REX.B, SIB with REX.X and scale, RIP-relative, %gs:, disp32 without base, 0x67")
    func cmpxchg16bForms() throws {
        // lock cmpxchg16b 0x20(%rbp): SLUB's, as Linux's boot stopped on it.
        #expect(operand([0xF0, 0x48, 0x0F, 0xC7, 0x4D, 0x20])! == (MemoryOperand(base: 5, displacement: 0x20), 6))
        #expect(operand([0xF0, 0x49, 0x0F, 0xC7, 0x0E])! == (MemoryOperand(base: 14), 5))
        // lock cmpxchg16b 0x10(%rbp,%r8,4)
        #expect(operand([0xF0, 0x4A, 0x0F, 0xC7, 0x4C, 0x85, 0x10])! == (MemoryOperand(base: 5, index: 8, scale: 4, displacement: 16), 7))
        // lock cmpxchg16b 0x12345678(%rip)
        #expect(operand([0xF0, 0x48, 0x0F, 0xC7, 0x0D, 0x78, 0x56, 0x34, 0x12])!
                == (MemoryOperand(displacement: 0x1234_5678, ripRelative: true), 9))
        // %gs:(%rsi), this_cpu_cmpxchg16b's form; negative disp8
        #expect(operand([0x65, 0xF0, 0x48, 0x0F, 0xC7, 0x4E, 0xF0])! == (MemoryOperand(base: 6, displacement: -16, segment: .gs), 7))
        // SIB base 101 with mod 00: disp32, no base; index 100 means none
        #expect(operand([0x48, 0x0F, 0xC7, 0x0C, 0x25, 0x00, 0x10, 0x00, 0x00])! == (MemoryOperand(displacement: 0x1000), 9))
        // (%rsp) needs a SIB; 0x67 prefix
        #expect(operand([0x67, 0x48, 0x0F, 0xC7, 0x0C, 0x24])! == (MemoryOperand(base: 4, addressSize32: true), 6))
        // disp32 with base r13 (REX.B, mod 10)
        #expect(operand([0x49, 0x0F, 0xC7, 0x8D, 0x00, 0x00, 0x00, 0x80])! == (MemoryOperand(base: 13, displacement: -0x8000_0000), 8))
    }

    @Test("anything else is not decoded", arguments: [
        [], [0x0F, 0x0B], [0xD9, 0xEE], [0xF0, 0xCC], [0x48, 0xCC], [0x66, 0x9B],
        [0x0F, 0xC7, 0x0E],                     // cmpxchg8b (no REX.W)
        [0x48, 0x0F, 0xC7, 0xF0],               // rdrand %rax (mod 11, /6)
        [0x48, 0x0F, 0xC7, 0xC8],               // /1 with a register operand: #UD
        [0xF0, 0x48, 0x0F, 0xC7, 0x4D],         // truncated before the displacement
        [0xF0, 0x48, 0x0F, 0xC7, 0x0C],         // truncated before the SIB
        [0xF0, 0x48, 0x0F, 0xC7],               // truncated before ModRM
        [0xF3, 0x48, 0x0F, 0xC7, 0x0E],         // rep prefix
        [0xF2, 0x0F, 0x38, 0xF1, 0xF6],         // crc32
        Array(repeating: 0x66, count: 15) + [0x9B],
    ] as [[UInt8]])
    func refused(bytes: [UInt8]) {
        #expect(CompletionDecoder.decode(bytes) == nil)
    }
}

/// The page walk over guest memory built here (no KVM needed).
@Suite("Emulation completion: page walk")
struct PageWalkTests {
    // Tables: PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000.
    private static func memory() throws -> GuestMemory {
        let memory = try GuestMemory(size: 8 << 20)
        try memory.store(UInt64(0x2000 | 0x7), at: 0x1000)               // PML4[0]: P|W|U
        try memory.store(UInt64(0x3000 | 0x7), at: 0x2000)               // PDPT[0]: P|W|U
        try memory.store(UInt64(0x4000_0000 | 0x83), at: 0x2008)         // PDPT[1]: 1 GiB page at 1 GiB
        try memory.store(UInt64(0x4000 | 0x7), at: 0x3000)               // PD[0]: → PT, user
        try memory.store(UInt64(0x20_0000 | 0x83), at: 0x3008)           // PD[1]: 2 MiB page at 2 MiB
        try memory.store(UInt64(0x60_0000 | 0x81), at: 0x3018)           // PD[3]: 2 MiB read-only
        try memory.store(UInt64(0x5000 | 0x3), at: 0x4000 + 5 * 8)        // PT[5]: 4 KiB at 0x5000
        try memory.store(UInt64(0x6000 | 0x7), at: 0x4000 + 6 * 8)        // PT[6]: user page
        return memory
    }

    private static let cr0: UInt64 = 0x8001_0011, cr4: UInt64 = 0x20    // PG|WP|ET|PE; PAE

    private func walk(_ address: UInt64, _ memory: GuestMemory, write: Bool = true, user: Bool = false,
                      cr4: UInt64 = Self.cr4, rflags: UInt64 = 2) -> Result<UInt64, PageWalk.Fault> {
        PageWalk.translate(address, access: .init(write: write, user: user), cr0: Self.cr0, cr3: 0x1000, cr4: cr4,
                           rflags: rflags, memory: memory)
    }

    @Test("4 KiB, 2 MiB and 1 GiB pages translate; accessed and dirty bits are set")
    func translates() throws {
        let memory = try Self.memory()
        #expect(walk(0x5123, memory) == .success(0x5123))
        #expect(walk(0x20_0000 + 0x1_2340, memory) == .success(0x21_2340))
        #expect(walk(0x4000_0000 + 0x123_4560, memory) == .success(0x4123_4560))
        let pte: UInt64 = try memory.load(at: 0x4000 + 5 * 8)
        #expect(pte & 0x60 == 0x60)
        #expect(try memory.load(UInt64.self, at: 0x1000) & 0x20 != 0)
        #expect(walk(0x60_0010, memory, write: false) == .success(0x60_0010))
        #expect(try memory.load(UInt64.self, at: 0x3018) & 0x40 == 0)    // a read leaves it clean
    }

    @Test("faults: not present, read-only with CR0.WP, user access to a supervisor page, SMAP, non-canonical, 5-level")
    func faults() throws {
        let memory = try Self.memory()
        #expect(walk(0x7000, memory) == .failure(.pageFault(errorCode: 2)))
        #expect(walk(0x7000, memory, write: false) == .failure(.pageFault(errorCode: 0)))
        #expect(walk(0x1_0000_0000 * 8, memory) == .failure(.pageFault(errorCode: 2)))
        #expect(walk(0x60_0000, memory) == .failure(.pageFault(errorCode: 3)))
        #expect(walk(0x5000, memory, user: true) == .failure(.pageFault(errorCode: 7)))
        #expect(walk(0x6000, memory, user: true) == .success(0x6000))
        #expect(walk(0x6000, memory, cr4: Self.cr4 | 1 << 21) == .failure(.pageFault(errorCode: 3)))
        #expect(walk(0x6000, memory, cr4: Self.cr4 | 1 << 21, rflags: 1 << 18) == .success(0x6000))
        #expect(walk(0x8000_0000_0000_0000, memory) == .failure(.notCanonical))
        #expect(walk(0x5000, memory, cr4: Self.cr4 | 1 << 12) == .failure(.unsupportedMode))
    }

    @Test("page tables outside RAM end the walk without touching memory")
    func tablesOutsideRAM() throws {
        let memory = try Self.memory()
        try memory.store(UInt64(0xFFFF_F000 | 0x3), at: 0x2000 + 2 * 8)    // PDPT[2] → a table in the MMIO hole
        #expect(walk(0x8000_0000, memory) == .failure(.tableNotInRAM(0xFFFF_F000)))
    }
}

/// cmpxchg16b carried out on guest memory (no KVM needed).
@Suite("Emulation completion: cmpxchg16b")
struct CompletionExecutorTests {
    private static func state() -> (Registers, SpecialRegisters) {
        var registers = Registers()
        registers.rip = 0x1000
        registers.rsi = 0x5000
        registers.rax = 0x11
        registers.rdx = 0x22
        registers.rbx = 0x33
        registers.rcx = 0x44
        var special = SpecialRegisters()
        special.cr0 = 0x8001_0011
        special.cr3 = 0x1000
        special.cr4 = 0x20
        special.efer = 0x500
        return (registers, special)
    }

    private static func memory() throws -> GuestMemory {
        let memory = try GuestMemory(size: 4 << 20)
        try memory.store(UInt64(0x2000 | 0x3), at: 0x1000)
        try memory.store(UInt64(0x0000 | 0x83), at: 0x2000 + 0)    // unused slot
        try memory.store(UInt64(0x3000 | 0x3), at: 0x2000)
        try memory.store(UInt64(0x0 | 0x83), at: 0x3000)           // 0–2 MiB identity, 2 MiB page
        return memory
    }

    private let instruction = CompletionDecoder.decode([0xF0, 0x48, 0x0F, 0xC7, 0x0E])!    // (%rsi)

    @Test("equal: memory takes RCX:RBX and ZF is set; different: RDX:RAX take memory and ZF is clear")
    func exchange() throws {
        let memory = try Self.memory()
        var (registers, special) = Self.state()
        try memory.store(UInt64(0x11), at: 0x5000)
        try memory.store(UInt64(0x22), at: 0x5008)
        guard case let .resume(after) = CompletionExecutor.execute(instruction, registers: registers, special: special,
                                                                   fsw: 0, memory: memory) else { Issue.record("not resumed"); return }
        #expect(after.rip == 0x1005 && after.rflags & 0x40 != 0)
        #expect(try memory.load(UInt64.self, at: 0x5000) == 0x33 && memory.load(UInt64.self, at: 0x5008) == 0x44)
        guard case let .resume(again) = CompletionExecutor.execute(instruction, registers: registers, special: special,
                                                                   fsw: 0, memory: memory) else { Issue.record("not resumed"); return }
        #expect(again.rflags & 0x40 == 0 && again.rax == 0x33 && again.rdx == 0x44)
        #expect(try memory.load(UInt64.self, at: 0x5000) == 0x33)
        registers.rsi = 0x5008
        #expect(CompletionExecutor.execute(instruction, registers: registers, special: special, fsw: 0, memory: memory)
                == .inject(registers: nil, vector: 13, errorCode: 0, cr2: nil))
        registers.rsi = 0x40_0000
        #expect(CompletionExecutor.execute(instruction, registers: registers, special: special, fsw: 0, memory: memory)
                == .inject(registers: nil, vector: 14, errorCode: 2, cr2: 0x40_0000))
        special.cr3 = 0x7F_F000    // tables past RAM's end: the layer gives up
        registers.rsi = 0x5000
        #expect(CompletionExecutor.execute(instruction, registers: registers, special: special, fsw: 0, memory: memory) == .unhandled)
    }

    @Test("fwait: plain, #NM with CR0.TS|MP, #MF with a pending x87 exception and CR0.NE")
    func fwait() throws {
        let memory = try Self.memory()
        var (registers, special) = Self.state()
        let fwait = CompletionDecoder.decode([0x9B])!
        registers.rip = 0x2000
        var expected = registers
        expected.rip = 0x2001
        #expect(CompletionExecutor.execute(fwait, registers: registers, special: special, fsw: 0, memory: memory) == .resume(expected))
        #expect(CompletionExecutor.execute(fwait, registers: registers, special: special, fsw: 0x80, memory: memory) == .unhandled)
        special.cr0 |= 0x20
        #expect(CompletionExecutor.execute(fwait, registers: registers, special: special, fsw: 0x80, memory: memory)
                == .inject(registers: nil, vector: 16, errorCode: nil, cr2: nil))
        special.cr0 |= 0xA
        #expect(CompletionExecutor.execute(fwait, registers: registers, special: special, fsw: 0, memory: memory)
                == .inject(registers: nil, vector: 7, errorCode: nil, cr2: nil))
    }

    @Test("the Linux CPU policy: clearcpuid= added once, never twice; test guests are not Linux kernels")
    func linuxPolicy() throws {
        let line = try #require(PVMLinuxPolicy.commandLine("console=ttyS0"))
        #expect(line.hasPrefix("console=ttyS0 clearcpuid=") && line.contains("smap") && line.contains("popcnt"))
        #expect(!line.contains("cx16"))
        #expect(PVMLinuxPolicy.commandLine("console=ttyS0 clearcpuid=xsave") == nil)
        // KVM's hypercall features go (PV unhalt, send-IPI, sched-yield); kvmclock and the rest stay.
        var table = CPUIDTable(entries: [.init(function: 0x4000_0001, eax: 0xFFFF_FFFF, ebx: 0, ecx: 0, edx: 0)])
        PVMLinuxPolicy.cpuidPolicy.apply(to: &table)
        #expect(table.entry(function: 0x4000_0001)?.eax == 0xFFFF_FFFF & ~UInt32((1 << 7) | (1 << 11) | (1 << 13)))
        var bz = [UInt8](repeating: 0, count: 0x300)
        bz[0x1FE] = 0x55; bz[0x1FF] = 0xAA
        bz.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        #expect(PVMLinuxPolicy.isLinuxKernel(bz))
        #expect(!PVMLinuxPolicy.isLinuxKernel(try GuestImages.bytes("emul.elf")))
    }
}

/// emul.elf on HyperCore: every instruction the layer completes, with the same lines QEMU prints.
@Suite("Emulation completion: guest", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct EmulationCompletionGuestTests {
    @Test("int3, fwait and cmpxchg16b (success, failure, #PF with CR2, #GP) finish with hardware semantics", .timeLimit(.minutes(1)))
    func guest() throws {
        let configuration = try GuestRun.configuration("emul.elf")
        let console = configuration.console as! BufferOutput
        let machine = try Machine(configuration)
        let exit = try machine.run(timeout: .seconds(30))
        let run = GuestRun(exit: exit, console: console.text)
        #expect(run.exit == .debugExit(0x42), "\(run.console)")
        let expected = [
            "bp=2", "bp_rip=after_int3+1", "fwait=ok", "nm=1", "cas_ok=1", "cas_ok_mem=0xaaaabbbbccccdddd,0xeeeeffff00001111",
            "cas_fail=1", "cas_fail_loaded=0xaaaabbbbccccdddd,0xeeeeffff00001111",
            "cas_fail_mem=0xaaaabbbbccccdddd,0xeeeeffff00001111", "pf=1", "pf_cr2=0x100000000", "pf_error=0x2",
            "gp=2", "gp_error=0x0", "pair_after=0xaaaabbbbccccdddd,0xeeeeffff00001111,0x0",
        ]
        #expect(run.console.split(separator: "\n").map(String.init) == expected)
        let stats = machine.emulationCompletions
        if PVMLinuxPolicy.hostIsPVM() {
            // Every one of them reached the layer: KVM's emulator runs none of them here.
            #expect(stats[.int3] == EmulationCompletionCounts(completed: 2, faulted: 0, nanoseconds: stats[.int3].nanoseconds))
            #expect(stats[.fwait].completed == 2 && stats[.fwait].faulted == 1)
            // KVM's emulator reads cmpxchg16b's operand before it gives up, so it raises the #PF and
            // #GP of the bad addresses itself (measured: 0 reach the layer); the layer's own fault
            // paths are covered by CompletionExecutorTests.
            #expect(stats[.cmpxchg16b].completed == 2 && stats[.cmpxchg16b].faulted <= 3)
            #expect(stats[.cmpxchg16b].nanoseconds > 0)
        } else {
            // With VT-x/AMD-V the CPU runs them itself.
            #expect(stats.total == 0)
        }
    }

    @Test("an instruction the layer does not know still ends the run as an emulation failure (hvrun status 3)", .timeLimit(.minutes(1)))
    func unknownInstruction() throws {
        let run = try GuestRun.pvh("emul.elf", commandLine: "bad=1")
        #expect(run.console.hasPrefix("bad=crc32\n"))
        guard PVMLinuxPolicy.hostIsPVM() else { return }
        guard case let .guestFailure(failure) = run.exit else { Issue.record("exit \(run.exit)"); return }
        #expect(failure.kind == .internalError(suberror: 1))
        #expect(Array(failure.instructionBytes.prefix(4)) == [0xF2, 0x0F, 0x38, 0xF1])
        #expect(!run.console.contains("bad_survived"))
    }

    @Test("hvrun --boot-time reports the completions by kind; a test guest gets no clearcpuid=; unknown → status 3",
          .timeLimit(.minutes(1)), .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
    func hvrunReport() throws {
        let guest = try GuestImages.path("emul.elf")
        let result = try TestHost.hvrun(["run", "--kernel", guest, "--boot-time"], timeoutSeconds: 30)
        #expect(result.status == 0x42, "\(result.stderr)")
        #expect(result.stderr.contains("hvrun: instructions completed for KVM's emulator"))
        #expect(!result.stderr.contains("clearcpuid"))
        if PVMLinuxPolicy.hostIsPVM() {
            #expect(result.stderr.contains("int3: 2 completed, 0 faulted"))
            #expect(result.stderr.contains("fwait: 2 completed, 1 faulted"))
            #expect(result.stderr.contains("cmpxchg16b: 2 completed, "))
            let bad = try TestHost.hvrun(["run", "--kernel", guest, "--cmdline", "bad=1"], timeoutSeconds: 30)
            #expect(bad.status == 3)
            #expect(bad.stderr.contains("instruction bytes: f2 0f 38 f1"))
        }
    }

    @Test("QEMU with TCG (the hardware's semantics; multi-threaded: atomic cmpxchg16b) prints the same lines",
          .timeLimit(.minutes(1)), .enabled(if: TestHost.hasTool("qemu-system-x86_64"), "qemu-system-x86_64 is not installed"))
    func sameAsQEMU() throws {
        let ours = try GuestRun.pvh("emul.elf")
        let result = try Subprocess.run("qemu-system-x86_64", [
            "-M", "q35", "-accel", "tcg,thread=multi", "-smp", "2", "-m", "128", "-nodefaults", "-nographic", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
            "-kernel", try GuestImages.path("emul.elf"),
        ], timeoutSeconds: 60)
        #expect(result.status == (0x42 << 1) | 1)
        // SeaBIOS prints before the guest, without a newline after "Booting from ROM..".
        let text = result.stdout.filter { $0 != "\r" }
        let guest = text.split(separator: "Booting from ROM..", omittingEmptySubsequences: false).last.map(String.init) ?? text
        #expect(guest.split(separator: "\n").map(String.init) == ours.console.split(separator: "\n").map(String.init))
    }

    @Test("two vCPUs contending with lock cmpxchg16b: every completion is atomic (no lost or torn update)",
          .timeLimit(.minutes(1)))
    func contention() throws {
        let configuration = try GuestRun.configuration("emul.elf", commandLine: "cpus=2 n=500", cpus: 2)
        let console = configuration.console as! BufferOutput
        let machine = try Machine(configuration)
        let exit = try machine.run(timeout: .seconds(30))
        let run = GuestRun(exit: exit, console: console.text)
        #expect(run.exit == .debugExit(0x42), "\(run.console)")
        #expect(run.values["smp_count"] == "1000")
        #expect(run.values["smp_consistent"] == "1")
        if PVMLinuxPolicy.hostIsPVM() {
            // 2 single ones, 1000 successful increments, and every retry that lost the race.
            let retries = (run.values["info smp_retries"] ?? "").split(separator: ",").compactMap { Int($0) }.reduce(0, +)
            #expect(machine.emulationCompletions[.cmpxchg16b].completed == 1002 + retries)
        }
    }

    @Test("on a PVM host a Linux kernel gets clearcpuid= (said on stderr); --cpuid or an explicit clearcpuid= turns it off",
          .timeLimit(.minutes(1)), .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"),
          .enabled(if: PVMLinuxPolicy.hostIsPVM(), "not a PVM host"))
    func clearCPUIDPolicy() throws {
        // A boot sector with HdrS and nothing else: hvrun decides the command line, then refuses
        // the file (status 1), so no kernel runs.
        let directory = try TemporaryDirectory()
        var bytes = [UInt8](repeating: 0, count: 0x400)
        bytes[0x1FE] = 0x55; bytes[0x1FF] = 0xAA
        bytes.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        let path = directory.file("bzImage")
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        #expect(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) } == bytes.count)
        close(fd)
        let automatic = try TestHost.hvrun(["run", "--kernel", path], timeoutSeconds: 30)
        #expect(automatic.status == 1)
        #expect(automatic.stderr.contains("hvrun: PVM host: added clearcpuid=xsave,smap,popcnt"))
        #expect(automatic.stderr.contains("hvrun: PVM host: hid KVM's hypercall features (0x40000001:eax:7, 0x40000001:eax:11, 0x40000001:eax:13)"))
        let overridden = try TestHost.hvrun(["run", "--kernel", path, "--cpuid=-x2apic"], timeoutSeconds: 30)
        #expect(overridden.stderr.contains("--cpuid given, so no clearcpuid= is added"))
        #expect(!overridden.stderr.contains("hid KVM's hypercall features"))
        let explicit = try TestHost.hvrun(["run", "--kernel", path, "--cmdline", "console=ttyS0 clearcpuid=xsave"], timeoutSeconds: 30)
        #expect(!explicit.stderr.contains("added clearcpuid="))
    }
}
