internal import CKVM
internal import Synchronization

// Emulation completion: on hosts where guest CPL0 code runs in KVM's instruction emulator (PVM,
// see Docs/hosts.md), an instruction the emulator lacks ends KVM_RUN with
// KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION. For the handful of instructions a
// kernel meets early, the vCPU thread finishes the instruction itself (or injects the exception
// the hardware would raise) and resumes the guest. Everything else ends the run as before.
//
// Scope: 64-bit mode only, 4-level paging only. Not a general x86 emulator: a small decoder that
// recognises exactly the forms below and refuses anything else.

/// The instructions the completion layer carries out.
public enum CompletedInstruction: Int, CaseIterable, Sendable, CustomStringConvertible {
    /// `int3` (CC): #BP injected with RIP past the instruction (a trap).
    case int3
    /// `fwait`/`wait` (9B): RIP + 1, or #NM / #MF as the hardware would raise.
    case fwait
    /// `[lock] cmpxchg16b m128` (REX.W 0F C7 /1): a real 16-byte compare-and-swap on guest RAM.
    case cmpxchg16b

    public var description: String {
        switch self {
        case .int3: "int3"
        case .fwait: "fwait"
        case .cmpxchg16b: "cmpxchg16b"
        }
    }
}

/// Per-kind counts of one machine's emulation completions.
public struct EmulationCompletionCounts: Sendable, Equatable {
    /// Instructions finished (for `int3`: #BP delivered as the instruction's own effect).
    public var completed = 0
    /// Instructions that raised an exception instead (#PF, #GP, #NM, #MF injected).
    public var faulted = 0
    /// Host time spent in the completion layer for this kind (decode, page walk, ioctls).
    public var nanoseconds: UInt64 = 0

    public init(completed: Int = 0, faulted: Int = 0, nanoseconds: UInt64 = 0) {
        self.completed = completed
        self.faulted = faulted
        self.nanoseconds = nanoseconds
    }
}

/// The counters of one machine, shared by its vCPU threads. Updated only on emulation-failure
/// exits (each already costs several microseconds in KVM), so a lock is cheap enough.
public final class EmulationStatistics: Sendable {
    private let counts = Mutex<[EmulationCompletionCounts]>(Array(repeating: .init(), count: CompletedInstruction.allCases.count))

    public init() {}

    public subscript(_ kind: CompletedInstruction) -> EmulationCompletionCounts {
        counts.withLock { $0[kind.rawValue] }
    }

    /// Total completions and faults over every kind.
    public var total: Int { counts.withLock { $0.reduce(0) { $0 + $1.completed + $1.faulted } } }

    func record(_ kind: CompletedInstruction, faulted: Bool, nanoseconds: UInt64) {
        counts.withLock {
            if faulted { $0[kind.rawValue].faulted += 1 } else { $0[kind.rawValue].completed += 1 }
            $0[kind.rawValue].nanoseconds &+= nanoseconds
        }
    }

    /// One line per kind that occurred, e.g. `cmpxchg16b: 12 completed, 1 faulted, 0.3 ms`;
    /// `none` when nothing was completed.
    public func report() -> String {
        let lines = CompletedInstruction.allCases.compactMap { kind -> String? in
            let c = self[kind]
            guard c.completed + c.faulted > 0 else { return nil }
            let tenths = c.nanoseconds / 100_000
            return "  \(kind): \(c.completed) completed, \(c.faulted) faulted, \(tenths / 10).\(tenths % 10) ms"
        }
        return lines.isEmpty ? "  none" : lines.joined(separator: "\n")
    }
}

extension Machine {
    /// What the emulation-completion layer did in this machine's run so far.
    public var emulationCompletions: EmulationStatistics { lifecycle.emulation }
}

// MARK: - Decoder

/// A memory operand as ModRM/SIB/displacement describe it (64-bit mode).
public struct MemoryOperand: Sendable, Equatable {
    public enum Segment: Sendable, Equatable { case none, fs, gs }
    /// General-purpose register numbers (0 = RAX … 15 = R15).
    public var base: Int?
    public var index: Int?
    public var scale: UInt64 = 1
    public var displacement: Int64 = 0
    /// RIP-relative (`disp32(%rip)`): relative to the next instruction.
    public var ripRelative = false
    public var segment: Segment = .none
    /// A 0x67 prefix: 32-bit address arithmetic.
    public var addressSize32 = false

