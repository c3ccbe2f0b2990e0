import Testing
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun` as a user runs it: a separate process, its output and its exit status.
@Suite("hvrun process", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct HVRunProcessTests {
    @Test("no arguments: the embedded guest greets, reports what it measured, and resets → status 0", .timeLimit(.minutes(1)))
    func embeddedGuest() throws {
        let result = try TestHost.hvrun([], timeoutSeconds: 30)
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.outputLines
        #expect(lines.first == "Hello from HyperCore guest")
        #expect(lines.contains("cmdline=console=ttyS0"))
        #expect(lines.contains("mem_mib=255"))  // 256 MiB minus the legacy hole, as the guest sums its memory map
        #expect(lines.contains { $0.hasPrefix("cpu_vendor=") && $0.count > "cpu_vendor=".count })
        #expect(lines.contains("bye"))
    }

    @Test("--memory and --cmdline reach the embedded guest", .timeLimit(.minutes(1)))
    func memoryAndCommandLine() throws {
        let result = try TestHost.hvrun(["run", "--memory", "64M", "--cmdline", "quiet x=1"], timeoutSeconds: 30)
        #expect(result.status == 0)
        #expect(result.outputLines.contains("cmdline=quiet x=1"))
        #expect(result.outputLines.contains("mem_mib=63"))
    }

    @Test("the debug-exit byte becomes the exit status", .timeLimit(.minutes(1)))
    func debugExitStatus() throws {
        let result = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("exit.elf"), "--cmdline", "code=42"], timeoutSeconds: 30)
        #expect(result.status == 42)
        #expect(result.stdout == "code=42\n")
    }

    @Test("--timeout stops a spinning guest with status 124 and says so", .timeLimit(.minutes(1)))
    func timeoutStatus() throws {
        let result = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("spin.elf"), "--timeout", "1"], timeoutSeconds: 30)
        #expect(result.status == 124)
        #expect(result.stdout.contains("spinning"))
        #expect(result.stderr.contains("--timeout expired"))
    }

    @Test("guest input typed on stdin reaches the UART", .timeLimit(.minutes(1)))
    func consoleInputDoesNotBreakTheRun() throws {
        let result = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("reset.elf")], stdin: "hello\n", timeoutSeconds: 30)
        #expect(result.status == 0)
        #expect(result.stdout == "resetting\n")
    }

    @Test("a missing kernel, a non-ELF kernel and bad options are one-line errors with status 1")
    func usageAndHostErrors() throws {
        let missing = try TestHost.hvrun(["run", "--kernel", "/nonexistent/vmlinux"])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("/nonexistent/vmlinux") && missing.stderr.contains("No such file"))
        let notELF = try TestHost.hvrun(["run", "--kernel", TestHost.repositoryRoot + "/Package.swift"])
        #expect(notELF.status == 1)
        #expect(notELF.stderr.contains("not an ELF file"))
        for arguments in [["run", "--cpus", "0"], ["run", "--memory", "lots"], ["run", "--timeout", "-1"], ["run", "--initrd", "/x"]] {
            let result = try TestHost.hvrun(arguments)
            #expect(result.status == 1, "\(arguments)")
            #expect(result.stderr.contains("Error"), "\(arguments): \(result.stderr)")
        }
    }

    @Test("a guest failure is status 3 with the reason, RIP and instruction bytes on stderr", .timeLimit(.minutes(1)))
    func guestFailureStatus() throws {
        let kernel = try TemporaryFile(bytes: TinyELF.make(code: [0x90, 0xCC, 0xF4]))
        let result = try TestHost.hvrun(["run", "--kernel", kernel.path], timeoutSeconds: 30)
        #expect(result.status == 3)
        #expect(result.stderr.contains("the guest failed"))
        #expect(result.stderr.contains("rip=0x10000"))
    }

    @Test("--help and --version exit 0")
    func help() throws {
        let help = try TestHost.hvrun(["--help"])
        #expect(help.status == 0)
        #expect(help.stdout.contains("SUBCOMMANDS"))
        #expect(try TestHost.hvrun(["--version"]).status == 0)
    }
}
