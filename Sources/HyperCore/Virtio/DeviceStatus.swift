internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// The device status byte (virtio 1.2 §2.1).
public struct VirtioStatus: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let acknowledge = VirtioStatus(rawValue: 1)
    public static let driver = VirtioStatus(rawValue: 2)
    public static let driverOK = VirtioStatus(rawValue: 4)
    public static let featuresOK = VirtioStatus(rawValue: 8)
    public static let needsReset = VirtioStatus(rawValue: 0x40)
    public static let failed = VirtioStatus(rawValue: 0x80)
}

/// Feature bits shared by every device type (virtio 1.2 §6).
public enum VirtioFeature {
    public static let indirectDescriptors: UInt64 = 1 << 28
    public static let eventIndex: UInt64 = 1 << 29
    public static let version1: UInt64 = 1 << 32
    /// What every HyperCore virtio device offers on top of its own bits.
    public static let transportDefaults: UInt64 = version1 | eventIndex | indirectDescriptors
}

/// virtio device IDs (virtio 1.2 §5). PCI device ID = 0x1040 + type.
public enum VirtioDeviceType {
    public static let network: UInt16 = 1
    public static let block: UInt16 = 2
    public static let console: UInt16 = 3
    public static let entropy: UInt16 = 4
}

/// A virtio device model: the device-type half of a virtio device. It knows nothing of the
/// transport (PCI or MMIO); ``VirtioDeviceCore`` connects the two.
///
/// Threading: `queueNotified`, `inputReady` and `activate` run on the device's I/O thread or under
/// the core's lock; config reads and writes come from vCPU threads under the same lock.
public protocol VirtioDevice: Snapshottable, Sendable {
    var deviceType: UInt16 { get }
    /// Device-specific feature bits (the core adds VERSION_1, EVENT_IDX and INDIRECT_DESC).
    var deviceFeatures: UInt64 { get }
    /// Maximum size of each queue.
    var queueSizes: [UInt16] { get }
    /// Bytes of device-specific configuration.
    var configSize: Int { get }
    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer)
    func writeConfig(offset: Int, from data: UnsafeRawBufferPointer)
    /// The driver set DRIVER_OK; `context` holds the negotiated features and the live queues.
    func activate(_ context: VirtioDeviceContext)
    /// The driver notified queue `index` (or the I/O thread was woken for it).
    func queueNotified(_ index: Int, _ context: VirtioDeviceContext) throws(VirtqueueError)
    /// A host file descriptor the I/O thread watches for this device (console input), if any.
    var inputFileDescriptor: Int32? { get }
    /// The input descriptor is readable. Returns false to stop watching it until the next queue
    /// notification (no buffers to put input in, or end of file).
    func inputReady(_ context: VirtioDeviceContext) throws(VirtqueueError) -> Bool
    /// Device reset: forget everything negotiated.
    func reset()
}

extension VirtioDevice {
    public var inputFileDescriptor: Int32? { nil }
    public func inputReady(_ context: VirtioDeviceContext) throws(VirtqueueError) -> Bool { false }
    public func writeConfig(offset: Int, from data: UnsafeRawBufferPointer) {}
}

/// What an active device works with.
public final class VirtioDeviceContext: @unchecked Sendable {
    public let features: UInt64
    public let queues: [Virtqueue]
    public let memory: GuestMemory
    private let signal: (Int) -> Void

    init(features: UInt64, queues: [Virtqueue], memory: GuestMemory, signal: @escaping (Int) -> Void) {
        self.features = features
        self.queues = queues
        self.memory = memory
        self.signal = signal
    }

    /// Raises the queue's interrupt (MSI-X vector, INTx or MMIO interrupt line, by transport).
    public func signalUsed(queue: Int) { signal(queue) }

    public func has(_ feature: UInt64) -> Bool { features & feature == feature }
}

/// How a transport delivers interrupts for the core.
public protocol VirtioInterrupts: AnyObject, Sendable {
    /// Used buffers on a queue whose vector (PCI MSI-X) is `vector`.
    func queueInterrupt(vector: UInt16)
    /// Configuration change (also how NEEDS_RESET is announced).
    func configInterrupt(vector: UInt16)
}