    public init(base: Int? = nil, index: Int? = nil, scale: UInt64 = 1, displacement: Int64 = 0,
                ripRelative: Bool = false, segment: Segment = .none, addressSize32: Bool = false) {
        self.base = base
        self.index = index
        self.scale = scale
        self.displacement = displacement
        self.ripRelative = ripRelative
        self.segment = segment
        self.addressSize32 = addressSize32
    }
}

/// A decoded instruction of the completion layer's table.
public struct DecodedInstruction: Sendable, Equatable {
    public enum Operation: Sendable, Equatable {
        case int3
        case fwait
        case cmpxchg16b(MemoryOperand)
    }
    public let operation: Operation
    /// Length in bytes, prefixes included.
    public let length: Int

    public var kind: CompletedInstruction {
        switch operation {
        case .int3: .int3
        case .fwait: .fwait
        case .cmpxchg16b: .cmpxchg16b
        }
    }
}

/// The table-driven decoder: prefixes, an optional REX, then one of the three opcodes. Anything
/// else (other opcodes, `lock` where it is #UD, truncated bytes, over 15 bytes) is nil.
public enum CompletionDecoder {
    public static func decode(_ bytes: [UInt8]) -> DecodedInstruction? {
        var i = 0
        var lock = false, repeatPrefix = false, operandSize = false, addressSize32 = false
        var segment = MemoryOperand.Segment.none
        prefixes: while i < bytes.count, i < 15 {
            switch bytes[i] {
            case 0xF0: lock = true
            case 0xF2, 0xF3: repeatPrefix = true
            case 0x2E, 0x36, 0x3E, 0x26: segment = .none    // null segments in 64-bit mode
            case 0x64: segment = .fs
            case 0x65: segment = .gs
            case 0x66: operandSize = true
            case 0x67: addressSize32 = true
            default: break prefixes
            }
            i += 1
        }
        let prefixed = i > 0
        var rex: UInt8 = 0
        if i < bytes.count, bytes[i] & 0xF0 == 0x40 {
            rex = bytes[i]
            i += 1
        }
        guard i < bytes.count else { return nil }
        switch bytes[i] {
        case 0xCC where !prefixed && rex == 0:
            return DecodedInstruction(operation: .int3, length: i + 1)
        case 0x9B where !prefixed && rex == 0:
            return DecodedInstruction(operation: .fwait, length: i + 1)
        case 0x0F:
            // REX.W 0F C7 /1 with a memory operand; without REX.W it is cmpxchg8b (not handled).
            guard i + 2 < bytes.count, bytes[i + 1] == 0xC7, rex & 0x08 != 0, !repeatPrefix, !operandSize else { return nil }
            let modrm = bytes[i + 2]
            let mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7
            guard reg == 1, mod != 3 else { return nil }
            _ = lock    // with or without lock: the layer's exchange is atomic either way
            i += 3
            var operand = MemoryOperand(segment: segment, addressSize32: addressSize32)
            let rexB = Int(rex & 1) << 3, rexX = Int(rex & 2) << 2
            var displacementSize = mod == 1 ? 1 : mod == 2 ? 4 : 0
            if rm == 4 {
                guard i < bytes.count else { return nil }
                let sib = bytes[i]
                i += 1
                let scaleBits = sib >> 6, index = Int((sib >> 3) & 7) | rexX, base = Int(sib & 7)
                if index != 4 { operand.index = index; operand.scale = 1 << UInt64(scaleBits) }
                if base == 5 && mod == 0 {
                    displacementSize = 4
                } else {
                    operand.base = base | rexB
                }
            } else if rm == 5 && mod == 0 {
                operand.ripRelative = true
                displacementSize = 4
            } else {
                operand.base = Int(rm) | rexB
            }
            guard i + displacementSize <= bytes.count, i + displacementSize <= 15 else { return nil }
            switch displacementSize {
            case 1: operand.displacement = Int64(Int8(bitPattern: bytes[i]))
            case 4:
                let raw = UInt32(bytes[i]) | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2]) << 16 | UInt32(bytes[i + 3]) << 24
                operand.displacement = Int64(Int32(bitPattern: raw))
            default: break
            }
            i += displacementSize
            return DecodedInstruction(operation: .cmpxchg16b(operand), length: i)
        default:
            return nil
        }
    }
}

