internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// virtio-net (virtio 1.2 §5.1) on a ``NetworkBackend``: a TAP interface, or nothing (link down).
///
/// Queues: receiveq 0, transmitq 1 (no control queue, no multiqueue), 256 entries each. Every
/// frame carries the 12-byte `virtio_net_hdr_v1`, which the TAP (IFF_VNET_HDR, header size 12)
/// reads and writes in the same layout, so checksum and segmentation offloads pass straight
/// through.
///
/// Receive: the I/O thread watches the TAP only while the guest has posted receive buffers. A
/// frame is read into one preallocated buffer (at most ``maximumFrame`` bytes), then placed: with
/// MRG_RXBUF into exactly as many buffers as it needs (`num_buffers`), else into one buffer big
/// enough for it. When the posted buffers are too few, the frame waits (one frame at most), the
/// TAP is no longer watched, and the next receive-queue notify resumes both. A frame that cannot
/// fit even in a full ring is dropped and counted.
///
/// Transmit: each chain's readable part (header + frame, at most ``maximumFrame`` bytes) is copied
/// once into a preallocated buffer, the header checked against what was negotiated, and written
/// to the TAP with one `write`. A frame the TAP does not take right now (EAGAIN) is **dropped and
/// counted**, as a NIC whose wire is busy drops; the chain completes either way, so a guest can
/// never make the VMM hold or allocate more than these two buffers.
public final class VirtioNet: VirtioDevice, @unchecked Sendable {
    public static let featureCsum: UInt64 = 1 << 0
    public static let featureGuestCsum: UInt64 = 1 << 1
    public static let featureMTU: UInt64 = 1 << 3
    public static let featureMAC: UInt64 = 1 << 5
    public static let featureGuestTSO4: UInt64 = 1 << 7
    public static let featureGuestTSO6: UInt64 = 1 << 8
    public static let featureHostTSO4: UInt64 = 1 << 11
    public static let featureHostTSO6: UInt64 = 1 << 12
    public static let featureMergeableRx: UInt64 = 1 << 15
    public static let featureStatus: UInt64 = 1 << 16

    public static let receiveQueue = 0
    public static let transmitQueue = 1
    public static let queueSize: UInt16 = 256
    /// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
    public static let headerSize = 12
    /// Header + the largest segmentation-offloaded frame (64 KiB + 14-byte Ethernet header).
    public static let maximumFrame = 65562
    public static let statusLinkUp: UInt16 = 1

    static let headerNeedsChecksum: UInt8 = 1
    static let gsoNone: UInt8 = 0
    static let gsoTCPv4: UInt8 = 1
    static let gsoTCPv6: UInt8 = 4
    /// Frames read from the TAP per wakeup before the thread looks at its other sources.
    static let receiveBatch = 64

    /// Counters, for tests and diagnostics (read under the device core's lock, or when idle).
    public struct Statistics: Sendable, Equatable {
        public var receivedFrames = 0
        public var receivedBytes = 0
        /// Frames from the host that no posted buffers could hold, or shorter than a header.
        public var receiveDropped = 0
        public var transmittedFrames = 0
        public var transmittedBytes = 0
        /// Guest frames not sent: too short or too long, a header the negotiated features do not
        /// allow, a disconnected NIC, or a TAP that would block (EAGAIN).
        public var transmitDropped = 0
        /// Writes the TAP refused (the kernel's own header checks, an interface that went away).
        public var transmitErrors = 0
    }