/// The transport-independent half of a virtio device: status state machine, feature negotiation,
/// queue configuration, and the link to the device model and its I/O thread. PCI and MMIO
/// transports translate their register layouts into calls on this class, always under ``lock``.
public final class VirtioDeviceCore: @unchecked Sendable {
    public let device: any VirtioDevice
    public let memory: GuestMemory
    public let queues: [Virtqueue]
    public let offeredFeatures: UInt64
    let lock = PthreadLock()
    /// One eventfd per queue: the ioeventfd KVM signals on a notify write, or the fallback path.
    public let queueEvents: [Int32]

    // Guarded by `lock`.
    public private(set) var status: UInt8 = 0
    var deviceFeatureSelect: UInt32 = 0
    var driverFeatureSelect: UInt32 = 0
    public private(set) var driverFeatures: UInt64 = 0
    var queueSelect: UInt16 = 0
    var configVector: UInt16 = Virtqueue.noVector
    public private(set) var configGeneration: UInt8 = 0
    private var context: VirtioDeviceContext?
    /// The first ring error since the last reset, for diagnostics and tests.
    public private(set) var lastError: VirtqueueError?
    private var inputPaused = false
    /// Set while the machine is paused: no request is processed (see ``quiesce()``).
    private var quiesced = false

    weak var interrupts: (any VirtioInterrupts)?
    private(set) var ioThread: VirtioIOThread?

    public init(device: any VirtioDevice, memory: GuestMemory) throws(VirtioSetupError) {
        self.device = device
        self.memory = memory
        queues = device.queueSizes.map { Virtqueue(maximumSize: $0, memory: memory) }
        offeredFeatures = device.deviceFeatures | VirtioFeature.transportDefaults
        var events: [Int32] = []
        for _ in queues {
            let fd = ckvm_eventfd_create()
            guard fd >= 0 else {
                events.forEach { close($0) }
                throw .eventFD(errno: -fd)
            }
            events.append(fd)
        }
        queueEvents = events
    }

    deinit {
        ioThread?.stop()
        queueEvents.forEach { close($0) }
    }

    /// Starts the device's I/O thread.
    public func startIOThread(name: String) throws(VirtioSetupError) {
        let thread = try VirtioIOThread(name: name, core: self)
        ioThread = thread
        try thread.start()
    }

    /// Stops the I/O thread (idempotent, bounded).
    public func stopIOThread() { ioThread?.stop() }

    // MARK: Register semantics shared by the transports (caller holds `lock`)

    var selectedQueue: Virtqueue? { Int(queueSelect) < queues.count ? queues[Int(queueSelect)] : nil }

    var deviceFeatureWord: UInt32 {
        deviceFeatureSelect < 2 ? UInt32(truncatingIfNeeded: offeredFeatures >> (32 * UInt64(deviceFeatureSelect))) : 0
    }

    var driverFeatureWord: UInt32 {
        driverFeatureSelect < 2 ? UInt32(truncatingIfNeeded: driverFeatures >> (32 * UInt64(driverFeatureSelect))) : 0
    }

    func setDriverFeatureWord(_ value: UInt32) {
        // Features are frozen once FEATURES_OK is set (§3.1.1).
        guard status & VirtioStatus.featuresOK.rawValue == 0, driverFeatureSelect < 2 else { return }
        let shift = 32 * UInt64(driverFeatureSelect)
        driverFeatures = (driverFeatures & ~(0xFFFF_FFFF << shift)) | (UInt64(value) << shift)
    }

    /// Queue registers may change only before the driver is done (§4.1.4.3.2 and §4.2.2.2).
    var queueConfigurable: Bool { status & VirtioStatus.driverOK.rawValue == 0 }

