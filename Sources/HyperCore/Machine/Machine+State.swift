internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// Where a machine is in its life. The transitions:
/// `created` → (``Machine/start(paused:)``) → `running` ⇄ (``Machine/pause()`` / ``Machine/resume()``) `paused`;
/// any of them → `ended` when the guest or the host ends the run. Snapshots are taken while `paused`.
public enum MachineRunState: String, Sendable {
    case created, running, paused, ended
}

/// The guest clock and TSCs at the moment of a pause, put back on resume so the guest does not
/// see the time it spent paused (KVM's documented way: `KVM_SET_CLOCK`, and the TSC through
/// `MSR_IA32_TSC`, which sets the vCPU's TSC offset).
struct PauseRecord {
    var clock: UInt64
    var timeStampCounters: [UInt32: UInt64]

    init(clock: UInt64, timeStampCounters: [UInt32: UInt64]) {
        self.clock = clock
        self.timeStampCounters = timeStampCounters
    }

    init(snapshot: MachineSnapshot) {
        clock = snapshot.vm.clock
        var counters: [UInt32: UInt64] = [:]
        for vcpu in snapshot.vcpus {
            if let tsc = vcpu.msrs.first(where: { $0.index == VCPU.tscMSR }) { counters[vcpu.id] = tsc.value }
        }
        timeStampCounters = counters
    }
}

/// The state machine's data, behind one lock that also serialises pause, resume and snapshot.
final class ControlState: @unchecked Sendable {
    let lock = PthreadLock()
    var state: MachineRunState = .created
    var pause: PauseRecord?
    var startedAt: UInt64 = 0
    var savableMSRs: [UInt32]?

    func begin(paused: Bool, pause: PauseRecord?) {
        lock.withLock {
            state = paused ? .paused : .running
            self.pause = pause
            startedAt = monotonicNanoseconds()
        }
    }
}

/// A snapshot on its way back into a machine.
struct RestorePlan: @unchecked Sendable {
    let snapshot: MachineSnapshot
    let memory: GuestMemory
}

/// How to rebuild a machine from a snapshot: the host-side plumbing the snapshot cannot carry.
public struct RestoreOptions: Sendable {
    /// Where COM1's output goes.
    public var console: any ConsoleOutput = FileDescriptorOutput.standardOutput
    /// Where a virtio-console's output goes (default: `console`) and what it reads.
    public var virtioConsoleOutput: (any ConsoleOutput)?
    public var virtioConsoleInput: Int32?
    /// New paths for the snapshot's disks, in the snapshot's disk order (nil: keep). Each must
    /// still be the same disk (see ``DiskIdentity``).
    public var diskPaths: [String?] = []
    /// What each disk must be now, in the snapshot's disk order (nil: what the snapshot recorded).
    /// For an owner that changed a disk's file without changing what it reads — the VM store,
    /// after merging a checkpoint's differencing disk into its parent — and knows the new identity.
    public var diskIdentities: [DiskIdentity?] = []
    /// Backends for the snapshot's NICs, in order (nil: reopen the saved TAP by name, or stay
    /// disconnected when it was).
    public var networkBackends: [NetworkBackend?] = []
    /// Read all of guest RAM now instead of mapping the memory file copy-on-write.
    public var eagerMemory = false
    /// Refuse the snapshot unless it has this many vCPUs / this much RAM (what a user asked for).
    public var expectedCPUCount: Int?
    public var expectedMemorySize: UInt64?
    /// Devices the embedder registered when the snapshot was taken, at the same places.
    public var portDevices: [MachineConfiguration.DeviceMapping] = []
    public var mmioDevices: [MachineConfiguration.DeviceMapping] = []
    public var bootTimer: BootTimer?
    public var kvmPath = "/dev/kvm"

    public init() {}
}

extension Machine {
    /// Where the machine is in its life.
    public var runState: MachineRunState {
        if lifecycle.exit.current != nil { return .ended }
        return control.lock.withLock { control.state }
    }

    /// Seconds since the machine was started in this process.
    public var uptimeSeconds: Double {
        let start = control.lock.withLock { control.startedAt }
        return start == 0 ? 0 : Double(monotonicNanoseconds() - start) / 1e9
    }

