/// The metadata region ([MS-VHDX] 2.6): a 64 KiB table (no checksum) of items, each located
/// relative to the start of the region. Known items are decoded; unknown items are kept as they
/// are unless they are marked required, which refuses the file.
struct VHDXMetadata: Equatable, Sendable {
    struct Entry: Equatable, Sendable {
        var itemID: GUID
        var offset: UInt32   // relative to the region start
        var length: UInt32
        var isUser: Bool
        var isVirtualDisk: Bool
        var isRequired: Bool
    }

    static let fileParametersID = GUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")!
    static let virtualDiskSizeID = GUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")!
    static let virtualDiskID = GUID("BECA12AB-B2E6-4523-93EF-C309E000C746")!
    static let logicalSectorSizeID = GUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")!
    static let physicalSectorSizeID = GUID("CDA348C7-445D-4471-9CC9-E9885251C556")!
    static let parentLocatorID = GUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")!
    /// Items openvmm knows beyond the specification; CHS and PMEM labels are harmless, "incomplete
    /// file" marks a creation that never finished.
    static let chsParametersID = GUID("DA02D7BC-3D3A-423C-AC88-2A36AB21479B")!
    static let incompleteFileID = GUID("71CC85F0-1B69-4E28-9558-C3BF83AE75D3")!
    static let pmemLabelID = GUID("10E1AE8A-4B7E-4169-A40F-CD70DE928393")!

    static let tableSize = 64 << 10
    static let maxItemLength: UInt32 = 1 << 20

    var entries: [Entry]
    var blockSize: UInt32
    var leaveBlocksAllocated: Bool
    var hasParent: Bool
    var virtualSize: UInt64
    var diskID: GUID
    var logicalSectorSize: UInt32
    var physicalSectorSize: UInt32
    var parentLocator: ParentLocator?

    /// File offset of the virtual disk size item (resize rewrites it through the log).
    var virtualSizeItemOffset: UInt64 = 0

