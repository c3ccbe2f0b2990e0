import ArgumentParser
internal import HyperCore

/// `hvrun check`: can this host run hvrun's VMs, and if not, what to do about it.
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check that this host can run hvrun.",
        discussion: """
            Checks the CPU, firmware, kernel modules, /dev/kvm and the KVM API layer by layer and prints \
            one PASS/WARN/FAIL line per check with a hint, then a verdict. Whether /dev/kvm opens and works \
            decides the verdict; the other layers explain failures and add warnings.

            Exit status: 0 usable (warnings allowed), 1 unusable, 2 undetermined (the host could not be \
            inspected); bad arguments exit 1 with a message on stderr. See Docs/hvrun-check.md.
            """)

    @Flag(help: "Print a JSON document instead of text.")
    var json = false

    @Flag(name: .shortAndLong, help: "Print only the verdict line; the exit status tells the rest.")
    var quiet = false

    @Option(help: .hidden)
    var record: String?

    @Option(help: .hidden)
    var fromRecording: String?

    func validate() throws {
        if json && quiet { throw ValidationError("--json and --quiet cannot be combined") }
        if record != nil && fromRecording != nil { throw ValidationError("--record and --from-recording cannot be combined") }
    }

    func run() throws {
        if let record {
            try HostRecorder.record(from: LiveHostProbe(), into: record)
            print("recorded this host into \(record)")
            return
        }
        let facts: HostFacts
        if let fromRecording {
            facts = HostFacts.gather(from: try RecordedHostProbe(root: fromRecording))
        } else {
            facts = HostFacts.gather(from: LiveHostProbe())
        }
        let report = HostCheck.evaluate(facts)
        if json {
            print(report.json(), terminator: "")
        } else if quiet {
            print(report.verdictLine)
        } else {
            var lines = report.humanText().split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            if fromRecording == nil, let verdict = lines.lastIndex(where: { $0.hasPrefix("VERDICT:") }) {
                // Virtual switches: a line of its own, outside the verdict (VMs without a switch
                // need none of it).
                let (usable, why) = SwitchStore.hostCanCreateSwitches()
                lines.insert("\(usable ? "PASS" : "WARN")  net.switches" + String(repeating: " ", count: 18) + why, at: verdict)
            }
            print(lines.joined(separator: "\n"), terminator: "")
        }
        if report.verdict.exitStatus != 0 { throw ExitCode(report.verdict.exitStatus) }
    }
}
