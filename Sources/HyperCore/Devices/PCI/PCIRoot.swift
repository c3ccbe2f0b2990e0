internal import Synchronization

/// A function on PCI bus 0.
public protocol PCIDevice: Snapshottable, Sendable {
    func configRead(offset: Int, into data: UnsafeMutableRawBufferPointer)
    func configWrite(offset: Int, from data: UnsafeRawBufferPointer)
    /// The BAR and offset decoding guest-physical `address`, when memory decoding is on.
    func decode(_ address: UInt64) -> (bar: Int, offset: UInt64)?
    func barRead(_ bar: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    func barWrite(_ bar: Int, offset: UInt64, from data: UnsafeRawBufferPointer)
}

/// Bus 0: the host bridge at device 0 and up to 31 devices, one function each.
public final class PCIRoot: Sendable {
    public static let maximumDevices = 32
    private let devices: [(any PCIDevice)?]

    /// `devices[i]` goes to slot i + 1 (slot 0 is the host bridge).
    public init(devices: [any PCIDevice]) {
        precondition(devices.count < Self.maximumDevices)
        var slots: [(any PCIDevice)?] = Array(repeating: nil, count: Self.maximumDevices)
        slots[0] = PCIHostBridge()
        for (i, device) in devices.enumerated() { slots[i + 1] = device }
        self.devices = slots
    }

    public func device(slot: Int) -> (any PCIDevice)? { slot < devices.count ? devices[slot] : nil }

    /// Every populated slot's device, host bridge first.
    public var allDevices: [any PCIDevice] { devices.compactMap { $0 } }
}

/// The host bridge: identity only (class 06/00), nothing to configure.
final class PCIHostBridge: PCIDevice, @unchecked Sendable {
    private let space = Mutex(PCIConfigSpace(vendor: 0x8086, device: 0x0D57, revision: 0, classCode: 0x06_00_00))
    func configRead(offset: Int, into data: UnsafeMutableRawBufferPointer) { space.withLock { $0.read(offset: offset, into: data) } }
    func configWrite(offset: Int, from data: UnsafeRawBufferPointer) { space.withLock { _ = $0.write(offset: offset, from: data) } }
    func decode(_ address: UInt64) -> (bar: Int, offset: UInt64)? { nil }
    func barRead(_ bar: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer) {}
    func barWrite(_ bar: Int, offset: UInt64, from data: UnsafeRawBufferPointer) {}
    func saveState() throws(SnapshotError) -> DeviceState { try DeviceState(space.withLock { $0.state }) }
    func restoreState(_ state: DeviceState) throws(SnapshotError) {
        let restored = try state.decode(PCIConfigSpace.State.self, device: "PCI host bridge")
        try space.withLock { space throws(SnapshotError) in try space.restore(restored, device: "PCI host bridge") }
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data window at 0xCFC–0xCFF
/// (register at port base + 0, data at + 4). Bus 0 only; absent devices and functions read as all ones.
public final class PCIConfigPorts: BusDevice, Sendable {
    public static let base: UInt64 = 0xCF8
    public static let size: UInt64 = 8
    private let root: PCIRoot
    private let address = Atomic<UInt32>(0)

    public init(root: PCIRoot) { self.root = root }

    struct State: Codable, Equatable {
        var address: UInt32
        /// Every slot's function, host bridge first: the PCI functions' state lives here, once.
        var functions: [DeviceState]
    }

    public func saveState() throws(SnapshotError) -> DeviceState {
        var functions: [DeviceState] = []
        for device in root.allDevices { functions.append(try device.saveState()) }
        return try DeviceState(State(address: address.load(ordering: .relaxed), functions: functions))
    }

    public func restoreState(_ saved: DeviceState) throws(SnapshotError) {
        let state = try saved.decode(State.self, device: "PCI configuration ports")
        let devices = root.allDevices
        guard state.functions.count == devices.count else {
            throw .invalidState("PCI: the snapshot has \(state.functions.count) functions, this machine \(devices.count)")
        }
        for (device, function) in zip(devices, state.functions) { try device.restoreState(function) }
        address.store(state.address, ordering: .relaxed)
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        if offset == 0, data.count == 4 {
            data.storeLittleEndian(UInt64(address.load(ordering: .relaxed)))
            return
        }
        guard offset >= 4, let (device, register) = target(dataOffset: offset) else { return }  // bus: 0xFF…
        device.configRead(offset: register, into: data)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset == 0 {
            // Only dword accesses hit the address register (byte writes to 0xCF9 are the reset
            // control register on real chipsets, not ours).
            if data.count == 4 { address.store(UInt32(truncatingIfNeeded: data.littleEndianValue), ordering: .relaxed) }
            return
        }
        guard offset >= 4, let (device, register) = target(dataOffset: offset) else { return }
        device.configWrite(offset: register, from: data)
    }

    private func target(dataOffset: UInt64) -> (any PCIDevice, Int)? {
        let value = address.load(ordering: .relaxed)
        guard value & 0x8000_0000 != 0 else { return nil }
        let bus = (value >> 16) & 0xFF
        let slot = Int((value >> 11) & 0x1F)
        let function = (value >> 8) & 0x7
        guard bus == 0, function == 0, let device = root.device(slot: slot) else { return nil }
        return (device, Int(value & 0xFC) + Int(dataOffset - 4))
    }
}

/// The PCI memory window (``GuestLayout/pciMMIOStart``–``GuestLayout/pciMMIOEnd``) on the MMIO
/// bus: each access goes to the device whose BAR decodes it now, so guests may move BARs.
public final class PCIMMIOWindow: BusDevice, Sendable {
    public static let base = GuestLayout.pciMMIOStart
    public static let size = GuestLayout.pciMMIOEnd - GuestLayout.pciMMIOStart
    private let devices: [any PCIDevice]

    public init(root: PCIRoot) { devices = root.allDevices }

    /// A window onto the functions' BARs; the functions' state is saved through ``PCIConfigPorts``.
    public func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {}

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard let (device, bar, barOffset) = claimant(of: offset) else { return }
        device.barRead(bar, offset: barOffset, into: data)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let (device, bar, barOffset) = claimant(of: offset) else { return }
        device.barWrite(bar, offset: barOffset, from: data)
    }

    /// The device whose BAR decodes the window offset now, with the BAR and the offset into it.
    private func claimant(of offset: UInt64) -> (device: any PCIDevice, bar: Int, offset: UInt64)? {
        let address = Self.base + offset
        for device in devices {
            if let (bar, barOffset) = device.decode(address) { return (device, bar, barOffset) }
        }
        return nil
    }
}

/// Places BARs in the PCI window, naturally aligned, bottom up.
public struct PCIBarAllocator: Sendable {
    private var next: UInt64
    private let end: UInt64

    public init(start: UInt64 = GuestLayout.pciMMIOStart, end: UInt64 = GuestLayout.pciMMIOEnd) {
        next = start
        self.end = end
    }

    public mutating func allocate(_ bar: PCIBar) -> UInt64? {
        let aligned = (next + bar.size - 1) & ~(bar.size - 1)
        guard aligned >= next, aligned + bar.size <= end else { return nil }
        next = aligned + bar.size
        return aligned
    }
}
