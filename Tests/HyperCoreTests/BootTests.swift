import Testing
@testable import HyperCore

@Suite("ELF and PVH loading")
struct BootTests {
    let memory: GuestMemory
    init() throws { memory = try GuestMemory(size: 32 << 20) }

    func load(_ image: [UInt8], commandLine: String = "", initrd: [UInt8]? = nil) throws(BootError) -> BootState {
        try PVHLoader.load(kernel: image, kernelName: "k.elf", initrd: initrd, commandLine: commandLine, into: memory)
    }

    @Test("a PVH image loads at its physical address and enters 32-bit protected mode with EBX → start info")
    func loadsPVHImage() throws {
        let code: [UInt8] = [0x90, 0x90, 0xF4]
        let state = try load(TinyELF.make(code: code, loadAddress: 0x200000, entry: 0x200001), commandLine: "a=b")
        #expect(try memory.readBytes(at: 0x200000, count: 3) == code)
        #expect(state.registers.rip == 0x200001)
        #expect(state.registers.rbx == PVHLoader.Addresses.startInfo)
        #expect(state.mode == .protected32)
        let sregs = state.specialRegisters(from: SpecialRegisters())
        #expect(sregs.cr0 & 1 == 1 && sregs.cr0 & 0x8000_0000 == 0)
        #expect(sregs.cs.defaultSize32 && sregs.cs.base == 0 && sregs.cs.limit == 0xFFFF_FFFF && !sregs.cs.long)
        #expect(sregs.tr.limit == 0x67 && sregs.tr.type == 0xB)
        #expect(sregs.efer == 0 && sregs.cr4 == 0)
    }

    @Test("hvm_start_info, memory map and module list are laid out as the Xen ABI defines them")
    func startInfoBytes() throws {
        let initrd = [UInt8](repeating: 0xAB, count: 5000)
        _ = try load(TinyELF.make(code: [0xF4]), commandLine: "console=ttyS0", initrd: initrd)
        let info = PVHLoader.Addresses.startInfo
        #expect(try memory.load(UInt32.self, at: info) == 0x336E_C578)
        #expect(try memory.load(UInt32.self, at: info + 4) == 1)
        #expect(try memory.load(UInt32.self, at: info + 12) == 1)
        let moduleList = try memory.load(UInt64.self, at: info + 16)
        let commandLine = try memory.load(UInt64.self, at: info + 24)
        #expect(try memory.readBytes(at: commandLine, count: 14) == Array("console=ttyS0".utf8) + [0])
        #expect(try memory.load(UInt64.self, at: info + 32) == 0) // no RSDP
        let mapAddress = try memory.load(UInt64.self, at: info + 40)
        let mapCount = try memory.load(UInt32.self, at: info + 48)
        #expect(mapCount == 4)
        var map: [String] = []
        for i in 0..<UInt64(mapCount) {
            let base = mapAddress + i * 24
            map.append("\(String(try memory.load(UInt64.self, at: base), radix: 16)):\(String(try memory.load(UInt64.self, at: base + 8), radix: 16)):\(try memory.load(UInt32.self, at: base + 16))")
        }
        #expect(map == ["0:a0000:1", "a0000:60000:2", "100000:1f00000:1", "fec00000:1400000:2"])
        let moduleAddress = try memory.load(UInt64.self, at: moduleList)
        #expect(try memory.load(UInt64.self, at: moduleList + 8) == 5000)
        #expect(moduleAddress % 4096 == 0 && moduleAddress + 5000 <= 32 << 20)
        #expect(try memory.readBytes(at: moduleAddress, count: 5000) == initrd)
        // The boot GDT has the selectors the segments use.
        #expect(try memory.load(UInt64.self, at: BootGDT.address + UInt64(BootGDT.code32Selector)) == 0x00CF_9B00_0000_FFFF)
    }

