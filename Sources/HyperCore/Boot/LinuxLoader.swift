/// The parts of a bzImage's real-mode setup header (Linux `Documentation/arch/x86/boot.rst`) that
/// a loader using the 64-bit entry point needs, read with bounds checks and validated.
public struct BzImageHeader: Sendable, Equatable {
    /// Offsets of setup-header fields, relative to the start of the file (and of the zero page,
    /// where the header is copied to the same offsets).
    public enum Offset {
        public static let setupSects: UInt64 = 0x1F1
        public static let syssize: UInt64 = 0x1F4
        public static let vidMode: UInt64 = 0x1FA
        public static let bootFlag: UInt64 = 0x1FE
        public static let jump: UInt64 = 0x200
        public static let header: UInt64 = 0x202
        public static let version: UInt64 = 0x206
        public static let typeOfLoader: UInt64 = 0x210
        public static let loadflags: UInt64 = 0x211
        public static let code32Start: UInt64 = 0x214
        public static let ramdiskImage: UInt64 = 0x218
        public static let ramdiskSize: UInt64 = 0x21C
        public static let heapEndPointer: UInt64 = 0x224
        public static let commandLinePointer: UInt64 = 0x228
        public static let initrdAddressMax: UInt64 = 0x22C
        public static let kernelAlignment: UInt64 = 0x230
        public static let relocatableKernel: UInt64 = 0x234
        public static let xloadflags: UInt64 = 0x236
        public static let commandLineSize: UInt64 = 0x238
        public static let payloadOffset: UInt64 = 0x248
        public static let payloadLength: UInt64 = 0x24C
        public static let preferredAddress: UInt64 = 0x258
        public static let initSize: UInt64 = 0x260
    }

    /// `HdrS`, little-endian.
    public static let headerMagic: UInt32 = 0x5372_6448
    public static let bootFlagValue: UInt16 = 0xAA55
    /// The oldest protocol accepted: 2.06 added `cmdline_size`; 2.12 (`xloadflags`) is what
    /// actually gates the 64-bit entry, checked separately.
    public static let minimumVersion: UInt16 = 0x0206
    /// `loadflags` bit 0: the protected-mode kernel is loaded at 1 MiB or above.
    public static let loadedHigh: UInt8 = 1 << 0
    /// `xloadflags` bit 0: the kernel has the 64-bit entry point at code32_start + 0x200.
    public static let xlfKernel64: UInt16 = 1 << 0

    /// Number of 512-byte setup sectors after the boot sector (0 means 4, as the protocol says).
    public let setupSectors: Int
    public let version: UInt16
    public let loadflags: UInt8
    public let xloadflags: UInt16
    public let relocatable: Bool
    public let kernelAlignment: UInt32
    /// Bytes the kernel needs from its load address while it decompresses and starts up.
    public let initSize: UInt32
    public let preferredAddress: UInt64
    public let initrdAddressMax: UInt32
    /// The longest command line the kernel accepts, excluding the terminating NUL.
    public let commandLineSize: UInt32
    public let payloadOffset: UInt32
    public let payloadLength: UInt32
    /// Size of the protected-mode kernel as the header declares it (`syssize` × 16).
    public let declaredKernelSize: UInt64
    /// The header's extent: 0x202 plus the byte at 0x201 (the setup code's jump offset).
    public let headerEnd: UInt64

    /// File offset of the protected-mode kernel (after the boot sector and setup sectors).
    public var kernelOffset: Int { (setupSectors + 1) * 512 }
    public var versionString: String { "\(version >> 8).\(String(format2: version & 0xFF))" }

    /// True when the bytes begin like a bzImage (boot-sector signature and `HdrS`); used to tell
    /// a bzImage from an ELF vmlinux before parsing either.
    public static func looksLikeBzImage(_ bytes: [UInt8]) -> Bool {
        guard bytes.count >= 0x206 else { return false }
        return bytes[0x1FE] == 0x55 && bytes[0x1FF] == 0xAA
            && bytes[0x202] == 0x48 && bytes[0x203] == 0x64 && bytes[0x204] == 0x72 && bytes[0x205] == 0x53
    }

