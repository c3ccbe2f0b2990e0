import Foundation
@testable import HyperCore
import Testing

@Suite("HostCheck output")
struct HostCheckOutputTests {
    private func parse(_ json: String) throws -> [String: Any] {
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8))
        return try #require(object as? [String: Any])
    }

    @Test func jsonEscapesEverythingRFC8259Requires() throws {
        let nasty = "quote \" backslash \\ newline \n tab \t bell \u{07} nul \u{00} del \u{7F} é 🚀 \u{1F}"
        let rendered = JSONValue.object([("s", .string(nasty)), ("n", .number(-5)), ("b", .bool(false)), ("z", .null)]).rendered()
        #expect(rendered.contains(#"\u0007"#))
        #expect(rendered.contains(#"\u0000"#))
        #expect(rendered.contains(#"\u001f"#))
        let object = try parse(rendered)
        #expect(object["s"] as? String == nasty)
        #expect(object["n"] as? Int == -5)
        #expect(object["b"] as? Bool == false)
        #expect(object["z"] is NSNull)
    }

    @Test func reportJSONHasTheDocumentedShape() throws {
        let report = try HostFixtures.report("this-machine-pvm")
        let object = try parse(report.json())
        #expect(object["verdict"] as? String == "usable")
        #expect(object["exit_status"] as? Int == 0)
        #expect(object["backend"] as? String == "kvm_pvm")
        #expect(object["nested"] as? Bool == true)
        #expect(object["hypervisor_signature"] as? String == "KVMKVMKVM")
        let checks = try #require(object["checks"] as? [[String: Any]])
        #expect(checks.count == report.checks.count)
        let backend = try #require(checks.first { $0["name"] as? String == "kernel.backend" })
        #expect(backend["status"] as? String == "WARN")
        #expect((backend["detail"] as? String)?.contains("PVM") == true)
        #expect(backend["hint"] is String)
        let capabilities = try #require(object["capabilities"] as? [String: Int])
        #expect(capabilities["IRQCHIP"] == 1)
        #expect(capabilities["MAX_VCPUS"] == 1024)
    }

    @Test func unusableJSONCarriesReasonAndNulls() throws {
        let object = try parse(try HostFixtures.report("unreadable-everything").json())
        #expect(object["verdict"] as? String == "undetermined")
        #expect(object["exit_status"] as? Int == 2)
        #expect(object["backend"] is NSNull)
        #expect(object["nested"] is NSNull)
        #expect((object["reason"] as? String)?.contains("/dev/kvm is absent") == true)
    }

    @Test func humanTextHasOneLinePerCheckHintsAndAVerdict() throws {
        let report = try HostFixtures.report("permission-denied")
        let lines = report.humanText().split(separator: "\n").map(String.init)
        let statusLines = lines.filter { $0.hasPrefix("PASS") || $0.hasPrefix("WARN") || $0.hasPrefix("FAIL") }
        #expect(statusLines.count == report.checks.count)
        #expect(lines.contains { $0.hasPrefix("FAIL  device.access") })
        #expect(lines.contains { $0.trimmingCharacters(in: .whitespaces).hasPrefix("hint: add yourself to the kvm group") })
        #expect(lines.last == report.verdictLine)
        #expect(report.verdictLine.hasPrefix("VERDICT: unusable: permission denied opening /dev/kvm"))
    }

    @Test func verdictLineCountsWarnings() throws {
        #expect(try HostFixtures.report("intel-bare-metal-ept").verdictLine == "VERDICT: usable: KVM acceleration can be used (backend kvm_intel)")
        #expect(try HostFixtures.report("recommended-capability-missing").verdictLine == "VERDICT: usable: KVM acceleration can be used (backend kvm_intel, 1 warning)")
    }
}
