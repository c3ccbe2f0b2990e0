import Foundation
import HyperCore
import Testing

@Suite("HostCheck recordings")
struct HostCheckRecordingTests {
    private func temporaryDirectory() throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("hostcheck-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url.path
    }

    @Test func recordingThisHostReplaysToTheSameReport() throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try HostRecorder.record(from: LiveHostProbe(), into: directory)
        let live = HostCheck.evaluate(HostFacts.gather(from: LiveHostProbe()))
        let replayed = HostCheck.evaluate(HostFacts.gather(from: try RecordedHostProbe(root: directory)))
        #expect(replayed == live, "live:\n\(live.humanText())\nreplayed:\n\(replayed.humanText())")
    }

    @Test func recordingAFixtureReproducesIt() throws {
        for fixture in ["intel-bare-metal-ept", "permission-denied", "sysfs-kvm-intel-parameters-fallback", "unreadable-everything"] {
            let directory = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let original = try RecordedHostProbe(root: HostFixtures.path(fixture))
            try HostRecorder.record(from: original, into: directory)
            let copy = try RecordedHostProbe(root: directory)
            #expect(HostCheck.evaluate(HostFacts.gather(from: copy)) == HostCheck.evaluate(HostFacts.gather(from: original)), "\(fixture)")
        }
    }

    @Test func deviceFileRoundTrips() throws {
        let text = try String(contentsOfFile: HostFixtures.path("intel-bare-metal-ept") + "/dev/kvm", encoding: .utf8)
        let facts = try HostRecordingFormat.decodeDevice(text, file: "kvm")
        #expect(facts.open == .succeeded)
        #expect(facts.apiVersion == .success(12))
        #expect(facts.capabilities["IRQ_ROUTING"] == 4096)
        #expect(try HostRecordingFormat.decodeDevice(HostRecordingFormat.encodeDevice(facts), file: "kvm") == facts)
        let failed = try HostRecordingFormat.decodeDevice("stat=errno 13\n", file: "kvm")
        #expect(failed.node == .failure(.permissionDenied))
    }

    @Test(arguments: [
        ("cpuid", "0x0 0x0 0x1 0x2 0x3 0x4\n0x1 0x0 zz\n", 2, "0x1 0x0 zz"),
        ("msr", "# comment\n0x3a 0x5\n0x48b sometimes\n", 3, "0x48b sometimes"),
        ("dev/kvm", "type=char\nopen=maybe\n", 2, "open=maybe"),
        ("dev/kvm", "colour=blue\n", 1, "colour=blue"),
    ])
    func malformedLinesAreReportedWithFileAndLine(file: String, content: String, line: Int, text: String) throws {
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory + "/dev", withIntermediateDirectories: true)
        try content.write(toFile: "\(directory)/\(file)", atomically: true, encoding: .utf8)
        let error = #expect(throws: HostRecordingError.self) { try RecordedHostProbe(root: directory) }
        #expect(error == .malformedLine(file: "\(directory)/\(file)", line: line, text: text))
        #expect(error?.description == "\(directory)/\(file):\(line): cannot parse \"\(text)\"")
    }

    @Test func missingRecordingIsACannotReadError() {
        #expect(throws: HostRecordingError.cannotRead(path: "/nonexistent/recording", .noSuchFile)) {
            try RecordedHostProbe(root: "/nonexistent/recording")
        }
    }

    @Test func msrsMissingFromTheFileReadAsEIO() throws {
        let probe = try RecordedHostProbe(root: HostFixtures.path("intel-bare-metal-ept"))
        #expect(probe.readMSR(0x3A) == .success(5))
        #expect(probe.readMSR(0x10) == .failure(.inputOutput))
        #expect(try RecordedHostProbe(root: HostFixtures.path("nested-vmx-exposed")).readMSR(0x3A) == .failure(.noSuchFile))
    }
}