    public init(bytes: [UInt8], name: String) throws(BootError) {
        let reader = ByteReader(bytes: bytes, file: name)
        guard bytes.count >= 0x206 else {
            throw .notBzImage(file: name, detail: "\(bytes.count) bytes is too short for the boot sector and setup header (at least 518)")
        }
        let magic = try reader.u32(Offset.header, "setup header")
        guard magic == Self.headerMagic else {
            let isELF = bytes.starts(with: [0x7F, 0x45, 0x4C, 0x46])
            throw .notBzImage(file: name, detail: "no \"HdrS\" magic at offset 0x202"
                + (isELF ? " (it is an ELF file: boot it through PVH instead)" : ""))
        }
        let flag = try reader.u16(Offset.bootFlag, "boot sector")
        guard flag == Self.bootFlagValue else {
            throw .notBzImage(file: name, detail: "boot_flag at 0x1FE is 0x\(String(flag, radix: 16)), not 0xAA55")
        }
        version = try reader.u16(Offset.version, "setup header")
        guard version >= Self.minimumVersion else {
            throw .unsupported(file: name, detail: "boot protocol \(version >> 8).\(version & 0xFF) is older than 2.06; this loader needs 2.12 or later (64-bit entry)")
        }
        let sectors = Int(try reader.u8(Offset.setupSects, "setup header"))
        setupSectors = sectors == 0 ? 4 : sectors
        headerEnd = 0x202 + UInt64(try reader.u8(Offset.jump + 1, "setup header"))
        loadflags = try reader.u8(Offset.loadflags, "setup header")
        guard loadflags & Self.loadedHigh != 0 else {
            throw .unsupported(file: name, detail: "loadflags 0x\(String(loadflags, radix: 16)) lack LOADED_HIGH: a zImage (loaded at 0x10000) is not supported")
        }
        // Fields added in 2.12 and later read as zero on older kernels, and the checks below
        // reject those as lacking the 64-bit entry.
        xloadflags = version >= 0x020C ? try reader.u16(Offset.xloadflags, "setup header") : 0
        guard xloadflags & Self.xlfKernel64 != 0 else {
            throw .unsupported(file: name, detail: "xloadflags 0x\(String(xloadflags, radix: 16)) lack XLF_KERNEL_64: the kernel has no 64-bit entry point (a 32-bit kernel, or protocol before 2.12)")
        }
        relocatable = try reader.u8(Offset.relocatableKernel, "setup header") != 0
        kernelAlignment = try reader.u32(Offset.kernelAlignment, "setup header")
        guard kernelAlignment == 0 || kernelAlignment & (kernelAlignment - 1) == 0 else {
            throw .malformed(file: name, structure: "setup header", offset: Offset.kernelAlignment,
                             detail: "kernel_alignment 0x\(String(kernelAlignment, radix: 16)) is not a power of two")
        }
        initrdAddressMax = try reader.u32(Offset.initrdAddressMax, "setup header")
        commandLineSize = try reader.u32(Offset.commandLineSize, "setup header")
        payloadOffset = version >= 0x0208 ? try reader.u32(Offset.payloadOffset, "setup header") : 0
        payloadLength = version >= 0x0208 ? try reader.u32(Offset.payloadLength, "setup header") : 0
        preferredAddress = version >= 0x020A ? try reader.u64(Offset.preferredAddress, "setup header") : 0x100000
        initSize = version >= 0x020A ? try reader.u32(Offset.initSize, "setup header") : 0
        declaredKernelSize = UInt64(try reader.u32(Offset.syssize, "setup header")) * 16

        guard headerEnd <= UInt64(kernelOffset) else {
            throw .malformed(file: name, structure: "setup header", offset: Offset.jump,
                             detail: "the header ends at 0x\(String(headerEnd, radix: 16)), past the \(setupSectors) setup sectors")
        }
        let available = UInt64(bytes.count) - min(UInt64(bytes.count), UInt64(kernelOffset))
        guard available > 0, available >= declaredKernelSize else {
            throw .truncated(file: name, structure: "protected-mode kernel (syssize \(declaredKernelSize) bytes after \(setupSectors) setup sectors)",
                             needed: UInt64(kernelOffset) + max(declaredKernelSize, 1), size: UInt64(bytes.count))
        }
        if payloadLength > 0 {
            let payloadEnd = UInt64(payloadOffset) + UInt64(payloadLength)
            guard payloadEnd <= available else {
                throw .truncated(file: name, structure: "compressed payload (payload_offset/payload_length)",
                                 needed: UInt64(kernelOffset) + payloadEnd, size: UInt64(bytes.count))
            }
        }
    }
}

private extension String {
    init(format2 value: UInt16) { self = value < 10 ? "0\(value)" : "\(value)" }
}