// MARK: - Page walk

/// x86-64 4-level paging, as the hardware walks it for one data access.
public enum PageWalk {
    public enum Fault: Error, Equatable, Sendable {
        /// #PF with this error code (bit 0 P, 1 W/R, 2 U/S, 3 RSVD).
        case pageFault(errorCode: UInt32)
        /// #GP(0): the address is not canonical.
        case notCanonical
        /// A paging-structure entry is not in guest RAM (the layer gives up).
        case tableNotInRAM(UInt64)
        /// 5-level paging, or paging off: not handled.
        case unsupportedMode
    }

    public struct Access: Sendable {
        public var write: Bool
        public var user: Bool
        public init(write: Bool, user: Bool) { self.write = write; self.user = user }
    }

    static let addressMask: UInt64 = 0x000F_FFFF_FFFF_F000

    public static func isCanonical(_ address: UInt64) -> Bool {
        let top = Int64(bitPattern: address) >> 47
        return top == 0 || top == -1
    }

    /// The guest-physical address of `linear`, or the fault the access raises. Sets the accessed
    /// bits on the way and the dirty bit of the leaf on a write (atomically), as the CPU does.
    public static func translate(_ linear: UInt64, access: Access, cr0: UInt64, cr3: UInt64, cr4: UInt64,
                                 rflags: UInt64, memory: GuestMemory) -> Result<UInt64, Fault> {
        guard cr0 & (1 << 31) != 0, cr4 & (1 << 5) != 0, cr4 & (1 << 12) == 0 else { return .failure(.unsupportedMode) }
        guard isCanonical(linear) else { return .failure(.notCanonical) }
        let accessBits = UInt32(access.write ? 2 : 0) | UInt32(access.user ? 4 : 0)
        var table = cr3 & addressMask
        var writable = true, userPage = true
        var physical: UInt64 = 0
        var leaf: UnsafeMutableRawPointer?
        var leafAddress: UInt64 = 0
        for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] as [(Int, UInt64)] {
            let entryAddress = table + ((linear >> shift) & 0x1FF) * 8
            guard let pointer = memory.pointer(at: entryAddress, count: 8), entryAddress & 7 == 0 else {
                return .failure(.tableNotInRAM(entryAddress))
            }
            let entry = UInt64(littleEndian: pointer.load(as: UInt64.self))
            if entry & 1 == 0 { return .failure(.pageFault(errorCode: accessBits)) }
            writable = writable && entry & 2 != 0
            userPage = userPage && entry & 4 != 0
            let large = entry & 0x80 != 0
            if large && level == 4 { return .failure(.pageFault(errorCode: accessBits | 1 | 8)) }
            if entry & 0x20 == 0 { ckvm_atomic_or_u64(pointer, 0x20); memory.vmmWrites.mark(entryAddress, count: 8) }    // accessed
            if level == 1 || large {
                let size: UInt64 = 1 << shift
                // Bit 12 is PAT in a large-page entry, not an address bit.
                physical = (entry & addressMask & ~(size - 1)) | (linear & (size - 1))
                leaf = pointer
                leafAddress = entryAddress
                break
            }
            table = entry & addressMask
        }
        let wp = cr0 & (1 << 16) != 0, smap = cr4 & (1 << 21) != 0, ac = rflags & (1 << 18) != 0
        if access.user && !userPage { return .failure(.pageFault(errorCode: accessBits | 1)) }
        if access.write && !writable && (access.user || wp) { return .failure(.pageFault(errorCode: accessBits | 1)) }
        if !access.user && userPage && smap && !ac { return .failure(.pageFault(errorCode: accessBits | 1)) }
        if access.write, let leaf, UInt64(littleEndian: leaf.load(as: UInt64.self)) & 0x40 == 0 {
            ckvm_atomic_or_u64(leaf, 0x40)    // dirty
            memory.vmmWrites.mark(leafAddress, count: 8)
        }
        return .success(physical)
    }
}

