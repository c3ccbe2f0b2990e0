internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// The thread that does one virtio device's work.
///
/// It sleeps in `epoll_wait` on the device's queue eventfds (which KVM signals directly on a
/// notify write through ioeventfd, so a notify never exits to userspace), an optional input
/// descriptor, and a stop eventfd. Device work therefore never runs on a vCPU thread or on the
/// Swift concurrency pool, and completions raise interrupts through irqfd from here.
final class VirtioIOThread: @unchecked Sendable {
    private static let stopToken: UInt64 = 0xFFFF_FFFF
    private static let inputToken: UInt64 = 0xFFFF_FFFE

    let name: String
    private weak var core: VirtioDeviceCore?
    private let epoll: Int32
    private let stopEvent: Int32
    private let queueEvents: [Int32]
    private var inputFD: Int32?
    private let thread = Mutex<pthread_t?>(nil)
    private let stopped = Atomic<Bool>(false)

    init(name: String, core: VirtioDeviceCore) throws(VirtioSetupError) {
        self.name = name
        self.core = core
        queueEvents = core.queueEvents
        inputFD = core.device.inputFileDescriptor
        let epoll = ckvm_epoll_create()
        guard epoll >= 0 else { throw .epoll(errno: -epoll) }
        let stop = ckvm_eventfd_create()
        guard stop >= 0 else {
            close(epoll)
            throw .eventFD(errno: -stop)
        }
        self.epoll = epoll
        stopEvent = stop
        var result = ckvm_epoll_add(epoll, stop, Self.stopToken)
        for (index, fd) in queueEvents.enumerated() where result == 0 {
            result = ckvm_epoll_add(epoll, fd, UInt64(index))
        }
        if result == 0, let inputFD {
            // Regular files and /dev/null cannot be polled (EPERM): such input is simply not watched.
            let added = ckvm_epoll_add(epoll, inputFD, Self.inputToken)
            if added == -EPERM { self.inputFD = nil } else { result = added }
        }
        guard result == 0 else {
            close(epoll)
            close(stop)
            throw .epoll(errno: -result)
        }
    }

    deinit {
        close(epoll)
        close(stopEvent)
    }

    func start() throws(VirtioSetupError) {
        var handle = pthread_t()
        let box = Unmanaged.passRetained(self).toOpaque()
        let result = pthread_create(&handle, nil, { argument in
            let thread = Unmanaged<VirtioIOThread>.fromOpaque(argument!).takeRetainedValue()
            thread.loop()
            return nil
        }, box)
        guard result == 0 else {
            Unmanaged<VirtioIOThread>.fromOpaque(box).release()
            throw .thread(errno: result)
        }
        thread.withLock { $0 = handle }
    }

    /// Asks the thread to leave and joins it. Idempotent; never called from the thread itself.
    func stop() {
        guard !stopped.exchange(true, ordering: .acquiringAndReleasing) else { return }
        _ = ckvm_eventfd_signal(stopEvent)
        guard let handle = thread.withLock({ $0 }) else { return }
        if pthread_equal(handle, pthread_self()) != 0 { return }
        // The loop checks the stop event between work items; a request in flight finishes first.
        while ckvm_thread_join(UInt(handle), 1000) == ETIMEDOUT {
            _ = ckvm_eventfd_signal(stopEvent)
        }
    }

    /// Starts or stops watching the device's input descriptor (called with the core locked).
    func setInputWatched(_ watched: Bool) {
        guard let inputFD else { return }
        if watched {
            _ = ckvm_epoll_add(epoll, inputFD, Self.inputToken)
        } else {
            _ = ckvm_epoll_del(epoll, inputFD)
        }
    }

    /// After work, the thread keeps checking its queues for this long (default 200 µs) before sleeping in epoll
    /// again (adaptive polling): a driver that submits the next request within the window is
    /// served without a wakeup. Zero disables it.
    /// `HYPERCORE_VIRTIO_POLL_NS` overrides the default.
    nonisolated(unsafe) static var pollNanoseconds: UInt64 = {
        if let text = getenv("HYPERCORE_VIRTIO_POLL_NS"), let value = UInt64(String(cString: text)) { return value }
        return 200_000
    }()

    private func loop() {
        ckvm_thread_set_name(name)
        // Host signals belong to the main thread.
        var blocked = sigset_t()
        sigfillset(&blocked)
        pthread_sigmask(SIG_BLOCK, &blocked, nil)
        var tokens = [UInt64](repeating: 0, count: 16)
        while !stopped.load(ordering: .acquiring) {
            let count = tokens.withUnsafeMutableBufferPointer { ckvm_epoll_wait(epoll, $0.baseAddress!, 16, -1) }
            if count < 0 {
                if count == -EINTR { continue }
                return
            }
            for i in 0..<Int(count) {
                let token = tokens[i]
                if token == Self.stopToken { return }
                guard let core else { return }
                if token == Self.inputToken {
                    core.processInput()
                } else if Int(token) < queueEvents.count {
                    _ = ckvm_eventfd_drain(queueEvents[Int(token)])
                    core.processQueue(Int(token))
                }
            }
            poll()
        }
    }

    /// Spins on the avail rings (not the eventfds) for up to ``pollNanoseconds`` after the last work.
    private func poll() {
        let window = Self.pollNanoseconds
        guard window > 0, let core else { return }
        var deadline = monotonicNanoseconds() &+ window
        while !stopped.load(ordering: .relaxed) {
            var worked = false
            for index in 0..<queueEvents.count where core.queueHasWork(index) {
                core.processQueue(index)
                worked = true
            }
            let now = monotonicNanoseconds()
            if worked { deadline = now &+ window } else if now >= deadline { return }
        }
    }
}