    /// Stops every vCPU (parked, not ended) and quiesces every device: on return no vCPU is in
    /// `KVM_RUN` and no virtio request is in flight. Pausing a paused machine does nothing.
    public func pause() throws(MachineError) {
        try control.lock.withLock { () throws(MachineError) in
            try requireLive(for: "pause")
            guard control.state == .running else { return }
            guard lifecycle.pauseAll() else { throw .wrongState("the run ended while pausing") }
            virtio?.cores.forEach { $0.quiesce() }
            do {
                var counters: [UInt32: UInt64] = [:]
                for vcpu in lifecycle.allVCPUs {
                    if let tsc = try vcpu.modelSpecificRegisters([VCPU.tscMSR]).first { counters[vcpu.id] = tsc.value }
                }
                control.pause = PauseRecord(clock: try vm.clock(), timeStampCounters: counters)
            } catch let error as KVMError {
                // Leave it running rather than half paused.
                virtio?.cores.forEach { $0.unquiesce() }
                lifecycle.resumeAll()
                throw .kvm(error)
            } catch {
                throw .wrongState("\(error)")
            }
            control.state = .paused
        }
    }

    /// Lets a paused machine continue. By default the guest's clock continues from where it
    /// paused (the pause is invisible to it); with `keepingGuestTime: false` the guest's clock
    /// catches up with the time spent paused, as after a host suspend. Resuming a running machine
    /// does nothing.
    public func resume(keepingGuestTime: Bool = true) throws(MachineError) {
        try control.lock.withLock { () throws(MachineError) in
            try requireLive(for: "resume")
            guard control.state == .paused else { return }
            if keepingGuestTime, let pause = control.pause {
                do throws(KVMError) {
                    try vm.setClock(pause.clock)
                    for vcpu in lifecycle.allVCPUs {
                        if let tsc = pause.timeStampCounters[vcpu.id] { try vcpu.setModelSpecificRegisters([(VCPU.tscMSR, tsc)]) }
                    }
                } catch {
                    throw .kvm(error)
                }
            }
            virtio?.cores.forEach { $0.unquiesce() }
            lifecycle.resumeAll()
            control.state = .running
        }
    }

    private func requireLive(for operation: String) throws(MachineError) {
        if lifecycle.exit.current != nil || control.state == .ended {
            throw .wrongState("cannot \(operation): the run has ended")
        }
        if control.state == .created { throw .wrongState("cannot \(operation) a machine that has not started") }
    }

    /// Writes the paused machine's complete state and RAM to `directory` (see
    /// ``SnapshotDirectory``); the machine stays paused.
    @discardableResult
    public func snapshot(to directory: String) throws(SnapshotError) -> SnapshotDirectory.Written {
        try control.lock.withLock { () throws(SnapshotError) in
            let snapshot = try captureStateLocked()
            return try SnapshotDirectory.write(snapshot, memory: memory, to: directory)
        }
    }

    /// Starts a snapshot of the paused machine whose RAM a child process writes from a
    /// copy-on-write view (``SnapshotDirectory/begin(_:memory:to:)``): the machine may resume as
    /// soon as this returns; ``SnapshotDirectory/Pending/finish()`` completes it.
    public func beginSnapshot(to directory: String) throws(SnapshotError) -> SnapshotDirectory.Pending {
        try control.lock.withLock { () throws(SnapshotError) in
            let snapshot = try captureStateLocked()
            return try SnapshotDirectory.begin(snapshot, memory: memory, to: directory)
        }
    }

    /// The paused machine's complete state, RAM aside.
    public func captureState() throws(SnapshotError) -> MachineSnapshot {
        try control.lock.withLock { () throws(SnapshotError) in try captureStateLocked() }
    }

