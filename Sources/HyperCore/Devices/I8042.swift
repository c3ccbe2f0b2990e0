internal import Synchronization

/// The PC keyboard controller, reduced to what a guest without a keyboard needs: Linux's i8042
/// driver probe succeeds (self-test, command byte), and the CPU-reset line works — command 0xFE,
/// or clearing bit 0 of the output port, resets the machine. Ports 0x60 (data) and 0x64
/// (status/command); register the device at 0x60 with size 5.
public final class I8042: BusDevice {
    enum Port {
        static let data: UInt64 = 0      // 0x60
        static let command: UInt64 = 4   // 0x64
    }

    enum Command {
        static let readCommandByte: UInt8 = 0x20
        static let writeCommandByte: UInt8 = 0x60
        static let disableAux: UInt8 = 0xA7
        static let enableAux: UInt8 = 0xA8
        static let testAux: UInt8 = 0xA9
        static let selfTest: UInt8 = 0xAA
        static let testKeyboard: UInt8 = 0xAB
        static let disableKeyboard: UInt8 = 0xAD
        static let enableKeyboard: UInt8 = 0xAE
        static let readOutputPort: UInt8 = 0xD0
        static let writeOutputPort: UInt8 = 0xD1
        static let pulseReset: UInt8 = 0xFE
    }

    enum Status {
        static let outputFull: UInt8 = 0x01
        static let systemFlag: UInt8 = 0x04
        static let lastWasCommand: UInt8 = 0x08
    }

    struct State: Codable, Equatable {
        var commandByte: UInt8 = 0x45 // keyboard interrupt, system flag, translation
        var outputPort: UInt8 = 0x01  // bit 0: reset line inactive
        var output: UInt8?
        var expectingDataFor: UInt8?
        var lastWasCommand = false
    }

    private let state = Mutex(State())
    private let onReset: @Sendable () -> Void

    /// - Parameter onReset: called (from a vCPU thread) when the guest pulls the reset line.
    public init(onReset: @escaping @Sendable () -> Void) { self.onReset = onReset }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard data.count >= 1 else { return }
        data[0] = state.withLock { state in
            switch offset {
            case Port.data:
                let value = state.output ?? 0
                state.output = nil
                return value
            case Port.command:
                var status = Status.systemFlag
                if state.output != nil { status |= Status.outputFull }
                if state.lastWasCommand { status |= Status.lastWasCommand }
                return status
            default:
                return 0xFF
            }
        }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard data.count >= 1 else { return }
        let value = data[0]
        let reset: Bool = state.withLock { state in
            switch offset {
            case Port.command:
                state.lastWasCommand = true
                return Self.command(value, &state)
            case Port.data:
                state.lastWasCommand = false
                guard let command = state.expectingDataFor else { return false } // keyboard data: no keyboard
                state.expectingDataFor = nil
                switch command {
                case Command.writeCommandByte:
                    state.commandByte = value
                case Command.writeOutputPort:
                    state.outputPort = value
                    return value & 0x01 == 0
                default:
                    break
                }
                return false
            default:
                return false
            }
        }
        if reset { onReset() }
    }

    public func saveState() throws(SnapshotError) -> DeviceState { try DeviceState(state.withLock { $0 }) }

    public func restoreState(_ saved: DeviceState) throws(SnapshotError) {
        let restored = try saved.decode(State.self, device: "i8042")
        state.withLock { $0 = restored }
    }

    /// Applies a controller command; returns true when it resets the CPU.
    private static func command(_ command: UInt8, _ state: inout State) -> Bool {
        switch command {
        case Command.readCommandByte: state.output = state.commandByte
        case Command.writeCommandByte, Command.writeOutputPort: state.expectingDataFor = command
        case Command.selfTest: state.output = 0x55
        case Command.testKeyboard, Command.testAux: state.output = 0x00
        case Command.readOutputPort: state.output = state.outputPort
        case Command.disableAux: state.commandByte |= 0x20
        case Command.enableAux: state.commandByte &= ~0x20
        case Command.disableKeyboard: state.commandByte |= 0x10
        case Command.enableKeyboard: state.commandByte &= ~0x10
        case Command.pulseReset: return true
        default:
            // 0xF0–0xFF pulse output-port lines; bit 0 of the low nibble clear pulses reset.
            if command & 0xF0 == 0xF0, command & 0x01 == 0 { return true }
        }
        return false
    }
}
