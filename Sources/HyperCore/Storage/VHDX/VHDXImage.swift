/// A VHDX image (fixed, dynamic or differencing) as a ``BlockBackend``.
///
/// Threading: payload I/O on allocated blocks runs outside the lock with positioned I/O, so reads
/// (and writes to allocated blocks) proceed in parallel; everything that looks at or changes
/// metadata — the BAT, sector bitmaps, the log, the headers — holds `lock`, which serialises
/// metadata updates.
///
/// Crash safety (see Docs/VHDX.md): the first modification of a session writes an empty log entry
/// with a new LogGuid and then updates both headers (new FileWriteGuid, DataWriteGuid, LogGuid).
/// New blocks are appended at a 1 MiB-aligned end of file; their BAT and bitmap changes stay in
/// memory until `flush()`, which makes the data durable, writes one log entry per ≤126 changed
/// pages, flushes, writes the pages in place and flushes again. A crash at any point leaves either
/// the old metadata or a log that replays to the new.
public final class VHDXImage: BlockBackend, @unchecked Sendable {
    public struct OpenOptions: Sendable {
        public var readOnly: Bool
        /// Open the parent chain of a differencing disk (the fuzzer and `check` turn this off).
        public var openParents: Bool
        public var maxChainDepth: Int
        /// `check` validates the BAT itself so it can list every problem, not just the first.
        var validateBAT = true

        public init(readOnly: Bool = false, openParents: Bool = true, maxChainDepth: Int = 64) {
            self.readOnly = readOnly
            self.openParents = openParents
            self.maxChainDepth = maxChainDepth
        }
    }

    public let path: String
    let file: DiskFile
    public let isReadOnly: Bool
    public internal(set) var virtualSize: UInt64
    public let logicalSectorSize: UInt32
    public let physicalSectorSize: UInt32
    public let blockSize: UInt32
    public let creator: String
    /// The parent of a differencing disk, opened read-only.
    public let parent: VHDXImage?
    /// True when a pending log was found on open (applied to the file, or kept in memory when
    /// read-only).
    public let logWasPending: Bool
    /// Changes only when resize moves the BAT (under the lock, through the log).
    var regions: VHDXRegionTable
    let regionCopies: [Result<VHDXRegionTable, HeaderProblem>]
    var metadata: VHDXMetadata
    var geometry: BATGeometry
    let overlay: ReplayOverlay

    // Everything below is guarded by `lock`.
    let lock = PthreadLock()
    var headers: HeaderPair
    /// The BAT as on disk plus pending changes, padded to whole 4 KiB pages.
    var bat: [UInt64]
    var dirtyBATPages: Set<Int> = []
    /// Sector-bitmap pages read so far, by file offset, and those changed since the last flush.
    var bitmapPages: [UInt64: [UInt8]] = [:]
    var dirtyBitmapPages: Set<UInt64> = []
    /// The file's size; new blocks go at `roundUp(fileSize, 1 MiB)`.
    var fileSize: UInt64
    var session: LogSession?
    var dataWriteGuidChanged = false
    /// The DataWriteGuid the next guest-visible change will set (merge announces it to the child
    /// first); a random one when nil.
    var plannedDataWriteGuid: GUID?
    var closed = false

    public var isDifferencing: Bool { metadata.hasParent }
    public var isFixed: Bool { metadata.leaveBlocksAllocated && !metadata.hasParent }
    public var diskID: GUID { metadata.diskID }
    public var parentLocator: ParentLocator? { metadata.parentLocator }
    public var dataWriteGuid: GUID { lock.withLock { headers.current.dataWriteGuid } }
    public var fileWriteGuid: GUID { lock.withLock { headers.current.fileWriteGuid } }
    public var logGuid: GUID { lock.withLock { headers.current.logGuid } }

    public convenience init(path: String, options: OpenOptions = OpenOptions()) throws(VHDXError) {
        let file = try DiskFile(path: path, readOnly: options.readOnly)
        try self.init(file: file, options: options, chain: [])
    }

    /// Opens from an already open file (the fuzzer passes a memfd).
    public convenience init(file: DiskFile, options: OpenOptions) throws(VHDXError) {
        try self.init(file: file, options: options, chain: [])
    }

