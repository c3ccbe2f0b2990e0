import Testing
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// Issue 8 item 1: however an `hvrun run --disk X.vhdx` ends, the VHDX the guest wrote to is closed
/// cleanly (flushed, log applied, both headers with a zero LogGuid) before the process exits, so
/// `disk info` shows no pending log and qemu-img opens it. A power-off (the ACPI sleep control
/// register, which `powerbtn.elf` writes; see VMStoreCLITests.gracefulStop) ends through the same
/// `Machine.run` return as reset; the disk-writing guest here does not power off.
@Suite("hvrun run closes its disks", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct HVRunDiskCloseTests {
    struct Ending: CustomTestStringConvertible, Sendable {
        let name: String
        let guestEnd: Int
        let extra: [String]
        let signal: Int32?
        let status: Int32
        var testDescription: String { name }
    }

    static let endings: [Ending] = [
        Ending(name: "debug exit", guestEnd: 0, extra: [], signal: nil, status: 0x40),
        Ending(name: "reset", guestEnd: 1, extra: [], signal: nil, status: 0),
        Ending(name: "guest failure", guestEnd: 3, extra: [], signal: nil, status: 3),
        Ending(name: "--timeout", guestEnd: 2, extra: ["--timeout", "3"], signal: nil, status: 124),
        Ending(name: "SIGINT", guestEnd: 2, extra: [], signal: SIGINT, status: 130),
        Ending(name: "SIGTERM", guestEnd: 2, extra: [], signal: SIGTERM, status: 143),
    ]

    @Test("the VHDX the guest wrote has no pending log afterwards, and qemu-img accepts it", .timeLimit(.minutes(2)),
          arguments: endings)
    func closedAfter(_ ending: Ending) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let disk = dir + "/disk.vhdx"
        let create = try TestHost.hvrun(["disk", "create", disk, "--size", "64M"])
        try #require(create.status == 0, "\(create.stderr)")

        let result = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("virtio.elf"),
                                         "--cmdline", "dev=2 end=\(ending.guestEnd)", "--disk", disk] + ending.extra,
                                        timeoutSeconds: 60, signal: ending.signal.map { ("parked", $0) })
        #expect(!result.timedOut)
        #expect(result.status == ending.status, "\(result.stderr)")
        // The guest really wrote: the session's first write sets a LogGuid that only a clean close clears.
        #expect(result.outputLines.contains("verify=ok"), "\(result.stdout)")

        let info = try TestHost.hvrun(["disk", "info", "--json", disk])
        #expect(info.status == 0, "\(info.stderr)")
        #expect(info.stdout.contains("\"log_pending\": false"), "\(info.stdout)")

        if let qemuImg = VHDXTestSupport.which("qemu-img") {
            let check = VHDXTestSupport.run(qemuImg, ["check", "-f", "vhdx", disk])
            #expect(check.status == 0, "qemu-img check: \(check.output)")
        } else {
            print("qemu-img is not installed: skipping the qemu-img check of the closed VHDX")
        }
    }

    @Test("a run that fails to open its second disk still closes the first and names the missing one")
    func hostErrorWhileOpening() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let disk = dir + "/disk.vhdx"
        try #require(try TestHost.hvrun(["disk", "create", disk, "--size", "8M"]).status == 0)
        let result = try TestHost.hvrun(["run", "--disk", disk, "--disk", dir + "/missing.vhdx"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("missing.vhdx"), "\(result.stderr)")
        #expect(try TestHost.hvrun(["disk", "info", "--json", disk]).stdout.contains("\"log_pending\": false"))
    }
}
