internal import CKVM

/// General-purpose registers (`struct kvm_regs`).
public struct Registers: Sendable, Equatable, Codable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    /// Bit 1 is reserved and always set.
    public var rflags: UInt64 = 0x2

    public init() {}

    init(_ r: kvm_regs) {
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var kvm: kvm_regs {
        kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                 r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                 rip: rip, rflags: rflags)
    }
}

/// A segment register as KVM holds it: the visible selector plus the hidden descriptor cache.
public struct Segment: Sendable, Equatable, Codable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0xFFFF
    public var selector: UInt16 = 0
    /// Descriptor type (bits 0–3 of the access byte), e.g. 0xB execute/read accessed code, 0x3 read/write accessed data.
    public var type: UInt8 = 0
    public var present: Bool = true
    public var dpl: UInt8 = 0
    /// D/B bit: 32-bit segment.
    public var defaultSize32: Bool = false
    /// L bit: 64-bit code segment.
    public var long: Bool = false
    public var granularity4K: Bool = false
    /// S bit: code/data (true) or system (false) descriptor.
    public var codeOrData: Bool = true
    public var unusable: Bool = false

    public init() {}

    /// A flat 4 GiB segment of the given type.
    public static func flat(selector: UInt16, type: UInt8, long: Bool = false) -> Segment {
        var segment = Segment()
        segment.base = 0
        segment.limit = 0xFFFF_FFFF
        segment.selector = selector
        segment.type = type
        segment.defaultSize32 = !long
        segment.long = long
        segment.granularity4K = true
        return segment
    }

    init(_ s: kvm_segment) {
        base = s.base; limit = s.limit; selector = s.selector; type = s.type
        present = s.present != 0; dpl = s.dpl; defaultSize32 = s.db != 0; long = s.l != 0
        granularity4K = s.g != 0; codeOrData = s.s != 0; unusable = s.unusable != 0
    }

    var kvm: kvm_segment {
        var s = kvm_segment()
        s.base = base; s.limit = limit; s.selector = selector; s.type = type
        s.present = present ? 1 : 0; s.dpl = dpl; s.db = defaultSize32 ? 1 : 0; s.l = long ? 1 : 0
        s.g = granularity4K ? 1 : 0; s.s = codeOrData ? 1 : 0; s.unusable = unusable ? 1 : 0
        return s
    }
}

/// Descriptor-table register (GDTR / IDTR).
public struct DescriptorTable: Sendable, Equatable, Codable {
    public var base: UInt64 = 0
    public var limit: UInt16 = 0
    public init(base: UInt64 = 0, limit: UInt16 = 0) { self.base = base; self.limit = limit }
}

/// Segment, control and system registers (`struct kvm_sregs`). The interrupt bitmap is kept
/// opaque so a get/set round trip preserves it.
public struct SpecialRegisters: Sendable, Equatable, Codable {
    public var cs = Segment(), ds = Segment(), es = Segment(), fs = Segment(), gs = Segment(), ss = Segment()
    public var tr = Segment(), ldt = Segment()
    public var gdt = DescriptorTable(), idt = DescriptorTable()
    public var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    public var efer: UInt64 = 0
    public var apicBase: UInt64 = 0
    var interruptBitmap: [UInt64] = [0, 0, 0, 0]

    public init() {}

    init(_ s: kvm_sregs) {
        cs = Segment(s.cs); ds = Segment(s.ds); es = Segment(s.es); fs = Segment(s.fs)
        gs = Segment(s.gs); ss = Segment(s.ss); tr = Segment(s.tr); ldt = Segment(s.ldt)
        gdt = DescriptorTable(base: s.gdt.base, limit: s.gdt.limit)
        idt = DescriptorTable(base: s.idt.base, limit: s.idt.limit)
        cr0 = s.cr0; cr2 = s.cr2; cr3 = s.cr3; cr4 = s.cr4; cr8 = s.cr8
        efer = s.efer; apicBase = s.apic_base
        interruptBitmap = withUnsafeBytes(of: s.interrupt_bitmap) { Array($0.bindMemory(to: UInt64.self)) }
    }

    var kvm: kvm_sregs {
        var s = kvm_sregs()
        s.cs = cs.kvm; s.ds = ds.kvm; s.es = es.kvm; s.fs = fs.kvm; s.gs = gs.kvm; s.ss = ss.kvm
        s.tr = tr.kvm; s.ldt = ldt.kvm
        s.gdt.base = gdt.base; s.gdt.limit = gdt.limit
        s.idt.base = idt.base; s.idt.limit = idt.limit
        s.cr0 = cr0; s.cr2 = cr2; s.cr3 = cr3; s.cr4 = cr4; s.cr8 = cr8
        s.efer = efer; s.apic_base = apicBase
        withUnsafeMutableBytes(of: &s.interrupt_bitmap) { raw in
            for (i, word) in interruptBitmap.prefix(4).enumerated() {
                raw.storeBytes(of: word, toByteOffset: i * 8, as: UInt64.self)
            }
        }
        return s
    }
}

extension Registers: CustomStringConvertible {
    public var description: String {
        func hex(_ v: UInt64) -> String {
            let digits = String(v, radix: 16)
            return "0x" + String(repeating: "0", count: max(0, 16 - digits.count)) + digits
        }
        return """
            rip=\(hex(rip)) rflags=\(hex(rflags)) rsp=\(hex(rsp)) rbp=\(hex(rbp))
            rax=\(hex(rax)) rbx=\(hex(rbx)) rcx=\(hex(rcx)) rdx=\(hex(rdx))
            rsi=\(hex(rsi)) rdi=\(hex(rdi)) r8=\(hex(r8)) r9=\(hex(r9))
            """
    }
}

extension SpecialRegisters: CustomStringConvertible {
    public var description: String {
        func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        let mode: String
        if efer & (1 << 10) != 0 { mode = cs.long ? "64-bit" : "compatibility" }
        else if cr0 & 1 != 0 { mode = cs.defaultSize32 ? "32-bit protected" : "16-bit protected" }
        else { mode = "real" }
        return """
            mode=\(mode) cs=\(hex(UInt64(cs.selector)))/base \(hex(cs.base)) ss=\(hex(UInt64(ss.selector))) \
            cr0=\(hex(cr0)) cr2=\(hex(cr2)) cr3=\(hex(cr3)) cr4=\(hex(cr4)) efer=\(hex(efer)) \
            gdt=\(hex(gdt.base))/\(gdt.limit) idt=\(hex(idt.base))/\(idt.limit)
            """
    }
}
