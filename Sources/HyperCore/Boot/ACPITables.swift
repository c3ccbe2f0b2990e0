/// A minimal set of ACPI tables: RSDP → XSDT → FADT (hardware-reduced) + MADT, and a DSDT with
/// the power button (see ``ACPIPower``).
///
/// Kernels built without `CONFIG_X86_MPPARSE` (Debian's among them) learn their CPUs and IOAPIC
/// only from the MADT, so without these tables they boot one CPU whatever `--cpus` says. The
/// FADT declares a hardware-reduced platform (no PM timer, SCI or fixed-feature registers, as
/// Firecracker does) with an i8042 present and sleep control/status registers, and the DSDT holds the
/// power button, its Generic Event Device and `\_S5`. The tables live in the
/// BIOS area at 0xE0000, which the e820 map reports as reserved; the RSDP is found there by the
/// kernel's legacy scan, through `hvm_start_info.rsdp_paddr` (PVH) or `boot_params.acpi_rsdp_addr`
/// (bzImage, protocol 2.14+).
public enum ACPITables {
    public static let rsdpAddress: UInt64 = 0xE0000
    static let xsdtAddress: UInt64 = 0xE0040
    static let fadtAddress: UInt64 = 0xE0100
    static let dsdtAddress: UInt64 = 0xE0300
    static let madtAddress: UInt64 = 0xE0400
    /// Bytes from ``rsdpAddress`` the tables may use.
    public static let regionSize: UInt64 = 0x1000

    static let oemID = Array("HYPRCR".utf8)       // 6 bytes
    static let oemTableID = Array("HYPERCOR".utf8) // 8 bytes
    static let creatorID = Array("HCVM".utf8)     // 4 bytes

    /// Table → bytes, keyed by guest address.
    public static func build(cpuCount: Int) -> [(address: UInt64, bytes: [UInt8])] {
        [
            (rsdpAddress, rsdp()),
            (xsdtAddress, xsdt(entries: [fadtAddress, madtAddress])),
            (fadtAddress, fadt()),
            (dsdtAddress, table(signature: "DSDT", revision: 2, body: dsdtBody())),
            (madtAddress, madt(cpuCount: cpuCount)),
        ]
    }

    public static func write(cpuCount: Int, into memory: GuestMemory) throws(GuestMemoryError) {
        for (address, bytes) in build(cpuCount: cpuCount) {
            try memory.write(at: address, bytes: bytes)
        }
    }