    private func captureStateLocked() throws(SnapshotError) -> MachineSnapshot {
        guard lifecycle.exit.current == nil, control.state == .paused, let pause = control.pause else {
            // (control.lock is held here: read the state directly, not through `runState`.)
            let state = lifecycle.exit.current != nil ? MachineRunState.ended : control.state
            throw .wrongState("the machine must be paused to take a snapshot (it is \(state.rawValue))")
        }
        let vcpus = lifecycle.allVCPUs
        guard vcpus.count == configuration.cpuCount else {
            throw .wrongState("only \(vcpus.count) of \(configuration.cpuCount) vCPUs exist")
        }
        var states: [VCPUState] = []
        let vmState: VMState
        do throws(KVMError) {
            let msrs = try savableMSRs(vcpus[0])
            for vcpu in vcpus {
                let given = restorePlan?.snapshot.vcpus[Int(vcpu.id)].cpuid ?? cpuid.forVCPU(vcpu.id, count: UInt32(configuration.cpuCount))
                states.append(try vcpu.captureState(msrs: msrs, cpuid: given))
            }
            vmState = VMState(interruptControllers: configuration.inKernelIRQChip ? try vm.interruptControllerState().map(HexBytes.init) : [],
                              pit: HexBytes(configuration.inKernelIRQChip ? try vm.pitState() : []), clock: pause.clock)
        } catch {
            throw .kvm(error)
        }
        var devices: [SavedDevice] = []
        for (name, bus) in [("port", portBus), ("mmio", mmioBus)] {
            for (range, device) in bus.registeredDevices {
                devices.append(SavedDevice(bus: name, base: range.base, size: range.size, state: try device.saveState()))
            }
        }
        return MachineSnapshot(writer: "HyperCore \(HyperCoreVersion.current)", createdUnixSeconds: Int64(time(nil)),
                               configuration: try snapshotConfiguration(), vm: vmState, vcpus: states,
                               devices: devices, memoryBytesWritten: 0)
    }

    /// KVM's list of MSRs to save, less those this host's vCPUs cannot read (found once).
    private func savableMSRs(_ vcpu: VCPU) throws(KVMError) -> [UInt32] {
        if let known = control.savableMSRs { return known }
        let readable = try vcpu.readableMSRs(try kvm.msrIndexList()).map(\.index)
        control.savableMSRs = readable
        return readable
    }

    func snapshotConfiguration() throws(SnapshotError) -> SnapshotConfiguration {
        var virtioDevices: [SnapshotVirtioDevice] = []
        // The disks in use now: a checkpoint may have moved the guest onto differencing children.
        var current = blockBackends.makeIterator()
        for device in configuration.virtioDevices {
            let transport: SnapshotVirtioDevice.Transport = device.transport == .pci ? .pci : .mmio
            switch device.kind {
            case let .block(configured, identifier):
                let backend = current.next() ?? configured
                let (path, identity) = try DiskIdentity.of(backend)
                virtioDevices.append(SnapshotVirtioDevice(kind: .block, transport: transport,
                                                          disk: SnapshotDisk(path: path, readOnly: backend.isReadOnly,
                                                                             identifier: identifier, identity: identity)))
            case .console:
                virtioDevices.append(SnapshotVirtioDevice(kind: .console, transport: transport, disk: nil))
            case .entropy:
                virtioDevices.append(SnapshotVirtioDevice(kind: .entropy, transport: transport, disk: nil))
            case let .network(backend, mac):
                let tap: String? = if case let .tap(device) = backend { device.name } else { nil }
                virtioDevices.append(SnapshotVirtioDevice(kind: .network, transport: transport, disk: nil,
                                                          nic: SnapshotNIC(mac: mac, tap: tap)))
            }
        }
        let (boot, commandLine): (String, String) = if let saved = restorePlan?.snapshot.configuration {
            (saved.boot, saved.commandLine)
        } else {
            switch configuration.boot {
            case let .pvh(_, name, _, line): ("pvh \(name)", line)
            case let .linux(_, name, _, line): ("linux \(name)", line)
            case let .flat(_, name, _): ("flat \(name)", "")
            case let .custom(name, _): (name, "")
            }
        }
        return SnapshotConfiguration(memorySize: configuration.memorySize, cpuCount: configuration.cpuCount,
                                     inKernelIRQChip: configuration.inKernelIRQChip, acpi: configuration.acpi,
                                     bootTimer: configuration.bootTimer != nil, boot: boot, commandLine: commandLine,
                                     virtio: virtioDevices)
    }

