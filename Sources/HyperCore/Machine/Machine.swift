internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// A virtual machine assembled from a ``MachineConfiguration``: memory, buses, the standard PC
/// devices, and one thread per vCPU.
///
/// Lifecycle: `init` builds everything and loads the guest; ``start()`` creates the vCPUs (each on
/// its own thread) and lets them run; ``wait(timeout:)`` blocks until the guest ends the run or the
/// deadline passes; ``stop()`` kicks every vCPU out of `KVM_RUN` and joins its thread. `stop` is
/// idempotent and always returns: a guest spinning with interrupts off is still interrupted,
/// because the kick is a signal that sets `kvm_run.immediate_exit`.
///
/// ```swift
/// var configuration = MachineConfiguration(boot: .pvh(kernel: bytes, kernelName: "guest.elf",
///                                                     initrd: nil, commandLine: "console=ttyS0"))
/// configuration.memorySize = 128 << 20
/// let machine = try Machine(configuration)
/// let exit = try machine.run(timeout: .seconds(10))
/// ```
public final class Machine: Sendable {
    public let configuration: MachineConfiguration
    public let kvm: KVM
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let portBus: Bus
    public let mmioBus: Bus
    /// COM1.
    public let serial: Serial16550
    /// The ACPI power button and soft-off registers (nil when the machine has no ACPI tables).
    public let acpiPower: ACPIPower?
    /// What the boot vCPU starts from; nil for a machine restored from a snapshot.
    public let bootState: BootState?
    /// The virtio devices' transport-independent state, in configuration order.
    public var virtioDevices: [VirtioDeviceCore] { virtio?.cores ?? [] }
    let virtio: VirtioAssembly?
    let cpuid: CPUIDTable
    let lifecycle = Lifecycle()
    private let threads = Mutex<[UInt]>([])
    private let started = Atomic<Bool>(false)
    private let joined = Mutex<Bool>(false)
    /// Serialises pause, resume and snapshot; guards `control`'s state.
    let control = ControlState()
    /// The snapshot being restored, until ``start(paused:)`` has put its state back: given at
    /// init, or (an incoming migration) set before start.
    var restorePlan: RestorePlan? { restoreBox.value }
    let restoreBox: SpinLockedState<RestorePlan?>

    public convenience init(_ configuration: MachineConfiguration) throws(MachineError) {
        try self.init(configuration, restoring: nil)
    }