    /// The ACPI 2.0+ root pointer: both checksums, RSDT left 0 (the XSDT is used).
    static func rsdp() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 36)
        bytes.replaceSubrange(0..<8, with: Array("RSD PTR ".utf8))
        bytes.replaceSubrange(9..<15, with: oemID)
        bytes[15] = 2                          // revision: ACPI 2.0+
        bytes.put(UInt32(36), at: 20)          // length
        bytes.put(xsdtAddress, at: 24)
        bytes[8] = MPTable.checksum(Array(bytes[0..<20]))
        bytes[32] = MPTable.checksum(bytes)
        return bytes
    }

    static func xsdt(entries: [UInt64]) -> [UInt8] {
        var body: [UInt8] = []
        for entry in entries {
            var word = [UInt8](repeating: 0, count: 8)
            word.put(entry, at: 0)
            body += word
        }
        return table(signature: "XSDT", revision: 1, body: body)
    }

    /// FADT, revision 6 (ACPI 6.x layout, 276 bytes).
    static func fadt() -> [UInt8] {
        var body = [UInt8](repeating: 0, count: 276 - 36)
        func put<T: FixedWidthInteger>(_ value: T, _ offset: Int) { body.put(value, at: offset - 36) }
        put(UInt32(dsdtAddress), 40)                 // DSDT
        // IAPC_BOOT_ARCH: 8042 present (bit 1), VGA not present (bit 2), MSI not supported
        // (bit 3) is left clear, ASPM controls absent (bit 4).
        put(UInt16((1 << 1) | (1 << 2) | (1 << 4)), 109)
        // Flags: WBINVD (0), PWR_BUTTON (4) and SLP_BUTTON (5) as control-method/absent,
        // HW_REDUCED_ACPI (20).
        put(UInt32((1 << 0) | (1 << 4) | (1 << 5) | (1 << 20)), 112)
        put(UInt8(1), 131)                           // FADT minor version (6.1)
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG: a hardware-reduced platform's way to power off
        // (the ACPIPower device), as Generic Address Structures in system I/O space, byte access.
        for (offset, register) in [(244, ACPIPower.sleepControlOffset), (256, ACPIPower.sleepStatusOffset)] {
            put(UInt8(1), offset)                    // address space: system I/O
            put(UInt8(8), offset + 1)                // register bit width
            put(UInt8(0), offset + 2)                // bit offset
            put(UInt8(1), offset + 3)                // access size: byte
            put(ACPIPower.port + register, offset + 4)
        }
        put(dsdtAddress, 140)                        // X_DSDT
        body.replaceSubrange((268 - 36)..<(276 - 36), with: Array("HYPRCORE".utf8)) // hypervisor vendor identity
        return table(signature: "FACP", revision: 6, body: body)
    }

    /// The DSDT's AML: `\_S5` (soft off: SLP_TYP 5), the power button `\_SB.PWRB` (PNP0C0C), and
    /// the Generic Event Device `\_SB.GED0` (ACPI0013) whose edge interrupt on ``ACPIPower/gsi``
    /// runs `_EVT`: read the event register (reading clears it), and on bit 0 notify the power
    /// button (0x80: "pressed"). See ``ACPIPower``.
    static func dsdtBody() -> [UInt8] {
        let eventPort = ACPIPower.port + ACPIPower.eventOffset
        return AML.nameTerm("_S5", AML.packageTerm([AML.integer(UInt64(ACPIPower.softOffType)), AML.integer(0)]))
            + AML.scope([0x5C] + AML.name("_SB"), [
                AML.device("PWRB", [AML.nameTerm("_HID", AML.eisaID("PNP0C0C"))]),
                AML.device("GED0", [
                    AML.nameTerm("_HID", AML.string("ACPI0013")),
                    AML.nameTerm("_UID", AML.integer(0)),
                    AML.nameTerm("_CRS", AML.edgeInterruptResource(gsi: ACPIPower.gsi)),
                    AML.systemIORegion("EREG", port: eventPort, length: 1),
                    AML.byteField(region: "EREG", field: "EVT"),
                    AML.method("_EVT", arguments: 1, [
                        AML.storeToLocal0(AML.name("EVT")),
                        AML.ifLocal0Has(UInt64(ACPIPower.powerButtonEvent), [AML.notify("PWRB", 0x80)]),
                    ]),
                ]),
            ])
    }

    /// MADT: one enabled LAPIC per vCPU (processor UID = APIC ID = vCPU index), the IOAPIC at
    /// GSI base 0 (ISA IRQs identity-mapped, so no source overrides), and LINT1 as NMI on all CPUs.
    static func madt(cpuCount: Int) -> [UInt8] {
        var body = [UInt8](repeating: 0, count: 8)
        body.put(UInt32(GuestLayout.lapicBase), at: 0)
        body.put(UInt32(1), at: 4)                   // PCAT_COMPAT: 8259 PICs present
        for cpu in 0..<cpuCount {
            var entry: [UInt8] = [0, 8, UInt8(cpu), UInt8(cpu), 0, 0, 0, 0]
            entry.put(UInt32(1), at: 4)              // enabled
            body += entry
        }
        var ioapic: [UInt8] = [1, 12, MPTable.ioAPICID(cpuCount: cpuCount), 0, 0, 0, 0, 0, 0, 0, 0, 0]
        ioapic.put(UInt32(GuestLayout.ioapicBase), at: 4)
        ioapic.put(UInt32(0), at: 8)                 // GSI base
        body += ioapic
        body += [4, 6, 0xFF, 0, 0, 1]                // LAPIC NMI: all processors, flags 0, LINT1
        return table(signature: "APIC", revision: 5, body: body)
    }

    /// A system description table: the 36-byte header, then `body`, with the checksum set.
    static func table(signature: String, revision: UInt8, body: [UInt8]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 36)
        bytes.replaceSubrange(0..<4, with: Array(signature.utf8))
        bytes.put(UInt32(36 + body.count), at: 4)
        bytes[8] = revision
        bytes.replaceSubrange(10..<16, with: oemID)
        bytes.replaceSubrange(16..<24, with: oemTableID)
        bytes.put(UInt32(1), at: 24)                 // OEM revision
        bytes.replaceSubrange(28..<32, with: creatorID)
        bytes.put(UInt32(1), at: 32)                 // creator revision
        bytes += body
        bytes[9] = MPTable.checksum(bytes)
        return bytes
    }
}