    init(file: DiskFile, options: OpenOptions, chain: [FileIdentity]) throws(VHDXError) {
        let path = file.path
        self.path = path
        self.file = file
        self.isReadOnly = options.readOnly
        var fileSize = try file.size()
        var (headers, creator) = try HeaderPair.read(file, fileSize: fileSize)
        self.creator = creator

        // 1. Replay the log before reading anything else.
        var overlay = ReplayOverlay()
        let header = headers.current
        logWasPending = !header.logGuid.isZero
        if !header.logGuid.isZero {
            let plan = try LogReplay.plan(file: file, header: header, fileSize: fileSize)
            if options.readOnly {
                overlay.operations = plan.descriptors
            } else {
                try headers.update(file) { $0.fileWriteGuid = .random() }
                try LogReplay.apply(plan, to: file)
                try headers.update(file) { $0.logGuid = .zero }
                try headers.update(file) { $0.logGuid = .zero }
                fileSize = try file.size()
            }
        }
        self.overlay = overlay
        self.headers = headers
        self.fileSize = fileSize

        // 2. Region table, metadata.
        let read = { (offset: UInt64, count: Int) throws(VHDXError) -> [UInt8] in
            var bytes = try file.read(count: count, at: offset)
            if !overlay.isEmpty { bytes.withUnsafeMutableBytes { overlay.apply(to: $0, at: offset) } }
            return bytes
        }
        (regions, regionCopies) = try VHDXRegionTable.read(path: path, fileSize: fileSize, read: read)
        let h = headers.current
        for r in regions.entries where r.fileOffset < h.logOffset + UInt64(h.logLength) && h.logOffset < r.fileOffset + UInt64(r.length) {
            throw .corrupt(path: path, structure: "region table", offset: VHDXLayout.regionTableOffsets[0],
                           detail: "region \(r.guid) at \(r.fileOffset) overlaps the log at \(h.logOffset)")
        }
        metadata = try VHDXMetadata.read(path: path, region: regions.metadata!, read: read)
        virtualSize = metadata.virtualSize
        logicalSectorSize = metadata.logicalSectorSize
        physicalSectorSize = metadata.physicalSectorSize
        blockSize = metadata.blockSize
        geometry = BATGeometry(blockSize: UInt64(metadata.blockSize), logicalSectorSize: UInt64(metadata.logicalSectorSize),
                               virtualSize: metadata.virtualSize, hasParent: metadata.hasParent)

        // 3. The BAT: sized from the metadata, bounded by its region (itself inside the file).
        let batRegion = regions.bat!
        let needed = geometry.entryCount * 8
        guard needed <= UInt64(batRegion.length) else {
            throw .corrupt(path: path, structure: "BAT region", offset: batRegion.fileOffset,
                           detail: "\(batRegion.length) bytes cannot hold the \(geometry.entryCount) entries a \(metadata.virtualSize)-byte disk with \(metadata.blockSize)-byte blocks needs")
        }
        let batBytes = Int(min(roundUp(needed, 4096), UInt64(batRegion.length)))
        let raw = try read(batRegion.fileOffset, batBytes)
        var bat = [UInt64](repeating: 0, count: batBytes / 8)
        for i in 0..<bat.count { bat[i] = raw.u64(8 * i) }
        self.bat = bat
        if options.validateBAT || !options.readOnly {
            try Self.validateBAT(bat: bat, geometry: geometry, regions: regions, header: h, fileSize: fileSize, path: path)
        }

        // 4. The parent chain.
        if metadata.hasParent && options.openParents {
            parent = try Self.openParent(childPath: path, file: file, metadata: metadata, options: options, chain: chain)
        } else {
            parent = nil
        }
    }

    deinit {
        if !closed && !isReadOnly { try? close() }
    }

    /// Checks every BAT entry that points into the file: inside the file, 1 MiB aligned, after the
    /// header section, overlapping nothing.
    static func validateBAT(bat: [UInt64], geometry g: BATGeometry, regions: VHDXRegionTable, header: VHDXHeader,
                            fileSize: UInt64, path: String) throws(VHDXError) {
        var problems: [VHDXError] = []
        batProblems(bat: bat, geometry: g, regions: regions, header: header, fileSize: fileSize, path: path, stopAtFirst: true) { problems.append($0) }
        if let first = problems.first { throw first }
    }