    @Test("hostile and broken files are refused with the structure and offset named")
    func hostileFiles() throws {
        let good = TinyELF.make(code: [0xF4])
        #expect(throws: BootError.notELF(file: "k.elf")) { _ = try load([0x7F, 0x45, 0x4C]) }
        #expect(throws: BootError.notELF(file: "k.elf")) { _ = try load(Array("#!/bin/sh\n".utf8) + good) }
        #expect(throws: BootError.noPVHEntry(file: "k.elf")) { _ = try load(TinyELF.make(code: [0xF4], withNote: false)) }
        // Truncated: the program headers cut off.
        #expect(throws: BootError.self) { _ = try load(Array(good.prefix(80))) }
        // A segment whose file range runs past the end of the file.
        var pastEnd = good
        pastEnd[96] = 0xFF; pastEnd[97] = 0xFF // p_filesz = 0xFFFF
        pastEnd[104] = 0xFF; pastEnd[105] = 0xFF
        #expect(throws: BootError.self) { _ = try load(pastEnd) }
        // A program-header count far beyond what exists.
        var manyHeaders = good
        manyHeaders[56] = 0xFF; manyHeaders[57] = 0xFF
        #expect(throws: BootError.self) { _ = try load(manyHeaders) }
        // Class byte neither 32 nor 64 bit; big-endian.
        var badClass = good; badClass[4] = 9
        #expect(throws: BootError.self) { _ = try load(badClass) }
        var bigEndian = good; bigEndian[5] = 2
        #expect(throws: BootError.self) { _ = try load(bigEndian) }
    }

    @Test("segments and entry points outside RAM, and oversized command lines, are refused")
    func outsideRAM() throws {
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4], loadAddress: 64 << 20)) }
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4], loadAddress: 0xD000_0000)) }
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4], loadAddress: 0x100000, entry: 0xFFFF_F000)) }
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4], loadAddress: 0x6100)) } // over the start info
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4], loadAddress: 0x500)) }  // over the GDT
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4], loadAddress: 0x2FFF0)) } // over the command line
        _ = try load(TinyELF.make(code: [0xF4], loadAddress: 0x1000)) // low, but clear of every table
        let longLine = String(repeating: "x", count: PVHLoader.maximumCommandLine + 1)
        #expect(throws: BootError.commandLineTooLong(length: longLine.utf8.count, maximum: PVHLoader.maximumCommandLine)) {
            _ = try load(TinyELF.make(code: [0xF4]), commandLine: longLine)
        }
        let hugeInitrd = [UInt8](repeating: 0, count: 32 << 20)
        #expect(throws: BootError.self) { _ = try load(TinyELF.make(code: [0xF4]), initrd: hugeInitrd) }
    }

    @Test("the PVH entry note is read in its 4- and 8-byte forms")
    func noteForms() throws {
        let image = try ELFImage(bytes: TinyELF.make(code: [0xF4], entry: 0x100000), name: "k")
        #expect(image.pvhEntry == 0x100000)
        #expect(image.is64Bit && image.machine == 62)
        #expect(image.loadSegments.count == 1)
    }

    @Test("flat binaries start in real mode at their load segment; bad addresses are refused")
    func flatBinary() throws {
        let state = try FlatBinaryLoader.load(image: [0xF4], name: "f", at: 0x10000, into: memory)
        let sregs = state.specialRegisters(from: SpecialRegisters())
        #expect(sregs.cs.selector == 0x1000 && sregs.cs.base == 0x10000 && state.registers.rip == 0)
        #expect(throws: BootError.self) { _ = try FlatBinaryLoader.load(image: [0xF4], name: "f", at: 0x10008, into: memory) }
        #expect(throws: BootError.self) { _ = try FlatBinaryLoader.load(image: [0xF4], name: "f", at: 0x100000, into: memory) }
        #expect(throws: BootError.self) { _ = try FlatBinaryLoader.load(image: [], name: "f", at: 0x10000, into: memory) }
    }

    @Test("image files: missing, directory and size limit give named errors")
    func imageFiles() throws {
        #expect(throws: BootError.cannotRead(file: "/nonexistent/k", errno: 2)) { _ = try ImageFile.read("/nonexistent/k") }
        #expect(throws: BootError.cannotRead(file: "/tmp", errno: 21)) { _ = try ImageFile.read("/tmp") }
        #expect(throws: BootError.self) { _ = try ImageFile.read("/proc/self/exe", limit: 16) }
        #expect(try ImageFile.read("/proc/self/exe").prefix(4) == [0x7F, 0x45, 0x4C, 0x46])
    }
}
