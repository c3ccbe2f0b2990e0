import Foundation
import HyperCore
import Testing

/// The live probe and the `hvrun check` process on the machine running the tests.
@Suite("HostCheck live")
struct HostCheckLiveTests {
    static let devKVMPresent = FileManager.default.fileExists(atPath: "/dev/kvm")
    static let devKVMUsable = devKVMPresent && FileManager.default.isWritableFile(atPath: "/dev/kvm")

    static let hvrun: String? = TestHost.hvrunPath

    @Test(.enabled(if: devKVMUsable, "/dev/kvm is absent or not writable for this user: nothing live to check"))
    func liveProbeFindsThisHostUsable() {
        let report = HostCheck.evaluate(HostFacts.gather(from: LiveHostProbe()))
        #expect(report.verdict == .usable, "\(report.humanText())")
        #expect(report.failureCount == 0)
        #expect(report.capabilities["IRQCHIP"] == 1)
        if FileManager.default.fileExists(atPath: "/sys/module/kvm_pvm") {
            #expect(report.backend == .pvm)
            #expect(report.check(named: "kernel.backend")?.status == .warn)
            #expect(report.check(named: "kernel.backend")?.detail.contains("backend is PVM") == true)
        } else {
            print("HostCheck live: no kvm_pvm here (backend \(report.backend?.rawValue ?? "unknown")); PVM expectations skipped")
        }
    }

    @Test func liveProbeAlwaysReachesAVerdict() {
        let report = HostCheck.evaluate(HostFacts.gather(from: LiveHostProbe()))
        if !Self.devKVMPresent { #expect(report.verdict != .usable) }
        #expect(report.checks.contains { $0.name.hasPrefix("device.") })
    }

    private struct Run {
        var status: Int32
        var output: String
        var errors: String
    }

    private func run(_ arguments: [String]) throws -> Run {
        let result = try TestHost.hvrun(arguments, timeoutSeconds: 60)
        #expect(!result.timedOut, "hvrun \(arguments) did not finish within its deadline")
        return Run(status: result.status, output: result.stdout, errors: result.stderr)
    }

    @Test(.enabled(if: hvrun != nil && devKVMUsable, "needs the hvrun binary next to the tests and a usable /dev/kvm"))
    func checkJSONProcessSaysUsableAndExitsZero() throws {
        let result = try run(["check", "--json"])
        #expect(result.status == 0, "\(result.errors)")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any])
        #expect(object["verdict"] as? String == "usable")
        #expect((object["checks"] as? [Any])?.isEmpty == false)
    }

    @Test(.enabled(if: hvrun != nil && devKVMUsable, "needs the hvrun binary next to the tests and a usable /dev/kvm"))
    func checkHumanAndQuietOutput() throws {
        let human = try run(["check"])
        #expect(human.status == 0)
        let lines = human.output.split(separator: "\n")
        #expect(lines.last?.hasPrefix("VERDICT: usable") == true)
        #expect(lines.contains { $0.hasPrefix("PASS  kvm.create_vm") })
        let quiet = try run(["check", "--quiet"])
        #expect(quiet.status == 0)
        #expect(quiet.output.split(separator: "\n").count == 1)
        #expect(quiet.output.hasPrefix("VERDICT: usable"))
    }

    @Test(.enabled(if: hvrun != nil, "the hvrun binary is not next to the test bundle; run swift build first"), arguments: [
        ("permission-denied", Int32(1), "hint: add yourself to the kvm group"),
        ("unreadable-everything", 2, "VERDICT: undetermined"),
        ("this-machine-pvm", 0, "WARN  kernel.backend"),
    ])
    func checkExitStatusFollowsTheVerdict(fixture: String, status: Int32, fragment: String) throws {
        let result = try run(["check", "--from-recording", HostFixtures.path(fixture)])
        #expect(result.status == status, "\(result.output)\(result.errors)")
        #expect(result.output.contains(fragment))
    }

    @Test(.enabled(if: hvrun != nil, "the hvrun binary is not next to the test bundle"))
    func conflictingFlagsAreAUsageError() throws {
        let result = try run(["check", "--json", "--quiet"])
        #expect(result.status == 1) // hvrun reports every usage error with status 1 (see HVRun.main)
        #expect(result.errors.contains("--json and --quiet cannot be combined"))
    }

    @Test(.enabled(if: hvrun != nil, "the hvrun binary is not next to the test bundle"))
    func recordThenReplayGivesTheSameVerdict() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("hvrun-record-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let record = try run(["check", "--record", directory])
        #expect(record.status == 0, "\(record.errors)")
        let live = try run(["check", "--quiet"])
        let replay = try run(["check", "--quiet", "--from-recording", directory])
        #expect(replay.status == live.status)
        #expect(replay.output == live.output)
    }
}
