internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// State shared by a machine's vCPU threads: the stop flag, the first exit, the thread handles
/// used to kick vCPUs out of `KVM_RUN`, and the parking place where paused vCPUs wait.
///
/// Pausing: ``pauseAll()`` raises the pause flag and kicks every vCPU; a vCPU parks only after
/// `KVM_RUN` returned `EINTR`, i.e. after KVM re-entered it with `immediate_exit` set, which
/// completes any port or MMIO access the last exit left half done (KVM's rule before reading
/// vCPU state). Parked threads stay alive and keep their vCPUs; ``resumeAll()`` lets them go on.
final class Lifecycle: @unchecked Sendable {
    private let stopFlag = Atomic<Bool>(false)
    private let pauseFlag = Atomic<Bool>(false)
    let exit = OneShot<MachineExit>()
    /// Auto-converge's vCPU throttle (idle unless a migration sets it).
    let throttle = VCPUThrottle()
    /// What the emulation-completion layer did (``EmulationCompletion``).
    let emulation = EmulationStatistics()
    /// Raised by the ``RIPSampler`` thread: a vCPU that sees it change prints a sample.
    let sampleGeneration = Atomic<UInt64>(0)
    /// pthread handles of vCPU threads that have not finished.
    private let running = Mutex<[UInt32: UInt]>([:])
    /// The vCPUs, once their threads created them (for state capture while parked).
    private let vcpus = Mutex<[UInt32: VCPU]>([:])
    private let parking = PthreadCondition()
    /// vCPU threads waiting in ``park()`` (guarded by `parking.lock`).
    private var parked = 0

    var stopRequested: Bool { stopFlag.load(ordering: .acquiring) }
    var pauseRequested: Bool { pauseFlag.load(ordering: .acquiring) }

    /// Records how the run ended (the first caller wins) and stops every vCPU, parked ones too.
    func finish(_ reason: MachineExit) {
        exit.complete(reason)
        stopFlag.store(true, ordering: .releasing)
        kickAll()
        parking.lock.withLock { parking.broadcast() }
    }

    func register(vcpu: VCPU) { vcpus.withLock { $0[vcpu.id] = vcpu } }

    /// The vCPUs in ID order.
    var allVCPUs: [VCPU] { vcpus.withLock { $0.values.sorted { $0.id < $1.id } } }

    /// Sets the pause flag before the vCPUs are released, so they park before their first run.
    func requestPause() { pauseFlag.store(true, ordering: .releasing) }

    /// Kicks every vCPU out of `KVM_RUN` and waits until all live ones are parked. Returns false
    /// when the run ended meanwhile.
    func pauseAll() -> Bool {
        pauseFlag.store(true, ordering: .releasing)
        kickAll()
        return parking.lock.withLock {
            while true {
                if stopRequested { return false }
                if parked >= running.withLock({ $0.count }) { return true }
                // A vCPU that just left KVM_RUN for an exit sees immediate_exit on its next entry;
                // the periodic re-kick only covers a thread that was between registration and its
                // first KVM_RUN.
                _ = parking.wait(untilNanoseconds: monotonicNanoseconds() + 20_000_000)
                if !stopRequested, parked < running.withLock({ $0.count }) { kickAll() }
            }
        }
    }

    func resumeAll() {
        parking.lock.withLock {
            pauseFlag.store(false, ordering: .releasing)
            parking.broadcast()
        }
    }

    /// Called by a vCPU thread out of `KVM_RUN` (with no access pending) while a pause is asked.
    func park() {
        parking.lock.withLock {
            parked += 1
            parking.broadcast()
            while pauseFlag.load(ordering: .acquiring) && !stopFlag.load(ordering: .acquiring) { _ = parking.wait() }
            parked -= 1
        }
    }

    func register(vcpu: UInt32, thread: UInt) { running.withLock { $0[vcpu] = thread } }

