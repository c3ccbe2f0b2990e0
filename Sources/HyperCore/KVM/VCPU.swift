internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// One virtual CPU: its file descriptor and its shared `kvm_run` page.
///
/// Threading: create it, configure it and run it on one thread (KVM's rule for vCPU ioctls).
/// The only thing other threads touch is `immediate_exit`, through the kick signal.
public final class VCPU: @unchecked Sendable {
    public let id: UInt32
    public let fileDescriptor: Int32
    let run: UnsafeMutablePointer<kvm_run>
    private let mapSize: Int

    init(id: UInt32, fileDescriptor: Int32, run: UnsafeMutablePointer<kvm_run>, mapSize: Int) {
        self.id = id
        self.fileDescriptor = fileDescriptor
        self.run = run
        self.mapSize = mapSize
    }

    deinit {
        munmap(run, mapSize)
        close(fileDescriptor)
    }

    private func call(_ name: String, _ request: UInt, _ pointer: UnsafeMutableRawPointer?) throws(KVMError) {
        let error = ioctlErrno(request, pointer)
        guard error == 0 else { throw KVMError(operation: name, errno: error, detail: "vCPU \(id)") }
    }

    /// Runs a pointer ioctl, retrying on EINTR; returns 0 or the errno.
    private func ioctlErrno(_ request: UInt, _ pointer: UnsafeMutableRawPointer?) -> Int32 {
        var result: Int32
        repeat { result = ckvm_ioctl_ptr(fileDescriptor, request, pointer) } while result < 0 && ckvm_errno() == EINTR
        return result < 0 ? ckvm_errno() : 0
    }

    // MARK: Registers

    /// `KVM_GET_REGS`.
    public func registers() throws(KVMError) -> Registers {
        var regs = kvm_regs()
        try call("KVM_GET_REGS", CKVM_GET_REGS, &regs)
        return Registers(regs)
    }

    /// `KVM_SET_REGS`.
    public func setRegisters(_ registers: Registers) throws(KVMError) {
        var regs = registers.kvm
        try call("KVM_SET_REGS", CKVM_SET_REGS, &regs)
    }

    /// `KVM_GET_SREGS`.
    public func specialRegisters() throws(KVMError) -> SpecialRegisters {
        var sregs = kvm_sregs()
        try call("KVM_GET_SREGS", CKVM_GET_SREGS, &sregs)
        return SpecialRegisters(sregs)
    }

    /// `KVM_SET_SREGS`.
    public func setSpecialRegisters(_ registers: SpecialRegisters) throws(KVMError) {
        var sregs = registers.kvm
        try call("KVM_SET_SREGS", CKVM_SET_SREGS, &sregs)
    }

    /// `KVM_SET_CPUID2`.
    public func setCPUID(_ table: CPUIDTable) throws(KVMError) {
        let result: Int32? = table.withKVMCPUID2 { ckvm_ioctl_ptr(fileDescriptor, CKVM_SET_CPUID2, $0) }
        guard let result else { throw KVMError(operation: "KVM_SET_CPUID2", errno: ENOMEM) }
        guard result == 0 else { throw KVMError(operation: "KVM_SET_CPUID2", errno: ckvm_errno(), detail: "vCPU \(id)") }
    }

    /// `KVM_GET_MSRS` for the given indices. Returns `(index, value)` for each MSR KVM returned.
    public func modelSpecificRegisters(_ indices: [UInt32]) throws(KVMError) -> [(index: UInt32, value: UInt64)] {
        guard !indices.isEmpty else { return [] }
        guard let msrs = ckvm_msrs_alloc(UInt32(indices.count)) else { throw KVMError(operation: "KVM_GET_MSRS", errno: ENOMEM) }
        defer { ckvm_free(msrs) }
        for (i, index) in indices.enumerated() { ckvm_msrs_entry(msrs, UInt32(i)).pointee.index = index }
        let count = ckvm_ioctl_ptr(fileDescriptor, CKVM_GET_MSRS, msrs)
        guard count >= 0 else { throw KVMError(operation: "KVM_GET_MSRS", errno: ckvm_errno(), detail: "vCPU \(id)") }
        return (0..<UInt32(count)).map { i in
            let entry = ckvm_msrs_entry(msrs, i).pointee
            return (entry.index, entry.data)
        }
    }

    /// `KVM_SET_MSRS`. Throws when KVM accepts fewer MSRs than given, naming the first refused one.
    public func setModelSpecificRegisters(_ values: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        guard !values.isEmpty else { return }
        guard let msrs = ckvm_msrs_alloc(UInt32(values.count)) else { throw KVMError(operation: "KVM_SET_MSRS", errno: ENOMEM) }
        defer { ckvm_free(msrs) }
        for (i, msr) in values.enumerated() {
            let entry = ckvm_msrs_entry(msrs, UInt32(i))
            entry.pointee.index = msr.index
            entry.pointee.data = msr.value
        }
        let count = ckvm_ioctl_ptr(fileDescriptor, CKVM_SET_MSRS, msrs)
        guard count >= 0 else { throw KVMError(operation: "KVM_SET_MSRS", errno: ckvm_errno(), detail: "vCPU \(id)") }
        guard Int(count) == values.count else {
            let refused = values[Int(count)].index
            throw KVMError(operation: "KVM_SET_MSRS", errno: EINVAL, detail: "vCPU \(id): MSR 0x\(String(refused, radix: 16)) refused")
        }
    }