    /// Puts the VM-wide and device state back (the vCPUs already have theirs, set on their
    /// threads): first the devices, which re-drive their interrupt lines, then the interrupt
    /// controllers, then the PIT and the clock.
    ///
    /// The order matters for an edge-triggered pin whose device still holds its line high
    /// because the guest is servicing it (the vector in the LAPIC's ISR, the device not yet
    /// acknowledged). KVM keeps each line's level outside the state it saves, and leaves a
    /// delivered edge out of the IOAPIC's saved IRR. Raised after `KVM_SET_IRQCHIP`, the line
    /// would be a new edge and the guest would take the interrupt a second time. Raised before,
    /// on the fresh IOAPIC whose pins are all masked, it only records the level; the restored
    /// IOAPIC then re-delivers exactly what was pending and undelivered when the state was taken.
    func restoreMachineState(_ plan: RestorePlan) throws(SnapshotError) {
        let snapshot = plan.snapshot
        try restoreDeviceStates(snapshot.devices)
        do throws(KVMError) {
            if configuration.inKernelIRQChip {
                try vm.setInterruptControllerState(snapshot.vm.interruptControllers.map(\.bytes))
                try vm.setPITState(snapshot.vm.pit.bytes)
            }
            try vm.setClock(snapshot.vm.clock)
        } catch {
            throw .kvm(error)
        }
    }

    private func restoreDeviceStates(_ devices: [SavedDevice]) throws(SnapshotError) {
        var saved = devices[...]
        for (name, bus) in [("port", portBus), ("mmio", mmioBus)] {
            for (range, device) in bus.registeredDevices {
                guard let entry = saved.first, entry.bus == name, entry.base == range.base, entry.size == range.size else {
                    throw .mismatch("the snapshot has no state for the \(name) device at \(range): it was taken on a machine with other devices")
                }
                saved = saved.dropFirst()
                try device.restoreState(entry.state)
            }
        }
        if let extra = saved.first {
            throw .mismatch("the snapshot holds state for the \(extra.name), which this machine does not have")
        }
    }

    /// Rebuilds a machine from a snapshot directory: same memory, vCPUs and devices, its disks
    /// opened again (each checked to be the disk the snapshot was taken with), guest RAM mapped
    /// from the memory file copy-on-write (or read, with ``RestoreOptions/eagerMemory``).
    /// ``start(paused:)`` then puts the state back and lets it run.
    ///
    /// Nothing is written before every check has passed: not the snapshot, not a disk.
    public convenience init(restoring directory: String, options: RestoreOptions = RestoreOptions()) throws(SnapshotError) {
        let snapshot = try SnapshotDirectory.read(directory)
        let saved = snapshot.configuration
        if let cpus = options.expectedCPUCount, cpus != saved.cpuCount {
            throw .mismatch("\(directory) was taken with \(saved.cpuCount) vCPUs, not \(cpus): drop --cpus or ask for \(saved.cpuCount)")
        }
        if let size = options.expectedMemorySize, size != saved.memorySize {
            throw .mismatch("\(directory) was taken with \(saved.memorySize >> 20) MiB of memory, not \(size >> 20) MiB: drop --memory or ask for \(saved.memorySize >> 20)M")
        }
        guard snapshot.vcpus.count == saved.cpuCount, snapshot.vcpus.enumerated().allSatisfy({ UInt32($0.offset) == $0.element.id }) else {
            throw .corrupt(path: directory, detail: "it holds \(snapshot.vcpus.count) vCPU states for \(saved.cpuCount) vCPUs")
        }
        let disks = saved.virtio.compactMap(\.disk)
        guard options.diskPaths.count <= disks.count else {
            throw .mismatch("\(options.diskPaths.count) disk paths given, but the snapshot has \(disks.count) disks")
        }
        // Every disk is checked before any is opened for writing.
        var paths: [String] = []
        for (index, disk) in disks.enumerated() {
            let path = (index < options.diskPaths.count ? options.diskPaths[index] : nil) ?? disk.path
            let expected = (index < options.diskIdentities.count ? options.diskIdentities[index] : nil) ?? disk.identity
            try DiskIdentity.verify(path: path, readsAs: expected)
            paths.append(path)
        }
        let memory: GuestMemory
        let memoryFD = try SnapshotDirectory.openMemory(directory)
        do throws(GuestMemoryError) {
            memory = try GuestMemory(size: saved.memorySize, mapping: options.eagerMemory ? nil : memoryFD)
        } catch {
            if options.eagerMemory { close(memoryFD) }
            throw .machine("\(error)")
        }
        if options.eagerMemory {
            defer { close(memoryFD) }
            try MemoryFile.load(memoryFD, into: memory, path: directory + "/" + SnapshotDirectory.memoryFile)
        }

        let configuration = try Self.restoredConfiguration(saved, diskPaths: paths, options: options, source: directory)
        do throws(MachineError) {
            try self.init(configuration, restoring: RestorePlan(snapshot: snapshot, memory: memory))
        } catch {
            throw .machine("\(error)")
        }
        try checkDeviceLayout(snapshot, source: directory)
    }

