#if canImport(Glibc)
internal import Glibc
#endif

/// virtio-console (virtio 1.2 §5.3) with one port, port 0, which Linux makes `hvc0`.
///
/// Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) the guest's output to
/// a ``ConsoleOutput``. No MULTIPORT, so there are no control queues. Input comes from an
/// optional file descriptor the I/O thread watches; it is read only when the guest has posted
/// receive buffers, so a guest that never reads cannot make the host buffer without bound.
public final class VirtioConsole: VirtioDevice, @unchecked Sendable {
    public static let receiveQueue = 0
    public static let transmitQueue = 1
    static let pendingLimit = 4096

    private let output: any ConsoleOutput
    public let inputFileDescriptor: Int32?
    private var pending: [UInt8] = []
    private var inputClosed = false
    private var context: VirtioDeviceContext?

    public init(output: any ConsoleOutput, input: Int32? = nil) {
        self.output = output
        inputFileDescriptor = input
    }

    public var deviceType: UInt16 { VirtioDeviceType.console }
    public var deviceFeatures: UInt64 { 0 }
    public var queueSizes: [UInt16] { [128, 128] }
    /// cols, rows, max_nr_ports, emerg_wr: present but meaningful only with features we do not offer.
    public var configSize: Int { 12 }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        var config = [UInt8](repeating: 0, count: 12)
        config[8] = 1  // max_nr_ports
        for i in 0..<data.count where offset + i < config.count { data[i] = config[offset + i] }
    }

    public func activate(_ context: VirtioDeviceContext) { self.context = context }

    /// Host input already read but not yet delivered to the guest. (Whether the host's input
    /// reached end of file is about this process's descriptor, not the guest: a restored
    /// machine reads its new input from the start.)
    struct State: Codable, Equatable { var pending: HexBytes }
    public func saveState() throws(SnapshotError) -> DeviceState { try DeviceState(State(pending: HexBytes(pending))) }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {
        let restored = try state.decode(State.self, device: "virtio-console")
        guard restored.pending.bytes.count <= Self.pendingLimit else { throw .invalidState("virtio-console: too much pending input") }
        pending = restored.pending.bytes
    }
    public func reset() {
        context = nil
        pending.removeAll()
    }

    public func queueNotified(_ index: Int, _ context: VirtioDeviceContext) throws(VirtqueueError) {
        switch index {
        case Self.transmitQueue:
            let output = self.output
            if try context.queues[index].drain({ chain in
                for segment in chain.readable {
                    output.write(UnsafeRawBufferPointer(start: segment.pointer, count: Int(segment.length)))
                }
                return 0
            }) {
                context.signalUsed(queue: index)
            }
        case Self.receiveQueue:
            try deliver(context)
        default:
            break
        }
    }

    public func inputReady(_ context: VirtioDeviceContext) throws(VirtqueueError) -> Bool {
        guard let fd = inputFileDescriptor, !inputClosed else { return false }
        let room = Self.pendingLimit - pending.count
        if room > 0 {
            var buffer = [UInt8](repeating: 0, count: room)
            let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, room) }
            if count == 0 || (count < 0 && errno != EINTR && errno != EAGAIN) {
                inputClosed = true
            } else if count > 0 {
                pending.append(contentsOf: buffer[0..<count])
            }
        }
        try deliver(context)
        // Keep watching only while there is room for more; the next receive-queue notify resumes it.
        return !inputClosed && pending.count < Self.pendingLimit && context.queues[Self.receiveQueue].isActive
    }

    /// Moves pending input into the guest's receive buffers.
    private func deliver(_ context: VirtioDeviceContext) throws(VirtqueueError) {
        let queue = context.queues[Self.receiveQueue]
        guard !pending.isEmpty, queue.isActive else { return }
        var chain = DescriptorChain()
        var delivered = false
        while !pending.isEmpty, try queue.pop(into: &chain) {
            var written = 0
            for segment in chain.writable where written < pending.count {
                let count = min(Int(segment.length), pending.count - written)
                pending.withUnsafeBytes { segment.pointer.copyMemory(from: $0.baseAddress! + written, byteCount: count) }
                written += count
            }
            pending.removeFirst(written)
            queue.noteWritten(chain)
            queue.pushUsed(head: chain.head, length: UInt32(written))
            delivered = true
        }
        if delivered, queue.shouldSignal() { context.signalUsed(queue: Self.receiveQueue) }
    }
}
