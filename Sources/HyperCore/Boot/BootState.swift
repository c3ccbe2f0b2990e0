/// The CPU state a loader leaves for the boot vCPU: registers plus the mode to enter.
public struct BootState: Sendable, Equatable {
    public enum EntryMode: Sendable, Equatable {
        /// Real mode with CS = DS = ES = SS = `segment` (base `segment << 4`).
        case real(segment: UInt16)
        /// 32-bit protected mode, paging off, flat segments from the boot GDT (the PVH ABI).
        case protected32
        /// 64-bit long mode with identity-mapped page tables at `pageTableRoot` (the Linux 64-bit boot protocol).
        case long64(pageTableRoot: UInt64)
    }

    public var registers: Registers
    public var mode: EntryMode

    public init(registers: Registers, mode: EntryMode) {
        self.registers = registers
        self.mode = mode
    }

    /// The special registers for ``mode``, starting from the vCPU's reset state.
    public func specialRegisters(from reset: SpecialRegisters) -> SpecialRegisters {
        var sregs = reset
        switch mode {
        case let .real(segment):
            var code = Segment()
            code.selector = segment
            code.base = UInt64(segment) << 4
            code.limit = 0xFFFF
            code.type = 0xB
            var data = code
            data.type = 0x3
            sregs.cs = code
            sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        case .protected32:
            Self.applyFlatSegments(&sregs, code: .flat(selector: BootGDT.code32Selector, type: 0xB))
            sregs.cr0 = 0x11 // PE, and ET (hard-wired to 1)
            sregs.cr4 = 0
            sregs.efer = 0
        case let .long64(pageTableRoot):
            Self.applyFlatSegments(&sregs, code: .flat(selector: BootGDT.code64Selector, type: 0xB, long: true))
            sregs.cr3 = pageTableRoot
            sregs.cr4 = 1 << 5 // PAE
            sregs.cr0 = 0x8000_0011 // PG, PE, ET
            sregs.efer = (1 << 8) | (1 << 10) // LME, LMA
        }
        return sregs
    }

    private static func applyFlatSegments(_ sregs: inout SpecialRegisters, code: Segment) {
        let data = Segment.flat(selector: BootGDT.dataSelector, type: 0x3)
        sregs.cs = code
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        var tss = Segment()
        tss.selector = BootGDT.tssSelector
        tss.base = 0
        tss.limit = 0x67
        tss.type = 0xB // busy 32-bit TSS
        tss.codeOrData = false
        sregs.tr = tss
        sregs.gdt = DescriptorTable(base: BootGDT.address, limit: UInt16(BootGDT.entries.count * 8 - 1))
        sregs.idt = DescriptorTable(base: 0, limit: 0)
    }
}

/// The GDT loaders place in guest memory, so a guest that reloads segment registers from the
/// selectors it was given finds matching descriptors. Selectors follow Linux's boot protocol
/// (`__BOOT_CS` = 0x10 for 64-bit code, `__BOOT_DS` = 0x18); PVH uses the 32-bit code at 0x08.
public enum BootGDT {
    public static let address: UInt64 = 0x500
    public static let code32Selector: UInt16 = 0x08
    public static let code64Selector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let tssSelector: UInt16 = 0x20

    static let entries: [UInt64] = [
        0,
        0x00CF_9B00_0000_FFFF, // 0x08: 32-bit code, base 0, limit 4 GiB
        0x00AF_9B00_0000_FFFF, // 0x10: 64-bit code
        0x00CF_9300_0000_FFFF, // 0x18: data, base 0, limit 4 GiB
        0x0000_8B00_0000_0067, // 0x20: busy 32-bit TSS, base 0, limit 0x67
    ]

    public static func write(into memory: GuestMemory) throws(GuestMemoryError) {
        for (index, entry) in entries.enumerated() {
            try memory.store(entry, at: address + UInt64(index * 8))
        }
    }
}
