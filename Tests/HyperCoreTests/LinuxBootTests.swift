import Testing
@testable import HyperCore

/// The bzImage setup-header parser, the zero page, the page tables and the e820 table, checked
/// byte by byte against Documentation/arch/x86/boot.rst (no KVM needed: guest memory is plain mmap).
@Suite("Linux boot protocol: bzImage header and zero page")
struct LinuxBootProtocolTests {
    @Test("a well-formed header parses into the fields the loader uses")
    func parsesCraftedHeader() throws {
        let header = try BzImageHeader(bytes: CraftedBzImage.make(), name: "crafted")
        #expect(header.version == 0x020F)
        #expect(header.versionString == "2.15")
        #expect(header.setupSectors == 4)
        #expect(header.kernelOffset == 5 * 512)
        #expect(header.relocatable)
        #expect(header.kernelAlignment == 0x20_0000)
        #expect(header.preferredAddress == 0x100_0000)
        #expect(header.initSize == 0x40_0000)
        #expect(header.commandLineSize == 2047)
        #expect(header.xloadflags & BzImageHeader.xlfKernel64 != 0)
        #expect(header.headerEnd == 0x26C)
    }

    @Test("setup_sects 0 means 4, as the protocol says")
    func zeroSetupSectors() throws {
        var fields = CraftedBzImage.Fields()
        fields.setupSectors = 0
        #expect(try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "old").setupSectors == 4)
    }

