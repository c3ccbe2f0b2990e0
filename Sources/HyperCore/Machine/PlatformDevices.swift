/// The PC platform pieces every machine gets beyond the UART, keyboard controller and debug exit:
/// the CMOS RTC, the optional boot timer, and the firmware tables (MP table, ACPI) a kernel reads to
/// find its CPUs and interrupt routing. Kept here so `Machine` only calls in.
enum PlatformDevices {
    static func register(ports: inout BusBuilder, mmio: inout BusBuilder,
                         configuration: MachineConfiguration) throws(BusError) {
        try ports.register(CMOSRTC(memorySize: configuration.memorySize), at: CMOSRTC.port, size: 2)
        if let timer = configuration.bootTimer {
            try ports.register(timer, at: BootTimer.port, size: 1)
            try mmio.register(timer, at: BootTimer.mmioAddress, size: 0x1000)
        }
    }

    /// The RSDP address to hand the kernel, or 0 without ACPI.
    static func rsdp(_ configuration: MachineConfiguration) -> UInt64 {
        configuration.acpi ? ACPITables.rsdpAddress : 0
    }

    /// Writes the MP table and the ACPI tables (all boot paths: Linux via bzImage or PVH, and the test guests). It
    /// sits in the BIOS area, which no loader uses, and is written before the kernel is loaded so
    /// that a flat image placed over it wins.
    static func writeFirmwareTables(configuration: MachineConfiguration, cpuid: CPUIDTable,
                                    into memory: GuestMemory) throws(BootError) {
        try PVHLoader.fitting("MP table") { () throws(GuestMemoryError) in
            try MPTable.write(cpuCount: configuration.cpuCount, cpuid: cpuid, into: memory)
            if configuration.acpi { try ACPITables.write(cpuCount: configuration.cpuCount, into: memory) }
        }
    }
}