    /// Called by a vCPU thread as it leaves; after this it is never signalled.
    func unregister(vcpu: UInt32) {
        running.withLock { _ = $0.removeValue(forKey: vcpu) }
        parking.lock.withLock { parking.broadcast() }
    }

    /// Signals every running vCPU thread. Holding the lock guarantees none of them is gone.
    func kickAll() {
        running.withLock { threads in
            for thread in threads.values { _ = ckvm_kick_thread(thread) }
        }
    }
}

/// Everything a vCPU thread needs, handed over at thread creation.
final class VCPUContext: @unchecked Sendable {
    let id: UInt32
    let vm: VirtualMachine
    let memory: GuestMemory
    let portBus: Bus
    let mmioBus: Bus
    let cpuid: CPUIDTable
    let boot: BootState?
    /// The state to give the vCPU instead of a boot state (a restored machine).
    let restore: VCPUState?
    let lifecycle: Lifecycle
    let ready: StartGate

    init(id: UInt32, vm: VirtualMachine, memory: GuestMemory, portBus: Bus, mmioBus: Bus, cpuid: CPUIDTable,
         boot: BootState?, restore: VCPUState?, lifecycle: Lifecycle, ready: StartGate) {
        self.id = id
        self.vm = vm
        self.memory = memory
        self.portBus = portBus
        self.mmioBus = mmioBus
        self.cpuid = cpuid
        self.boot = boot
        self.restore = restore
        self.lifecycle = lifecycle
        self.ready = ready
    }
}

/// The thread entry point: a named C-convention function, so it carries no actor isolation.
private func vcpuThreadMain(_ argument: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    let context = Unmanaged<VCPUContext>.fromOpaque(argument!).takeRetainedValue()
    VCPURunLoop.threadBody(context)
    return nil
}

/// Starts the thread for one vCPU.
func spawnVCPUThread(_ context: VCPUContext) throws(MachineError) -> pthread_t {
    var thread = pthread_t()
    let box = Unmanaged.passRetained(context).toOpaque()
    let result = pthread_create(&thread, nil, vcpuThreadMain, box)
    guard result == 0 else {
        Unmanaged<VCPUContext>.fromOpaque(box).release()
        throw .thread(errno: result)
    }
    return thread
}

/// One vCPU's life: create and configure the vCPU on this thread, wait for the start signal,
/// then run `KVM_RUN` and dispatch each exit until the machine stops.
enum VCPURunLoop {
    static func threadBody(_ context: VCPUContext) {
        ckvm_thread_set_name("vcpu\(context.id)")
        // Host signals (Ctrl-C, SIGTERM) belong to the main thread; only kicks reach a vCPU.
        var blocked = sigset_t()
        sigemptyset(&blocked)
        for signal in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGWINCH] { sigaddset(&blocked, signal) }
        pthread_sigmask(SIG_BLOCK, &blocked, nil)
        _ = ckvm_kick_unblock()