    /// `KVM_GET_MP_STATE`: 0 runnable, 1 uninitialized (an AP waiting for INIT/SIPI), 3 halted …
    public func multiprocessingState() throws(KVMError) -> UInt32 {
        var state = kvm_mp_state()
        try call("KVM_GET_MP_STATE", CKVM_GET_MP_STATE, &state)
        return state.mp_state
    }

    /// `KVM_SET_MP_STATE`.
    public func setMultiprocessingState(_ value: UInt32) throws(KVMError) {
        var state = kvm_mp_state(mp_state: value)
        try call("KVM_SET_MP_STATE", CKVM_SET_MP_STATE, &state)
    }

    // MARK: Opaque state (for checkpoints): bytes round-trip through the matching SET ioctl.

    /// `KVM_GET_LAPIC` / `KVM_GET_XSAVE` / `KVM_GET_XCRS` / `KVM_GET_VCPU_EVENTS` / `KVM_GET_FPU`.
    public func opaqueState(_ kind: OpaqueStateKind) throws(KVMError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: kind.size)
        let request = kind.getRequest
        let name = kind.getName
        let error = bytes.withUnsafeMutableBytes { ioctlErrno(request, $0.baseAddress) }
        guard error == 0 else { throw KVMError(operation: name, errno: error, detail: "vCPU \(id)") }
        return bytes
    }

    /// The SET ioctl for ``opaqueState(_:)``.
    public func setOpaqueState(_ kind: OpaqueStateKind, _ bytes: [UInt8]) throws(KVMError) {
        guard bytes.count == kind.size else {
            throw KVMError(operation: kind.setName, errno: EINVAL, detail: "state has \(bytes.count) bytes, expected \(kind.size)")
        }
        var copy = bytes
        let request = kind.setRequest
        let name = kind.setName
        let error = copy.withUnsafeMutableBytes { ioctlErrno(request, $0.baseAddress) }
        guard error == 0 else { throw KVMError(operation: name, errno: error, detail: "vCPU \(id)") }
    }

    /// Blocks every signal but the kick while the vCPU runs guest code (`KVM_SET_SIGNAL_MASK`),
    /// so that no other signal interrupts `KVM_RUN`.
    public func setSignalMask(blockingAllBut allowed: Int32) throws(KVMError) {
        // struct kvm_signal_mask { __u32 len; __u8 sigset[]; } with the kernel's 8-byte sigset.
        var buffer = [UInt8](repeating: 0, count: 4 + 8)
        buffer.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt32(8), toByteOffset: 0, as: UInt32.self)
            let mask = ~(UInt64(1) << UInt64(allowed - 1))
            raw.storeBytes(of: mask, toByteOffset: 4, as: UInt64.self)
        }
        let error = buffer.withUnsafeMutableBytes { ioctlErrno(CKVM_SET_SIGNAL_MASK, $0.baseAddress) }
        guard error == 0 else { throw KVMError(operation: "KVM_SET_SIGNAL_MASK", errno: error, detail: "vCPU \(id)") }
    }
}

/// vCPU state KVM exposes as fixed-size structs that HyperCore only saves and restores.
public enum OpaqueStateKind: Sendable, CaseIterable {
    case fpu, lapic, xsave, xcrs, events, debugRegisters

    var size: Int {
        switch self {
        case .fpu: MemoryLayout<kvm_fpu>.size
        case .lapic: MemoryLayout<kvm_lapic_state>.size
        case .xsave: MemoryLayout<kvm_xsave>.size
        case .xcrs: MemoryLayout<kvm_xcrs>.size
        case .events: MemoryLayout<kvm_vcpu_events>.size
        case .debugRegisters: MemoryLayout<kvm_debugregs>.size
        }
    }

    var getRequest: UInt {
        switch self {
        case .fpu: CKVM_GET_FPU
        case .lapic: CKVM_GET_LAPIC
        case .xsave: CKVM_GET_XSAVE
        case .xcrs: CKVM_GET_XCRS
        case .events: CKVM_GET_VCPU_EVENTS
        case .debugRegisters: CKVM_GET_DEBUGREGS
        }
    }

    var setRequest: UInt {
        switch self {
        case .fpu: CKVM_SET_FPU
        case .lapic: CKVM_SET_LAPIC
        case .xsave: CKVM_SET_XSAVE
        case .xcrs: CKVM_SET_XCRS
        case .events: CKVM_SET_VCPU_EVENTS
        case .debugRegisters: CKVM_SET_DEBUGREGS
        }
    }

    var getName: String { "KVM_GET_" + suffix }
    var setName: String { "KVM_SET_" + suffix }
    private var suffix: String {
        switch self {
        case .fpu: "FPU"
        case .lapic: "LAPIC"
        case .xsave: "XSAVE"
        case .xcrs: "XCRS"
        case .events: "VCPU_EVENTS"
        case .debugRegisters: "DEBUGREGS"
        }
    }
}