/// Loads a bzImage for the 64-bit boot protocol: the protected-mode kernel at its preferred
/// address, a zero page (`struct boot_params`) with the e820 map, command line and initrd, and the
/// boot CPU in long mode on identity-mapped page tables, entering at code32_start + 0x200.
public enum LinuxLoader {
    /// Guest-physical addresses used, all below 1 MiB and clear of the real-mode IVT/BDA (0–0x4FF),
    /// the boot GDT (0x500), the PVH tables (0x6000) and the MP table in the BIOS area.
    public enum Addresses {
        public static let zeroPage: UInt64 = 0x7000
        /// Top of the boot stack (the page between the zero page and the page tables). The kernel
        /// sets up its own stack at once; this only has to be valid memory.
        public static let stackTop: UInt64 = 0x8FF0
        public static let pageTables: UInt64 = PageTables.defaultRoot
        public static let commandLine: UInt64 = 0x20000
        /// The legacy default for kernels that do not state a preferred address.
        public static let defaultKernel: UInt64 = 0x100000
    }

    /// `type_of_loader` 0xFF: "undefined" boot loader (no ID assigned), as other VMMs report.
    public static let loaderType: UInt8 = 0xFF
    /// e820 entries the zero page holds (`E820_MAX_ENTRIES_ZEROPAGE`).
    public static let maximumE820Entries = 128
    /// Offsets in `struct boot_params` outside the setup header.
    public enum ZeroPage {
        public static let acpiRSDPAddress: UInt64 = 0x070
        public static let extRamdiskImage: UInt64 = 0x0C0
        public static let extRamdiskSize: UInt64 = 0x0C4
        public static let extCommandLinePointer: UInt64 = 0x0C8
        public static let e820Entries: UInt64 = 0x1E8
        public static let e820Table: UInt64 = 0x2D0
        public static let size: UInt64 = 0x1000
    }

    /// Where the pieces went; tests and `hvrun` report it.
    public struct Placement: Sendable, Equatable {
        public var kernelAddress: UInt64
        public var kernelSize: UInt64
        /// Kernel address + init_size: the end of the region the kernel may use while starting.
        public var kernelEnd: UInt64
        public var entry: UInt64
        public var initrd: (address: UInt64, size: UInt64)?
        public static func == (a: Placement, b: Placement) -> Bool {
            a.kernelAddress == b.kernelAddress && a.kernelSize == b.kernelSize && a.kernelEnd == b.kernelEnd
                && a.entry == b.entry && a.initrd?.address == b.initrd?.address && a.initrd?.size == b.initrd?.size
        }
    }

    /// Loads `bzImage` (and `initrd`) into `memory`; returns the boot vCPU's state.
    public static func load(bzImage: [UInt8], name: String, initrd: [UInt8]?, initrdName: String = "initrd",
                            commandLine: String, acpiRSDP: UInt64 = 0, into memory: GuestMemory) throws(BootError) -> BootState {
        try loadReportingPlacement(bzImage: bzImage, name: name, initrd: initrd, initrdName: initrdName,
                                   commandLine: commandLine, acpiRSDP: acpiRSDP, into: memory).state
    }

    public static func loadReportingPlacement(bzImage: [UInt8], name: String, initrd: [UInt8]?, initrdName: String = "initrd",
                                              commandLine: String, acpiRSDP: UInt64 = 0,
                                              into memory: GuestMemory) throws(BootError) -> (state: BootState, placement: Placement) {
        let header = try BzImageHeader(bytes: bzImage, name: name)
        let kernel = bzImage[header.kernelOffset...]

        // The kernel goes at its preferred address (16 MiB for current x86-64 kernels). A
        // relocatable kernel could go lower, but it would move itself up to that address before
        // decompressing anyway, so loading it there directly needs no more memory.
        var address = header.preferredAddress >= Addresses.defaultKernel ? header.preferredAddress : Addresses.defaultKernel
        if header.kernelAlignment > 1 {
            let mask = UInt64(header.kernelAlignment) - 1
            address = (address + mask) & ~mask
        }
        let footprint = max(UInt64(header.initSize), UInt64(kernel.count))
        let lowRAMEnd = min(memory.regions.first?.guestEnd ?? 0, GuestLayout.mmioHoleStart)
        guard address + footprint <= lowRAMEnd else {
            throw .insufficientMemory(file: name, needed: address + footprint, available: lowRAMEnd,
                                      why: "the kernel loads at 0x\(String(address, radix: 16)) and needs init_size 0x\(String(header.initSize, radix: 16)) bytes from there to decompress and start")
        }

        let commandLineBytes = Array(commandLine.utf8)
        let maximumCommandLine = Int(min(header.commandLineSize, UInt32(PVHLoader.maximumCommandLine)))
        guard commandLineBytes.count <= maximumCommandLine else {
            throw .commandLineTooLong(length: commandLineBytes.count, maximum: maximumCommandLine)
        }

        var initrdPlacement: (address: UInt64, size: UInt64)?
        if let initrd {
            // initrd_addr_max is the highest address the initrd's last byte may occupy.
            let limit = min(UInt64(header.initrdAddressMax) + 1, GuestLayout.mmioHoleStart)
            let at = try InitrdPlacement.address(for: UInt64(initrd.count), above: address + footprint, in: memory,
                                                 limit: limit, file: initrdName)
            try PVHLoader.fitting(initrdName) { () throws(GuestMemoryError) in try memory.write(at: at, bytes: initrd) }
            initrdPlacement = (at, UInt64(initrd.count))
        }

        let map = MemoryMapEntry.standard(for: memory)
        guard map.count <= maximumE820Entries else {
            throw .unsupported(file: name, detail: "memory map has \(map.count) entries; the zero page holds \(maximumE820Entries)")
        }
        let zeroPage = try buildZeroPage(bzImage: bzImage, header: header, kernelAddress: address,
                                         commandLineAddress: Addresses.commandLine, initrd: initrdPlacement,
                                         e820: map, acpiRSDP: acpiRSDP)
        try PVHLoader.fitting(name) { () throws(GuestMemoryError) in
            try memory.write(at: address, bytes: kernel)
            try memory.write(at: Addresses.zeroPage, bytes: zeroPage)
            try memory.write(at: Addresses.commandLine, bytes: commandLineBytes + [0])
            try PageTables.writeIdentityMap(at: Addresses.pageTables, into: memory)
            try BootGDT.write(into: memory)
        }

        var registers = Registers()
        registers.rip = address + 0x200 // the 64-bit entry (startup_64) follows the 32-bit one
        registers.rsi = Addresses.zeroPage
        registers.rsp = Addresses.stackTop
        registers.rbp = Addresses.stackTop
        registers.rflags = 0x2 // interrupts off, as the protocol requires
        let placement = Placement(kernelAddress: address, kernelSize: UInt64(kernel.count), kernelEnd: address + footprint,
                                  entry: registers.rip, initrd: initrdPlacement)
        return (BootState(registers: registers, mode: .long64(pageTableRoot: Addresses.pageTables)), placement)
    }