    /// `incoming`: RAM an incoming migration fills; the machine does not boot, and its state is
    /// given with ``setIncomingState(_:)`` before ``start(paused:)``.
    init(_ configuration: MachineConfiguration, restoring plan: RestorePlan?, incoming: GuestMemory? = nil) throws(MachineError) {
        restoreBox = SpinLockedState(plan)
        guard (1...MachineConfiguration.maximumCPUs).contains(configuration.cpuCount) else {
            throw .invalidConfiguration("--cpus must be between 1 and \(MachineConfiguration.maximumCPUs), not \(configuration.cpuCount)")
        }
        self.configuration = configuration
        guard ckvm_kick_install() == 0 else { throw .thread(errno: ckvm_errno()) }
        do {
            kvm = try KVM(path: configuration.kvmPath)
            let missing = RequiredCapabilities.missing(in: kvm)
            guard missing.isEmpty else { throw MachineError.missingCapabilities(missing) }
            vm = try kvm.createVirtualMachine()
            try vm.setIdentityMapAddress(GuestLayout.identityMapAddress)
            try vm.setTSSAddress(GuestLayout.tssAddress)
            // Slots before the irqchip: adding a slot to a VM that already has one costs
            // milliseconds more (measured: about 5.5 ms on a PVM host).
            memory = try plan?.memory ?? incoming ?? GuestMemory(size: configuration.memorySize)
            try vm.map(memory)
            if configuration.inKernelIRQChip {
                try vm.createInterruptController()
                try vm.createPIT()
            }
            var table = CPUSetup.prepare(try kvm.supportedCPUID())
            configuration.cpuidPolicy?(&table)
            cpuid = table
        } catch let error as KVMError {
            throw .kvm(error)
        } catch let error as GuestMemoryError {
            throw .memory(error)
        } catch let error as MachineError {
            throw error
        } catch {
            throw .invalidConfiguration("\(error)")
        }

        let lifecycle = self.lifecycle
        let interrupt: any InterruptLine = configuration.inKernelIRQChip ? IRQChipLine(vm: vm, gsi: 4) : RecordingLine()
        serial = Serial16550(output: configuration.bootTimer.map { $0.watching(configuration.console) } ?? configuration.console,
                             interrupt: interrupt)
        // The ACPI tables describe it (power button, soft off): it exists exactly when they do.
        acpiPower = configuration.acpi
            ? ACPIPower(interrupt: configuration.inKernelIRQChip ? IRQChipLine(vm: vm, gsi: ACPIPower.gsi) : RecordingLine(),
                        onPowerOff: { lifecycle.finish(.powerOff) })
            : nil
        var ports = BusBuilder(name: "port I/O")
        var mmio = BusBuilder(name: "MMIO")
        do {
            try ports.register(serial, at: 0x3F8, size: 8)
            try ports.register(I8042(onReset: { lifecycle.finish(.reset) }), at: 0x60, size: 5)
            try ports.register(DebugExit(onExit: { lifecycle.finish(.debugExit($0)) }), at: DebugExit.defaultPort, size: 2)
            if let acpiPower { try ports.register(acpiPower, at: ACPIPower.port, size: ACPIPower.size) }
            try PlatformDevices.register(ports: &ports, mmio: &mmio, configuration: configuration)
            for mapping in configuration.portDevices {
                try ports.register(mapping.device, at: mapping.base, size: mapping.size)
            }
            for mapping in configuration.mmioDevices {
                try mmio.register(mapping.device, at: mapping.base, size: mapping.size)
            }
        } catch {
            throw .bus(error)
        }
        virtio = configuration.virtioDevices.isEmpty ? nil
            : try VirtioAssembly(vm: vm, memory: memory, devices: configuration.virtioDevices, ports: &ports, mmio: &mmio)
        portBus = ports.build()
        mmioBus = mmio.build()

        if plan != nil || incoming != nil {
            // Guest RAM already holds the firmware tables, the kernel and everything since.
            bootState = nil
            return
        }
        do {
            try PlatformDevices.writeFirmwareTables(configuration: configuration, cpuid: cpuid, into: memory)
            switch configuration.boot {
            case let .pvh(kernel, kernelName, initrd, commandLine):
                bootState = try PVHLoader.load(kernel: kernel, kernelName: kernelName, initrd: initrd,
                                               commandLine: commandLine + (virtio?.commandLineSuffix ?? ""),
                                               acpiRSDP: PlatformDevices.rsdp(configuration), into: memory)
            case let .linux(kernel, kernelName, initrd, commandLine):
                bootState = try LinuxLoader.load(bzImage: kernel, name: kernelName, initrd: initrd,
                                                 commandLine: commandLine + (virtio?.commandLineSuffix ?? ""),
                                                 acpiRSDP: PlatformDevices.rsdp(configuration), into: memory)
            case let .flat(image, name, loadAddress):
                bootState = try FlatBinaryLoader.load(image: image, name: name, at: loadAddress, into: memory)
            case let .custom(_, load):
                bootState = try load(memory)
            }
        } catch {
            throw .boot(error)
        }
    }

    deinit { stop() }

