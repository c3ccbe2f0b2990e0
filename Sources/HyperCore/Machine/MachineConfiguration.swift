/// Everything needed to assemble a ``Machine``. A value: build it, then hand it over.
public struct MachineConfiguration: Sendable {
    /// What the boot vCPU starts running.
    public enum Boot: Sendable {
        /// An ELF kernel entered through its PVH note; `initrd` becomes PVH module 0.
        case pvh(kernel: [UInt8], kernelName: String, initrd: [UInt8]?, commandLine: String)
        /// A Linux bzImage entered through the 64-bit boot protocol (zero page, e820, initrd).
        case linux(kernel: [UInt8], kernelName: String, initrd: [UInt8]?, commandLine: String)
        /// A raw binary started in real mode at `loadAddress` (below 1 MiB).
        case flat(image: [UInt8], name: String, loadAddress: UInt64)
        /// A loader supplied by the caller (tests, other image formats): it fills guest memory and
        /// returns the boot vCPU's state.
        case custom(name: String, load: @Sendable (GuestMemory) throws(BootError) -> BootState)
    }

    /// A device the caller registers on a bus (tests, embedders).
    public struct DeviceMapping: Sendable {
        public let base: UInt64
        public let size: UInt64
        public let device: any BusDevice
        public init(base: UInt64, size: UInt64, device: any BusDevice) {
            self.base = base
            self.size = size
            self.device = device
        }
    }

    public var boot: Boot
    /// Guest RAM in bytes (default 256 MiB).
    public var memorySize: UInt64 = 256 << 20
    /// Number of vCPUs; vCPU 0 boots, the others wait for INIT/SIPI from the guest.
    public var cpuCount: Int = 1
    /// Where the COM1 UART's output goes.
    public var console: any ConsoleOutput = FileDescriptorOutput.standardOutput
    /// The in-kernel PIC/IOAPIC/LAPIC and PIT. Without it, HLT exits to the VMM and ends the run.
    public var inKernelIRQChip = true
    /// Extra devices on the port-I/O bus.
    public var portDevices: [DeviceMapping] = []
    /// Extra devices on the MMIO bus.
    public var mmioDevices: [DeviceMapping] = []
    /// virtio devices (PCI or MMIO transport), in order: PCI slot 1 up, MMIO from 0xD0000000 up.
    public var virtioDevices: [VirtioDeviceConfiguration] = []
    /// CPUID changes applied to every vCPU's table after KVM's supported set is fetched.
    public var cpuidPolicy: (@Sendable (inout CPUIDTable) -> Void)?
    /// Whether to give the guest ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) besides the MP table.
    public var acpi = true
    /// Boot-time milestones (first serial byte, kernel banner, init's ready marker), when set.
    public var bootTimer: BootTimer?
    /// The KVM device node.
    public var kvmPath = "/dev/kvm"

    public init(boot: Boot) { self.boot = boot }

    /// The largest vCPU count accepted (the MP table and APIC ID space used here).
    public static let maximumCPUs = 64
}
