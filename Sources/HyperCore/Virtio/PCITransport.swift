internal import Synchronization

/// Registers (or removes) the ioeventfd behind one queue's notify address.
public typealias VirtioNotifyRegistrar = @Sendable (_ queue: Int, _ address: UInt64, _ attach: Bool) -> Void

/// The virtio-pci modern transport (virtio 1.2 §4.1): a PCI function with vendor 0x1AF4, device
/// 0x1040 + type, revision 1, and vendor capabilities pointing into its BARs.
///
/// BAR layout (both placed by the VMM, movable by the guest):
/// - BAR0, 32-bit memory, 4 KiB: the MSI-X table at 0 and the pending-bit array at 0x800.
/// - BAR2, 64-bit memory, 16 KiB: common configuration at 0, ISR at 0x1000, device configuration
///   at 0x2000, notifications at 0x3000 (one 4-byte slot per queue: `queue_notify_off` = queue index).
///
/// Notify writes are caught by ioeventfds in KVM and wake the device's I/O thread without an exit;
/// a write that reaches the bus anyway (no ioeventfd) takes the same path from the vCPU thread.
public final class VirtioPCITransport: PCIDevice, VirtioInterrupts, @unchecked Sendable {
    public static let vendorID: UInt16 = 0x1AF4
    public static let msixBar = 0
    public static let msixBarSize: UInt64 = 0x1000
    public static let pbaOffset: UInt64 = 0x800
    public static let virtioBar = 2
    public static let virtioBarSize: UInt64 = 0x4000
    public static let commonOffset: UInt64 = 0
    public static let isrOffset: UInt64 = 0x1000
    public static let deviceOffset: UInt64 = 0x2000
    public static let notifyOffset: UInt64 = 0x3000
    public static let notifyMultiplier: UInt32 = 4
    static let commonLength: UInt32 = 0x3C

    public let core: VirtioDeviceCore
    public let msix: MSIXVectors
    private let intx: any InterruptLine
    private let space: Mutex<PCIConfigSpace>
    private let isr = Atomic<UInt8>(0)
    private let msixCapability: Int
    private let pciConfigCapability: Int
    private let registrar: VirtioNotifyRegistrar?
    private let notifyBase = Mutex<UInt64?>(nil)