    @Test("files that are not a bzImage are rejected with the reason")
    func rejectsNonBzImage() {
        #expect(throws: BootError.notBzImage(file: "tiny", detail: "100 bytes is too short for the boot sector and setup header (at least 518)")) {
            try BzImageHeader(bytes: [UInt8](repeating: 0, count: 100), name: "tiny")
        }
        var fields = CraftedBzImage.Fields()
        fields.magic = Array("Hdr!".utf8)
        #expect(throws: BootError.notBzImage(file: "nomagic", detail: "no \"HdrS\" magic at offset 0x202")) {
            try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "nomagic")
        }
        // An ELF vmlinux passed as a bzImage: the message points to PVH.
        var elf = TinyELF.make(code: [0xF4])
        elf += [UInt8](repeating: 0, count: 1024)
        do {
            _ = try BzImageHeader(bytes: elf, name: "vmlinux")
            Issue.record("an ELF parsed as a bzImage")
        } catch {
            #expect(error.description.contains("ELF file: boot it through PVH"))
        }
        fields = CraftedBzImage.Fields()
        fields.bootFlag = 0x1234
        #expect(throws: BootError.notBzImage(file: "flag", detail: "boot_flag at 0x1FE is 0x1234, not 0xAA55")) {
            try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "flag")
        }
        #expect(!BzImageHeader.looksLikeBzImage(elf))
        #expect(BzImageHeader.looksLikeBzImage(CraftedBzImage.make()))
    }

    @Test("a truncated file is reported with what is missing")
    func rejectsTruncated() throws {
        let whole = CraftedBzImage.make()
        let cut = Array(whole.prefix(whole.count - 100))
        do {
            _ = try BzImageHeader(bytes: cut, name: "cut")
            Issue.record("a truncated bzImage parsed")
        } catch let error {
            guard case let .truncated(file, structure, needed, size) = error else {
                Issue.record("expected .truncated, got \(error)")
                return
            }
            #expect(file == "cut")
            #expect(structure.contains("protected-mode kernel"))
            #expect(needed == UInt64(whole.count))
            #expect(size == UInt64(cut.count))
        }
        // Only the boot sector and setup sectors: no kernel at all.
        let headerOnly = Array(whole.prefix(5 * 512))
        #expect(throws: BootError.self) { try BzImageHeader(bytes: headerOnly, name: "setup-only") }
    }

    @Test("old protocols, 32-bit-only kernels and zImages are refused")
    func rejectsUnsupported() {
        var fields = CraftedBzImage.Fields()
        fields.version = 0x0205
        #expect(throws: BootError.self) { try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "old") }
        fields = CraftedBzImage.Fields()
        fields.xloadflags = 0
        do {
            _ = try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "k32")
            Issue.record("a kernel without XLF_KERNEL_64 was accepted")
        } catch {
            #expect(error.description.contains("XLF_KERNEL_64"))
        }
        fields = CraftedBzImage.Fields()
        fields.loadflags = 0
        do {
            _ = try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "zimage")
            Issue.record("a zImage was accepted")
        } catch {
            #expect(error.description.contains("LOADED_HIGH"))
        }
        fields = CraftedBzImage.Fields()
        fields.kernelAlignment = 0x30_0000
        #expect(throws: BootError.self) { try BzImageHeader(bytes: CraftedBzImage.make(fields), name: "align") }
    }

    @Test("a kernel that needs more memory than configured is refused with the size it needs")
    func rejectsTooLittleMemory() throws {
        var fields = CraftedBzImage.Fields()
        fields.initSize = 0x300_0000 // 48 MiB from 16 MiB: needs 64 MiB
        let memory = try GuestMemory(size: 32 << 20)
        do {
            _ = try LinuxLoader.load(bzImage: CraftedBzImage.make(fields), name: "big", initrd: nil, commandLine: "", into: memory)
            Issue.record("loaded a kernel that does not fit")
        } catch {
            guard case let .insufficientMemory(file, needed, available, _) = error else {
                Issue.record("expected .insufficientMemory, got \(error)")
                return
            }
            #expect(file == "big")
            #expect(needed == 0x400_0000)
            #expect(available == 32 << 20)
            #expect(error.description.contains("raise --memory"))
            #expect(error.description.contains("init_size"))
        }
    }

    @Test("command line longer than cmdline_size is refused")
    func rejectsLongCommandLine() throws {
        var fields = CraftedBzImage.Fields()
        fields.commandLineSize = 16
        let memory = try GuestMemory(size: 64 << 20)
        #expect(throws: BootError.commandLineTooLong(length: 17, maximum: 16)) {
            try LinuxLoader.load(bzImage: CraftedBzImage.make(fields), name: "k", initrd: nil,
                                 commandLine: String(repeating: "x", count: 17), into: memory)
        }
    }

    @Test("zero page, command line, initrd, page tables, GDT and registers are where the protocol wants them")
    func zeroPageLayout() throws {
        let image = CraftedBzImage.make()
        let memory = try GuestMemory(size: 64 << 20)
        let initrd: [UInt8] = (0..<10000).map { UInt8(truncatingIfNeeded: $0 * 3) }
        let (state, placement) = try LinuxLoader.loadReportingPlacement(bzImage: image, name: "crafted", initrd: initrd,
                                                                        commandLine: "console=ttyS0 hello", into: memory)
        // Kernel: at pref_address, the protected-mode part of the file.
        #expect(placement.kernelAddress == 0x100_0000)
        #expect(try memory.readBytes(at: 0x100_0000, count: 0x2000) == Array(image[(5 * 512)...]))
        #expect(placement.kernelEnd == 0x100_0000 + 0x40_0000)
        // Registers: 64-bit entry at load + 0x200, RSI = zero page, interrupts off.
        #expect(state.registers.rip == 0x100_0200)
        #expect(state.registers.rsi == LinuxLoader.Addresses.zeroPage)
        #expect(state.registers.rflags == 0x2)
        #expect(state.mode == .long64(pageTableRoot: 0x9000))
        let sregs = state.specialRegisters(from: SpecialRegisters())
        #expect(sregs.cs.selector == 0x10 && sregs.cs.long)
        #expect(sregs.ds.selector == 0x18 && sregs.ss.selector == 0x18 && sregs.es.selector == 0x18)
        #expect(sregs.cr0 & 0x8000_0001 == 0x8000_0001)
        #expect(sregs.cr4 & 0x20 != 0)
        #expect(sregs.efer & 0x500 == 0x500)

        let page = try memory.readBytes(at: LinuxLoader.Addresses.zeroPage, count: 4096)
        // The setup header is copied from the file at the same offsets…
        #expect(page[0x1F1] == 4)
        #expect(page.u16(0x1FE) == 0xAA55)
        #expect(Array(page[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(page.u16(0x206) == 0x020F)
        #expect(page.u32(0x230) == 0x20_0000)
        #expect(page.u64(0x258) == 0x100_0000)
        #expect(page.u32(0x260) == 0x40_0000)
        // …and nothing of the file past the header.
        #expect(page[0x26C..<0x2D0].allSatisfy { $0 == 0 })
        // …with the loader's fields filled in.
        #expect(page.u16(0x1FA) == 0xFFFF)         // vid_mode: normal
        #expect(page[0x210] == 0xFF)               // type_of_loader: undefined
        #expect(page[0x211] == 0x01)               // loadflags: LOADED_HIGH, not QUIET, not CAN_USE_HEAP
        #expect(page.u32(0x214) == 0x100_0000)     // code32_start = load address
        #expect(page.u32(0x228) == 0x20000)        // cmd_line_ptr
        #expect(page.u32(0x0C8) == 0)              // ext_cmd_line_ptr
        let initrdAddress = UInt64(page.u32(0x218))
        #expect(page.u32(0x21C) == 10000)          // ramdisk_size
        #expect(initrdAddress % 4096 == 0)
        #expect(initrdAddress >= placement.kernelEnd)
        #expect(initrdAddress + 10000 <= 64 << 20)
        #expect(try memory.readBytes(at: initrdAddress, count: initrd.count) == initrd)
        #expect(page[0x1EF] == 0)                  // sentinel: untouched
        #expect(try memory.readBytes(at: 0x20000, count: 20) == Array("console=ttyS0 hello".utf8) + [0])

        // e820: 20-byte entries (u64 address, u64 size, u32 type) at 0x2D0, count at 0x1E8.
        #expect(page[0x1E8] == 4)
        let expected: [(UInt64, UInt64, UInt32)] = [
            (0, 0xA0000, 1), (0xA0000, 0x60000, 2), (0x100000, (64 << 20) - 0x100000, 1), (0xFEC0_0000, 0x140_0000, 2),
        ]
        for (index, entry) in expected.enumerated() {
            let base = 0x2D0 + index * 20
            #expect(page.u64(base) == entry.0, "e820[\(index)].addr")
            #expect(page.u64(base + 8) == entry.1, "e820[\(index)].size")
            #expect(page.u32(base + 16) == entry.2, "e820[\(index)].type")
        }
        #expect(page[(0x2D0 + 4 * 20)..<(0x2D0 + 5 * 20)].allSatisfy { $0 == 0 })

        // Page tables: PML4[0] → PDPT; PDPT[0..3] → four page directories of 2 MiB pages (PS),
        // identity mapping 0–4 GiB.
        #expect(try memory.load(UInt64.self, at: 0x9000) == 0xA003)
        for gib in 0..<4 {
            #expect(try memory.load(UInt64.self, at: 0xA000 + UInt64(gib) * 8) == 0xB003 + UInt64(gib) * 0x1000)
        }
        #expect(try memory.load(UInt64.self, at: 0xA000 + 4 * 8) == 0)
        #expect(try memory.load(UInt64.self, at: 0xB000) == 0x83)
        #expect(try memory.load(UInt64.self, at: 0xB008) == 0x20_0083)
        #expect(try memory.load(UInt64.self, at: 0xE000 + 511 * 8) == 0xFFE0_0083)
        // GDT: __BOOT_CS (0x10) 64-bit code, __BOOT_DS (0x18) data.
        #expect(try memory.load(UInt64.self, at: 0x510) == 0x00AF_9B00_0000_FFFF)
        #expect(try memory.load(UInt64.self, at: 0x518) == 0x00CF_9300_0000_FFFF)
    }

    @Test("an initrd above initrd_addr_max is placed below it")
    func initrdRespectsAddressMax() throws {
        var fields = CraftedBzImage.Fields()
        fields.initrdAddressMax = 0x1FF_FFFF // 32 MiB − 1
        let memory = try GuestMemory(size: 128 << 20)
        let (_, placement) = try LinuxLoader.loadReportingPlacement(bzImage: CraftedBzImage.make(fields), name: "k",
                                                                    initrd: [UInt8](repeating: 7, count: 5000),
                                                                    commandLine: "", into: memory)
        let initrd = try #require(placement.initrd)
        #expect(initrd.address + initrd.size <= 0x200_0000)
        #expect(initrd.address >= placement.kernelEnd)
    }

    @Test("Debian's cloud kernel: header values and a load into 512 MiB", .enabled(if: LinuxGuest.available, LinuxGuest.missingReason))
    func realDebianKernel() throws {
        let bytes = try ImageFile.read(LinuxGuest.bzImagePath)
        #expect(BzImageHeader.looksLikeBzImage(bytes))
        let header = try BzImageHeader(bytes: bytes, name: "bzImage")
        #expect(header.version >= 0x020C)
        #expect(header.relocatable)
        #expect(header.xloadflags & 1 != 0)
        #expect(header.kernelAlignment == 0x20_0000)
        #expect(header.preferredAddress == 0x100_0000)
        #expect(header.initSize > UInt32(bytes.count - header.kernelOffset))
        #expect(header.commandLineSize >= 2047)
        #expect(header.payloadLength > 0)

        let memory = try GuestMemory(size: 512 << 20)
        let initrd = try ImageFile.read(LinuxGuest.initramfsPath)
        let (state, placement) = try LinuxLoader.loadReportingPlacement(bzImage: bytes, name: "bzImage", initrd: initrd,
                                                                        commandLine: "console=ttyS0", into: memory)
        #expect(state.registers.rip == 0x100_0200)
        #expect(placement.kernelEnd == 0x100_0000 + UInt64(header.initSize))
        let page = try memory.readBytes(at: LinuxLoader.Addresses.zeroPage, count: 4096)
        #expect(page.u32(0x218) == UInt32(try #require(placement.initrd).address))
        #expect(page.u32(0x21C) == UInt32(initrd.count))

        // In too little memory the loader says how much it needs.
        let small = try GuestMemory(size: 48 << 20)
        #expect(throws: BootError.self) {
            try LinuxLoader.load(bzImage: bytes, name: "bzImage", initrd: nil, commandLine: "", into: small)
        }
        // The vmlinux from inside it carries the PVH entry note.
        let vmlinux = try ELFImage(bytes: try ImageFile.read(LinuxGuest.vmlinuxPath), name: "vmlinux")
        #expect(vmlinux.pvhEntry != nil)
    }
}