    /// Creates the vCPUs on their threads and starts them; with `paused`, they stop before their
    /// first instruction and wait for ``resume()``. A restored machine gets its saved state back
    /// here, before any vCPU runs.
    public func start(paused: Bool = false) throws(MachineError) {
        guard !started.exchange(true, ordering: .acquiringAndReleasing) else { throw .alreadyStarted }
        let gate = StartGate()
        var spawned: [UInt] = []
        for id in 0..<UInt32(configuration.cpuCount) {
            let context = VCPUContext(id: id, vm: vm, memory: memory, portBus: portBus, mmioBus: mmioBus,
                                      cpuid: cpuid.forVCPU(id, count: UInt32(configuration.cpuCount)),
                                      boot: id == 0 ? bootState : nil, restore: restorePlan?.snapshot.vcpus[Int(id)],
                                      lifecycle: lifecycle, ready: gate)
            do {
                spawned.append(UInt(try spawnVCPUThread(context)))
            } catch {
                gate.arrive(.failure(error))
                break
            }
        }
        threads.withLock { $0 = spawned }
        var failure = gate.waitForArrivals(spawned.count + (spawned.count < configuration.cpuCount ? 1 : 0))
        if failure == nil, let plan = restorePlan {
            do throws(SnapshotError) { try restoreMachineState(plan) } catch { failure = .restore(error) }
        }
        if let error = failure {
            gate.release(go: false)
            lifecycle.finish(.hostError(error.description))
            joinThreads()
            throw error
        }
        control.begin(paused: paused, pause: restorePlan.map { PauseRecord(snapshot: $0.snapshot) })
        if paused { lifecycle.requestPause() }
        gate.release(go: true)
        RIPSampler.startIfRequested(lifecycle)
        if paused {
            virtio?.cores.forEach { $0.quiesce() }
            _ = lifecycle.pauseAll()
        }
    }

    /// Blocks until the run ends. With a `timeout`, a run still going at the deadline is stopped
    /// and reported as ``MachineExit/timedOut``. The vCPU threads are joined before this returns.
    public func wait(timeout: Duration? = nil) -> MachineExit {
        let deadline: UInt64? = timeout.map { duration in
            let (seconds, attoseconds) = duration.components
            let nanoseconds = UInt64(max(0, seconds)) * 1_000_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000)
            return monotonicNanoseconds() &+ nanoseconds
        }
        if lifecycle.exit.wait(untilNanoseconds: deadline) == nil {
            lifecycle.finish(.timedOut)
        }
        joinThreads()
        virtio?.shutdown()
        return lifecycle.exit.current ?? .stopped
    }

    /// Ends the run with `reason` (when it has not ended already) and stops the vCPUs.
    /// Presses the ACPI power button: a guest OS that handles it shuts down and powers off
    /// (``MachineExit/powerOff``); one that does not goes on running. Throws when the machine has
    /// no ACPI tables, so no power button, or is not running.
    public func pressPowerButton() throws(MachineError) {
        guard let acpiPower else { throw .invalidConfiguration("this machine has no ACPI tables, so no power button") }
        guard runState == .running || runState == .paused else {
            throw .invalidConfiguration("the machine is \(runState.rawValue): there is nothing to shut down")
        }
        acpiPower.pressPowerButton()
    }

    public func finish(_ reason: MachineExit) {
        lifecycle.finish(reason)
    }

    /// Starts the machine and waits for it: the one-shot way to run a guest.
    public func run(timeout: Duration? = nil) throws(MachineError) -> MachineExit {
        try start()
        return wait(timeout: timeout)
    }

    /// Stops every vCPU and joins the threads. Safe to call at any time, more than once.
    public func stop() {
        lifecycle.finish(.stopped)
        joinThreads()
        virtio?.shutdown()
    }

    /// How the run ended, once it has.
    public var exit: MachineExit? { lifecycle.exit.current }

    private func joinThreads() {
        joined.withLock { done in
            guard !done else { return }
            let handles = threads.withLock { $0 }
            // Keep kicking until every thread is out: a kick that lands between the stop check and
            // KVM_RUN is caught by immediate_exit, but one sent before the thread registered is not.
            for handle in handles {
                while ckvm_thread_join(handle, 20) == ETIMEDOUT {
                    lifecycle.kickAll()
                }
            }
            // Done only once threads were actually joined: a stop() before start() must not keep a
            // later wait() from joining the threads start() creates.
            done = !handles.isEmpty
        }
    }
}
