/// Boots an ELF kernel through its PVH entry point (Xen's direct-boot ABI, which Linux supports
/// with CONFIG_PVH): segments loaded at their physical addresses, an `hvm_start_info` describing
/// the command line, the memory map and the initrd, and the CPU in flat 32-bit protected mode with
/// paging off and EBX pointing at the start info.
public enum PVHLoader {
    /// Where the loader puts its tables, all in the first 64 KiB (below any kernel, which the
    /// PVH ABI loads at or above 1 MiB) and clear of the real-mode IVT and BDA.
    public enum Addresses {
        public static let startInfo: UInt64 = 0x6000
        public static let moduleList: UInt64 = 0x6040
        public static let memoryMap: UInt64 = 0x6100
        public static let commandLine: UInt64 = 0x20000

        /// Guest-physical ranges the loader writes: the GDT, the start-info page, the command line.
        static let reserved: [Range<UInt64>] = [
            BootGDT.address..<(BootGDT.address + UInt64(BootGDT.entries.count * 8)),
            startInfo..<(memoryMap + UInt64(maximumMemoryMapEntries * 24)),
            commandLine..<(commandLine + UInt64(maximumCommandLine + 1)),
        ]
    }

    public static let startInfoMagic: UInt32 = 0x336E_C578
    public static let maximumCommandLine = 0x10000 - 1
    /// Room for the map at 0x6100 before the page ends (24 bytes an entry).
    static let maximumMemoryMapEntries = 128

    /// Loads `kernel` (and `initrd`, as module 0) into `memory`.
    public static func load(kernel: [UInt8], kernelName: String, initrd: [UInt8]?, initrdName: String = "initrd",
                            commandLine: String, acpiRSDP: UInt64 = 0, into memory: GuestMemory) throws(BootError) -> BootState {
        let image = try ELFImage(bytes: kernel, name: kernelName)
        guard let entry = image.pvhEntry else { throw .noPVHEntry(file: kernelName) }

        var kernelEnd: UInt64 = 0
        for segment in image.loadSegments {
            let address = segment.physicalAddress
            guard memory.contains(address, count: Int(clamping: segment.memorySize)), segment.memorySize <= memory.size else {
                throw .doesNotFit(file: kernelName, what: "segment", address: address, size: segment.memorySize, memory: memory.size)
            }
            if let table = Addresses.reserved.first(where: { address < $0.upperBound && $0.lowerBound < address + segment.memorySize }) {
                throw .malformed(file: kernelName, structure: "segment", offset: segment.fileOffset,
                                 detail: "loads at 0x\(String(address, radix: 16)), over the loader's tables at 0x\(String(table.lowerBound, radix: 16)); PVH kernels load at 1 MiB or above")
            }
            let start = Int(segment.fileOffset)
            let fileBytes = kernel[start..<start + Int(segment.fileSize)]
            try fitting(kernelName) { () throws(GuestMemoryError) in
                try memory.write(at: address, bytes: fileBytes)
                try memory.zero(at: address + segment.fileSize, count: Int(segment.memorySize - segment.fileSize))
            }
            kernelEnd = max(kernelEnd, address + segment.memorySize)
        }
        guard memory.contains(entry, count: 1) else {
            throw .doesNotFit(file: kernelName, what: "entry point", address: entry, size: 1, memory: memory.size)
        }

        let commandLineBytes = Array(commandLine.utf8)
        guard commandLineBytes.count <= maximumCommandLine else {
            throw .commandLineTooLong(length: commandLineBytes.count, maximum: maximumCommandLine)
        }

        var modules: [(address: UInt64, size: UInt64)] = []
        if let initrd {
            let address = try InitrdPlacement.address(for: UInt64(initrd.count), above: kernelEnd, in: memory, file: initrdName)
            try fitting(initrdName) { () throws(GuestMemoryError) in try memory.write(at: address, bytes: initrd) }
            modules.append((address, UInt64(initrd.count)))
        }

        let map = MemoryMapEntry.standard(for: memory)
        guard map.count <= maximumMemoryMapEntries else {
            throw .unsupported(file: kernelName, detail: "memory map has \(map.count) entries")
        }
        try fitting(kernelName) { () throws(GuestMemoryError) in
            try BootGDT.write(into: memory)
            try memory.write(at: Addresses.commandLine, bytes: commandLineBytes + [0])
            for (index, entry) in map.enumerated() {
                let base = Addresses.memoryMap + UInt64(index * 24)
                try memory.store(entry.address, at: base)
                try memory.store(entry.size, at: base + 8)
                try memory.store(entry.kind.rawValue, at: base + 16)
                try memory.store(UInt32(0), at: base + 20)
            }
            for (index, module) in modules.enumerated() {
                let base = Addresses.moduleList + UInt64(index * 32)
                try memory.store(module.address, at: base)
                try memory.store(module.size, at: base + 8)
                try memory.store(UInt64(0), at: base + 16) // no per-module command line
                try memory.store(UInt64(0), at: base + 24)
            }
            // struct hvm_start_info, version 1 (with the memory map).
            let info = Addresses.startInfo
            try memory.store(startInfoMagic, at: info)
            try memory.store(UInt32(1), at: info + 4)                      // version
            try memory.store(UInt32(0), at: info + 8)                      // flags
            try memory.store(UInt32(modules.count), at: info + 12)         // nr_modules
            try memory.store(modules.isEmpty ? 0 : Addresses.moduleList, at: info + 16)
            try memory.store(Addresses.commandLine, at: info + 24)
            try memory.store(acpiRSDP, at: info + 32)                      // rsdp_paddr (0: none)
            try memory.store(Addresses.memoryMap, at: info + 40)
            try memory.store(UInt32(map.count), at: info + 48)
            try memory.store(UInt32(0), at: info + 52)
        }

        var registers = Registers()
        registers.rip = entry
        registers.rbx = Addresses.startInfo
        registers.rflags = 0x2
        return BootState(registers: registers, mode: .protected32)
    }

    /// Turns a guest-memory failure during loading (which the checks above should prevent) into a boot error.
    static func fitting(_ file: String, _ body: () throws(GuestMemoryError) -> Void) throws(BootError) {
        do { try body() } catch {
            throw .unsupported(file: file, detail: "could not be written to guest memory: \(error)")
        }
    }
}

/// Where an initrd goes: as high as possible in RAM below 4 GiB (kernels read it through
/// 32-bit fields), page-aligned, above the kernel.
public enum InitrdPlacement {
    public static func address(for size: UInt64, above kernelEnd: UInt64, in memory: GuestMemory,
                               limit: UInt64 = GuestLayout.mmioHoleStart, file: String) throws(BootError) -> UInt64 {
        let lowRAMEnd = min(memory.regions.first?.guestEnd ?? 0, limit)
        let floor = (kernelEnd + 0xFFF) & ~0xFFF
        guard size <= lowRAMEnd, lowRAMEnd - size >= floor else {
            throw .doesNotFit(file: file, what: "initrd", address: floor, size: size, memory: memory.size)
        }
        return (lowRAMEnd - size) & ~0xFFF
    }
}