    /// Every BAT problem, reported one by one (`check` lists them all; open stops at the first).
    static func batProblems(bat: [UInt64], geometry g: BATGeometry, regions: VHDXRegionTable, header: VHDXHeader,
                            fileSize: UInt64, path: String, stopAtFirst: Bool, report: (VHDXError) -> Void) {
        let batOffset = regions.bat!.fileOffset
        var extents: [(start: UInt64, end: UInt64, what: String)] = [(0, VHDXLayout.headerSectionSize, "header section"),
                                                                       (header.logOffset, header.logOffset + UInt64(header.logLength), "log")]
        for r in regions.entries { extents.append((r.fileOffset, r.fileOffset + UInt64(r.length), "region \(r.guid)")) }
        var chunksNeedingBitmap: Set<UInt64> = []
        var count = 0
        for i in 0..<Int(g.entryCount) {
            if stopAtFirst && count > 0 { return }
            let e = BATEntry(raw: bat[i])
            func bad(_ detail: String) {
                report(.corrupt(path: path, structure: "BAT entry \(i)", offset: batOffset + UInt64(8 * i), detail: detail))
                count += 1
            }
            if e.reservedBits != 0 { bad("reserved bits 3-19 are set (0x\(String(e.raw, radix: 16)))") }
            if g.isBitmapIndex(i) {
                switch e.state {
                case SectorBitmapState.notPresent: continue
                case SectorBitmapState.present:
                    guard g.hasParent else { bad("sector bitmap block present in a disk without a parent"); continue }
                    guard e.fileOffset >= VHDXLayout.headerSectionSize, fits(e.fileOffset, MiB, within: fileSize) else {
                        bad("sector bitmap block at \(e.fileOffset) is outside the file (\(fileSize) bytes)"); continue
                    }
                    extents.append((e.fileOffset, e.fileOffset + MiB, "sector bitmap (BAT entry \(i))"))
                default: bad("invalid sector bitmap state \(e.state)")
                }
                continue
            }
            let chunk = UInt64(i) / (g.chunkRatio + 1)
            let block = UInt64(i) - chunk
            switch e.state {
            case 0, 1, 2, 3, 5: continue
            case 6, 7:
                // A differencing BAT covers whole chunks; entries past the last block must be unused.
                guard block < g.payloadBlocks else { bad("block \(block) lies past the end of the disk but is marked present"); continue }
                if e.state == 7 {
                    guard g.hasParent else { bad("PARTIALLY_PRESENT block in a disk without a parent"); continue }
                    chunksNeedingBitmap.insert(chunk)
                }
                let length = g.blockLength(block)
                guard e.fileOffset >= VHDXLayout.headerSectionSize, fits(e.fileOffset, length, within: fileSize) else {
                    bad("payload block \(block) at file offset \(e.fileOffset) points outside the file (\(fileSize) bytes)"); continue
                }
                extents.append((e.fileOffset, e.fileOffset + length, "payload block \(block) (BAT entry \(i))"))
            default:
                bad("invalid payload block state \(e.state)")
            }
        }
        if stopAtFirst && count > 0 { return }
        for c in chunksNeedingBitmap.sorted() where BATEntry(raw: bat[g.bitmapIndex(chunk: c)]).state != SectorBitmapState.present {
            report(.corrupt(path: path, structure: "BAT entry \(g.bitmapIndex(chunk: c))", offset: batOffset + UInt64(8 * g.bitmapIndex(chunk: c)),
                            detail: "chunk \(c) has partially present blocks but no sector bitmap block"))
            if stopAtFirst { return }
        }
        extents.sort { $0.start < $1.start }
        var furthest = 0
        for k in extents.indices.dropFirst() {
            if extents[k].start < extents[furthest].end {
                report(.corrupt(path: path, structure: extents[k].what, offset: extents[k].start,
                                detail: "overlaps \(extents[furthest].what) at \(extents[furthest].start)..<\(extents[furthest].end)"))
                if stopAtFirst { return }
            }
            if extents[k].end > extents[furthest].end { furthest = k }
        }
    }