    /// The configuration that rebuilds a saved machine (no boot: its RAM holds the guest), its
    /// disks opened at `diskPaths` (already checked).
    /// `disks`: the block devices' backends when the caller opened them (a migration builds the
    /// machine on placeholders and puts the real disks in later); else the files at `paths`.
    static func restoredConfiguration(_ saved: SnapshotConfiguration, diskPaths paths: [String], disks: [any BlockBackend]? = nil,
                                      options: RestoreOptions, source directory: String) throws(SnapshotError) -> MachineConfiguration {
        var configuration = MachineConfiguration(boot: .custom(name: saved.boot) { _ throws(BootError) in
            throw BootError.unsupported(file: saved.boot, detail: "a restored machine does not boot")
        })
        configuration.memorySize = saved.memorySize
        configuration.cpuCount = saved.cpuCount
        configuration.console = options.console
        configuration.inKernelIRQChip = saved.inKernelIRQChip
        configuration.acpi = saved.acpi
        configuration.bootTimer = saved.bootTimer ? (options.bootTimer ?? BootTimer()) : nil
        configuration.portDevices = options.portDevices
        configuration.mmioDevices = options.mmioDevices
        configuration.kvmPath = options.kvmPath
        var diskIndex = 0
        var nicIndex = 0
        for device in saved.virtio {
            let transport: VirtioDeviceConfiguration.Transport = device.transport == .pci ? .pci : .mmio
            switch device.kind {
            case .block:
                guard let disk = device.disk else { throw .corrupt(path: directory, detail: "a block device without its disk") }
                let backend: any BlockBackend
                if let disks {
                    guard diskIndex < disks.count else { throw .mismatch("\(directory) has more disks than were given") }
                    backend = disks[diskIndex]
                } else {
                    do throws(VHDXError) { backend = try openDisk(path: paths[diskIndex], readOnly: disk.readOnly) } catch {
                        throw .diskChanged(path: paths[diskIndex], detail: "cannot be opened (\(error))")
                    }
                }
                diskIndex += 1
                configuration.virtioDevices.append(.init(.block(backend, identifier: disk.identifier), transport: transport))
            case .console:
                configuration.virtioDevices.append(.init(.console(output: options.virtioConsoleOutput ?? options.console,
                                                                  input: options.virtioConsoleInput), transport: transport))
            case .entropy:
                configuration.virtioDevices.append(.init(.entropy, transport: transport))
            case .network:
                guard let nic = device.nic else { throw .corrupt(path: directory, detail: "a network device without its NIC") }
                let backend: NetworkBackend
                if nicIndex < options.networkBackends.count, let given = options.networkBackends[nicIndex] {
                    backend = given
                } else if let name = nic.tap {
                    do throws(NetworkError) { backend = .tap(try TapDevice(name: name)) } catch {
                        throw .machine("\(error)")
                    }
                } else {
                    backend = .disconnected
                }
                nicIndex += 1
                configuration.virtioDevices.append(.init(.network(backend, mac: nic.mac), transport: transport))
            }
        }
        return configuration
    }

    /// The buses must hold the devices the snapshot has state for, at the same places.
    func checkDeviceLayout(_ snapshot: MachineSnapshot, source directory: String) throws(SnapshotError) {
        let layout = [("port", portBus), ("mmio", mmioBus)].flatMap { name, bus in
            bus.registeredRanges.map { "\(name) \($0)" }
        }
        let savedLayout = snapshot.devices.map { "\($0.bus) \(BusRange(base: $0.base, size: $0.size))" }
        guard layout == savedLayout else {
            let missing = Set(savedLayout).symmetricDifference(layout).sorted().joined(separator: ", ")
            throw .mismatch("\(directory) was taken on a machine with other devices (differing: \(missing))")
        }
    }
}

/// The library's version, recorded in snapshots.
public enum HyperCoreVersion {
    public static let current = "0.2.0"
}
