/// Human and JSON renderings of a ``HostReport``.
extension HostReport {
    /// The last line of the human output, stable enough for scripts to grep (like kvm-ok's).
    public var verdictLine: String {
        var notes: [String] = []
        if let backend { notes.append("backend \(backend.rawValue)") }
        if warningCount > 0 { notes.append(warningCount == 1 ? "1 warning" : "\(warningCount) warnings") }
        if failureCount > 0 { notes.append(failureCount == 1 ? "1 failure" : "\(failureCount) failures") }
        let suffix = notes.isEmpty ? "" : " (\(notes.joined(separator: ", ")))"
        switch verdict {
        case .usable: return "VERDICT: usable: KVM acceleration can be used\(suffix)"
        case .unusable: return "VERDICT: unusable: \(reason)\(suffix)"
        case .undetermined: return "VERDICT: undetermined: \(reason)\(suffix)"
        }
    }

    /// One `STATUS  name  detail` line per check, hints indented below, then the verdict line.
    public func humanText() -> String {
        let width = (checks.map(\.name.count).max() ?? 0) + 2
        var lines: [String] = []
        for check in checks {
            let padding = String(repeating: " ", count: max(1, width - check.name.count))
            lines.append("\(check.status.rawValue)  \(check.name)\(padding)\(check.detail)")
            if let hint = check.hint {
                lines.append(String(repeating: " ", count: 6 + width) + "hint: \(hint)")
            }
        }
        lines.append(verdictLine)
        return lines.joined(separator: "\n") + "\n"
    }

    /// The `--json` document.
    public func json() -> String {
        var root: [(String, JSONValue)] = [
            ("verdict", .string(verdict.rawValue)),
            ("exit_status", .number(Int64(verdict.exitStatus))),
            ("reason", .string(reason)),
            ("backend", backend.map { .string($0.rawValue) } ?? .null),
            ("nested", nested.map(JSONValue.bool) ?? .null),
            ("hypervisor_signature", hypervisorSignature.map(JSONValue.string) ?? .null),
        ]
        root.append(
            ("checks", .array(checks.map { check in
                .object([
                    ("name", .string(check.name)),
                    ("status", .string(check.status.rawValue)),
                    ("detail", .string(check.detail)),
                    ("hint", check.hint.map(JSONValue.string) ?? .null),
                ])
            })))
        root.append(
            ("capabilities", .object(capabilities.sorted { $0.key < $1.key }.map { ($0.key, .number(Int64($0.value))) })))
        return JSONValue.object(root).rendered() + "\n"
    }
}
