import HyperCore
import Testing

/// Locating and loading the recorded hosts under Fixtures/host.
enum HostFixtures {
    static let directory: String = {
        let file = String(#filePath)
        return String(file[..<file.lastIndex(of: "/")!]) + "/Fixtures/host"
    }()

    static func path(_ name: String) -> String { "\(directory)/\(name)" }

    static func facts(_ name: String) throws -> HostFacts {
        HostFacts.gather(from: try RecordedHostProbe(root: path(name)))
    }

    static func report(_ name: String) throws -> HostReport { HostCheck.evaluate(try facts(name)) }
}

extension HostReport {
    /// Name → status, for compact expectations.
    var statuses: [String: CheckStatus] {
        Dictionary(uniqueKeysWithValues: checks.map { ($0.name, $0.status) })
    }

    func status(_ name: String) -> CheckStatus? { check(named: name)?.status }
}
