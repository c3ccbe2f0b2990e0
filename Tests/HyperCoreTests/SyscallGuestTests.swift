import Testing
@testable import HyperCore

/// `syscall.elf`: SYSCALL from CPL3 to LSTAR, the path of every Linux system call. It is the
/// measured reason Linux's init dies on PVM hosts (Docs/linux-boot.md): there the entry code
/// runs still in user mode.
@Suite("SYSCALL from user mode", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct SyscallGuestTests {
    @Test("SYSCALL from CPL3 enters LSTAR at CPL0 with CS from STAR (hardware); on PVM it stays at CPL3",
          .timeLimit(.minutes(1)))
    func syscallFromUserMode() throws {
        let run = try GuestRun.pvh("syscall.elf")
        #expect(run.values["user_mode"] == "1", "\(run.console)")
        if PVMLinuxPolicy.hostIsPVM() {
            // Measured: the entry runs with a user-mode CS (0x33, not the guest's own 0x2b: PVM runs
            // guest user code on the host's selectors), and its first port access faults.
            #expect(run.exit == .debugExit(0x36), "\(run.console)")
            let cs = try #require(run.values["syscall_cs"].flatMap { UInt64($0.dropFirst(2), radix: 16) }, "\(run.console)")
            #expect(cs & 3 == 3, "the entry ran at CPL\(cs & 3)")
            #expect(run.console.contains("fault vector=13"))
        } else {
            #expect(run.exit == .debugExit(0x35), "\(run.console)")
            #expect(run.values["syscall_cs"] == "0x8")
            #expect(run.values["syscall_rcx_is_return"] == "1")
        }
    }

    @Test("QEMU with TCG (the hardware's semantics): the entry runs at CPL0 with CS 0x08",
          .timeLimit(.minutes(1)), .enabled(if: TestHost.hasTool("qemu-system-x86_64"), "qemu-system-x86_64 is not installed"))
    func sameAsQEMU() throws {
        let result = try Subprocess.run("qemu-system-x86_64", [
            "-M", "q35", "-accel", "tcg", "-m", "128", "-nodefaults", "-nographic", "-no-reboot",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
            "-kernel", try GuestImages.path("syscall.elf"),
        ], timeoutSeconds: 60)
        #expect(result.status == (0x35 << 1) | 1, "\(result.stdout)")
        let lines = result.stdout.filter { $0 != "\r" }.split(separator: "\n").map(String.init)
        #expect(lines.contains("syscall_cs=0x8"))
        #expect(lines.contains("syscall_rcx_is_return=1"))
        #expect(lines.contains("syscall_r11=0x2"))
    }
}