    /// A write to the status register: the state machine of §2.1 and §3.1.
    func writeStatus(_ value: UInt8) {
        if value == 0 {
            reset()
            return
        }
        var new = value
        // The driver cannot clear bits except by writing 0 (reset).
        new |= status & ~VirtioStatus.needsReset.rawValue
        if new & VirtioStatus.featuresOK.rawValue != 0, status & VirtioStatus.featuresOK.rawValue == 0 {
            // Accept only a subset of what was offered, and only as a modern (VERSION_1) driver.
            let acceptable = driverFeatures & ~offeredFeatures == 0 && driverFeatures & VirtioFeature.version1 != 0
            if !acceptable { new &= ~VirtioStatus.featuresOK.rawValue }
        }
        if new & VirtioStatus.driverOK.rawValue != 0, status & VirtioStatus.driverOK.rawValue == 0 {
            guard new & VirtioStatus.featuresOK.rawValue != 0 else {
                // DRIVER_OK without FEATURES_OK: refuse to go live.
                status = new & ~VirtioStatus.driverOK.rawValue
                return
            }
            status = new
            activate()
            return
        }
        status = (status & VirtioStatus.needsReset.rawValue) | new
    }

    private func activate() {
        let eventIndex = driverFeatures & VirtioFeature.eventIndex != 0
        let indirect = driverFeatures & VirtioFeature.indirectDescriptors != 0
        for queue in queues where queue.enabled {
            do throws(VirtqueueError) {
                try queue.activate(eventIndex: eventIndex, indirect: indirect)
            } catch {
                markBroken(error)
                return
            }
        }
        let context = makeContext()
        self.context = context
        device.activate(context)
        // Notifies that arrived before DRIVER_OK (or ring contents set up before it) get looked at.
        for fd in queueEvents { _ = ckvm_eventfd_signal(fd) }
    }

    /// Device reset (§2.4): back to the initial state; the I/O thread is idle on return because it
    /// only processes under the same lock.
    func reset() {
        device.reset()
        queues.forEach { $0.reset() }
        context = nil
        status = 0
        driverFeatures = 0
        deviceFeatureSelect = 0
        driverFeatureSelect = 0
        queueSelect = 0
        configVector = Virtqueue.noVector
        lastError = nil
        resumeInputIfPaused()
    }

    /// A broken ring: NEEDS_RESET, stop processing, tell the driver (§2.1.2).
    private func markBroken(_ error: VirtqueueError) {
        if lastError == nil { lastError = error }
        context = nil
        queues.forEach { $0.deactivate() }
        status |= VirtioStatus.needsReset.rawValue
        configGeneration &+= 1
        interrupts?.configInterrupt(vector: configVector)
    }

    var isLive: Bool {
        !quiesced && context != nil && status & (VirtioStatus.needsReset.rawValue | VirtioStatus.failed.rawValue) == 0
    }

    // MARK: Pause and snapshot

    /// Stops processing: on return no request is in flight (requests are served under ``lock``,
    /// which this takes) and none starts until ``unquiesce()``; host input is no longer read.
    func quiesce() {
        lock.withLock {
            quiesced = true
            pauseInput()
        }
    }

    /// Processing resumes; notifies that arrived meanwhile are looked at.
    func unquiesce() {
        lock.withLock {
            quiesced = false
            resumeInputIfPaused()
        }
        for fd in queueEvents { _ = ckvm_eventfd_signal(fd) }
    }

    struct State: Codable, Equatable {
        var deviceType: UInt16
        var status: UInt8
        var deviceFeatureSelect: UInt32
        var driverFeatureSelect: UInt32
        var driverFeatures: UInt64
        var queueSelect: UInt16
        var configVector: UInt16
        var configGeneration: UInt8
        /// DRIVER_OK was accepted and the device has not been reset or broken since.
        var live: Bool
        var lastError: VirtqueueError?
        var queues: [Virtqueue.State]
        var device: DeviceState
    }

    func saveState() throws(SnapshotError) -> State {
        try lock.withLock { () throws(SnapshotError) in
            State(deviceType: device.deviceType, status: status, deviceFeatureSelect: deviceFeatureSelect,
                  driverFeatureSelect: driverFeatureSelect, driverFeatures: driverFeatures, queueSelect: queueSelect,
                  configVector: configVector, configGeneration: configGeneration, live: context != nil,
                  lastError: lastError, queues: queues.map(\.state), device: try device.saveState())
        }
    }

