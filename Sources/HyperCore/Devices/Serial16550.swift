internal import Synchronization

/// A 16550A UART, as Linux's 8250 driver probes and drives it (COM1: ports 0x3F8–0x3FF, IRQ 4).
///
/// Transmission is instantaneous: a byte written to THR goes straight to the output and THR is
/// empty again, so LSR always shows THRE|TEMT. Received bytes (from the host terminal, or from THR
/// in loopback mode) wait in a FIFO of 16 bytes, the chip's own depth; host input beyond that
/// waits in an unbounded-but-capped host queue until the guest drains the FIFO.
///
/// Interrupts follow the chip's priority order (line status, received data, THR empty, modem
/// status); the line is driven as a level, like QEMU's model, which the 8250 driver expects.
public final class Serial16550: BusDevice {
    /// Register offsets from the base port.
    enum Register {
        static let data: UInt64 = 0            // RBR (read) / THR (write) / DLL (DLAB=1)
        static let interruptEnable: UInt64 = 1 // IER / DLM (DLAB=1)
        static let interruptId: UInt64 = 2     // IIR (read) / FCR (write)
        static let lineControl: UInt64 = 3
        static let modemControl: UInt64 = 4
        static let lineStatus: UInt64 = 5
        static let modemStatus: UInt64 = 6
        static let scratch: UInt64 = 7
    }

    enum LineStatus {
        static let dataReady: UInt8 = 0x01
        static let overrun: UInt8 = 0x02
        static let thrEmpty: UInt8 = 0x20
        static let transmitterEmpty: UInt8 = 0x40
    }

    enum IIR {
        static let noInterrupt: UInt8 = 0x01
        static let modemStatus: UInt8 = 0x00
        static let thrEmpty: UInt8 = 0x02
        static let receivedData: UInt8 = 0x04
        static let lineStatus: UInt8 = 0x06
        static let characterTimeout: UInt8 = 0x0C
        static let fifoEnabled: UInt8 = 0xC0
    }

    static let fifoDepth = 16
    /// Host input beyond this is dropped (a paste of megabytes must not grow memory without bound).
    static let hostQueueLimit = 64 * 1024

    struct State: Codable, Equatable {
        var divisor: UInt16 = 12 // 9600 baud from the 1.8432 MHz clock
        var interruptEnable: UInt8 = 0
        var lineControl: UInt8 = 0x03 // 8N1
        var modemControl: UInt8 = 0x08 // OUT2
        var lineStatus: UInt8 = LineStatus.thrEmpty | LineStatus.transmitterEmpty
        var modemStatus: UInt8 = 0
        var scratch: UInt8 = 0
        var fifoControl: UInt8 = 0
        var thrInterruptPending = false
        var receiveFIFO: [UInt8] = []
        var hostQueue: [UInt8] = []

        var dlab: Bool { lineControl & 0x80 != 0 }
        var loopback: Bool { modemControl & 0x10 != 0 }
        var fifoEnabled: Bool { fifoControl & 0x01 != 0 }
        var triggerLevel: Int { [1, 4, 8, 14][Int(fifoControl >> 6)] }
    }

    private let state = Mutex(State())
    private let output: any ConsoleOutput
    private let interrupt: any InterruptLine

    public init(output: any ConsoleOutput, interrupt: any InterruptLine) {
        self.output = output
        self.interrupt = interrupt
    }

    /// Bytes from the host side (a terminal) for the guest to read.
    public func receive(_ bytes: some Sequence<UInt8>) {
        let high: Bool = state.withLock { state in
            for byte in bytes where state.hostQueue.count < Self.hostQueueLimit { state.hostQueue.append(byte) }
            Self.refill(&state)
            return Self.interruptPending(state) != nil
        }
        interrupt.set(high: high)
    }

