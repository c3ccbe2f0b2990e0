/// The guest's physical memory map, as reported to the guest in PVH's `hvm_start_info` and in
/// the Linux zero page's e820 table (the same type codes serve both).
public struct MemoryMapEntry: Sendable, Equatable {
    public enum Kind: UInt32, Sendable {
        case ram = 1
        case reserved = 2
        case acpiReclaimable = 3
        case acpiNVS = 4
        case unusable = 5
    }

    public var address: UInt64
    public var size: UInt64
    public var kind: Kind

    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address
        self.size = size
        self.kind = kind
    }

    /// The map for `memory`: low RAM below the legacy VGA/BIOS hole, that hole reserved, RAM up to
    /// the 32-bit MMIO hole, the interrupt controllers and KVM's private pages reserved, then RAM
    /// above 4 GiB. The PCI/virtio window in the hole is deliberately absent: it is neither RAM
    /// nor firmware-reserved, so the guest may use it for device BARs.
    public static func standard(for memory: GuestMemory) -> [MemoryMapEntry] {
        var entries: [MemoryMapEntry] = []
        for region in memory.regions {
            if region.guestAddress == 0 {
                let legacyEnd = min(region.size, GuestLayout.legacyHoleStart)
                entries.append(MemoryMapEntry(address: 0, size: legacyEnd, kind: .ram))
                if region.size > GuestLayout.legacyHoleEnd {
                    entries.append(MemoryMapEntry(address: GuestLayout.legacyHoleStart,
                                                  size: GuestLayout.legacyHoleEnd - GuestLayout.legacyHoleStart, kind: .reserved))
                    entries.append(MemoryMapEntry(address: GuestLayout.legacyHoleEnd,
                                                  size: region.size - GuestLayout.legacyHoleEnd, kind: .ram))
                }
            } else {
                entries.append(MemoryMapEntry(address: region.guestAddress, size: region.size, kind: .ram))
            }
        }
        let systemStart = GuestLayout.ioapicBase
        entries.append(MemoryMapEntry(address: systemStart, size: GuestLayout.fourGiB - systemStart, kind: .reserved))
        return entries.sorted { $0.address < $1.address }
    }
}
