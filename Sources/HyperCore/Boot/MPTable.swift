/// An Intel MultiProcessor Specification 1.4 table: the floating pointer structure and the
/// configuration table describing the CPUs (one LAPIC each), the ISA bus, the IOAPIC and how the
/// ISA interrupts reach it.
///
/// Kernels built with `CONFIG_X86_MPPARSE` find it by scanning the BIOS ROM area
/// (0xF0000–0xFFFFF), which the e820 map reports as reserved, so the table is never mistaken for
/// free RAM. Kernels without ACPI use it to learn the CPU count; the test guests use it too.
public enum MPTable {
    /// The floating pointer goes at the start of the BIOS ROM area; the configuration table follows it.
    public static let defaultAddress: UInt64 = 0xF0000

    public static let floatingPointerSignature = Array("_MP_".utf8)
    public static let configurationSignature = Array("PCMP".utf8)
    public static let specificationRevision: UInt8 = 4 // MP spec 1.4
    public static let oemID = Array("HYPRCORE".utf8)            // 8 bytes
    public static let productID = Array("HyperCore VM".utf8)    // 12 bytes
    /// The LAPIC version KVM's in-kernel LAPIC reports (an integrated xAPIC).
    public static let localAPICVersion: UInt8 = 0x14
    /// The version register of KVM's in-kernel IOAPIC.
    public static let ioAPICVersion: UInt8 = 0x11
    /// ISA IRQs routed through the IOAPIC (pins 0–15, identity, as KVM's default GSI routing does).
    public static let isaIRQCount = 16

    public enum EntryType: UInt8 {
        case processor = 0, bus = 1, ioAPIC = 2, ioInterrupt = 3, localInterrupt = 4
    }

    public enum InterruptType: UInt8 {
        case vectored = 0, nmi = 1, smi = 2, extINT = 3
    }

    /// The IOAPIC's ID: the first one after the CPUs' LAPIC IDs (0…count−1), so the two never clash.
    public static func ioAPICID(cpuCount: Int) -> UInt8 { UInt8(min(cpuCount, 254)) }

    /// The bytes to place at `address`: the 16-byte floating pointer, then the configuration table.
    /// `cpuSignature` and `featureFlags` are CPUID leaf 1 EAX and EDX (the spec's processor entry fields).
    public static func build(cpuCount: Int, address: UInt64 = defaultAddress,
                             cpuSignature: UInt32 = 0x600, featureFlags: UInt32 = 0x201) -> [UInt8] {
        let tableAddress = address + 16
        var table: [UInt8] = []
        var entryCount = 0
        func append(_ bytes: [UInt8]) { table += bytes; entryCount += 1 }

        for cpu in 0..<cpuCount {
            var entry = [UInt8](repeating: 0, count: 20)
            entry[0] = EntryType.processor.rawValue
            entry[1] = UInt8(cpu)                        // LAPIC ID = vCPU index (CPUIDTable.forVCPU)
            entry[2] = localAPICVersion
            entry[3] = 0x01 | (cpu == 0 ? 0x02 : 0)      // EN; BP for the boot processor
            entry.put(cpuSignature, at: 4)
            entry.put(featureFlags, at: 8)
            append(entry)
        }
        append([EntryType.bus.rawValue, 0] + Array("ISA   ".utf8))
        let ioapic = ioAPICID(cpuCount: cpuCount)
        var ioapicEntry: [UInt8] = [EntryType.ioAPIC.rawValue, ioapic, ioAPICVersion, 0x01, 0, 0, 0, 0]
        ioapicEntry.put(UInt32(GuestLayout.ioapicBase), at: 4)
        append(ioapicEntry)
        // ISA IRQ n → IOAPIC pin n, polarity and trigger "conforms to the bus" (edge, active high).
        for irq in 0..<UInt8(isaIRQCount) {
            append([EntryType.ioInterrupt.rawValue, InterruptType.vectored.rawValue, 0, 0, 0, irq, ioapic, irq])
        }
        // Virtual-wire mode: the PIC reaches every LAPIC's LINT0 as ExtINT, NMI comes in on LINT1.
        append([EntryType.localInterrupt.rawValue, InterruptType.extINT.rawValue, 0, 0, 0, 0, 0xFF, 0])
        append([EntryType.localInterrupt.rawValue, InterruptType.nmi.rawValue, 0, 0, 0, 0, 0xFF, 1])

        var header = [UInt8](repeating: 0, count: 44)
        header.replaceSubrange(0..<4, with: configurationSignature)
        header.put(UInt16(44 + table.count), at: 4)
        header[6] = specificationRevision
        header.replaceSubrange(8..<16, with: oemID)
        header.replaceSubrange(16..<28, with: productID)
        header.put(UInt16(entryCount), at: 34)
        header.put(UInt32(GuestLayout.lapicBase), at: 36)
        var configuration = header + table
        configuration[7] = checksum(configuration)

        var pointer = [UInt8](repeating: 0, count: 16)
        pointer.replaceSubrange(0..<4, with: floatingPointerSignature)
        pointer.put(UInt32(tableAddress), at: 4)
        pointer[8] = 1                       // length in 16-byte units
        pointer[9] = specificationRevision
        // Feature byte 1 = 0: a configuration table is present (no default configuration);
        // feature byte 2 bit 7 (IMCR) = 0: virtual-wire mode, no IMCR to program.
        pointer[10] = checksum(pointer)
        return pointer + configuration
    }

    /// The byte that makes `bytes` sum to zero modulo 256.
    public static func checksum(_ bytes: [UInt8]) -> UInt8 {
        UInt8(truncatingIfNeeded: 0 &- bytes.reduce(UInt8(0)) { $0 &+ $1 })
    }

    /// Writes the table for `cpuCount` CPUs at ``defaultAddress``.
    public static func write(cpuCount: Int, cpuid: CPUIDTable? = nil, into memory: GuestMemory) throws(GuestMemoryError) {
        let leaf1 = cpuid?.entry(function: 1)
        let bytes = build(cpuCount: cpuCount, cpuSignature: leaf1?.eax ?? 0x600, featureFlags: leaf1?.edx ?? 0x201)
        try memory.write(at: defaultAddress, bytes: bytes)
    }
}

extension [UInt8] {
    /// Stores `value` little-endian at `offset` (the array must be long enough).
    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for index in 0..<(T.bitWidth / 8) {
            self[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * index))
        }
    }
}