    public let backend: NetworkBackend
    public let mac: MACAddress
    public let mtu: UInt16
    public let deviceFeatures: UInt64
    public private(set) var statistics = Statistics()
    private var negotiated: UInt64 = 0
    private var offloads: UInt32 = 0
    private let receiveBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: VirtioNet.maximumFrame, alignment: 64)
    private let transmitBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: VirtioNet.maximumFrame, alignment: 64)
    /// Bytes of a frame read from the TAP and not yet placed (0: none).
    private var pendingLength = 0
    private var chains: [DescriptorChain] = []

    public init(backend: NetworkBackend, mac: MACAddress, mtu: UInt16 = 1500) {
        self.backend = backend
        self.mac = mac
        self.mtu = mtu
        deviceFeatures = Self.featureCsum | Self.featureGuestCsum | Self.featureMTU | Self.featureMAC
            | Self.featureGuestTSO4 | Self.featureGuestTSO6 | Self.featureHostTSO4 | Self.featureHostTSO6
            | Self.featureMergeableRx | Self.featureStatus
    }

    deinit {
        receiveBuffer.deallocate()
        transmitBuffer.deallocate()
    }

    public var deviceType: UInt16 { VirtioDeviceType.network }
    public var queueSizes: [UInt16] { [Self.queueSize, Self.queueSize] }
    /// mac[6], status, max_virtqueue_pairs, mtu.
    public var configSize: Int { 12 }

    public var linkUp: Bool {
        if case .tap = backend { true } else { false }
    }

    public var inputFileDescriptor: Int32? {
        if case let .tap(tap) = backend { tap.fileDescriptor } else { nil }
    }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        var config = mac.bytes
        let status = linkUp ? Self.statusLinkUp : 0
        config += [UInt8(status & 0xFF), UInt8(status >> 8), 1, 0, UInt8(mtu & 0xFF), UInt8(mtu >> 8)]
        for i in 0..<data.count where offset >= 0 && offset + i < config.count { data[i] = config[offset + i] }
    }

    public func activate(_ context: VirtioDeviceContext) {
        negotiated = context.features
        applyOffloads()
    }

    public func reset() {
        negotiated = 0
        pendingLength = 0
        applyOffloads()
    }

    /// TUNSETOFFLOAD from what the guest acknowledged: the kernel may then hand us frames with
    /// partial checksums (GUEST_CSUM) and TSO super-frames (GUEST_TSO4/6, which need GUEST_CSUM).
    private func applyOffloads() {
        var flags: UInt32 = 0
        if negotiated & Self.featureGuestCsum != 0 {
            flags |= UInt32(CKVM_TUN_F_CSUM)
            if negotiated & Self.featureGuestTSO4 != 0 { flags |= UInt32(CKVM_TUN_F_TSO4) }
            if negotiated & Self.featureGuestTSO6 != 0 { flags |= UInt32(CKVM_TUN_F_TSO6) }
        }
        offloads = flags
        if case let .tap(tap) = backend { tap.setOffload(flags) }
    }

    // MARK: Snapshot

    /// The negotiated features, the TAP offloads they imply, and the link state. The machine is
    /// quiesced first, so no transmit is in flight; a received frame not yet placed in guest
    /// buffers is not saved (it is lost, as on a wire).
    struct State: Codable, Equatable {
        var negotiated: UInt64
        var offloads: UInt32
        var linkUp: Bool
        var mac: MACAddress
    }

    public func saveState() throws(SnapshotError) -> DeviceState {
        try DeviceState(State(negotiated: negotiated, offloads: offloads, linkUp: linkUp, mac: mac))
    }

    public func restoreState(_ state: DeviceState) throws(SnapshotError) {
        let restored = try state.decode(State.self, device: "virtio-net")
        guard restored.negotiated & ~(deviceFeatures | VirtioFeature.transportDefaults) == 0 else {
            throw .invalidState("virtio-net: negotiated features were not offered")
        }
        guard restored.mac == mac else { throw .invalidState("virtio-net: the snapshot's MAC is \(restored.mac), this NIC's \(mac)") }
        negotiated = restored.negotiated
        pendingLength = 0
        applyOffloads()
    }

    // MARK: Queues

    public func queueNotified(_ index: Int, _ context: VirtioDeviceContext) throws(VirtqueueError) {
        switch index {
        case Self.transmitQueue:
            if try context.queues[index].drain({ chain in transmit(chain) }) {
                context.signalUsed(queue: index)
            }
        case Self.receiveQueue:
            // New receive buffers: place a waiting frame (and whatever else the TAP has). The core
            // resumes watching the TAP after this.
            _ = try receive(context)
        default:
            break
        }
    }

    public func inputReady(_ context: VirtioDeviceContext) throws(VirtqueueError) -> Bool {
        try receive(context)
    }

    // MARK: Transmit

    /// Sends one guest frame; returns 0 (nothing is written into a transmit chain).
    public func transmit(_ chain: DescriptorChain) -> UInt32 {
        let length = chain.readableBytes
        guard length >= UInt64(Self.headerSize) + 14, length <= UInt64(Self.maximumFrame) else {
            statistics.transmitDropped += 1
            return 0
        }
        // One copy out of guest memory: what is checked is what is sent.
        var offset = 0
        for segment in chain.readable {
            (transmitBuffer.baseAddress! + offset).copyMemory(from: segment.pointer, byteCount: Int(segment.length))
            offset += Int(segment.length)
        }
        guard headerAllowed(transmitBuffer.baseAddress!, frameLength: offset - Self.headerSize) else {
            statistics.transmitDropped += 1
            return 0
        }
        guard case let .tap(tap) = backend else {
            statistics.transmitDropped += 1
            return 0
        }
        // num_buffers means nothing on transmit; the TAP ignores bytes 10–11 anyway.
        transmitBuffer[10] = 0
        transmitBuffer[11] = 0
        var written: Int
        repeat { written = write(tap.fileDescriptor, transmitBuffer.baseAddress!, offset) } while written < 0 && errno == EINTR
        if written == offset {
            statistics.transmittedFrames += 1
            statistics.transmittedBytes += offset - Self.headerSize
        } else if written < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
            statistics.transmitDropped += 1
        } else {
            statistics.transmitErrors += 1
        }
        return 0
    }

    /// Whether a transmit header asks only for what was negotiated: NEEDS_CSUM with CSUM and a
    /// checksum location inside the frame; TCPv4/v6 segmentation with HOST_TSO4/6 (and NEEDS_CSUM).
    func headerAllowed(_ header: UnsafeRawPointer, frameLength: Int) -> Bool {
        let flags = header.load(fromByteOffset: 0, as: UInt8.self)
        let gso = header.load(fromByteOffset: 1, as: UInt8.self)
        let checksumStart = Int(UInt16(header.load(fromByteOffset: 6, as: UInt8.self)) | UInt16(header.load(fromByteOffset: 7, as: UInt8.self)) << 8)
        let checksumOffset = Int(UInt16(header.load(fromByteOffset: 8, as: UInt8.self)) | UInt16(header.load(fromByteOffset: 9, as: UInt8.self)) << 8)
        guard flags & ~Self.headerNeedsChecksum == 0 else { return false }
        if flags & Self.headerNeedsChecksum != 0 {
            guard negotiated & Self.featureCsum != 0, checksumStart + checksumOffset + 2 <= frameLength else { return false }
        }
        switch gso {
        case Self.gsoNone: return true
        case Self.gsoTCPv4: return negotiated & Self.featureHostTSO4 != 0 && flags & Self.headerNeedsChecksum != 0
        case Self.gsoTCPv6: return negotiated & Self.featureHostTSO6 != 0 && flags & Self.headerNeedsChecksum != 0
        default: return false
        }
    }

    // MARK: Receive

    /// Reads frames from the TAP into posted receive buffers. Returns whether to keep watching
    /// the TAP: false when the guest has no (or too few) buffers, or the TAP failed.
    func receive(_ context: VirtioDeviceContext) throws(VirtqueueError) -> Bool {
        guard case let .tap(tap) = backend else { return false }
        let queue = context.queues[Self.receiveQueue]
        guard queue.isActive else { return false }
        var placedAny = false
        defer { if placedAny, queue.shouldSignal() { context.signalUsed(queue: Self.receiveQueue) } }
        for _ in 0..<Self.receiveBatch {
            if pendingLength == 0 {
                // Read only into buffers the guest has posted (asking for a notify when there are none).
                guard try queue.pendingCount() > 0 || queue.rearm() else { return false }
                let count = read(tap.fileDescriptor, receiveBuffer.baseAddress!, Self.maximumFrame)
                if count < 0 {
                    if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return true }
                    return false
                }
                // End of file (a descriptor whose other end closed; a TAP never does this): stop
                // watching, or a level-triggered watch would spin.
                if count == 0 { return false }
                guard count >= Self.headerSize else {
                    if count > 0 { statistics.receiveDropped += 1 }
                    continue
                }
                pendingLength = count
            }
            switch try place(queue) {
            case .placed:
                placedAny = true
                statistics.receivedFrames += 1
                statistics.receivedBytes += pendingLength - Self.headerSize
                pendingLength = 0
            case .dropped:
                statistics.receiveDropped += 1
                pendingLength = 0
            case .waiting:
                return false
            }
        }
        return true
    }

    enum Placement { case placed, dropped, waiting }

    /// Places `frame` (header included) in `queue`'s buffers as if it had been read from the
    /// backend; a frame that would have to wait for buffers is dropped. For fuzzing and tests.
    public func placeFrame(_ frame: UnsafeRawBufferPointer, in queue: Virtqueue) throws(VirtqueueError) -> Bool {
        guard frame.count >= Self.headerSize, frame.count <= Self.maximumFrame, pendingLength == 0 else { return false }
        receiveBuffer.copyMemory(from: frame)
        pendingLength = frame.count
        defer { pendingLength = 0 }
        return try place(queue) == .placed
    }

    /// Puts the pending frame into receive buffers: exactly as many as it needs with MRG_RXBUF,
    /// else one that holds all of it.
    func place(_ queue: Virtqueue) throws(VirtqueueError) -> Placement {
        let needed = pendingLength
        let mergeable = negotiated & Self.featureMergeableRx != 0
        var taken = 0
        var room: UInt64 = 0
        while room < UInt64(needed) {
            if taken == chains.count { chains.append(DescriptorChain()) }
            if try queue.pop(into: &chains[taken]) {
                room += chains[taken].writableBytes
                taken += 1
                if !mergeable, room < UInt64(needed) {
                    // One buffer per frame: this one is too small for it. The frame is dropped;
                    // the buffer stays for the next one.
                    queue.unpop(taken)
                    return .dropped
                }
                continue
            }
            // Every buffer the ring can hold would not be enough: the frame can never be placed.
            if taken >= Int(queue.size) {
                queue.unpop(taken)
                return .dropped
            }
            // Ask for a notify at the next buffer (avail_event past the ones taken), then re-check.
            if queue.rearm() { continue }
            queue.unpop(taken)
            return .waiting
        }
        copy(needed, buffers: taken, into: queue)
        return .placed
    }

    private func copy(_ length: Int, buffers: Int, into queue: Virtqueue) {
        // num_buffers (1 without MRG_RXBUF).
        receiveBuffer[10] = UInt8(buffers & 0xFF)
        receiveBuffer[11] = UInt8(buffers >> 8)
        var done = 0
        for index in 0..<buffers {
            var written = 0
            for segment in chains[index].writable where done < length {
                let count = min(Int(segment.length), length - done)
                segment.pointer.copyMemory(from: receiveBuffer.baseAddress! + done, byteCount: count)
                done += count
                written += count
            }
            queue.noteWritten(chains[index])
            queue.pushUsed(head: chains[index].head, length: UInt32(written))
        }
    }
}