    static func read(path: String, region: VHDXRegionTable.Entry,
                     read: (UInt64, Int) throws(VHDXError) -> [UInt8]) throws(VHDXError) -> VHDXMetadata {
        let base = region.fileOffset
        func bad(_ what: String, _ off: UInt64, _ detail: String) -> VHDXError {
            .corrupt(path: path, structure: what, offset: off, detail: detail)
        }
        guard region.length >= UInt32(tableSize) else { throw bad("metadata region", base, "region is smaller than its 64 KiB table") }
        let t = try read(base, tableSize)
        guard t.hasSignature("metadata", at: 0) else { throw bad("metadata table", base, "no \"metadata\" signature") }
        let count = Int(t.u16(10))
        guard count <= 2047 else { throw bad("metadata table", base, "EntryCount \(count) exceeds 2047") }

        var entries: [Entry] = []
        var userCount = 0
        for i in 0..<count {
            let o = 32 + 32 * i
            let flags = t.u32(o + 24)
            let e = Entry(itemID: GUID(t, at: o), offset: t.u32(o + 16), length: t.u32(o + 20),
                          isUser: flags & 1 != 0, isVirtualDisk: flags & 2 != 0, isRequired: flags & 4 != 0)
            let where_ = base + UInt64(o)
            if e.isUser { userCount += 1 }
            guard userCount <= 1024 else { throw bad("metadata entry \(i)", where_, "more than 1024 user items") }
            if e.length == 0 {
                guard e.offset == 0 else { throw bad("metadata entry \(i)", where_, "empty item with non-zero offset") }
            } else {
                guard e.offset >= UInt32(tableSize), e.length <= maxItemLength,
                      UInt64(e.offset) + UInt64(e.length) <= UInt64(region.length) else {
                    throw bad("metadata entry \(i) (\(e.itemID))", where_, "item \(e.offset)+\(e.length) is not inside the metadata region (length \(region.length))")
                }
                if let j = entries.firstIndex(where: { $0.length > 0 && $0.offset < e.offset + e.length && e.offset < $0.offset + $0.length }) {
                    throw bad("metadata entry \(i)", where_, "item overlaps entry \(j)")
                }
            }
            if entries.contains(where: { $0.itemID == e.itemID && $0.isUser == e.isUser }) {
                throw bad("metadata entry \(i)", where_, "duplicate item \(e.itemID)")
            }
            entries.append(e)
        }

        func item(_ id: GUID, minLength: UInt32) throws(VHDXError) -> [UInt8]? {
            guard let e = entries.first(where: { $0.itemID == id && !$0.isUser }) else { return nil }
            guard e.length >= minLength else {
                throw bad("metadata item \(id)", base + UInt64(e.offset), "length \(e.length), expected at least \(minLength)")
            }
            return try read(base + UInt64(e.offset), Int(e.length))
        }
        let known: Set<GUID> = [fileParametersID, virtualDiskSizeID, virtualDiskID, logicalSectorSizeID,
                                physicalSectorSizeID, parentLocatorID, chsParametersID, pmemLabelID]
        for e in entries where e.isRequired && !e.isUser {
            if e.itemID == incompleteFileID {
                throw .unsupported(path: path, detail: "the file is marked incomplete (its creation never finished)")
            }
            if !known.contains(e.itemID) {
                throw .unsupported(path: path, detail: "required metadata item \(e.itemID) is unknown to this implementation")
            }
        }

        guard let fp = try item(fileParametersID, minLength: 8) else { throw bad("metadata", base, "no File Parameters item") }
        let blockSize = fp.u32(0), fpFlags = fp.u32(4)
        guard blockSize >= 1 << 20, blockSize <= 256 << 20, blockSize & (blockSize - 1) == 0 else {
            throw bad("File Parameters", base, "block size \(blockSize) is not a power of two between 1 MiB and 256 MiB")
        }
        guard let vds = try item(virtualDiskSizeID, minLength: 8) else { throw bad("metadata", base, "no Virtual Disk Size item") }
        guard let lssItem = try item(logicalSectorSizeID, minLength: 4) else { throw bad("metadata", base, "no Logical Sector Size item") }
        guard let pssItem = try item(physicalSectorSizeID, minLength: 4) else { throw bad("metadata", base, "no Physical Sector Size item") }
        let lss = lssItem.u32(0), pss = pssItem.u32(0), size = vds.u64(0)
        guard lss == 512 || lss == 4096 else { throw bad("Logical Sector Size", base, "\(lss) is neither 512 nor 4096") }
        guard pss == 512 || pss == 4096 else { throw bad("Physical Sector Size", base, "\(pss) is neither 512 nor 4096") }
        guard size > 0, size % UInt64(lss) == 0, size <= VHDXLayout.maxVirtualSize else {
            throw bad("Virtual Disk Size", base, "\(size) is not a non-zero multiple of the \(lss)-byte sector size up to 64 TiB")
        }
        let id = try item(virtualDiskID, minLength: 16).map { GUID($0, at: 0) } ?? .zero
        let hasParent = fpFlags & 2 != 0
        var locator: ParentLocator?
        if let pl = try item(parentLocatorID, minLength: 20) {
            let plOffset = base + UInt64(entries.first { $0.itemID == parentLocatorID }!.offset)
            locator = try ParentLocator.decode(pl, path: path, fileOffset: plOffset)
        }
        if hasParent && locator == nil { throw bad("metadata", base, "differencing disk (HasParent) without a Parent Locator item") }

        var md = VHDXMetadata(entries: entries, blockSize: blockSize, leaveBlocksAllocated: fpFlags & 1 != 0,
                              hasParent: hasParent, virtualSize: size, diskID: id, logicalSectorSize: lss,
                              physicalSectorSize: pss, parentLocator: hasParent ? locator : nil)
        md.virtualSizeItemOffset = base + UInt64(entries.first { $0.itemID == virtualDiskSizeID && !$0.isUser }!.offset)
        return md
    }

