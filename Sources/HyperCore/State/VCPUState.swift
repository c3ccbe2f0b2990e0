internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// One model-specific register's value.
public struct MSRValue: Codable, Sendable, Equatable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) {
        self.index = index
        self.value = value
    }
}

/// Everything KVM holds for one vCPU: what `KVM_GET_*` returns, as QEMU and Cloud Hypervisor save
/// it. The fixed-size KVM structs stay opaque bytes (they round-trip through the matching
/// `KVM_SET_*`); registers are decoded so a snapshot can be read and compared.
public struct VCPUState: Codable, Sendable, Equatable {
    public var id: UInt32
    public var registers: Registers
    public var specialRegisters: SpecialRegisters
    public var fpu: HexBytes
    /// nil where KVM lacks `KVM_CAP_XSAVE` (the legacy FPU area then carries the state).
    public var xsave: HexBytes?
    public var xcrs: HexBytes?
    public var msrs: [MSRValue]
    public var lapic: HexBytes
    /// Pending and injected exceptions, interrupts and NMIs, the interrupt shadow, the SIPI vector.
    public var events: HexBytes
    /// `KVM_MP_STATE_*`: runnable, waiting for INIT/SIPI, halted …
    public var multiprocessingState: UInt32
    public var debugRegisters: HexBytes
    /// The CPUID table the vCPU was given (the restore gives it again, whatever this host offers).
    public var cpuid: CPUIDTable
}

/// The machine-wide in-kernel state.
public struct VMState: Codable, Sendable, Equatable {
    /// `KVM_GET_IRQCHIP` for the master PIC, the slave PIC and the IOAPIC.
    public var interruptControllers: [HexBytes]
    public var pit: HexBytes
    /// kvmclock at the moment the machine paused, in nanoseconds.
    public var clock: UInt64
}

extension VCPU {
    static let tscMSR: UInt32 = 0x10

    /// The MSRs of `candidates` this vCPU can read: KVM's index list includes MSRs a host's CPU
    /// lacks, and `KVM_GET_MSRS` stops at the first it cannot read, so the failing one is left out
    /// and the read resumes after it.
    func readableMSRs(_ candidates: [UInt32]) throws(KVMError) -> [MSRValue] {
        var values: [MSRValue] = []
        var remaining = candidates[...]
        while !remaining.isEmpty {
            let read = try modelSpecificRegisters(Array(remaining))
            values += read.map { MSRValue(index: $0.index, value: $0.value) }
            remaining = remaining.dropFirst(read.count + 1)  // skip the one KVM refused
        }
        return values
    }

    func captureState(msrs: [UInt32], cpuid: CPUIDTable) throws(KVMError) -> VCPUState {
        let xsave = try? opaqueState(.xsave)
        let xcrs = try? opaqueState(.xcrs)
        let values = try modelSpecificRegisters(msrs)
        guard values.count == msrs.count else {
            throw KVMError(operation: "KVM_GET_MSRS", errno: EIO, detail: "vCPU \(id): MSR 0x\(String(msrs[values.count], radix: 16)) could not be read")
        }
        return VCPUState(id: id, registers: try registers(), specialRegisters: try specialRegisters(),
                         fpu: HexBytes(try opaqueState(.fpu)), xsave: xsave.map(HexBytes.init), xcrs: xcrs.map(HexBytes.init),
                         msrs: values.map { MSRValue(index: $0.index, value: $0.value) },
                         lapic: HexBytes(try opaqueState(.lapic)), events: HexBytes(try opaqueState(.events)),
                         multiprocessingState: try multiprocessingState(),
                         debugRegisters: HexBytes(try opaqueState(.debugRegisters)), cpuid: cpuid)
    }

    /// Puts a saved state back, in the order KVM needs: general registers, extended state,
    /// special registers (CR4 and EFER decide which MSRs are valid), MSRs with the TSC first (the
    /// TSC deadline is relative to it), the MP state, the LAPIC, then pending events, which must
    /// come after the LAPIC they may target. The CPUID table is set before, when the vCPU is made.
    func restoreState(_ state: VCPUState) throws(KVMError) {
        try setRegisters(state.registers)
        try setOpaqueState(.fpu, state.fpu.bytes)
        if let xsave = state.xsave { try setOpaqueState(.xsave, xsave.bytes) }
        if let xcrs = state.xcrs { try setOpaqueState(.xcrs, xcrs.bytes) }
        try setSpecialRegisters(state.specialRegisters)
        let msrs = state.msrs.sorted { ($0.index == Self.tscMSR ? 0 : 1, $0.index) < ($1.index == Self.tscMSR ? 0 : 1, $1.index) }
        try setModelSpecificRegisters(msrs.map { ($0.index, $0.value) })
        try setMultiprocessingState(state.multiprocessingState)
        try setOpaqueState(.lapic, state.lapic.bytes)
        try setOpaqueState(.events, Self.eventsForRestore(state.events.bytes))
        try setOpaqueState(.debugRegisters, state.debugRegisters.bytes)
    }

    /// `KVM_SET_VCPU_EVENTS` ignores the NMI-pending flag and the SIPI vector unless told they
    /// are valid; `KVM_GET_VCPU_EVENTS` does not set those bits, so the restore does.
    static func eventsForRestore(_ bytes: [UInt8]) -> [UInt8] {
        guard bytes.count == MemoryLayout<kvm_vcpu_events>.size else { return bytes }
        var events = kvm_vcpu_events()
        withUnsafeMutableBytes(of: &events) { $0.copyBytes(from: bytes) }
        events.flags |= UInt32(KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR)
        return withUnsafeBytes(of: events) { Array($0) }
    }
}
