/// The power button and the "soft off" of a hardware-reduced ACPI platform, the way a guest OS
/// expects them when the FADT says there are no fixed-feature registers:
///
/// - a **Generic Event Device** (`ACPI0013` in the DSDT, see ``ACPITables``): its interrupt
///   (``gsi``, edge) tells the OS an event is pending; its `_EVT` method reads the event register
///   (``eventOffset``: reading returns and clears the pending events) and, for bit 0, notifies the
///   power button device (`PNP0C0C`), which the OS treats as a press of the power button — Linux
///   hands it to userspace (systemd-logind, acpid) which shuts down;
/// - the **sleep control register** (FADT `SLEEP_CONTROL_REG`, ``sleepControlOffset``): writing
///   `SLP_EN` with the `SLP_TYP` of the DSDT's `\_S5` package is the OS's last act of a power-off,
///   and ends the machine as ``MachineExit/powerOff``.
///
/// Ports ``port``…``port``+2; the sleep status register (``sleepStatusOffset``) reads 0.
public final class ACPIPower: BusDevice, @unchecked Sendable {
    public static let port: UInt64 = 0x600
    public static let size: UInt64 = 3
    public static let sleepControlOffset: UInt64 = 0
    public static let sleepStatusOffset: UInt64 = 1
    public static let eventOffset: UInt64 = 2
    /// A GSI no other device of ours uses (COM2's, which this machine does not have).
    public static let gsi: UInt32 = 3
    /// The `SLP_TYP` value of `\_S5` (soft off) in the DSDT.
    public static let softOffType: UInt8 = 5
    /// Event register bit: the power button was pressed.
    public static let powerButtonEvent: UInt8 = 1

    private let interrupt: any InterruptLine
    private let onPowerOff: @Sendable () -> Void
    private let lock = PthreadLock()
    private var pending: UInt8 = 0

    public init(interrupt: any InterruptLine, onPowerOff: @escaping @Sendable () -> Void) {
        self.interrupt = interrupt
        self.onPowerOff = onPowerOff
    }

    /// Presses the power button: the event is latched and the GED's interrupt edge raised.
    public func pressPowerButton() {
        lock.withLock { pending |= Self.powerButtonEvent }
        interrupt.set(high: true)
        interrupt.set(high: false)
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard data.count >= 1 else { return }
        for index in data.indices { data[index] = 0 }
        if offset == Self.eventOffset {
            data[0] = lock.withLock {
                let events = pending
                pending = 0
                return events
            }
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset == Self.sleepControlOffset, data.count >= 1 else { return }
        let value = data[0]
        let sleepEnable: UInt8 = 1 << 5
        if value & sleepEnable != 0, (value >> 2) & 0x7 == Self.softOffType { onPowerOff() }
    }

    struct State: Codable, Equatable { var pending: UInt8 }
    public func saveState() throws(SnapshotError) -> DeviceState {
        try DeviceState(State(pending: lock.withLock { pending }))
    }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {
        let saved = try state.decode(State.self, device: "ACPI power")
        lock.withLock { pending = saved.pending }
    }
}
