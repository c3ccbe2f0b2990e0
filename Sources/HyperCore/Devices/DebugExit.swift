/// A one-register device that ends the VM: a guest write of byte `v` stops the machine with exit
/// code `v`. At port 0x501 (2 ports wide), where QEMU's `isa-debug-exit` sits by default, so
/// test guests run unchanged on both VMMs. (QEMU turns `v` into process status `(v << 1) | 1`;
/// HyperCore reports `v` itself.)
public final class DebugExit: BusDevice {
    public static let defaultPort: UInt64 = 0x501
    private let onExit: @Sendable (UInt8) -> Void

    public init(onExit: @escaping @Sendable (UInt8) -> Void) { self.onExit = onExit }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {}

    /// A write ends the run at once: nothing is latched.
    public func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {}

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset == 0, data.count >= 1 else { return }
        onExit(data[0])
    }
}