    static func openParent(childPath: String, file: DiskFile, metadata: VHDXMetadata, options: OpenOptions,
                           chain: [FileIdentity]) throws(VHDXError) -> VHDXImage {
        guard let locator = metadata.parentLocator else { throw .parent(path: childPath, detail: "no parent locator") }
        guard chain.count < options.maxChainDepth else {
            throw .parent(path: childPath, detail: "the chain is deeper than \(options.maxChainDepth) disks")
        }
        var chain = chain
        if let me = ParentResolver.identity(childPath) { chain.append(me) }
        let candidates = ParentResolver.candidates(childPath: childPath, locator: locator)
        guard let parentPath = candidates.first(where: ParentResolver.exists) else {
            throw .parent(path: childPath, detail: "parent not found (tried: \(candidates.isEmpty ? "no usable path in the locator" : candidates.joined(separator: ", ")))")
        }
        if let id = ParentResolver.identity(parentPath), chain.contains(id) {
            throw .parent(path: childPath, detail: "parent \(parentPath) is already in the chain (a loop)")
        }
        let parentFile = try DiskFile(path: parentPath, readOnly: true)
        var parentOptions = options
        parentOptions.readOnly = true
        let parent: VHDXImage
        do {
            parent = try VHDXImage(file: parentFile, options: parentOptions, chain: chain)
        } catch {
            if case .parent = error { throw error }
            throw .parent(path: childPath, detail: "cannot open parent \(parentPath): \(error)")
        }
        let linkage = [locator["parent_linkage"], locator["parent_linkage2"]].compactMap { $0.flatMap(GUID.init) }.filter { !$0.isZero }
        let current = parent.headers.current.dataWriteGuid
        guard linkage.contains(current) else {
            throw .parent(path: childPath, detail: "parent \(parentPath) has changed since this disk was created (its DataWriteGuid is \(current.braced), the child expects \(locator["parent_linkage"] ?? "?")); the child's data would be wrong on top of it")
        }
        guard parent.logicalSectorSize == metadata.logicalSectorSize else {
            throw .parent(path: childPath, detail: "parent \(parentPath) has \(parent.logicalSectorSize)-byte sectors, the child \(metadata.logicalSectorSize)")
        }
        return parent
    }

    // MARK: - Reading

    /// Reads from the file, with any in-memory log replay applied.
    func readFile(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VHDXError) {
        try file.read(into: buffer, at: offset)
        if !overlay.isEmpty { overlay.apply(to: buffer, at: offset) }
    }

    func readFile(count: Int, at offset: UInt64) throws(VHDXError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let r: Result<Void, VHDXError> = bytes.withUnsafeMutableBytes { b in
            do throws(VHDXError) { try readFile(into: b, at: offset); return .success(()) } catch { return .failure(error) }
        }
        try r.get()
        return bytes
    }

    /// Where a run of virtual sectors comes from.
    enum Source {
        case file(UInt64)
        case parent
        case zeros
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError) {
        try validate(offset: offset, length: UInt64(buffer.count))
        do throws(VHDXError) { try readVirtual(into: buffer, at: offset) } catch { throw error.blockError }
    }