    /// The zero page: the file's setup header copied to the same offsets, then the fields a boot
    /// loader must fill in. Everything else stays zero (no EDD, no EFI, no screen info).
    public static func buildZeroPage(bzImage: [UInt8], header: BzImageHeader, kernelAddress: UInt64,
                                     commandLineAddress: UInt64, initrd: (address: UInt64, size: UInt64)?,
                                     e820: [MemoryMapEntry], acpiRSDP: UInt64 = 0) throws(BootError) -> [UInt8] {
        var page = [UInt8](repeating: 0, count: Int(ZeroPage.size))
        let start = Int(BzImageHeader.Offset.setupSects)
        let end = Int(min(header.headerEnd, UInt64(bzImage.count)))
        page.replaceSubrange(start..<end, with: bzImage[start..<end])

        func put<T: FixedWidthInteger>(_ value: T, _ offset: UInt64) {
            withUnsafeBytes(of: value.littleEndian) { raw in
                for (index, byte) in raw.enumerated() { page[Int(offset) + index] = byte }
            }
        }
        typealias O = BzImageHeader.Offset
        put(UInt16(0xFFFF), O.vidMode) // "normal" text mode: no mode switch
        put(loaderType, O.typeOfLoader)
        // Keep LOADED_HIGH; clear QUIET_FLAG (bit 5) so the kernel's early messages are not suppressed
        // and CAN_USE_HEAP (bit 7), since no real-mode setup code runs.
        put(header.loadflags & ~UInt8(0xA0), O.loadflags)
        put(UInt32(truncatingIfNeeded: kernelAddress), O.code32Start)
        put(UInt32(truncatingIfNeeded: commandLineAddress), O.commandLinePointer)
        put(UInt32(truncatingIfNeeded: commandLineAddress >> 32), ZeroPage.extCommandLinePointer)
        if let initrd {
            put(UInt32(truncatingIfNeeded: initrd.address), O.ramdiskImage)
            put(UInt32(truncatingIfNeeded: initrd.size), O.ramdiskSize)
            put(UInt32(truncatingIfNeeded: initrd.address >> 32), ZeroPage.extRamdiskImage)
            put(UInt32(truncatingIfNeeded: initrd.size >> 32), ZeroPage.extRamdiskSize)
        }
        if acpiRSDP != 0, header.version >= 0x020E { put(acpiRSDP, ZeroPage.acpiRSDPAddress) }
        put(UInt8(e820.count), ZeroPage.e820Entries)
        for (index, entry) in e820.enumerated() {
            let base = ZeroPage.e820Table + UInt64(index * 20)
            put(entry.address, base)
            put(entry.size, base + 8)
            put(entry.kind.rawValue, base + 16)
        }
        return page
    }
}