    /// Restores a device of the same type and queue count; a live device gets its queues back
    /// at their saved ring positions and its model re-activated with the negotiated features.
    func restoreState(_ state: State) throws(SnapshotError) {
        let name = "virtio device type \(device.deviceType)"
        guard state.deviceType == device.deviceType, state.queues.count == queues.count else {
            throw .invalidState("\(name): the snapshot holds type \(state.deviceType) with \(state.queues.count) queues")
        }
        guard state.driverFeatures & ~offeredFeatures == 0 else {
            throw .invalidState("\(name): negotiated features 0x\(String(state.driverFeatures, radix: 16)) were not offered")
        }
        try lock.withLock { () throws(SnapshotError) in
            device.reset()
            context = nil
            status = state.status
            deviceFeatureSelect = state.deviceFeatureSelect
            driverFeatureSelect = state.driverFeatureSelect
            driverFeatures = state.driverFeatures
            queueSelect = state.queueSelect
            configVector = state.configVector
            configGeneration = state.configGeneration
            lastError = state.lastError
            for (queue, saved) in zip(queues, state.queues) {
                do throws(VirtqueueError) { try queue.restore(saved) } catch {
                    throw .invalidState("\(name): \(error)")
                }
            }
            if state.live {
                let context = makeContext()
                self.context = context
                device.activate(context)
            }
            try device.restoreState(state.device)
        }
        for fd in queueEvents { _ = ckvm_eventfd_signal(fd) }
    }

    private func makeContext() -> VirtioDeviceContext {
        VirtioDeviceContext(features: driverFeatures, queues: queues, memory: memory) { [weak self] index in
            guard let self, let interrupts = self.interrupts else { return }
            interrupts.queueInterrupt(vector: self.queues[index].vector)
        }
    }

    // MARK: I/O thread entry points

    /// The queue's eventfd fired (or the bus fallback path was taken).
    func processQueue(_ index: Int) {
        lock.withLock {
            guard isLive, let context, index < queues.count, queues[index].isActive else { return }
            do throws(VirtqueueError) {
                try device.queueNotified(index, context)
            } catch {
                markBroken(error)
            }
            queues[index].noteProcessed()
            resumeInputIfPaused()
        }
    }

    /// Whether the driver published new chains on queue `index` since it was last processed (the
    /// I/O thread's polling check).
    func queueHasWork(_ index: Int) -> Bool {
        lock.withLock {
            guard isLive, index < queues.count, queues[index].isActive else { return false }
            return queues[index].hasNewAvailable()
        }
    }

    /// The device's input descriptor is readable.
    func processInput() {
        lock.withLock {
            guard isLive, let context else {
                pauseInput()
                return
            }
            do throws(VirtqueueError) {
                if try !device.inputReady(context) { pauseInput() }
            } catch {
                markBroken(error)
            }
        }
    }

    fileprivate func pauseInput() {
        guard !inputPaused else { return }
        inputPaused = true
        ioThread?.setInputWatched(false)
    }

    private func resumeInputIfPaused() {
        guard inputPaused else { return }
        inputPaused = false
        ioThread?.setInputWatched(true)
    }

    /// A notify that reached the bus (no ioeventfd registered): hand it to the I/O thread.
    func notifyFromBus(queue: UInt64) {
        guard queue < UInt64(queueEvents.count) else { return }  // unknown queue: ignored
        _ = ckvm_eventfd_signal(queueEvents[Int(queue)])
    }
}

/// Why a virtio device could not be assembled.
public enum VirtioSetupError: Error, Sendable, CustomStringConvertible {
    case eventFD(errno: Int32)
    case epoll(errno: Int32)
    case thread(errno: Int32)
    case kvm(KVMError)
    case noSpace(String)

    public var description: String {
        switch self {
        case let .eventFD(errno): "virtio: eventfd failed: \(SystemError.describe(errno))"
        case let .epoll(errno): "virtio: epoll failed: \(SystemError.describe(errno))"
        case let .thread(errno): "virtio: cannot start an I/O thread: \(SystemError.describe(errno))"
        case let .kvm(error): "virtio: \(error)"
        case let .noSpace(what): "virtio: no room for \(what)"
        }
    }
}