    // MARK: BusDevice

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard data.count >= 1 else { return }
        let (value, high): (UInt8, Bool) = state.withLock { state in
            let value = Self.readRegister(offset, &state)
            return (value, Self.interruptPending(state) != nil)
        }
        data[0] = value
        interrupt.set(high: high)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard data.count >= 1 else { return }
        var transmitted: UInt8?
        let high: Bool = state.withLock { state in
            transmitted = Self.writeRegister(offset, data[0], &state)
            return Self.interruptPending(state) != nil
        }
        if var byte = transmitted { withUnsafeBytes(of: &byte) { output.write($0) } }
        interrupt.set(high: high)
    }

    // MARK: Snapshot

    public func saveState() throws(SnapshotError) -> DeviceState { try DeviceState(state.withLock { $0 }) }

    public func restoreState(_ saved: DeviceState) throws(SnapshotError) {
        let restored = try saved.decode(State.self, device: "16550 UART")
        state.withLock { $0 = restored }
        interrupt.force(high: Self.interruptPending(restored) != nil)
    }

    // MARK: Register model (pure functions over State, so the lock holds only bookkeeping)

    private static func readRegister(_ offset: UInt64, _ state: inout State) -> UInt8 {
        switch offset {
        case Register.data:
            if state.dlab { return UInt8(truncatingIfNeeded: state.divisor) }
            guard !state.receiveFIFO.isEmpty else { return 0 }
            let byte = state.receiveFIFO.removeFirst()
            refill(&state)
            return byte
        case Register.interruptEnable:
            return state.dlab ? UInt8(state.divisor >> 8) : state.interruptEnable
        case Register.interruptId:
            let pending = interruptPending(state)
            // Reading IIR acknowledges a THR-empty interrupt (the chip's documented side effect).
            if pending == IIR.thrEmpty { state.thrInterruptPending = false }
            return (pending ?? IIR.noInterrupt) | (state.fifoEnabled ? IIR.fifoEnabled : 0)
        case Register.lineControl:
            return state.lineControl
        case Register.modemControl:
            return state.modemControl
        case Register.lineStatus:
            let value = state.lineStatus
            state.lineStatus &= ~LineStatus.overrun // cleared by reading
            return value
        case Register.modemStatus:
            let value = modemStatusValue(state)
            state.modemStatus &= 0xF0 // reading clears the delta bits
            return value
        case Register.scratch:
            return state.scratch
        default:
            return 0xFF
        }
    }

    /// Returns a byte to transmit to the host, if the write sent one.
    private static func writeRegister(_ offset: UInt64, _ value: UInt8, _ state: inout State) -> UInt8? {
        switch offset {
        case Register.data:
            if state.dlab {
                state.divisor = (state.divisor & 0xFF00) | UInt16(value)
                return nil
            }
            state.thrInterruptPending = true // THR empties at once
            if state.loopback {
                pushReceived(value, &state)
                return nil
            }
            return value
        case Register.interruptEnable:
            if state.dlab {
                state.divisor = (state.divisor & 0x00FF) | (UInt16(value) << 8)
                return nil
            }
            let enablingTHRE = value & 0x02 != 0 && state.interruptEnable & 0x02 == 0
            state.interruptEnable = value & 0x0F
            // Enabling the THR-empty interrupt while THR is empty raises it (the 8250 driver tests this).
            if enablingTHRE { state.thrInterruptPending = true }
        case Register.interruptId:
            if value & 0x01 != (state.fifoControl & 0x01) { state.receiveFIFO.removeAll() }
            if value & 0x02 != 0 { state.receiveFIFO.removeAll() }
            state.fifoControl = value & 0xC9 // bits 1,2 self-clear; DMA mode bit 3 kept
            updateDataReady(&state)
            refill(&state)
        case Register.lineControl:
            state.lineControl = value
        case Register.modemControl:
            let old = modemStatusValue(state)
            state.modemControl = value & 0x1F
            let new = modemStatusValue(state)
            // Delta bits record changes of CTS, DSR and DCD, and RI's trailing edge.
            var delta: UInt8 = 0
            if (old ^ new) & 0x10 != 0 { delta |= 0x01 }
            if (old ^ new) & 0x20 != 0 { delta |= 0x02 }
            if old & 0x40 != 0, new & 0x40 == 0 { delta |= 0x04 }
            if (old ^ new) & 0x80 != 0 { delta |= 0x08 }
            state.modemStatus |= delta
        case Register.scratch:
            state.scratch = value
        default:
            break
        }
        return nil
    }

    private static func modemStatusValue(_ state: State) -> UInt8 {
        let lines: UInt8
        if state.loopback {
            // Loopback wires DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
            let mcr = state.modemControl
            lines = ((mcr & 0x02) << 3) | ((mcr & 0x01) << 5) | ((mcr & 0x04) << 4) | ((mcr & 0x08) << 4)
        } else {
            lines = 0xB0 // a terminal is attached: CTS, DSR, DCD
        }
        return lines | (state.modemStatus & 0x0F)
    }

    private static func pushReceived(_ byte: UInt8, _ state: inout State) {
        let depth = state.fifoEnabled ? fifoDepth : 1
        if state.receiveFIFO.count >= depth {
            state.lineStatus |= LineStatus.overrun
        } else {
            state.receiveFIFO.append(byte)
        }
        updateDataReady(&state)
    }

    /// Moves host input into the FIFO as space frees up.
    private static func refill(_ state: inout State) {
        let depth = state.fifoEnabled ? fifoDepth : 1
        while state.receiveFIFO.count < depth, !state.hostQueue.isEmpty {
            state.receiveFIFO.append(state.hostQueue.removeFirst())
        }
        updateDataReady(&state)
    }

    private static func updateDataReady(_ state: inout State) {
        if state.receiveFIFO.isEmpty { state.lineStatus &= ~LineStatus.dataReady }
        else { state.lineStatus |= LineStatus.dataReady }
    }

    /// The highest-priority pending interrupt's IIR code, or nil.
    private static func interruptPending(_ state: State) -> UInt8? {
        let ier = state.interruptEnable
        if ier & 0x04 != 0, state.lineStatus & LineStatus.overrun != 0 { return IIR.lineStatus }
        if ier & 0x01 != 0, !state.receiveFIFO.isEmpty {
            if state.fifoEnabled, state.receiveFIFO.count < state.triggerLevel { return IIR.characterTimeout }
            return IIR.receivedData
        }
        if ier & 0x02 != 0, state.thrInterruptPending { return IIR.thrEmpty }
        if ier & 0x08 != 0, state.modemStatus & 0x0F != 0 { return IIR.modemStatus }
        return nil
    }
}
