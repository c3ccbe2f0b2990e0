internal import Synchronization

/// The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): a 4 KiB register block on the MMIO
/// bus plus one interrupt line. Guests find it through `virtio_mmio.device=4K@ADDR:IRQ` on the
/// kernel command line (``commandLineFragment``).
///
/// QueueNotify (offset 0x50) is caught by one ioeventfd per queue with the queue index as
/// datamatch, so a notify does not exit to userspace; a write that reaches the bus wakes the
/// I/O thread the same way.
public final class VirtioMMIOTransport: BusDevice, VirtioInterrupts, @unchecked Sendable {
    public static let magic: UInt32 = 0x7472_6976  // "virt"
    public static let version: UInt32 = 2
    /// "HYPC", the vendor ID this VMM reports.
    public static let vendor: UInt32 = 0x4350_5948
    public static let size: UInt64 = 0x1000
    public static let queueNotifyOffset: UInt64 = 0x50
    public static let configOffset: UInt64 = 0x100

    public let core: VirtioDeviceCore
    public let base: UInt64
    public let gsi: UInt32
    private let line: any InterruptLine
    private let interruptStatus = Atomic<UInt32>(0)

    public init(core: VirtioDeviceCore, base: UInt64, gsi: UInt32, line: any InterruptLine, registrar: VirtioNotifyRegistrar?) {
        self.core = core
        self.base = base
        self.gsi = gsi
        self.line = line
        core.interrupts = self
        if let registrar {
            for queue in 0..<core.queues.count { registrar(queue, base + Self.queueNotifyOffset, true) }
        }
    }

    /// The kernel command-line option that tells Linux (and the project's guests) where this device is.
    public var commandLineFragment: String { "virtio_mmio.device=4K@0x\(String(base, radix: 16)):\(gsi)" }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        data.initializeMemory(as: UInt8.self, repeating: 0)
        if offset >= Self.configOffset {
            let start = Int(offset - Self.configOffset)
            guard start + data.count <= core.device.configSize else { return }
            core.lock.withLock { core.device.readConfig(offset: start, into: data) }
            return
        }
        // Registers below 0x100 are 32-bit only (§4.2.2.2).
        guard data.count == 4 else { return }
        let value: UInt32 = core.lock.withLock {
            let queue = core.selectedQueue
            switch offset {
            case 0x000: return Self.magic
            case 0x004: return Self.version
            case 0x008: return UInt32(core.device.deviceType)
            case 0x00C: return Self.vendor
            case 0x010: return core.deviceFeatureWord
            case 0x034: return UInt32(queue?.maximumSize ?? 0)
            case 0x044: return queue?.enabled == true ? 1 : 0
            case 0x060: return interruptStatus.load(ordering: .acquiring)
            case 0x070: return UInt32(core.status)
            case 0x080: return UInt32(truncatingIfNeeded: queue?.descriptorTableAddress ?? 0)
            case 0x084: return UInt32(truncatingIfNeeded: (queue?.descriptorTableAddress ?? 0) >> 32)
            case 0x090: return UInt32(truncatingIfNeeded: queue?.availableRingAddress ?? 0)
            case 0x094: return UInt32(truncatingIfNeeded: (queue?.availableRingAddress ?? 0) >> 32)
            case 0x0A0: return UInt32(truncatingIfNeeded: queue?.usedRingAddress ?? 0)
            case 0x0A4: return UInt32(truncatingIfNeeded: (queue?.usedRingAddress ?? 0) >> 32)
            case 0x0FC: return UInt32(core.configGeneration)
            default: return 0
            }
        }
        data.storeLittleEndian(UInt64(value))
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        if offset >= Self.configOffset {
            let start = Int(offset - Self.configOffset)
            guard start + data.count <= core.device.configSize else { return }
            core.lock.withLock { core.device.writeConfig(offset: start, from: data) }
            return
        }
        guard data.count == 4 else { return }
        let value = UInt32(truncatingIfNeeded: data.littleEndianValue)
        if offset == Self.queueNotifyOffset {
            core.notifyFromBus(queue: UInt64(value))
            return
        }
        if offset == 0x064 {
            // InterruptACK: clear the acknowledged bits; the line follows the remaining status.
            let remaining = interruptStatus.bitwiseAnd(~value, ordering: .acquiringAndReleasing).newValue
            if remaining == 0 { line.set(high: false) }
            return
        }
        let reset: Bool = core.lock.withLock {
            let queue = core.selectedQueue
            let configurable = core.queueConfigurable && queue?.enabled == false
            func setLow(_ path: ReferenceWritableKeyPath<Virtqueue, UInt64>) {
                guard let queue, configurable else { return }
                queue[keyPath: path] = (queue[keyPath: path] & ~0xFFFF_FFFF) | UInt64(value)
            }
            func setHigh(_ path: ReferenceWritableKeyPath<Virtqueue, UInt64>) {
                guard let queue, configurable else { return }
                queue[keyPath: path] = (queue[keyPath: path] & 0xFFFF_FFFF) | UInt64(value) << 32
            }
            switch offset {
            case 0x014: core.deviceFeatureSelect = value
            case 0x020: core.setDriverFeatureWord(value)
            case 0x024: core.driverFeatureSelect = value
            case 0x030: core.queueSelect = UInt16(truncatingIfNeeded: value)
            case 0x038: if let queue, configurable { queue.size = UInt16(truncatingIfNeeded: value) }
            case 0x044:
                if let queue, core.queueConfigurable {
                    if value & 1 == 1 { queue.enabled = true } else if !queue.isActive { queue.enabled = false }
                }
            case 0x070:
                core.writeStatus(UInt8(truncatingIfNeeded: value))
                return value == 0
            case 0x080: setLow(\.descriptorTableAddress)
            case 0x084: setHigh(\.descriptorTableAddress)
            case 0x090: setLow(\.availableRingAddress)
            case 0x094: setHigh(\.availableRingAddress)
            case 0x0A0: setLow(\.usedRingAddress)
            case 0x0A4: setHigh(\.usedRingAddress)
            default: break
            }
            return false
        }
        if reset {
            interruptStatus.store(0, ordering: .releasing)
            line.set(high: false)
        }
    }

    struct State: Codable, Equatable {
        var interruptStatus: UInt32
        var lineHigh: Bool
        var core: VirtioDeviceCore.State
    }

    public func saveState() throws(SnapshotError) -> DeviceState {
        try DeviceState(State(interruptStatus: interruptStatus.load(ordering: .acquiring), lineHigh: line.isHigh,
                              core: try core.saveState()))
    }

    public func restoreState(_ saved: DeviceState) throws(SnapshotError) {
        let state = try saved.decode(State.self, device: "virtio-mmio at 0x\(String(base, radix: 16))")
        try core.restoreState(state.core)
        interruptStatus.store(state.interruptStatus, ordering: .releasing)
        line.force(high: state.lineHigh)
    }

    public func queueInterrupt(vector: UInt16) { raise(1) }
    public func configInterrupt(vector: UInt16) { raise(2) }

    private func raise(_ bit: UInt32) {
        interruptStatus.bitwiseOr(bit, ordering: .acquiringAndReleasing)
        line.set(high: true)
    }
}