    func readVirtual(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VHDXError) {
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let runs = try lock.withLock { () throws(VHDXError) -> [(Source, Int)] in
                try resolve(virtualOffset: pos, maxLength: buffer.count - done)
            }
            for (source, length) in runs {
                let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + length])
                switch source {
                case let .file(fileOffset): try readFile(into: piece, at: fileOffset)
                case .zeros: piece.initializeMemory(as: UInt8.self, repeating: 0)
                case .parent: try readParent(into: piece, at: offset + UInt64(done))
                }
                done += length
            }
        }
    }

    /// Reads from the parent; the part beyond the parent's size (a grown child) reads as zeros.
    func readParent(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(VHDXError) {
        guard let parent else {
            throw .parent(path: path, detail: "data lives in the parent, which is not open")
        }
        let inParent = offset >= parent.virtualSize ? 0 : Int(min(UInt64(buffer.count), parent.virtualSize - offset))
        if inParent > 0 { try parent.readVirtual(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<inParent]), at: offset) }
        if inParent < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[inParent...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Splits the request starting at `virtualOffset` (within one block) into runs by source.
    /// Caller holds the lock.
    func resolve(virtualOffset: UInt64, maxLength: Int) throws(VHDXError) -> [(Source, Int)] {
        let bs = geometry.blockSize
        let block = virtualOffset / bs
        let inBlock = virtualOffset % bs
        let length = Int(min(UInt64(maxLength), bs - inBlock))
        let entry = BATEntry(raw: bat[geometry.payloadIndex(block)])
        switch entry.state {
        case PayloadBlockState.fullyPresent.rawValue:
            return [(.file(entry.fileOffset + inBlock), length)]
        case PayloadBlockState.notPresent.rawValue:
            return [(metadata.hasParent ? .parent : .zeros, length)]
        case PayloadBlockState.partiallyPresent.rawValue:
            var runs: [(Source, Int)] = []
            let lss = UInt64(logicalSectorSize)
            var sector = virtualOffset / lss
            let endSector = sector + UInt64(length) / lss
            while sector < endSector {
                let present = try bitmapBit(sector: sector)
                var n: UInt64 = 1
                while sector + n < endSector, try bitmapBit(sector: sector + n) == present { n += 1 }
                let src: Source = present ? .file(entry.fileOffset + (sector * lss) % bs) : .parent
                runs.append((src, Int(n * lss)))
                sector += n
            }
            return runs
        default:
            return [(.zeros, length)]
        }
    }

    // MARK: - Sector bitmaps

    /// File offset of the bitmap byte for `sector`, and the bit within it. Caller holds the lock.
    func bitmapLocation(sector: UInt64) throws(VHDXError) -> (page: UInt64, byte: Int, bit: Int)? {
        let chunk = sector >> 23
        let entry = BATEntry(raw: bat[geometry.bitmapIndex(chunk: chunk)])
        guard entry.state == SectorBitmapState.present else { return nil }
        let inChunk = sector & ((1 << 23) - 1)
        let byteInBlock = inChunk / 8
        return (entry.fileOffset + (byteInBlock & ~4095), Int(byteInBlock & 4095), Int(inChunk % 8))
    }

    func bitmapPage(_ fileOffset: UInt64) throws(VHDXError) -> [UInt8] {
        if let p = bitmapPages[fileOffset] { return p }
        let p = try readFile(count: 4096, at: fileOffset)
        bitmapPages[fileOffset] = p
        return p
    }

    func bitmapBit(sector: UInt64) throws(VHDXError) -> Bool {
        guard let loc = try bitmapLocation(sector: sector) else { return false }
        return try bitmapPage(loc.page)[loc.byte] & (1 << loc.bit) != 0
    }

    // MARK: - Information

    /// Bytes of payload blocks that hold data in this file (fully or partially present).
    public var allocatedBytes: UInt64 {
        lock.withLock {
            var n: UInt64 = 0
            for b in 0..<geometry.payloadBlocks {
                let s = BATEntry(raw: bat[geometry.payloadIndex(b)]).state
                if s == PayloadBlockState.fullyPresent.rawValue || s == PayloadBlockState.partiallyPresent.rawValue { n += geometry.blockSize }
            }
            return n
        }
    }

    /// Whether the virtual range holds data in this file or its chain (false means it reads as zeros
    /// without reading anything). Used by convert to skip empty blocks cheaply.
    public func isAllocated(offset: UInt64, length: UInt64) -> Bool {
        lock.withLock {
            var b = offset / geometry.blockSize
            let last = (offset + length - 1) / geometry.blockSize
            while b <= last {
                switch BATEntry(raw: bat[geometry.payloadIndex(b)]).state {
                case PayloadBlockState.fullyPresent.rawValue, PayloadBlockState.partiallyPresent.rawValue: return true
                case PayloadBlockState.notPresent.rawValue:
                    if let parent, b * geometry.blockSize < parent.virtualSize {
                        let lo = max(offset, b * geometry.blockSize)
                        let hi = min(offset + length, (b + 1) * geometry.blockSize, parent.virtualSize)
                        if parent.isAllocated(offset: lo, length: hi - lo) { return true }
                    }
                default: break
                }
                b += 1
            }
            return false
        }
    }

    /// The chain from this disk to its base, paths only.
    public var chainPaths: [String] {
        var out: [String] = [path]
        var p = parent
        while let x = p { out.append(x.path); p = x.parent }
        return out
    }
}