        let vcpu: VCPU
        do {
            vcpu = try configure(context)
        } catch {
            context.ready.arrive(.failure(.vcpuSetup(vcpu: context.id, error)))
            return
        }
        ckvm_kick_register(vcpu.run)
        context.lifecycle.register(vcpu: vcpu)
        context.lifecycle.register(vcpu: context.id, thread: UInt(pthread_self()))
        defer {
            context.lifecycle.unregister(vcpu: context.id)
            ckvm_kick_register(nil)
        }
        context.ready.arrive(.success(()))
        guard context.ready.waitForStart() else { return }
        run(vcpu, context)
    }

    private static func configure(_ context: VCPUContext) throws(KVMError) -> VCPU {
        let vcpu = try context.vm.createVCPU(id: context.id)
        if let saved = context.restore {
            try vcpu.setCPUID(saved.cpuid)
            try vcpu.restoreState(saved)
            return vcpu
        }
        try vcpu.setCPUID(context.cpuid)
        try CPUSetup.configure(vcpu, isBoot: context.id == 0)
        if let boot = context.boot {
            let reset = try vcpu.specialRegisters()
            try vcpu.setSpecialRegisters(boot.specialRegisters(from: reset))
            try vcpu.setRegisters(boot.registers)
        }
        return vcpu
    }

    /// The exit loop. Per exit it reads `kvm_run` in place and calls one bus method: no
    /// allocation, no lock, no logging on the path of an I/O exit.
    private static func run(_ vcpu: VCPU, _ context: VCPUContext) {
        let run = vcpu.run
        let lifecycle = context.lifecycle
        let fd = vcpu.fileDescriptor
        // HYPERCORE_SAMPLE_RIP only: the sample seen last, and the exits since (plain counters).
        let sampling = RIPSampler.interval != nil
        let samplingStart = monotonicNanoseconds()
        var sampleSeen: UInt64 = 0
        var exits = RIPSampler.ExitCounts()
        // A machine started paused (a restore with --paused) parks before its first instruction.
        if lifecycle.pauseRequested { lifecycle.park() }
        while !lifecycle.stopRequested {
            if ckvm_ioctl(fd, CKVM_RUN) < 0 {
                switch ckvm_errno() {
                case EINTR:
                    // A kick (or a stray signal): clear the flag and look at the stop and pause requests.
                    run.pointee.immediate_exit = 0
                    if sampling, lifecycle.sampleGeneration.load(ordering: .acquiring) != sampleSeen {
                        sampleSeen = lifecycle.sampleGeneration.load(ordering: .acquiring)
                        RIPSampler.sample(vcpu, context.memory, since: samplingStart, exits: exits)
                        exits = RIPSampler.ExitCounts()
                    }
                    if lifecycle.pauseRequested { lifecycle.park() }
                    let throttled = lifecycle.throttle.sleepNanoseconds
                    if throttled > 0, !lifecycle.stopRequested {
                        var interval = timespec(tv_sec: 0, tv_nsec: Int(throttled))
                        nanosleep(&interval, nil)
                    }
                case EAGAIN:
                    // An application processor not yet started by INIT/SIPI (seen on PVM hosts).
                    if lifecycle.pauseRequested { lifecycle.park() } else { sched_yield() }
                case let code:
                    lifecycle.finish(.hostError("KVM_RUN on vCPU \(context.id) failed: \(SystemError.describe(code))"))
                }
                continue
            }
            switch Int32(bitPattern: run.pointee.exit_reason) {
            case KVM_EXIT_IO:
                exits.io &+= 1
                handlePortIO(run, context.portBus)
            case KVM_EXIT_MMIO:
                exits.mmio &+= 1
                handleMMIO(run, context.mmioBus)
            case KVM_EXIT_INTR:
                exits.intr &+= 1
                continue
            case KVM_EXIT_HLT:
                lifecycle.finish(.halted)
            case KVM_EXIT_SHUTDOWN:
                lifecycle.finish(.guestFailure(failure(.tripleFault, vcpu)))
            case KVM_EXIT_SYSTEM_EVENT:
                switch run.pointee.system_event.type {
                case UInt32(KVM_SYSTEM_EVENT_SHUTDOWN): lifecycle.finish(.powerOff)
                case UInt32(KVM_SYSTEM_EVENT_RESET): lifecycle.finish(.reset)
                default: lifecycle.finish(.guestFailure(failure(.crash, vcpu)))
                }
            case KVM_EXIT_FAIL_ENTRY:
                let reason = run.pointee.fail_entry.hardware_entry_failure_reason
                lifecycle.finish(.guestFailure(failure(.entryFailure(reason: reason), vcpu)))
            case KVM_EXIT_INTERNAL_ERROR:
                let suberror = run.pointee.internal.suberror
                let bytes = emulationFailureBytes(run)
                exits.emulation &+= 1
                // An instruction KVM's emulator lacks (PVM hosts): finish it here when the
                // completion layer knows it, else end the run as before.
                if suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION),
                   EmulationCompletion.complete(vcpu, run, context, bytes: bytes) { continue }
                lifecycle.finish(.guestFailure(failure(.internalError(suberror: suberror), vcpu, instruction: bytes)))
            default:
                lifecycle.finish(.guestFailure(failure(.unknownExit(reason: run.pointee.exit_reason), vcpu)))
            }
        }
    }

    @inline(__always)
    private static func handlePortIO(_ run: UnsafeMutablePointer<kvm_run>, _ bus: Bus) {
        let io = run.pointee.io
        let size = Int(io.size)
        let base = UnsafeMutableRawPointer(run) + Int(io.data_offset)
        let port = UInt64(io.port)
        // String I/O (rep ins/outs) delivers `count` elements back to back.
        for element in 0..<Int(io.count) {
            let data = UnsafeMutableRawBufferPointer(start: base + element * size, count: size)
            if io.direction == UInt8(KVM_EXIT_IO_OUT) {
                bus.write(address: port, data: UnsafeRawBufferPointer(data))
            } else {
                bus.read(address: port, data: data)
            }
        }
    }

    @inline(__always)
    private static func handleMMIO(_ run: UnsafeMutablePointer<kvm_run>, _ bus: Bus) {
        let address = run.pointee.mmio.phys_addr
        let length = min(Int(run.pointee.mmio.len), 8)
        let isWrite = run.pointee.mmio.is_write != 0
        withUnsafeMutableBytes(of: &run.pointee.mmio.data) { raw in
            let data = UnsafeMutableRawBufferPointer(rebasing: raw[0..<length])
            if isWrite {
                bus.write(address: address, data: UnsafeRawBufferPointer(data))
            } else {
                bus.read(address: address, data: data)
            }
        }
    }

    /// The failing instruction's bytes from an emulation-failure exit
    /// (`struct kvm_run.emulation_failure`: flags bit 0 says the bytes are valid).
    private static func emulationFailureBytes(_ run: UnsafeMutablePointer<kvm_run>) -> [UInt8] {
        guard run.pointee.internal.suberror == UInt32(KVM_INTERNAL_ERROR_EMULATION) else { return [] }
        let ndata = Int(run.pointee.internal.ndata)
        return withUnsafeBytes(of: run.pointee.internal.data) { raw -> [UInt8] in
            // data[0] = flags; then insn_size (1 byte) and up to 15 instruction bytes.
            guard ndata >= 2, raw.load(as: UInt64.self) & 1 != 0 else { return [] }
            let size = min(Int(raw[8]), 15)
            return Array(raw[9..<(9 + size)])
        }
    }

    private static func failure(_ kind: GuestFailure.Kind, _ vcpu: VCPU, instruction: [UInt8] = []) -> GuestFailure {
        GuestFailure(kind: kind, vcpu: vcpu.id, registers: try? vcpu.registers(),
                     specialRegisters: try? vcpu.specialRegisters(), instructionBytes: instruction)
    }
}

/// Lets the machine wait until every vCPU thread has created its vCPU, then release them together
/// (an AP must exist before the boot CPU sends it INIT/SIPI).
final class StartGate: @unchecked Sendable {
    private let condition = PthreadCondition()
    private var arrivals: [Result<Void, MachineError>] = []
    private var decision: Bool?

    func arrive(_ result: Result<Void, MachineError>) {
        condition.lock.withLock {
            arrivals.append(result)
            condition.broadcast()
        }
    }

    /// Waits for `count` arrivals; returns the first failure, if any.
    func waitForArrivals(_ count: Int) -> MachineError? {
        condition.lock.withLock {
            while arrivals.count < count { _ = condition.wait() }
            for case let .failure(error) in arrivals { return error }
            return nil
        }
    }

    /// Releases the vCPUs: `go` true to run, false to make them return at once.
    func release(go: Bool) {
        condition.lock.withLock {
            decision = go
            condition.broadcast()
        }
    }

    func waitForStart() -> Bool {
        condition.lock.withLock {
            while decision == nil { _ = condition.wait() }
            return decision!
        }
    }
}
