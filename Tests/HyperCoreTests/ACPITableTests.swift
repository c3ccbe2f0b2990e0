import Testing
@testable import HyperCore

/// The ACPI tables parsed back from guest memory and checked against the ACPI 6 layouts.
@Suite("ACPI tables")
struct ACPITableTests {
    static func sumsToZero(_ bytes: ArraySlice<UInt8>) -> Bool { bytes.reduce(UInt8(0), &+) == 0 }

    /// Reads a system description table at `address`: signature, whole bytes (length from the header).
    static func table(_ memory: GuestMemory, _ address: UInt64) throws -> (signature: String, bytes: [UInt8]) {
        let header = try memory.readBytes(at: address, count: 36)
        let length = Int(header.u32(4))
        let bytes = try memory.readBytes(at: address, count: length)
        return (String(decoding: header[0..<4], as: UTF8.self), bytes)
    }

    @Test("RSDP → XSDT → FADT (→ DSDT) and MADT, all checksummed", arguments: [1, 4, 64])
    func tables(cpus: Int) throws {
        let memory = try GuestMemory(size: 32 << 20)
        try ACPITables.write(cpuCount: cpus, into: memory)

        let rsdp = try memory.readBytes(at: ACPITables.rsdpAddress, count: 36)
        #expect(Array(rsdp[0..<8]) == Array("RSD PTR ".utf8))
        #expect(Self.sumsToZero(rsdp[0..<20]))
        #expect(Self.sumsToZero(rsdp[0..<36]))
        #expect(rsdp[15] == 2)
        #expect(rsdp.u32(20) == 36)
        #expect(ACPITables.rsdpAddress % 16 == 0 && (0xE0000..<0x100000).contains(ACPITables.rsdpAddress))

        let xsdt = try Self.table(memory, rsdp.u64(24))
        #expect(xsdt.signature == "XSDT")
        #expect(Self.sumsToZero(xsdt.bytes[...]))
        let pointers = stride(from: 36, to: xsdt.bytes.count, by: 8).map { xsdt.bytes.u64($0) }
        let tables = try pointers.map { try Self.table(memory, $0) }
        #expect(tables.map(\.signature) == ["FACP", "APIC"])
        for table in tables { #expect(Self.sumsToZero(table.bytes[...]), "\(table.signature) checksum") }

        let fadt = tables[0].bytes
        #expect(fadt.count == 276)
        #expect(fadt[8] == 6)
        #expect(fadt.u32(112) & (1 << 20) != 0, "HW_REDUCED_ACPI")
        #expect(fadt.u16(109) & (1 << 1) != 0, "8042 present")
        let dsdtAddress = fadt.u64(140)
        #expect(UInt64(fadt.u32(40)) == dsdtAddress)
        let dsdt = try Self.table(memory, dsdtAddress)
        #expect(dsdt.signature == "DSDT" && Self.sumsToZero(dsdt.bytes[...]))
        #expect(dsdtAddress + UInt64(dsdt.bytes.count) <= 0xE0400, "the DSDT ends before the MADT")
        // The power-off registers: system I/O, byte wide, at the ACPIPower device.
        for (offset, register) in [(244, ACPIPower.sleepControlOffset), (256, ACPIPower.sleepStatusOffset)] {
            #expect(fadt[offset] == 1 && fadt[offset + 1] == 8 && fadt[offset + 3] == 1)
            #expect(fadt.u64(offset + 4) == ACPIPower.port + register)
        }

        let madt = tables[1].bytes
        #expect(madt.u32(36) == 0xFEE0_0000)
        #expect(madt.u32(40) & 1 == 1) // PCAT_COMPAT
        var offset = 44
        var lapics: [(uid: UInt8, id: UInt8, flags: UInt32)] = []
        var ioapics: [(id: UInt8, address: UInt32, gsiBase: UInt32)] = []
        var nmis: [(uid: UInt8, lint: UInt8)] = []
        while offset < madt.count {
            let type = madt[offset], length = Int(madt[offset + 1])
            switch type {
            case 0: lapics.append((madt[offset + 2], madt[offset + 3], madt.u32(offset + 4)))
            case 1: ioapics.append((madt[offset + 2], madt.u32(offset + 4), madt.u32(offset + 8)))
            case 4: nmis.append((madt[offset + 2], madt[offset + 5]))
            default: Issue.record("unexpected MADT entry type \(type)")
            }
            #expect(length > 0)
            offset += max(length, 1)
        }
        #expect(offset == madt.count)
        #expect(lapics.map(\.id) == (0..<cpus).map { UInt8($0) })
        #expect(lapics.map(\.uid) == (0..<cpus).map { UInt8($0) })
        #expect(lapics.allSatisfy { $0.flags == 1 })
        #expect(ioapics.count == 1)
        #expect(ioapics.first?.address == 0xFEC0_0000 && ioapics.first?.gsiBase == 0)
        #expect(ioapics.first?.id == UInt8(cpus))
        #expect(nmis.count == 1 && nmis.first?.uid == 0xFF && nmis.first?.lint == 1)
        // Everything stays inside the reserved BIOS area.
        #expect(pointers.allSatisfy { $0 >= 0xE0000 && $0 < 0xE0000 + ACPITables.regionSize })
    }

    /// The DSDT's AML, disassembled by ACPICA's `iasl` (the compiler Linux's own ACPI code comes
    /// from): it must parse, and say what the power button needs.
    @Test("the DSDT's AML disassembles with iasl into the power button, its GED and \\_S5")
    func amlDisassembles() throws {
        guard TestHost.hasTool("iasl") else {
            print("skipped: iasl is not installed (apt-get install acpica-tools)")
            return
        }
        let directory = try TemporaryDirectory()
        let dsdt = try #require(ACPITables.build(cpuCount: 1).first { Array($0.bytes.prefix(4)) == Array("DSDT".utf8) }?.bytes)
        let path = directory.path + "/dsdt.aml"
        let file = try DiskFile(creating: path, overwrite: true)
        try file.write(dsdt, at: 0)
        let result = try Subprocess.run("/usr/bin/env", ["iasl", "-d", path], timeoutSeconds: 30)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        let text = String(decoding: fileBytes(directory.path + "/dsdt.dsl"), as: UTF8.self)
        for needle in ["Name (_S5, Package", "Device (PWRB)", "EisaId (\"PNP0C0C\")", "Device (GED0)", "\"ACPI0013\"",
                       "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive", "0x00000003",
                       "OperationRegion (EREG, SystemIO, 0x0602, One)", "Method (_EVT, 1, Serialized)", "Notify (PWRB, 0x80)"] {
            #expect(text.contains(needle), "missing \(needle) in:\n\(text)")
        }
    }
}
