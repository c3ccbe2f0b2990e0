import Testing
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `HYPERCORE_SAMPLE_RIP` / `HYPERCORE_SAMPLE_PEEK` (the diagnostic that found where Linux spends
/// its time on PVM hosts, Docs/linux-boot.md): hvrun prints periodic vCPU samples on stderr.
@Suite("RIP sampler", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct RIPSamplerTests {
    /// The sample lines of a spin.elf run (it spins on `cli; 1: jmp 1b`) under `environment`.
    private func spinSamples(_ environment: [String]) throws -> (lines: [String], status: Int32, errors: String) {
        let process = try VMProcess(["run", "--kernel", try GuestImages.path("spin.elf"), "--timeout", "2"],
                                    environment: environment)
        let status = process.wait(timeoutSeconds: 30)
        let errors = process.errors
        return (errors.split(separator: "\n").map(String.init).filter { $0.hasPrefix("hvrun: sample ") }, status, errors)
    }

    private func field(_ name: String, _ line: String) -> String? {
        line.split(separator: " ").first { $0.hasPrefix(name + "=") }.map { String($0.dropFirst(name.count + 1)) }
    }

    @Test("every 0.2 s vCPU 0 reports the spin loop's RIP with interrupts off; PEEK reads the loop's bytes",
          .timeLimit(.minutes(1)))
    func samplesTheSpinLoop() throws {
        let run = try spinSamples(["HYPERCORE_SAMPLE_RIP=0.2"])
        #expect(run.status == 124, "\(run.errors)")
        // 2 s at 0.2 s: about 10; a starved host may coalesce some, never all.
        #expect(run.lines.count >= 3, "\(run.errors)")
        #expect(run.lines.allSatisfy { $0.hasPrefix("hvrun: sample vcpu0 +") })
        let rips = Set(run.lines.compactMap { field("rip", $0) })
        #expect(rips.count == 1, "the guest spins on one instruction: \(rips)")
        #expect(run.lines.allSatisfy { field("if", $0) == "0" })
        let rip = try #require(rips.first)

        // The same run reading 8 bytes at that RIP through the guest's page tables: `jmp 1b` is EB FE.
        let peeked = try spinSamples(["HYPERCORE_SAMPLE_RIP=0.2", "HYPERCORE_SAMPLE_PEEK=\(rip)"])
        let values = peeked.lines.compactMap { field("peek", $0) }
        #expect(!values.isEmpty, "\(peeked.errors)")
        for value in values {
            let number = try #require(UInt64(value.dropFirst(2), radix: 16))
            #expect(number & 0xFFFF == 0xFEEB, "peek=\(value)")
        }
    }

    @Test("without the variable (or with a non-number) hvrun prints no samples", .timeLimit(.minutes(1)))
    func offByDefault() throws {
        let plain = try spinSamples([])
        #expect(plain.status == 124)
        #expect(plain.lines.isEmpty, "\(plain.errors)")
        let garbage = try spinSamples(["HYPERCORE_SAMPLE_RIP=often"])
        #expect(garbage.lines.isEmpty, "\(garbage.errors)")
    }
}