/// MP table bytes parsed back and checked against the MP specification 1.4.
@Suite("MP table")
struct MPTableTests {
    struct Parsed {
        var pointerChecksumOK = false, tableChecksumOK = false
        var physicalPointer: UInt32 = 0, entryCount = 0, baseLength = 0
        var cpus: [(apicID: UInt8, flags: UInt8)] = []
        var buses: [(id: UInt8, type: String)] = []
        var ioapics: [(id: UInt8, flags: UInt8, address: UInt32)] = []
        var ioInterrupts: [(type: UInt8, bus: UInt8, irq: UInt8, ioapic: UInt8, pin: UInt8)] = []
        var localInterrupts: [(type: UInt8, lapic: UInt8, lint: UInt8)] = []
    }

    static func parse(_ bytes: [UInt8], at address: UInt64 = MPTable.defaultAddress) throws -> Parsed {
        var parsed = Parsed()
        #expect(Array(bytes[0..<4]) == Array("_MP_".utf8))
        parsed.pointerChecksumOK = bytes[0..<16].reduce(UInt8(0), &+) == 0
        parsed.physicalPointer = bytes.u32(4)
        #expect(bytes[8] == 1 && bytes[9] == 4)
        #expect(bytes[11] == 0) // feature byte 1: a configuration table follows
        let table = Int(UInt64(parsed.physicalPointer) - address)
        #expect(Array(bytes[table..<table + 4]) == Array("PCMP".utf8))
        parsed.baseLength = Int(bytes.u16(table + 4))
        #expect(bytes[table + 6] == 4)
        parsed.tableChecksumOK = bytes[table..<table + parsed.baseLength].reduce(UInt8(0), &+) == 0
        parsed.entryCount = Int(bytes.u16(table + 34))
        #expect(bytes.u32(table + 36) == 0xFEE0_0000)
        var offset = table + 44
        for _ in 0..<parsed.entryCount {
            switch bytes[offset] {
            case 0:
                parsed.cpus.append((bytes[offset + 1], bytes[offset + 3]))
                #expect(bytes[offset + 2] == 0x14)
                offset += 20
            case 1:
                parsed.buses.append((bytes[offset + 1], String(decoding: bytes[offset + 2..<offset + 8], as: UTF8.self)))
                offset += 8
            case 2:
                parsed.ioapics.append((bytes[offset + 1], bytes[offset + 3], bytes.u32(offset + 4)))
                offset += 8
            case 3:
                parsed.ioInterrupts.append((bytes[offset + 1], bytes[offset + 4], bytes[offset + 5], bytes[offset + 6], bytes[offset + 7]))
                offset += 8
            case 4:
                parsed.localInterrupts.append((bytes[offset + 1], bytes[offset + 6], bytes[offset + 7]))
                offset += 8
            default:
                Issue.record("unknown MP entry type \(bytes[offset]) at \(offset)")
                return parsed
            }
        }
        #expect(offset == table + parsed.baseLength)
        return parsed
    }