    /// - Parameters:
    ///   - msixBarAddress, virtioBarAddress: where the VMM places BAR0 and BAR2.
    ///   - intx: the legacy interrupt line (an IOAPIC pin); `interruptLine` is its number for config byte 0x3C.
    ///   - registrar: attaches ioeventfds for notify addresses; nil leaves every notify on the bus.
    public init(core: VirtioDeviceCore, msixDelivery: any MSIDelivery, intx: any InterruptLine, interruptLine: UInt8,
                msixBarAddress: UInt64, virtioBarAddress: UInt64, registrar: VirtioNotifyRegistrar?) {
        self.core = core
        self.intx = intx
        self.registrar = registrar
        let vectors = core.queues.count + 1
        msix = MSIXVectors(count: vectors, delivery: msixDelivery)

        let type = core.device.deviceType
        let classCode: UInt32 = switch type {
        case VirtioDeviceType.block: 0x01_80_00      // mass storage, other
        case VirtioDeviceType.console: 0x07_80_00    // communication, other
        default: 0xFF_00_00                          // unclassified
        }
        var space = PCIConfigSpace(vendor: Self.vendorID, device: 0x1040 + type, revision: 1, classCode: classCode,
                                   subsystemVendor: Self.vendorID, subsystem: 0x40, interruptPin: 1)
        _ = withUnsafeBytes(of: interruptLine) { space.write(offset: 0x3C, from: $0) }
        space.setBar(Self.msixBar, PCIBar(kind: .memory32, size: Self.msixBarSize), address: msixBarAddress)
        space.setBar(Self.virtioBar, PCIBar(kind: .memory64, size: Self.virtioBarSize), address: virtioBarAddress)

        let cap = MSIXVectors.capability(vectors: vectors, tableBar: Self.msixBar, tableOffset: 0,
                                         pbaBar: Self.msixBar, pbaOffset: UInt32(Self.pbaOffset))
        msixCapability = space.addCapability(cap.bytes, writableMask: cap.mask)
        func virtioCap(_ type: UInt8, _ offset: UInt64, _ length: UInt32, extra: [UInt8] = []) -> [UInt8] {
            var bytes: [UInt8] = [0x09, 0, UInt8(16 + extra.count), type, UInt8(Self.virtioBar), 0, 0, 0]
            for word in [UInt32(offset), length] { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: word >> (8 * UInt32(i)))) } }
            return bytes + extra
        }
        let multiplier = (0..<4).map { UInt8(truncatingIfNeeded: Self.notifyMultiplier >> (8 * UInt32($0))) }
        space.addCapability(virtioCap(1, Self.commonOffset, Self.commonLength))
        space.addCapability(virtioCap(2, Self.notifyOffset, UInt32(4 * max(core.queues.count, 1)), extra: multiplier))
        space.addCapability(virtioCap(3, Self.isrOffset, 4))
        if core.device.configSize > 0 {
            space.addCapability(virtioCap(4, Self.deviceOffset, UInt32(core.device.configSize)))
        }
        // VIRTIO_PCI_CAP_PCI_CFG: a window into the BARs through config space. bar, offset, length
        // and the data dword are the driver's to write.
        var windowMask = [UInt8](repeating: 0, count: 20)
        windowMask[4] = 0xFF
        for i in 8..<20 { windowMask[i] = 0xFF }
        pciConfigCapability = space.addCapability(virtioCap(5, 0, 0, extra: [0, 0, 0, 0]), writableMask: windowMask)
        self.space = Mutex(space)
        core.interrupts = self
        registerNotify(at: virtioBarAddress + Self.notifyOffset)
    }

    deinit { registerNotify(at: nil) }

    /// Moves the notify ioeventfds to follow BAR2.
    private func registerNotify(at base: UInt64?) {
        guard let registrar else { return }
        notifyBase.withLock { current in
            guard current != base else { return }
            if let current { for q in 0..<core.queues.count { registrar(q, current + UInt64(Self.notifyMultiplier) * UInt64(q), false) } }
            if let base { for q in 0..<core.queues.count { registrar(q, base + UInt64(Self.notifyMultiplier) * UInt64(q), true) } }
            current = base
        }
    }

    // MARK: Configuration space

    public func configRead(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        let window = pciConfigCapability + 16
        if offset >= window, offset < window + 4 {
            windowAccess(read: data, write: nil)
            return
        }
        space.withLock { $0.read(offset: offset, into: data) }
    }

    public func configWrite(offset: Int, from data: UnsafeRawBufferPointer) {
        let window = pciConfigCapability + 16
        if offset >= window, offset < window + 4 {
            windowAccess(read: nil, write: data)
            return
        }
        let (moved, control, command, virtioBase) = space.withLock { space in
            let moved = space.write(offset: offset, from: data)
            return (moved, space.get16(msixCapability + 2), space.command, space.barAddress(Self.virtioBar))
        }
        if offset <= msixCapability + 3, offset + data.count > msixCapability + 2 {
            msix.controlWritten(control)
        }
        if moved.contains(Self.virtioBar), let virtioBase {
            registerNotify(at: virtioBase + Self.notifyOffset)
        }
        if command & PCIConfigSpace.commandINTxDisable != 0 { intx.set(high: false) }
    }

    /// VIRTIO_PCI_CAP_PCI_CFG's data dword: an access of `length` bytes at `offset` in `bar`.
    private func windowAccess(read: UnsafeMutableRawBufferPointer?, write: UnsafeRawBufferPointer?) {
        let (bar, offset, length) = space.withLock { space in
            (Int(space.bytes[pciConfigCapability + 4]), UInt64(space.get32(pciConfigCapability + 8)),
             Int(space.get32(pciConfigCapability + 12)))
        }
        guard [1, 2, 4].contains(length), bar == Self.msixBar || bar == Self.virtioBar else { return }
        var scratch: UInt32 = 0
        withUnsafeMutableBytes(of: &scratch) { buffer in
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
            if let write {
                for i in 0..<min(length, write.count) { slice[i] = write[i] }
                barWrite(bar, offset: offset, from: UnsafeRawBufferPointer(slice))
            } else if let read {
                barRead(bar, offset: offset, into: slice)
                for i in 0..<read.count { read[i] = i < length ? slice[i] : 0 }
            }
        }
    }

    public func decode(_ address: UInt64) -> (bar: Int, offset: UInt64)? {
        space.withLock { space in
            guard space.memoryEnabled else { return nil }
            for (bar, size) in [(Self.msixBar, Self.msixBarSize), (Self.virtioBar, Self.virtioBarSize)] {
                if let base = space.barAddress(bar), address >= base, address - base < size { return (bar, address - base) }
            }
            return nil
        }
    }

    // MARK: BARs

    public func barRead(_ bar: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0)
        if bar == Self.msixBar {
            if offset < Self.pbaOffset { msix.tableRead(offset: offset, into: data) } else { msix.pbaRead(offset: offset - Self.pbaOffset, into: data) }
            return
        }
        switch offset {
        case Self.commonOffset..<Self.isrOffset:
            data.storeLittleEndian(core.lock.withLock { readCommon(offset, width: data.count) })
        case Self.isrOffset..<Self.deviceOffset:
            guard offset == Self.isrOffset else { return }
            // Reading the ISR acknowledges it and lowers INTx (§4.1.4.5).
            let value = isr.exchange(0, ordering: .acquiringAndReleasing)
            intx.set(high: false)
            data.storeLittleEndian(UInt64(value))
        case Self.deviceOffset..<Self.notifyOffset:
            let start = Int(offset - Self.deviceOffset)
            guard start + data.count <= core.device.configSize else { return }
            core.lock.withLock { core.device.readConfig(offset: start, into: data) }
        default:
            break  // notify region reads as zero
        }
    }

    public func barWrite(_ bar: Int, offset: UInt64, from data: UnsafeRawBufferPointer) {
        if bar == Self.msixBar {
            if offset < Self.pbaOffset { msix.tableWrite(offset: offset, from: data) }
            return
        }
        switch offset {
        case Self.commonOffset..<Self.isrOffset:
            let reset = core.lock.withLock { writeCommon(offset, width: data.count, value: data.littleEndianValue) }
            if reset {
                isr.store(0, ordering: .releasing)
                intx.set(high: false)
            }
        case Self.deviceOffset..<Self.notifyOffset:
            let start = Int(offset - Self.deviceOffset)
            guard start + data.count <= core.device.configSize else { return }
            core.lock.withLock { core.device.writeConfig(offset: start, from: data) }
        case Self.notifyOffset..<(Self.notifyOffset + 0x1000):
            // Fallback path: the ioeventfd did not catch this write. Unknown queues are ignored.
            core.notifyFromBus(queue: (offset - Self.notifyOffset) / UInt64(Self.notifyMultiplier))
        default:
            break
        }
    }

    /// Common configuration reads (caller holds the core lock). 64-bit fields may be read as two dwords.
    private func readCommon(_ offset: UInt64, width: Int) -> UInt64 {
        let queue = core.selectedQueue
        switch (offset, width) {
        case (0x00, 4): return UInt64(core.deviceFeatureSelect)
        case (0x04, 4): return UInt64(core.deviceFeatureWord)
        case (0x08, 4): return UInt64(core.driverFeatureSelect)
        case (0x0C, 4): return UInt64(core.driverFeatureWord)
        case (0x10, 2): return UInt64(core.configVector)
        case (0x12, 2): return UInt64(core.queues.count)
        case (0x14, 1): return UInt64(core.status)
        case (0x15, 1): return UInt64(core.configGeneration)
        case (0x16, 2): return UInt64(core.queueSelect)
        case (0x18, 2): return UInt64(queue?.size ?? 0)  // 0: the selected queue does not exist
        case (0x1A, 2): return UInt64(queue?.vector ?? Virtqueue.noVector)
        case (0x1C, 2): return queue?.enabled == true ? 1 : 0
        case (0x1E, 2): return UInt64(core.queueSelect)
        case (0x20, _), (0x24, 4): return split(queue?.descriptorTableAddress, offset - 0x20, width)
        case (0x28, _), (0x2C, 4): return split(queue?.availableRingAddress, offset - 0x28, width)
        case (0x30, _), (0x34, 4): return split(queue?.usedRingAddress, offset - 0x30, width)
        default: return 0
        }
    }

    private func split(_ value: UInt64?, _ half: UInt64, _ width: Int) -> UInt64 {
        guard let value else { return 0 }
        if width == 8 { return value }
        return half == 0 ? value & 0xFFFF_FFFF : value >> 32
    }

    /// Common configuration writes (caller holds the core lock). Returns true on a device reset.
    private func writeCommon(_ offset: UInt64, width: Int, value: UInt64) -> Bool {
        let queue = core.selectedQueue
        let configurable = core.queueConfigurable
        func set(_ field: ReferenceWritableKeyPath<Virtqueue, UInt64>, _ base: UInt64) {
            guard let queue, configurable, !queue.enabled else { return }
            if width == 8 { queue[keyPath: field] = value; return }
            let old = queue[keyPath: field]
            queue[keyPath: field] = offset == base ? (old & ~0xFFFF_FFFF) | (value & 0xFFFF_FFFF) : (old & 0xFFFF_FFFF) | (value << 32)
        }
        switch (offset, width) {
        case (0x00, 4): core.deviceFeatureSelect = UInt32(truncatingIfNeeded: value)
        case (0x08, 4): core.driverFeatureSelect = UInt32(truncatingIfNeeded: value)
        case (0x0C, 4): core.setDriverFeatureWord(UInt32(truncatingIfNeeded: value))
        case (0x10, 2):
            // A vector the table cannot hold reads back as NO_VECTOR (§4.1.5.1.2).
            core.configVector = value < UInt64(msix.count) ? UInt16(value) : Virtqueue.noVector
        case (0x14, 1):
            core.writeStatus(UInt8(truncatingIfNeeded: value))
            return value & 0xFF == 0
        case (0x16, 2): core.queueSelect = UInt16(truncatingIfNeeded: value)
        case (0x18, 2):
            if let queue, configurable, !queue.enabled { queue.size = UInt16(truncatingIfNeeded: value) }
        case (0x1A, 2):
            if let queue { queue.vector = value < UInt64(msix.count) ? UInt16(value) : Virtqueue.noVector }
        case (0x1C, 2):
            if let queue, configurable, value & 1 == 1 { queue.enabled = true }
        case (0x20, 4), (0x24, 4), (0x20, 8): set(\.descriptorTableAddress, 0x20)
        case (0x28, 4), (0x2C, 4), (0x28, 8): set(\.availableRingAddress, 0x28)
        case (0x30, 4), (0x34, 4), (0x30, 8): set(\.usedRingAddress, 0x30)
        default: break
        }
        return false
    }

    // MARK: Snapshot

    struct State: Codable, Equatable {
        var configuration: PCIConfigSpace.State
        var msix: MSIXVectors.State
        var isr: UInt8
        var intxHigh: Bool
        var core: VirtioDeviceCore.State
    }

    public func saveState() throws(SnapshotError) -> DeviceState {
        try DeviceState(State(configuration: space.withLock { $0.state }, msix: msix.state,
                              isr: isr.load(ordering: .acquiring), intxHigh: intx.isHigh, core: try core.saveState()))
    }

    public func restoreState(_ saved: DeviceState) throws(SnapshotError) {
        let name = "virtio-pci \(core.device.deviceType)"
        let state = try saved.decode(State.self, device: name)
        let virtioBase = try space.withLock { space throws(SnapshotError) in
            try space.restore(state.configuration, device: name)
            return space.barAddress(Self.virtioBar)
        }
        try msix.restore(state.msix)
        try core.restoreState(state.core)
        isr.store(state.isr, ordering: .releasing)
        intx.force(high: state.intxHigh)
        if let virtioBase { registerNotify(at: virtioBase + Self.notifyOffset) }
    }

    // MARK: Interrupts

    public func queueInterrupt(vector: UInt16) { raise(vector: vector, isrBit: 1) }
    public func configInterrupt(vector: UInt16) { raise(vector: vector, isrBit: 2) }

    private func raise(vector: UInt16, isrBit: UInt8) {
        if msix.signal(vector) { return }
        // MSI-X off: INTx, level-triggered, held until the driver reads the ISR.
        isr.bitwiseOr(isrBit, ordering: .acquiringAndReleasing)
        let disabled = space.withLock { $0.command & PCIConfigSpace.commandINTxDisable != 0 }
        if !disabled { intx.set(high: true) }
    }

    /// The ISR as the guest would read it, without acknowledging (tests).
    public var pendingISR: UInt8 { isr.load(ordering: .acquiring) }
}
