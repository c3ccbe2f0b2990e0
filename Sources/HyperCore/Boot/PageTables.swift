/// Identity-mapped long-mode page tables for entering a 64-bit kernel directly.
///
/// Linux's 64-bit boot protocol requires paging on with the loaded kernel, the zero page and the
/// command line identity mapped. The startup code replaces these tables early, so they only need to
/// cover low memory; 4 GiB is mapped so that the LAPIC/IOAPIC and a kernel loaded anywhere below
/// 4 GiB are reachable too. 2 MiB pages only: 1 GiB pages need PDPE1GB, which not every host
/// exposes (on PVM-nested KVM they take a reserved-bit page fault).
public enum PageTables {
    /// PML4 at `root`, one PDPT after it, then one page directory per GiB mapped.
    public static let defaultRoot: UInt64 = 0x9000
    public static let mappedGiB = 4

    /// Bytes the tables occupy from `root`.
    public static var size: UInt64 { UInt64(2 + mappedGiB) * 0x1000 }

    /// Page-table entry bits: present, writable; PS (2 MiB page) in page-directory entries.
    static let present: UInt64 = 1 << 0
    static let writable: UInt64 = 1 << 1
    static let largePage: UInt64 = 1 << 7

    /// Writes the tables and returns the value for CR3.
    @discardableResult
    public static func writeIdentityMap(at root: UInt64 = defaultRoot, into memory: GuestMemory) throws(GuestMemoryError) -> UInt64 {
        let pdpt = root + 0x1000
        try memory.zero(at: root, count: Int(size))
        try memory.store(pdpt | present | writable, at: root)
        for gib in 0..<UInt64(mappedGiB) {
            let directory = pdpt + 0x1000 * (gib + 1)
            try memory.store(directory | present | writable, at: pdpt + gib * 8)
            for entry in 0..<UInt64(512) {
                let physical = (gib << 30) | (entry << 21)
                try memory.store(physical | present | writable | largePage, at: directory + entry * 8)
            }
        }
        return root
    }
}
