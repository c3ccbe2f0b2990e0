#if canImport(Glibc)
internal import Glibc
#elseif canImport(Musl)
internal import Musl
#endif

/// The guest's RAM: anonymous mappings in this process, each registered with KVM as one memory slot.
///
/// Every translation from a guest-physical address to a host pointer goes through
/// ``pointer(at:count:)``, which checks that the whole range lies inside one region. Device models,
/// boot loaders and the virtqueue walker use only these checked accessors, so a guest-supplied
/// address can never make the VMM read or write outside the guest's memory.
///
/// Layout: RAM starts at guest-physical 0 and stops at the 32-bit MMIO hole
/// (``GuestLayout/mmioHoleStart`` up to 4 GiB, where the IOAPIC, LAPIC and device BARs live); the
/// rest of the RAM continues at 4 GiB.
///
/// Thread safety: the regions are fixed at creation, so translation needs no lock. Concurrent
/// accesses to the same guest bytes race exactly as they would on hardware; callers that need
/// ordering (virtqueues) use explicit fences.
public final class GuestMemory: @unchecked Sendable {
    public struct Region: Sendable, Equatable {
        /// First guest-physical address of the region.
        public let guestAddress: UInt64
        public let size: UInt64
        /// The KVM memory slot number.
        public let slot: UInt32
        /// Host virtual address of the mapping, as an integer (pointers are not Sendable).
        public let hostAddress: UInt
        /// Where the region's bytes sit in a snapshot's memory file: regions back to back, in order.
        public let fileOffset: UInt64

        public var guestEnd: UInt64 { guestAddress + size }
        public func contains(_ address: UInt64) -> Bool { address >= guestAddress && address < guestEnd }
    }

    public let regions: [Region]
    /// Total RAM in bytes.
    public let size: UInt64
    /// The snapshot memory file the RAM is a private (copy-on-write) mapping of, when the machine
    /// was restored lazily; nil for anonymous RAM. Kept open: a later snapshot reads the pages the
    /// guest has not touched since from it.
    public let backingFile: Int32?
    /// Pages the VMM writes while a migration tracks dirty pages (see ``VMMWriteLog``).
    public let vmmWrites: VMMWriteLog

    /// Maps `size` bytes of RAM, split around the MMIO hole: anonymous memory, or with `file` a
    /// private mapping of a snapshot's memory file (pages load on first touch; the file is never
    /// written). The memory takes ownership of `file`.
    ///
    /// - Parameter size: at least 1 MiB and a multiple of 4 KiB.
    public init(size: UInt64, mapping file: Int32? = nil) throws(GuestMemoryError) {
        guard size >= 1 << 20, size % 4096 == 0 else { throw .invalidSize(size) }
        guard size <= GuestLayout.maximumRAM else { throw .invalidSize(size) }
        var regions: [Region] = []
        var slot: UInt32 = 0
        var fileOffset: UInt64 = 0
        for (start, length) in GuestLayout.ramRanges(size: size) {
            // MAP_NORESERVE: a large guest costs only the pages it touches.
            let mapping = if let file {
                mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, file, off_t(fileOffset))
            } else {
                mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            }
            guard let mapping, mapping != MAP_FAILED else {
                let code = errno
                for region in regions { munmap(UnsafeMutableRawPointer(bitPattern: region.hostAddress), Int(region.size)) }
                if let file { close(file) }
                throw .mapFailed(size: length, errno: code)
            }
            regions.append(Region(guestAddress: start, size: length, slot: slot,
                                  hostAddress: UInt(bitPattern: mapping), fileOffset: fileOffset))
            slot += 1
            fileOffset += length
        }
        self.regions = regions
        self.size = size
        vmmWrites = VMMWriteLog(pageCount: Int((regions.last.map(\.guestEnd) ?? 0) >> 12))
        backingFile = file
    }

    deinit {
        for region in regions {
            munmap(UnsafeMutableRawPointer(bitPattern: region.hostAddress), Int(region.size))
        }
        if let backingFile { close(backingFile) }
    }

    // MARK: Translation

    /// The host pointer for `count` bytes at guest-physical `address`, or nil when any byte of the
    /// range is outside RAM (in the MMIO hole, past the end, or straddling two regions).
    @inlinable
    public func pointer(at address: UInt64, count: Int) -> UnsafeMutableRawPointer? {
        guard count >= 0 else { return nil }
        let (end, overflow) = address.addingReportingOverflow(UInt64(count))
        if overflow { return nil }
        for region in regions where address >= region.guestAddress && end <= region.guestEnd {
            return UnsafeMutableRawPointer(bitPattern: region.hostAddress &+ UInt(address - region.guestAddress))
        }
        return nil
    }

    /// Allocates the host pages behind `count` bytes at `address` now, in one system call
    /// (`MADV_POPULATE_WRITE`), instead of one page fault per page as they are first written.
    /// Best effort: false when the range is not RAM or the kernel (before 5.14) cannot.
    @discardableResult
    public func populate(at address: UInt64, count: Int) -> Bool {
        guard count > 0, let start = pointer(at: address, count: count) else { return false }
        let pageMask = UInt(4096 - 1)
        let first = UInt(bitPattern: start) & ~pageMask
        let end = (UInt(bitPattern: start) + UInt(count) + pageMask) & ~pageMask
        return madvise(UnsafeMutableRawPointer(bitPattern: first), Int(end - first), Self.populateWrite) == 0
    }

    /// `MADV_POPULATE_WRITE` (Linux 5.14), which Glibc's module map does not export.
    private static let populateWrite: Int32 = 23

    /// Like ``pointer(at:count:)`` but throws a descriptive error.
    @inlinable
    public func checkedPointer(at address: UInt64, count: Int) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        guard let pointer = pointer(at: address, count: count) else {
            throw .outOfBounds(address: address, count: UInt64(max(count, 0)))
        }
        return pointer
    }

    /// True when `count` bytes at `address` are all guest RAM.
    @inlinable
    public func contains(_ address: UInt64, count: Int) -> Bool { pointer(at: address, count: count) != nil }

    // MARK: Typed access (little-endian, unaligned allowed)

    @inlinable
    public func load<T: FixedWidthInteger>(_: T.Type = T.self, at address: UInt64) throws(GuestMemoryError) -> T {
        let pointer = try checkedPointer(at: address, count: MemoryLayout<T>.size)
        return T(littleEndian: pointer.loadUnaligned(as: T.self))
    }

    @inlinable
    public func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws(GuestMemoryError) {
        let pointer = try checkedPointer(at: address, count: MemoryLayout<T>.size)
        pointer.storeBytes(of: value.littleEndian, as: T.self)
        vmmWrites.mark(address, count: MemoryLayout<T>.size)
    }

    /// Copies guest bytes into `buffer`.
    public func read(at address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(GuestMemoryError) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let source = try checkedPointer(at: address, count: buffer.count)
        base.copyMemory(from: source, byteCount: buffer.count)
    }

    /// Copies `bytes` into guest memory.
    public func write(at address: UInt64, from bytes: UnsafeRawBufferPointer) throws(GuestMemoryError) {
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        let destination = try checkedPointer(at: address, count: bytes.count)
        destination.copyMemory(from: base, byteCount: bytes.count)
        vmmWrites.mark(address, count: bytes.count)
    }

    public func write(at address: UInt64, bytes: [UInt8]) throws(GuestMemoryError) {
        guard !bytes.isEmpty else { return }
        let destination = try checkedPointer(at: address, count: bytes.count)
        bytes.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        vmmWrites.mark(address, count: bytes.count)
    }

    public func write(at address: UInt64, bytes: ArraySlice<UInt8>) throws(GuestMemoryError) {
        guard !bytes.isEmpty else { return }
        let destination = try checkedPointer(at: address, count: bytes.count)
        bytes.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        vmmWrites.mark(address, count: bytes.count)
    }

    public func readBytes(at address: UInt64, count: Int) throws(GuestMemoryError) -> [UInt8] {
        let source = try checkedPointer(at: address, count: count)
        return Array(UnsafeRawBufferPointer(start: source, count: count))
    }

    /// Fills a range with zeroes.
    public func zero(at address: UInt64, count: Int) throws(GuestMemoryError) {
        let destination = try checkedPointer(at: address, count: count)
        destination.initializeMemory(as: UInt8.self, repeating: 0, count: count)
        vmmWrites.mark(address, count: count)
    }
}