// MARK: - Execution

/// What the vCPU thread must do to finish an instruction.
public enum CompletionOutcome: Sendable, Equatable {
    /// Set these registers and resume.
    case resume(Registers)
    /// Set these registers (if any), then inject `vector` (with `errorCode`; #PF with `cr2`).
    case inject(registers: Registers?, vector: UInt8, errorCode: UInt32?, cr2: UInt64?)
    /// Not handled: the run ends as an emulation failure.
    case unhandled
}

public enum CompletionExecutor {
    /// The outcome of `instruction` on a vCPU with these registers. Touches guest memory only
    /// through `memory`'s checked pointers (and the atomic exchange on the 16 bytes it found).
    /// `fsw` is the x87 status word (only `fwait` reads it).
    public static func execute(_ instruction: DecodedInstruction, registers: Registers, special: SpecialRegisters,
                               fsw: UInt16, memory: GuestMemory) -> CompletionOutcome {
        var next = registers
        next.rip &+= UInt64(instruction.length)
        switch instruction.operation {
        case .int3:
            return .inject(registers: next, vector: 3, errorCode: nil, cr2: nil)
        case .fwait:
            let ts = special.cr0 & (1 << 3) != 0, mp = special.cr0 & (1 << 1) != 0, ne = special.cr0 & (1 << 5) != 0
            if ts && mp { return .inject(registers: nil, vector: 7, errorCode: nil, cr2: nil) }
            if fsw & 0x80 != 0 { return ne ? .inject(registers: nil, vector: 16, errorCode: nil, cr2: nil) : .unhandled }
            return .resume(next)
        case let .cmpxchg16b(operand):
            var address: UInt64 = UInt64(bitPattern: operand.displacement)
            if operand.ripRelative { address &+= next.rip }
            if let base = operand.base { address &+= registers[gpr: base] }
            if let index = operand.index { address &+= registers[gpr: index] &* operand.scale }
            if operand.addressSize32 { address &= 0xFFFF_FFFF }
            switch operand.segment {
            case .fs: address &+= special.fs.base
            case .gs: address &+= special.gs.base
            case .none: break
            }
            let gp = CompletionOutcome.inject(registers: nil, vector: 13, errorCode: 0, cr2: nil)
            guard PageWalk.isCanonical(address), address & 15 == 0 else { return gp }
            let user = special.cs.dpl == 3
            // A locked cmpxchg16b always writes (the old value back on a mismatch): a write access.
            switch PageWalk.translate(address, access: .init(write: true, user: user), cr0: special.cr0, cr3: special.cr3,
                                      cr4: special.cr4, rflags: registers.rflags, memory: memory) {
            case let .failure(.pageFault(code)):
                return .inject(registers: nil, vector: 14, errorCode: code, cr2: address)
            case .failure(.notCanonical):
                return gp
            case .failure:
                return .unhandled
            case let .success(physical):
                guard let pointer = memory.pointer(at: physical, count: 16) else { return .unhandled }    // MMIO
                var expected: (UInt64, UInt64) = (registers.rax, registers.rdx)
                let swapped = withUnsafeMutableBytes(of: &expected) { raw in
                    ckvm_cmpxchg16b(pointer, raw.baseAddress!.assumingMemoryBound(to: UInt64.self), registers.rbx, registers.rcx)
                }
                if swapped != 0 {
                    memory.vmmWrites.mark(physical, count: 16)
                    next.rflags |= 0x40
                } else {
                    next.rflags &= ~UInt64(0x40)
                    next.rax = expected.0
                    next.rdx = expected.1
                }
                return .resume(next)
            }
        }
    }
}

extension Registers {
    /// General-purpose register by encoding number (0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI,
    /// 7 RDI, 8–15 R8–R15).
    subscript(gpr number: Int) -> UInt64 {
        switch number {
        case 0: rax
        case 1: rcx
        case 2: rdx
        case 3: rbx
        case 4: rsp
        case 5: rbp
        case 6: rsi
        case 7: rdi
        case 8: r8
        case 9: r9
        case 10: r10
        case 11: r11
        case 12: r12
        case 13: r13
        case 14: r14
        default: r15
        }
    }
}

