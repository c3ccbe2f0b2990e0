/// Answers every probe from a recording made by ``HostRecorder`` (format: ``HostRecordingFormat``).
public struct RecordedHostProbe: HostProbe {
    public let root: String
    private let cpuidTable: [CPUIDLeaf: CPUIDRegisters]?
    private let msrTable: [UInt32: Result<UInt64, ProbeError>]?
    private let device: KVMDeviceFacts

    /// Loads the recording at `root`; the small text files are parsed now so errors surface early.
    public init(root: String) throws(HostRecordingError) {
        self.root = root
        if case .failure(let error) = FileAccess.listDirectory(root) { throw .cannotRead(path: root, error) }
        cpuidTable = try Self.loadOptional(root, HostRecordingFormat.cpuidFile).map { text throws(HostRecordingError) in
            try Self.parseCPUID(text, file: "\(root)/\(HostRecordingFormat.cpuidFile)")
        }
        msrTable = try Self.loadOptional(root, HostRecordingFormat.msrFile).map { text throws(HostRecordingError) in
            try Self.parseMSRs(text, file: "\(root)/\(HostRecordingFormat.msrFile)")
        }
        let deviceFile = "\(root)/\(HostRecordingFormat.deviceFile)"
        device = try Self.loadOptional(root, HostRecordingFormat.deviceFile).map { text throws(HostRecordingError) in
            try HostRecordingFormat.decodeDevice(text, file: deviceFile)
        } ?? KVMDeviceFacts(node: .failure(.noSuchFile))
    }

    public func cpuid(_ leaf: CPUIDLeaf) -> CPUIDRegisters? {
        guard let cpuidTable else { return nil }
        return cpuidTable[leaf] ?? .zero
    }

    public func readMSR(_ index: UInt32) -> Result<UInt64, ProbeError> {
        guard let msrTable else { return .failure(.noSuchFile) }
        return msrTable[index] ?? .failure(.inputOutput)
    }

    public func readFile(_ path: String) -> Result<String, ProbeError> { FileAccess.readText(root + path) }

    public func listDirectory(_ path: String) -> Result<[String], ProbeError> { FileAccess.listDirectory(root + path) }

    /// The recording holds the answers for the catalog it was made with; capabilities it lacks read as 0.
    public func probeKVMDevice(capabilities: [KVMCapabilityRequirement]) -> KVMDeviceFacts { device }

    private static func loadOptional(_ root: String, _ name: String) throws(HostRecordingError) -> String? {
        switch FileAccess.readText("\(root)/\(name)") {
        case .success(let text): return text
        case .failure(.noSuchFile): return nil
        case .failure(let error): throw .cannotRead(path: "\(root)/\(name)", error)
        }
    }

    private static func parseCPUID(_ text: String, file: String) throws(HostRecordingError) -> [CPUIDLeaf: CPUIDRegisters] {
        var table: [CPUIDLeaf: CPUIDRegisters] = [:]
        for (number, line) in HostRecordingFormat.meaningfulLines(text) {
            let values = line.split(separator: " ").compactMap(HostRecordingFormat.parseNumber)
            guard values.count == 6, values.allSatisfy({ $0 <= UInt32.max }) else {
                throw .malformedLine(file: file, line: number, text: String(line))
            }
            let registers = values.map { UInt32($0) }
            table[CPUIDLeaf(registers[0], registers[1])] = CPUIDRegisters(
                eax: registers[2], ebx: registers[3], ecx: registers[4], edx: registers[5])
        }
        return table
    }

    private static func parseMSRs(_ text: String, file: String) throws(HostRecordingError) -> [UInt32: Result<UInt64, ProbeError>] {
        var table: [UInt32: Result<UInt64, ProbeError>] = [:]
        for (number, line) in HostRecordingFormat.meaningfulLines(text) {
            let malformed = HostRecordingError.malformedLine(file: file, line: number, text: String(line))
            guard let space = line.firstIndex(of: " "), let index = HostRecordingFormat.parseNumber(line[..<space]),
                let msr = UInt32(exactly: index)
            else { throw malformed }
            let rest = Substring(line[space...].trimmingWhitespace())
            if let error = HostRecordingFormat.parseErrno(rest) {
                table[msr] = .failure(error)
            } else if let value = HostRecordingFormat.parseNumber(rest) {
                table[msr] = .success(value)
            } else {
                throw malformed
            }
        }
        return table
    }
}
