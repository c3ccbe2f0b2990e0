internal import CKVM

/// virtio-rng (virtio 1.2 §5.4): one request queue whose writable buffers the device fills from
/// the host kernel's CSPRNG (getrandom). At most 64 KiB per request: the spec lets the device
/// return fewer bytes than offered, and a huge buffer must not stall the I/O thread.
public final class VirtioEntropy: VirtioDevice, @unchecked Sendable {
    static let maximumPerRequest = 64 << 10

    public init() {}

    public var deviceType: UInt16 { VirtioDeviceType.entropy }
    public var deviceFeatures: UInt64 { 0 }
    public var queueSizes: [UInt16] { [8] }
    public var configSize: Int { 0 }
    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {}
    public func activate(_ context: VirtioDeviceContext) {}
    public func reset() {}
    /// Each request is answered from getrandom as it comes: nothing carries over.
    public func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {}

    public func queueNotified(_ index: Int, _ context: VirtioDeviceContext) throws(VirtqueueError) {
        if try context.queues[index].drain({ chain in
            var total = 0
            for segment in chain.writable where total < Self.maximumPerRequest {
                let want = min(Int(segment.length), Self.maximumPerRequest - total)
                let got = ckvm_getrandom(segment.pointer, want)
                guard got > 0 else { break }
                total += got
                if got < want { break }
            }
            return UInt32(total)
        }) {
            context.signalUsed(queue: index)
        }
    }
}
