/// The on-disk format of a recorded host, shared by ``HostRecorder`` and ``RecordedHostProbe``.
///
/// A recording is a directory that mirrors the host's own paths where it can
/// (`proc/cpuinfo`, `proc/self/status`, `etc/group`, `sys/module/<name>/parameters/<p>`) plus three
/// small text files for what has no file on the host (`#` starts a comment):
///
/// - `cpuid`: `leaf subleaf eax ebx ecx edx` in hex per line. Absent: CPUID unavailable.
///   A leaf not listed reads as zeros.
/// - `msr`: `index value` or `index errno N` per line (CPU 0). Absent: no `/dev/cpu/0/msr`
///   (every read fails with ENOENT); an index not listed fails with EIO, like a missing MSR.
/// - `dev/kvm`: `key=value` lines describing `/dev/kvm` and what it did. Absent: no `/dev/kvm`.
///   Keys: `stat=errno N` or `type=char|regular|directory|other`, `rdev=10:232`, `mode=0660`,
///   `uid=0`, `gid=36`; then `open`, `create_vm`, `create_vcpu` = `ok` or `errno N`;
///   `api_version=12` or `errno N`; `cap.<NAME>=<value>` per KVM_CHECK_EXTENSION result.
///
/// A file missing from the recording reads as ENOENT, so "unreadable" is recorded by leaving
/// the file out.
public enum HostRecordingFormat {
    public static let cpuidFile = "cpuid"
    public static let msrFile = "msr"
    public static let deviceFile = "dev/kvm"
    /// Marks `sys/module` as readable even when no KVM module was loaded (git keeps no empty folders).
    public static let sysModuleMarker = "sys/module/.readable"

    static func hex(_ value: some BinaryInteger) -> String { "0x" + String(value, radix: 16) }

    static func parseNumber(_ text: Substring) -> UInt64? {
        text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    }

    /// `ok` / `errno N`.
    static func encode(_ outcome: KVMDeviceFacts.Outcome) -> String {
        switch outcome {
        case .succeeded: "ok"
        case .failed(let error): "errno \(error.errno)"
        }
    }

    static func parseErrno(_ text: Substring) -> ProbeError? {
        guard text.hasPrefix("errno "), let code = Int32(text.dropFirst(6)) else { return nil }
        return ProbeError(errno: code)
    }

    static func parseOutcome(_ text: Substring) -> KVMDeviceFacts.Outcome? {
        if text == "ok" { return .succeeded }
        return parseErrno(text).map { .failed($0) }
    }

    /// Lines without comments and blank lines, with their 1-based numbers for error messages.
    static func meaningfulLines(_ text: String) -> [(number: Int, text: Substring)] {
        text.split(separator: "\n", omittingEmptySubsequences: false).enumerated().compactMap { index, line in
            let content = line.split(separator: "#", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
            let trimmed = Substring(content.trimmingWhitespace())
            return trimmed.isEmpty ? nil : (index + 1, trimmed)
        }
    }

    public static func encodeDevice(_ facts: KVMDeviceFacts) -> String {
        var lines = ["# /dev/kvm as recorded by hvrun check --record"]
        switch facts.node {
        case .failure(let error): lines.append("stat=errno \(error.errno)")
        case .success(let node):
            lines += [
                "type=\(node.type.rawValue)", "rdev=\(node.major):\(node.minor)", "mode=\(HostCheck.octal(node.mode))",
                "uid=\(node.ownerUID)", "gid=\(node.groupID)",
            ]
        }
        if let open = facts.open { lines.append("open=\(encode(open))") }
        switch facts.apiVersion {
        case .success(let version)?: lines.append("api_version=\(version)")
        case .failure(let error)?: lines.append("api_version=errno \(error.errno)")
        case nil: break
        }
        for (name, value) in facts.capabilities.sorted(by: { $0.key < $1.key }) { lines.append("cap.\(name)=\(value)") }
        if let createVM = facts.createVM { lines.append("create_vm=\(encode(createVM))") }
        if let createVCPU = facts.createVCPU { lines.append("create_vcpu=\(encode(createVCPU))") }
        return lines.joined(separator: "\n") + "\n"
    }

    public static func decodeDevice(_ text: String, file: String) throws(HostRecordingError) -> KVMDeviceFacts {
        var facts = KVMDeviceFacts(node: .failure(.noSuchFile))
        var node = KVMDeviceFacts.Node(type: .characterDevice, major: 10, minor: 232, mode: 0o600, ownerUID: 0, groupID: 0)
        var statError: ProbeError?
        for (number, line) in meaningfulLines(text) {
            let malformed = HostRecordingError.malformedLine(file: file, line: number, text: String(line))
            guard let equals = line.firstIndex(of: "=") else { throw malformed }
            let key = line[..<equals]
            let value = line[line.index(after: equals)...]
            switch key {
            case "stat": guard let error = parseErrno(value) else { throw malformed }; statError = error
            case "type": guard let type = KVMDeviceFacts.FileType(rawValue: String(value)) else { throw malformed }; node.type = type
            case "rdev":
                let parts = value.split(separator: ":")
                guard parts.count == 2, let major = UInt32(parts[0]), let minor = UInt32(parts[1]) else { throw malformed }
                (node.major, node.minor) = (major, minor)
            case "mode": guard let mode = UInt32(value, radix: 8) else { throw malformed }; node.mode = mode
            case "uid": guard let uid = UInt32(value) else { throw malformed }; node.ownerUID = uid
            case "gid": guard let gid = UInt32(value) else { throw malformed }; node.groupID = gid
            case "open": guard let outcome = parseOutcome(value) else { throw malformed }; facts.open = outcome
            case "create_vm": guard let outcome = parseOutcome(value) else { throw malformed }; facts.createVM = outcome
            case "create_vcpu": guard let outcome = parseOutcome(value) else { throw malformed }; facts.createVCPU = outcome
            case "api_version":
                if let error = parseErrno(value) {
                    facts.apiVersion = .failure(error)
                } else if let version = Int32(value) {
                    facts.apiVersion = .success(version)
                } else {
                    throw malformed
                }
            case _ where key.hasPrefix("cap."):
                guard let capability = Int32(value) else { throw malformed }
                facts.capabilities[String(key.dropFirst(4))] = capability
            default: throw malformed
            }
        }
        facts.node = statError.map { .failure($0) } ?? .success(node)
        return facts
    }
}

/// Why a recording could not be read or written.
public enum HostRecordingError: Error, Hashable, Sendable, CustomStringConvertible {
    case malformedLine(file: String, line: Int, text: String)
    case cannotRead(path: String, ProbeError)
    case cannotWrite(path: String, ProbeError)

    public var description: String {
        switch self {
        case .malformedLine(let file, let line, let text): "\(file):\(line): cannot parse \"\(text)\""
        case .cannotRead(let path, let error): "cannot read \(path): \(error)"
        case .cannotWrite(let path, let error): "cannot write \(path): \(error)"
        }
    }
}