    /// The region's bytes for a new file: table plus the known items, packed from +64 KiB.
    static func encodeRegion(blockSize: UInt32, leaveBlocksAllocated: Bool, hasParent: Bool, virtualSize: UInt64,
                             diskID: GUID, logicalSectorSize: UInt32, physicalSectorSize: UInt32,
                             parentLocator: ParentLocator?) -> [UInt8] {
        var items: [(GUID, [UInt8], isVirtualDisk: Bool)] = []
        var fp = [UInt8](repeating: 0, count: 8)
        fp.storeLE(blockSize, at: 0)
        fp.storeLE(UInt32((leaveBlocksAllocated ? 1 : 0) | (hasParent ? 2 : 0)), at: 4)
        items.append((fileParametersID, fp, false))
        var vds = [UInt8](repeating: 0, count: 8)
        vds.storeLE(virtualSize, at: 0)
        items.append((virtualDiskSizeID, vds, true))
        items.append((virtualDiskID, diskID.bytes, true))
        var l = [UInt8](repeating: 0, count: 4)
        l.storeLE(logicalSectorSize, at: 0)
        items.append((logicalSectorSizeID, l, true))
        var p = [UInt8](repeating: 0, count: 4)
        p.storeLE(physicalSectorSize, at: 0)
        items.append((physicalSectorSizeID, p, true))
        if let parentLocator { items.append((parentLocatorID, parentLocator.encode(), false)) }

        var region = [UInt8](repeating: 0, count: Int(MiB))
        region.putSignature("metadata", at: 0)
        region.storeLE(UInt16(items.count), at: 10)
        var next = tableSize
        for (i, (id, bytes, vd)) in items.enumerated() {
            let o = 32 + 32 * i
            region.putGUID(id, at: o)
            region.storeLE(UInt32(next), at: o + 16)
            region.storeLE(UInt32(bytes.count), at: o + 20)
            region.storeLE(UInt32((vd ? 2 : 0) | 4), at: o + 24)
            region.replaceSubrange(next..<next + bytes.count, with: bytes)
            next += (bytes.count + 7) & ~7
        }
        return region
    }
}

/// The parent locator item ([MS-VHDX] 2.6.2.6): UTF-16 key/value pairs naming the parent file and
/// the parent's DataWriteGuid at the time the child was made.
public struct ParentLocator: Equatable, Sendable {
    static let vhdxLocatorType = GUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")!

    public var entries: [(key: String, value: String)]

    public static func == (a: ParentLocator, b: ParentLocator) -> Bool {
        a.entries.map(\.key) == b.entries.map(\.key) && a.entries.map(\.value) == b.entries.map(\.value)
    }

    public init(entries: [(key: String, value: String)]) { self.entries = entries }

    public subscript(key: String) -> String? { entries.first { $0.key == key }?.value }

    static func decode(_ b: [UInt8], path: String, fileOffset: UInt64) throws(VHDXError) -> ParentLocator {
        func bad(_ detail: String) -> VHDXError { .corrupt(path: path, structure: "parent locator", offset: fileOffset, detail: detail) }
        guard GUID(b, at: 0) == vhdxLocatorType else {
            throw .unsupported(path: path, detail: "parent locator type \(GUID(b, at: 0)) is not the VHDX locator type")
        }
        let count = Int(b.u16(18))
        guard 20 + 12 * count <= b.count else { throw bad("\(count) key/value entries do not fit in the \(b.count)-byte item") }
        func string(_ off: UInt32, _ len: UInt16) throws(VHDXError) -> String {
            let start = Int(off), n = Int(len)
            guard start > 0, n > 0, n % 2 == 0, start + n <= b.count else { throw bad("string at \(off) length \(len) is outside the item") }
            var units: [UInt16] = []
            units.reserveCapacity(n / 2)
            for i in stride(from: start, to: start + n, by: 2) { units.append(b.u16(i)) }
            return String(decoding: units, as: UTF16.self)
        }
        var entries: [(key: String, value: String)] = []
        for i in 0..<count {
            let o = 20 + 12 * i
            let key = try string(b.u32(o), b.u16(o + 8))
            let value = try string(b.u32(o + 4), b.u16(o + 10))
            if entries.contains(where: { $0.key == key }) { throw bad("duplicate key \(key)") }
            entries.append((key, value))
        }
        guard entries.contains(where: { $0.key == "parent_linkage" }) else { throw bad("no parent_linkage key") }
        return ParentLocator(entries: entries)
    }

    func encode() -> [UInt8] {
        var header = [UInt8](repeating: 0, count: 20 + 12 * entries.count)
        header.putGUID(Self.vhdxLocatorType, at: 0)
        header.storeLE(UInt16(entries.count), at: 18)
        var strings: [UInt8] = []
        func append(_ s: String) -> (UInt32, UInt16) {
            let off = UInt32(header.count + strings.count)
            for u in s.utf16 { strings.append(UInt8(u & 0xFF)); strings.append(UInt8(u >> 8)) }
            return (off, UInt16(s.utf16.count * 2))
        }
        for (i, e) in entries.enumerated() {
            let (ko, kl) = append(e.key)
            let (vo, vl) = append(e.value)
            let o = 20 + 12 * i
            header.storeLE(ko, at: o)
            header.storeLE(vo, at: o + 4)
            header.storeLE(kl, at: o + 8)
            header.storeLE(vl, at: o + 10)
        }
        return header + strings
    }
}