public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidSize(UInt64)
    case mapFailed(size: UInt64, errno: Int32)
    case outOfBounds(address: UInt64, count: UInt64)

    public var description: String {
        switch self {
        case let .invalidSize(size):
            return "guest memory size \(size) bytes is invalid: use a multiple of 4 KiB between 1 MiB and \(GuestLayout.maximumRAM >> 30) GiB"
        case let .mapFailed(size, errno):
            return "mmap of \(size) bytes of guest memory failed: \(SystemError.describe(errno))"
        case let .outOfBounds(address, count):
            return "guest-physical range 0x\(String(address, radix: 16))+\(count) is not guest RAM"
        }
    }
}

/// Fixed guest-physical addresses of the machine (x86 PC conventions, as Firecracker and QEMU use).
public enum GuestLayout {
    /// Start of the 32-bit MMIO hole; RAM above this goes to 4 GiB and beyond.
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    public static let fourGiB: UInt64 = 1 << 32
    /// PCI memory BARs are placed from here up (inside the hole).
    public static let pciMMIOStart: UInt64 = 0xC000_0000
    public static let pciMMIOEnd: UInt64 = 0xD000_0000
    /// virtio-mmio devices, 4 KiB apart.
    public static let virtioMMIOStart: UInt64 = 0xD000_0000
    public static let virtioMMIOStride: UInt64 = 0x1000
    public static let ioapicBase: UInt64 = 0xFEC0_0000
    public static let lapicBase: UInt64 = 0xFEE0_0000
    /// The identity-map page and TSS pages KVM needs on Intel, at the top of the hole below the BIOS.
    public static let identityMapAddress: UInt64 = 0xFEFF_C000
    public static let tssAddress: UInt64 = 0xFEFF_D000
    /// The legacy video/BIOS area the e820 map reports as reserved.
    public static let legacyHoleStart: UInt64 = 0xA0000
    public static let legacyHoleEnd: UInt64 = 0x100000
    /// 1 TiB: far more than this machine can back, and keeps address arithmetic far from overflow.
    public static let maximumRAM: UInt64 = 1 << 40

    /// RAM ranges `(start, length)` for a guest of `size` bytes.
    public static func ramRanges(size: UInt64) -> [(UInt64, UInt64)] {
        if size <= mmioHoleStart { return [(0, size)] }
        return [(0, mmioHoleStart), (fourGiB, size - mmioHoleStart)]
    }
}
