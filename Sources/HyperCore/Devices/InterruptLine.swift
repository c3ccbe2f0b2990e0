/// One interrupt wire from a device to the interrupt controller.
///
/// Devices drive it as a level (high while they want service); the line forwards changes only,
/// so a device can call ``set(high:)`` after every register access without an ioctl each time.
public protocol InterruptLine: Sendable {
    func set(high: Bool)
    /// The level the device last drove.
    var isHigh: Bool { get }
    /// Drives the level even if the line believes it is there already: a restored machine's
    /// interrupt controller must hear it again (KVM keeps each source's level outside the irqchip
    /// state it saves).
    func force(high: Bool)
}

/// A line into the in-kernel irqchip (`KVM_IRQ_LINE`). GSIs 0–15 reach both the PIC and the
/// IOAPIC pins of the same number, as on a PC.
public final class IRQChipLine: InterruptLine, @unchecked Sendable {
    private let vm: VirtualMachine
    public let gsi: UInt32
    private let state = SpinLockedState(false)

    public init(vm: VirtualMachine, gsi: UInt32) {
        self.vm = vm
        self.gsi = gsi
    }

    public func set(high: Bool) {
        guard state.exchange(high) != high else { return }
        // The only failure is an invalid GSI, which is a programming error caught at assembly.
        try? vm.setInterruptLine(gsi, high: high)
    }

    public var isHigh: Bool { state.value }

    public func force(high: Bool) {
        _ = state.exchange(high)
        try? vm.setInterruptLine(gsi, high: high)
    }
}

/// A line that goes nowhere (machines without an irqchip, unit tests). It remembers its level.
public final class RecordingLine: InterruptLine, @unchecked Sendable {
    private let state = SpinLockedState(false)
    private let edges = SpinLockedState(0)
    public init() {}
    public func set(high: Bool) {
        if state.exchange(high) != high, high { edges.update { $0 += 1 } }
    }
    public var isHigh: Bool { state.value }
    public func force(high: Bool) { set(high: high) }
    /// Number of low→high transitions seen.
    public var risingEdges: Int { edges.value }
}