    @Test("floating pointer, configuration table, CPUs, IOAPIC and ISA routing", arguments: [1, 2, 8, 32, 64])
    func layout(cpus: Int) throws {
        let bytes = MPTable.build(cpuCount: cpus)
        let parsed = try Self.parse(bytes)
        #expect(parsed.pointerChecksumOK)
        #expect(parsed.tableChecksumOK)
        #expect(parsed.physicalPointer == 0xF0010)
        #expect(parsed.entryCount == cpus + 1 + 1 + 16 + 2)
        #expect(parsed.baseLength == 44 + cpus * 20 + 8 * (1 + 1 + 16 + 2))
        #expect(parsed.cpus.map(\.apicID) == (0..<cpus).map { UInt8($0) })
        #expect(parsed.cpus.first?.flags == 0x03)                       // enabled, boot processor
        #expect(parsed.cpus.dropFirst().allSatisfy { $0.flags == 0x01 }) // enabled only
        #expect(parsed.buses.count == 1 && parsed.buses[0].type == "ISA   ")
        #expect(parsed.ioapics.count == 1)
        let ioapic = try #require(parsed.ioapics.first)
        #expect(ioapic.id == UInt8(cpus))
        #expect(ioapic.flags == 1)
        #expect(ioapic.address == 0xFEC0_0000)
        #expect(parsed.ioInterrupts.count == 16)
        for (irq, entry) in parsed.ioInterrupts.enumerated() {
            #expect(entry.type == 0 && entry.bus == 0 && entry.irq == UInt8(irq) && entry.ioapic == ioapic.id && entry.pin == UInt8(irq))
        }
        #expect(parsed.localInterrupts.map(\.type) == [3, 1])  // ExtINT, NMI
        #expect(parsed.localInterrupts.map(\.lint) == [0, 1])  // LINT0, LINT1
        #expect(parsed.localInterrupts.allSatisfy { $0.lapic == 0xFF })
    }

    @Test("the table lands in the BIOS area of guest memory, which e820 reports as reserved")
    func writtenToBIOSArea() throws {
        let memory = try GuestMemory(size: 32 << 20)
        try MPTable.write(cpuCount: 4, into: memory)
        let bytes = try memory.readBytes(at: MPTable.defaultAddress, count: 1024)
        #expect(try Self.parse(bytes).cpus.count == 4)
        let reserved = MemoryMapEntry.standard(for: memory).first { $0.address <= 0xF0000 && 0xF0000 < $0.address + $0.size }
        #expect(reserved?.kind == .reserved)
    }
}