// MARK: - The vCPU side

enum EmulationCompletion {
    /// Tries to complete the instruction of an emulation-failure exit. True when the guest may
    /// resume; false when the run must end as an emulation failure (as it did before this layer).
    static func complete(_ vcpu: VCPU, _ run: UnsafeMutablePointer<kvm_run>, _ context: VCPUContext,
                         bytes: [UInt8]) -> Bool {
        let start = monotonicNanoseconds()
        guard let registers = try? vcpu.registers(), let special = try? vcpu.specialRegisters(),
              special.efer & (1 << 10) != 0, special.cs.long else { return false }    // 64-bit mode only
        var code = bytes
        if code.isEmpty { code = fetch(registers.rip &+ special.cs.base, special, registers, context.memory) }
        guard let instruction = CompletionDecoder.decode(code) else { return false }
        var fsw: UInt16 = 0
        if case .fwait = instruction.operation {
            var fpu = kvm_fpu()
            guard ckvm_ioctl_ptr(vcpu.fileDescriptor, CKVM_GET_FPU, &fpu) == 0 else { return false }
            fsw = fpu.fsw
        }
        let outcome = CompletionExecutor.execute(instruction, registers: registers, special: special, fsw: fsw,
                                                 memory: context.memory)
        let faulted: Bool
        switch outcome {
        case .unhandled:
            return false
        case let .resume(next):
            guard (try? vcpu.setRegisters(next)) != nil else { return false }
            faulted = false
        case let .inject(next, vector, errorCode, cr2):
            if let next { guard (try? vcpu.setRegisters(next)) != nil else { return false } }
            guard inject(vcpu, vector: vector, errorCode: errorCode, cr2: cr2) else { return false }
            faulted = vector != 3
        }
        context.lifecycle.emulation.record(instruction.kind, faulted: faulted, nanoseconds: monotonicNanoseconds() &- start)
        return true
    }

    /// Up to 15 instruction bytes at `linear` (an exit without bytes), fewer at an unmapped page.
    private static func fetch(_ linear: UInt64, _ special: SpecialRegisters, _ registers: Registers,
                              _ memory: GuestMemory) -> [UInt8] {
        var bytes: [UInt8] = []
        var address = linear
        while bytes.count < 15 {
            guard case let .success(physical) = PageWalk.translate(
                address, access: .init(write: false, user: special.cs.dpl == 3), cr0: special.cr0, cr3: special.cr3,
                cr4: special.cr4, rflags: registers.rflags | (1 << 18), memory: memory) else { break }
            let count = min(15 - bytes.count, Int(4096 - (address & 0xFFF)))
            guard let chunk = try? memory.readBytes(at: physical, count: count) else { break }
            bytes += chunk
            address &+= UInt64(count)
        }
        return bytes
    }

    /// `KVM_SET_VCPU_EVENTS` with an exception marked injected (the form KVM accepts from
    /// userspace without KVM_CAP_EXCEPTION_PAYLOAD). For #PF, CR2 is set first through the sregs.
    private static func inject(_ vcpu: VCPU, vector: UInt8, errorCode: UInt32?, cr2: UInt64?) -> Bool {
        let fd = vcpu.fileDescriptor
        if let cr2 {
            var sregs = kvm_sregs()
            guard ckvm_ioctl_ptr(fd, CKVM_GET_SREGS, &sregs) == 0 else { return false }
            sregs.cr2 = cr2
            guard ckvm_ioctl_ptr(fd, CKVM_SET_SREGS, &sregs) == 0 else { return false }
        }
        var events = kvm_vcpu_events()
        guard ckvm_ioctl_ptr(fd, CKVM_GET_VCPU_EVENTS, &events) == 0 else { return false }
        events.exception.injected = 1
        events.exception.pending = 0
        events.exception.nr = vector
        events.exception.has_error_code = errorCode == nil ? 0 : 1
        events.exception.error_code = errorCode ?? 0
        return ckvm_ioctl_ptr(fd, CKVM_SET_VCPU_EVENTS, &events) == 0
    }
}
