/// Snapshots a host into a recording (``HostRecordingFormat``) that ``RecordedHostProbe`` replays:
/// `hvrun check --record DIR` turns a machine into a test fixture.
public enum HostRecorder {
    public static func record(from probe: some HostProbe, into directory: String) throws(HostRecordingError) {
        func write(_ text: String, _ relativePath: String) throws(HostRecordingError) {
            let path = "\(directory)/\(relativePath)"
            do { try FileAccess.writeText(text, to: path) } catch { throw .cannotWrite(path: path, error) }
        }

        if probe.cpuid(.vendor) != nil {
            var lines = ["# leaf subleaf eax ebx ecx edx"]
            for leaf in CPUIDLeaf.probed {
                let registers = probe.cpuid(leaf) ?? .zero
                let values = [leaf.leaf, leaf.subleaf, registers.eax, registers.ebx, registers.ecx, registers.edx]
                lines.append(values.map(HostRecordingFormat.hex).joined(separator: " "))
            }
            try write(lines.joined(separator: "\n") + "\n", HostRecordingFormat.cpuidFile)
        }

        let msrs = HostMSR.probed.map { ($0, probe.readMSR($0)) }
        // All ENOENT means there is no msr device at all; the format says that by omitting the file.
        if !msrs.allSatisfy({ $0.1 == .failure(.noSuchFile) }) {
            var lines = ["# msr value-or-errno (CPU 0)"]
            for (index, result) in msrs {
                switch result {
                case .success(let value): lines.append("\(HostRecordingFormat.hex(index)) \(HostRecordingFormat.hex(value))")
                case .failure(let error): lines.append("\(HostRecordingFormat.hex(index)) errno \(error.errno)")
                }
            }
            try write(lines.joined(separator: "\n") + "\n", HostRecordingFormat.msrFile)
        }

        for path in [HostPaths.cpuinfo, HostPaths.processStatus] {
            if case .success(let text) = probe.readFile(path) { try write(text, String(path.dropFirst())) }
        }

        let device = probe.probeKVMDevice(capabilities: KVMCapabilityCatalog.all)
        if device.node != .failure(.noSuchFile) {
            try write(HostRecordingFormat.encodeDevice(device), HostRecordingFormat.deviceFile)
        }

        try recordAccounts(from: probe, device: device, write: write)

        if case .success(let loaded) = probe.listDirectory(HostPaths.sysModule) {
            try write("", HostRecordingFormat.sysModuleMarker)
            for module in HostPaths.kvmModules where loaded.contains(module) {
                let parameters = "\(HostPaths.sysModule)/\(module)/parameters"
                for parameter in (try? probe.listDirectory(parameters).get()) ?? [] {
                    if case .success(let value) = probe.readFile("\(parameters)/\(parameter)") {
                        try write(value, String("\(parameters)/\(parameter)".dropFirst()))
                    }
                }
            }
        }
    }

    /// Only the account lines the check can use are kept: the caller, the device's group and
    /// `kvm`. A fixture has no business carrying a machine's whole user list.
    private static func recordAccounts(
        from probe: some HostProbe, device: KVMDeviceFacts, write: (String, String) throws(HostRecordingError) -> Void
    ) throws(HostRecordingError) {
        let caller = CallerIdentity(
            processStatus: try? probe.readFile(HostPaths.processStatus).get(), passwd: nil, group: nil)
        var relevantGroups: Set<UInt32> = Set(caller.groupIDs)
        if case .success(let node) = device.node { relevantGroups.insert(node.groupID) }

        if case .success(let passwd) = probe.readFile(HostPaths.passwd) {
            let lines = passwd.split(separator: "\n").filter { line in
                let fields = line.split(separator: ":", omittingEmptySubsequences: false)
                return fields.count > 2 && UInt32(fields[2]) == caller.uid
            }
            try write(lines.joined(separator: "\n") + "\n", String(HostPaths.passwd.dropFirst()))
        }
        if case .success(let group) = probe.readFile(HostPaths.group) {
            let lines = group.split(separator: "\n").filter { line in
                let fields = line.split(separator: ":", omittingEmptySubsequences: false)
                guard fields.count > 2 else { return false }
                return fields[0] == "kvm" || UInt32(fields[2]).map(relevantGroups.contains) == true
            }
            try write(lines.joined(separator: "\n") + "\n", String(HostPaths.group.dropFirst()))
        }
    }
}
