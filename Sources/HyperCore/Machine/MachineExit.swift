/// How a machine's run ended.
public enum MachineExit: Sendable, Equatable, CustomStringConvertible {
    /// The guest reset the machine (i8042 reset line, KVM_SYSTEM_EVENT_RESET).
    case reset
    /// The guest powered off (KVM_SYSTEM_EVENT_SHUTDOWN).
    case powerOff
    /// The guest wrote `code` to the debug-exit port.
    case debugExit(UInt8)
    /// A vCPU halted with no in-kernel irqchip to wake it.
    case halted
    /// The guest crashed the virtual CPU: triple fault, emulation failure, entry failure.
    case guestFailure(GuestFailure)
    /// The deadline passed; the vCPUs were stopped.
    case timedOut
    /// ``Machine/stop()`` was called.
    case stopped
    /// The machine's state was saved to the snapshot directory at this path, and the run ended there.
    case saved(String)
    /// A host-side failure (an ioctl that should not fail did).
    case hostError(String)

    public var description: String {
        switch self {
        case .reset: "the guest reset the machine"
        case .powerOff: "the guest powered off"
        case let .debugExit(code): "the guest exited through the debug port with code \(code)"
        case .halted: "the guest halted"
        case let .guestFailure(failure): failure.description
        case .timedOut: "the deadline passed and the guest was stopped"
        case .stopped: "the machine was stopped"
        case let .saved(path): "the machine was saved to \(path)"
        case let .hostError(message): "host error: \(message)"
        }
    }
}

/// What went wrong inside the guest, with the vCPU state that explains where.
public struct GuestFailure: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        case tripleFault
        /// KVM_EXIT_INTERNAL_ERROR; suberror 1 is an instruction KVM's emulator cannot execute.
        case internalError(suberror: UInt32)
        /// KVM_EXIT_FAIL_ENTRY with the hardware's reason code.
        case entryFailure(reason: UInt64)
        /// KVM_SYSTEM_EVENT_CRASH.
        case crash
        case unknownExit(reason: UInt32)
    }

    public let kind: Kind
    public let vcpu: UInt32
    public let registers: Registers?
    public let specialRegisters: SpecialRegisters?
    /// The bytes of the failing instruction, when KVM reports them.
    public let instructionBytes: [UInt8]

    public var summary: String {
        switch kind {
        case .tripleFault: "triple fault (KVM_EXIT_SHUTDOWN)"
        case let .internalError(suberror) where suberror == 1:
            "KVM internal error: the instruction emulator cannot execute the guest's instruction (suberror 1, emulation)"
        case let .internalError(suberror): "KVM internal error (suberror \(suberror))"
        case let .entryFailure(reason): "VM entry failed (hardware reason 0x\(String(reason, radix: 16)))"
        case .crash: "the guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"
        case let .unknownExit(reason): "unhandled KVM exit reason \(reason)"
        }
    }

    public var description: String {
        var text = "vCPU \(vcpu): \(summary)"
        if let registers {
            text += " at rip=0x\(String(registers.rip, radix: 16))"
        }
        if !instructionBytes.isEmpty {
            text += "\n  instruction bytes: " + instructionBytes.map { byte in
                let hex = String(byte, radix: 16)
                return byte < 16 ? "0" + hex : hex
            }.joined(separator: " ")
        }
        if let registers { text += "\n  " + registers.description.split(separator: "\n").joined(separator: "\n  ") }
        if let specialRegisters { text += "\n  " + specialRegisters.description }
        return text
    }
}

/// Why a machine could not be assembled or started.
public enum MachineError: Error, Sendable, CustomStringConvertible {
    case kvm(KVMError)
    case memory(GuestMemoryError)
    case boot(BootError)
    case bus(BusError)
    case missingCapabilities([String])
    case invalidConfiguration(String)
    case vcpuSetup(vcpu: UInt32, KVMError)
    case thread(errno: Int32)
    case alreadyStarted
    /// The operation does not fit the machine's state (pause before start, resume after the end).
    case wrongState(String)
    /// A snapshot's state could not be put back.
    case restore(SnapshotError)

    public var description: String {
        switch self {
        case let .kvm(error): error.description
        case let .memory(error): error.description
        case let .boot(error): error.description
        case let .bus(error): error.description
        case let .missingCapabilities(names):
            "this KVM lacks required capabilities: \(names.joined(separator: ", ")); `hvrun check` explains"
        case let .invalidConfiguration(message): message
        case let .vcpuSetup(vcpu, error): "setting up vCPU \(vcpu): \(error)"
        case let .thread(errno): "could not start a vCPU thread: \(SystemError.describe(errno))"
        case .alreadyStarted: "the machine was already started"
        case let .wrongState(message): message
        case let .restore(error): error.description
        }
    }
}
