/// Offline operations Hyper-V users know: Resize-VHD, Optimize-VHD (compact), Merge-VHD.
/// Each one changes metadata only through the log, like the write path.
extension VHDXImage {
    // MARK: Resize

    /// Grows the disk, or shrinks it when every block past the new end is unallocated.
    public func resize(to newSize: UInt64) throws(VHDXError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        let lss = UInt64(logicalSectorSize)
        guard newSize > 0, newSize % lss == 0, newSize <= VHDXLayout.maxVirtualSize else {
            throw .invalidArgument("new size \(newSize) must be a non-zero multiple of \(lss) bytes, at most 64 TiB")
        }
        try lock.withLock { () throws(VHDXError) in
            let old = geometry
            if newSize == old.virtualSize { return }
            let new = BATGeometry(blockSize: old.blockSize, logicalSectorSize: old.logicalSectorSize, virtualSize: newSize, hasParent: old.hasParent)
            // A BAT region too small for the new size moves to the end of the file: the copy is
            // written to fresh space and made durable, then the region tables switch to it in the
            // same log entry as the new size.
            var newRegions: VHDXRegionTable?
            if new.entryCount * 8 > UInt64(regions.bat!.length) {
                guard new.regionLength <= UInt64(UInt32.max) & ~(MiB - 1) else {
                    throw .invalidArgument("\(path): a \(newSize)-byte disk with \(old.blockSize)-byte blocks needs a BAT over 4 GiB; use larger blocks")
                }
                newRegions = regions
                let index = regions.entries.firstIndex { $0.guid == VHDXRegionTable.batGUID }!
                newRegions!.entries[index].length = UInt32(new.regionLength)
            }
            if newSize < old.virtualSize {
                let firstGone = (newSize + old.blockSize - 1) / old.blockSize
                for b in firstGone..<old.payloadBlocks {
                    let s = BATEntry(raw: bat[old.payloadIndex(b)]).state
                    if s == PayloadBlockState.fullyPresent.rawValue || s == PayloadBlockState.partiallyPresent.rawValue {
                        throw .invalidArgument("\(path): cannot shrink to \(newSize) bytes: block \(b) (from byte \(b * old.blockSize)) holds data; compact first or choose a larger size")
                    }
                }
            }
            try beginModification(userVisible: true)
            // Bytes past the old end in the old last block must read as zeros once they are inside the disk.
            if newSize > old.virtualSize && old.virtualSize % old.blockSize != 0 {
                let b = old.payloadBlocks - 1
                let e = BATEntry(raw: bat[old.payloadIndex(b)])
                if e.state == PayloadBlockState.fullyPresent.rawValue || e.state == PayloadBlockState.partiallyPresent.rawValue {
                    let inBlock = old.virtualSize % old.blockSize
                    try file.writeZeros(at: e.fileOffset + inBlock, length: old.blockSize - inBlock)
                }
            }
            if bat.count < Int(roundUp(new.entryCount, 512)) {
                bat += [UInt64](repeating: 0, count: Int(roundUp(new.entryCount, 512)) - bat.count)
            }
            if metadata.leaveBlocksAllocated && !metadata.hasParent && new.payloadBlocks > old.payloadBlocks {
                for b in old.payloadBlocks..<new.payloadBlocks {
                    let off = try allocate(old.blockSize)
                    try file.preallocate(offset: off, length: old.blockSize)
                    setBATEntry(new.payloadIndex(b), BATEntry(state: PayloadBlockState.fullyPresent.rawValue, fileOffset: off))
                }
            }
            var pages: [(fileOffset: UInt64, page: [UInt8])] = []
            if var moved = newRegions {
                let index = moved.entries.firstIndex { $0.guid == VHDXRegionTable.batGUID }!
                let offset = try allocate(UInt64(moved.entries[index].length))
                moved.entries[index].fileOffset = offset
                var bytes = [UInt8](repeating: 0, count: bat.count * 8)
                for i in bat.indices { bytes.storeLE(bat[i], at: 8 * i) }
                try file.write(bytes, at: offset)
                let table = moved.encode()
                for copy in VHDXLayout.regionTableOffsets {
                    for p in 0..<VHDXLayout.regionTableSize / 4096 {
                        pages.append((copy + UInt64(p * 4096), Array(table[p * 4096..<(p + 1) * 4096])))
                    }
                }
                regions = moved
                dirtyBATPages.removeAll()
            }
            try file.sync()
            pages += dirtyPages()
            let itemPage = metadata.virtualSizeItemOffset & ~4095
            var page = try readFile(count: 4096, at: itemPage)
            page.storeLE(newSize, at: Int(metadata.virtualSizeItemOffset - itemPage))
            pages.append((itemPage, page))
            try commit(pages: pages)
            dirtyBATPages.removeAll()
            dirtyBitmapPages.removeAll()
            geometry = new
            metadata.virtualSize = newSize
            virtualSize = newSize
        }
    }

    // MARK: Compact

    public struct CompactResult: Sendable {
        public var blocksZeroed: Int
        public var blocksMoved: Int
        public var oldFileSize: UInt64
        public var newFileSize: UInt64
    }

    /// Drops blocks that hold only zeros and moves the remaining blocks down into the holes, then
    /// shortens the file. Fixed disks are left as they are (their blocks stay allocated).
    public func compact() throws(VHDXError) -> CompactResult {
        guard !isReadOnly else { throw .readOnly(path: path) }
        return try lock.withLock { () throws(VHDXError) -> CompactResult in
            let oldSize = fileSize
            guard !isFixed else { return CompactResult(blocksZeroed: 0, blocksMoved: 0, oldFileSize: oldSize, newFileSize: oldSize) }
            try flushLocked()
            let g = geometry
            // 1. All-zero blocks become ZERO (reads stay zeros, never the parent).
            var zeroed = 0
            var buffer = [UInt8](repeating: 0, count: Int(g.blockSize))
            for b in 0..<g.payloadBlocks {
                let index = g.payloadIndex(b)
                let e = BATEntry(raw: bat[index])
                guard e.state == PayloadBlockState.fullyPresent.rawValue else { continue }
                let n = Int(g.blockLength(b))
                let r: Result<Bool, VHDXError> = buffer.withUnsafeMutableBytes { buf in
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<n])
                    do throws(VHDXError) { try readFile(into: piece, at: e.fileOffset); return .success(isZero(UnsafeRawBufferPointer(piece))) }
                    catch { return .failure(error) }
                }
                if try r.get() {
                    try beginModification(userVisible: false)
                    setBATEntry(index, BATEntry(state: PayloadBlockState.zero.rawValue, fileOffset: 0))
                    zeroed += 1
                }
            }
            try flushLocked()

            // 2. Move blocks from the end of the file into the lowest holes.
            let h = headers.current
            var fixedExtents: [(UInt64, UInt64)] = [(0, VHDXLayout.headerSectionSize), (h.logOffset, h.logOffset + UInt64(h.logLength))]
            for r in regions.entries { fixedExtents.append((r.fileOffset, r.fileOffset + roundUp(UInt64(r.length), MiB))) }
            var movable: [(index: Int, start: UInt64, length: UInt64)] = []
            for i in 0..<Int(g.entryCount) {
                let e = BATEntry(raw: bat[i])
                if g.isBitmapIndex(i) {
                    if e.state == SectorBitmapState.present { movable.append((i, e.fileOffset, MiB)) }
                } else if e.state == PayloadBlockState.fullyPresent.rawValue || e.state == PayloadBlockState.partiallyPresent.rawValue {
                    movable.append((i, e.fileOffset, g.blockSize))
                }
            }
            var used = fixedExtents + movable.map { ($0.start, $0.start + $0.length) }
            used.sort { $0.0 < $1.0 }
            var holes: [(UInt64, UInt64)] = []
            var cursor: UInt64 = 0
            for (s, e) in used {
                if s > cursor { holes.append((cursor, s)) }
                cursor = max(cursor, e)
            }
            movable.sort { $0.start > $1.start }
            var moved = 0
            var copy = [UInt8](repeating: 0, count: Int(MiB))
            for m in movable {
                guard let hi = holes.firstIndex(where: { $0.1 - $0.0 >= m.length && $0.0 < m.start }) else { continue }
                let target = holes[hi].0
                var done: UInt64 = 0
                while done < m.length {
                    let r: Result<Void, VHDXError> = copy.withUnsafeMutableBytes { buf in
                        do throws(VHDXError) {
                            try readFile(into: buf, at: m.start + done)
                            try file.write(UnsafeRawBufferPointer(buf), at: target + done)
                            return .success(())
                        } catch { return .failure(error) }
                    }
                    try r.get()
                    done += MiB
                }
                holes[hi].0 += m.length
                holes.append((m.start, m.start + m.length))
                holes.sort { $0.0 < $1.0 }
                let e = BATEntry(raw: bat[m.index])
                try beginModification(userVisible: false)
                setBATEntry(m.index, BATEntry(state: e.state, fileOffset: target))
                moved += 1
            }
            bitmapPages.removeAll()   // bitmap blocks may have moved
            try flushLocked()

            // 3. Shorten the file past the last thing still in use. The log is retired first: its
            // entries record the old size, and replaying them against a shorter file would fail.
            var end: UInt64 = VHDXLayout.headerSectionSize
            for (_, e) in fixedExtents { end = max(end, e) }
            for i in 0..<Int(g.entryCount) {
                let e = BATEntry(raw: bat[i])
                if g.isBitmapIndex(i) {
                    if e.state == SectorBitmapState.present { end = max(end, e.fileOffset + MiB) }
                } else if e.state == PayloadBlockState.fullyPresent.rawValue || e.state == PayloadBlockState.partiallyPresent.rawValue {
                    end = max(end, e.fileOffset + g.blockSize)
                }
            }
            if session != nil {
                for _ in 0..<2 { try headers.update(file) { $0.logGuid = .zero } }
                session = nil
            }
            if end < fileSize {
                try file.truncate(to: end)
                try file.sync()
                fileSize = end
            }
            return CompactResult(blocksZeroed: zeroed, blocksMoved: moved, oldFileSize: oldSize, newFileSize: fileSize)
        }
    }

    // MARK: Merge

    /// Writes this differencing disk's own data into its parent (Merge-VHD).
    ///
    /// Crash-safe in the way [MS-VHDX] note 12 describes: the DataWriteGuid the parent is about to
    /// get is first written into this child's `parent_linkage2` (through the log), and only then is
    /// the parent changed. The chain reads the same bytes at every moment of the merge (the child's
    /// sectors win over the parent's, and the parent only receives those same sectors), so an
    /// interrupted merge leaves a chain that still opens and can simply be merged again. Afterwards
    /// the child is redundant and can be deleted. `stopAfterBlocks` simulates an interruption (tests).
    public func mergeIntoParent(progress: ((UInt64, UInt64) -> Void)? = nil) throws(VHDXError) {
        try mergeIntoParent(progress: progress, stopAfterBlocks: nil)
    }

    func mergeIntoParent(progress: ((UInt64, UInt64) -> Void)?, stopAfterBlocks: UInt64?) throws(VHDXError) {
        guard metadata.hasParent, let parent else { throw .invalidArgument("\(path) is not a differencing disk") }
        guard !isReadOnly else { throw .readOnly(path: path) }
        // Resuming an interrupted merge: the parent already carries the GUID announced in
        // parent_linkage2, so keep it (a fresh one would orphan the child if this run stops too).
        let current = parent.dataWriteGuid
        let announced = parentLocator?["parent_linkage2"].flatMap(GUID.init)
        let newGuid = announced == current ? current : GUID.random()
        if announced != newGuid { try setParentLinkage2(newGuid) }
        let target = try VHDXImage(path: parent.path, options: OpenOptions(readOnly: false))
        target.plannedDataWriteGuid = newGuid
        try target.lock.withLock { () throws(VHDXError) in try target.beginModification(userVisible: true) }
        if target.virtualSize < virtualSize { try target.resize(to: virtualSize) }
        let g = geometry
        var buffer = [UInt8](repeating: 0, count: Int(g.blockSize))
        for b in 0..<g.payloadBlocks {
            progress?(b, g.payloadBlocks)
            if let stopAfterBlocks, b >= stopAfterBlocks {
                try target.lock.withLock { () throws(VHDXError) in try target.flushLocked() }
                target.abandon()
                return
            }
            let start = b * g.blockSize
            let length = g.blockLength(b)
            let (state, runs) = try lock.withLock { () throws(VHDXError) -> (UInt8, [(Source, Int)]) in
                let e = BATEntry(raw: bat[g.payloadIndex(b)])
                return (e.state, e.state == PayloadBlockState.partiallyPresent.rawValue
                        ? try resolve(virtualOffset: start, maxLength: Int(length)) : [])
            }
            switch state {
            case PayloadBlockState.notPresent.rawValue:
                continue
            case PayloadBlockState.fullyPresent.rawValue, PayloadBlockState.partiallyPresent.rawValue:
                let r: Result<Void, VHDXError> = buffer.withUnsafeMutableBytes { buf in
                    do throws(VHDXError) {
                        let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(length)])
                        try readVirtual(into: piece, at: start)
                        if state == PayloadBlockState.fullyPresent.rawValue {
                            try target.writeVirtual(UnsafeRawBufferPointer(piece), at: start)
                        } else {
                            var at = 0
                            for (source, n) in runs {
                                if case .file = source {
                                    try target.writeVirtual(UnsafeRawBufferPointer(rebasing: piece[at..<at + n]), at: start + UInt64(at))
                                }
                                at += n
                            }
                        }
                        return .success(())
                    } catch { return .failure(error) }
                }
                try r.get()
            default:
                try target.zeroVirtual(offset: start, length: length)
            }
        }
        progress?(g.payloadBlocks, g.payloadBlocks)
        try target.close()
    }
}

extension VHDXImage {
    /// Sets `parent_linkage2` in this child's parent locator, through the log. The item is rewritten
    /// in place when it still fits, otherwise after the last item of the metadata region.
    func setParentLinkage2(_ guid: GUID) throws(VHDXError) {
        try rewriteParentLocator { locator in
            if let k = locator.entries.firstIndex(where: { $0.key == "parent_linkage2" }) {
                locator.entries[k].value = guid.braced
            } else {
                locator.entries.append(("parent_linkage2", guid.braced))
            }
        }
    }

    /// Points the differencing disk at `childPath` to a new parent, `parentPath`, which must read
    /// exactly as its old parent does (the old parent merged into it, or a copy of it elsewhere):
    /// the locator's paths and `parent_linkage` become the new parent's, `parent_linkage2` goes.
    /// One logged metadata write, so a crash leaves the old locator or the new one.
    public static func reparent(childPath: String, to parentPath: String) throws(VHDXError) {
        let parent = try VHDXImage(path: parentPath, options: OpenOptions(readOnly: true))
        let guid = parent.dataWriteGuid
        guard parent.virtualSize > 0 else { throw .invalidArgument("\(parentPath) is empty") }
        try? parent.close()
        let child = try VHDXImage(path: childPath, options: OpenOptions(readOnly: false, openParents: false))
        guard child.metadata.hasParent else { throw .invalidArgument("\(childPath) is not a differencing disk") }
        let childAbsolute = ParentResolver.absolute(childPath), parentAbsolute = ParentResolver.absolute(parentPath)
        let relative = ParentResolver.relative(parentAbsolute, from: ParentResolver.directory(of: childAbsolute))
        do throws(VHDXError) {
            try child.rewriteParentLocator { locator in
                var entries = locator.entries.filter { !["parent_linkage", "parent_linkage2", "relative_path", "absolute_win32_path"].contains($0.key) }
                entries.insert(contentsOf: [("parent_linkage", guid.braced),
                                            ("relative_path", ParentResolver.windowsPath(relative)),
                                            ("absolute_win32_path", ParentResolver.windowsPath(parentAbsolute))], at: 0)
                locator.entries = entries
            }
        } catch {
            child.abandon()
            throw error
        }
        try child.close()
    }

    /// Rewrites the parent locator item through the log: in place when it still fits, otherwise
    /// after the last item of the metadata region.
    func rewriteParentLocator(_ change: (inout ParentLocator) -> Void) throws(VHDXError) {
        try lock.withLock { () throws(VHDXError) in
            guard var locator = metadata.parentLocator,
                  let index = metadata.entries.firstIndex(where: { $0.itemID == VHDXMetadata.parentLocatorID && !$0.isUser }) else {
                throw .invalidArgument("\(path) has no parent locator")
            }
            change(&locator)
            let item = locator.encode()
            var entry = metadata.entries[index]
            let region = regions.metadata!
            if item.count > Int(entry.length) {
                let end = metadata.entries.map { UInt64($0.offset) + UInt64($0.length) }.max() ?? UInt64(VHDXMetadata.tableSize)
                let offset = roundUp(max(end, UInt64(VHDXMetadata.tableSize)), 8)
                guard offset + UInt64(item.count) <= UInt64(region.length) else {
                    throw .unsupported(path: path, detail: "no room in the metadata region for a larger parent locator")
                }
                entry.offset = UInt32(offset)
            }
            entry.length = UInt32(item.count)
            try beginModification(userVisible: false)
            // Patch the table entry and the item, and log every page they touch.
            let base = region.fileOffset
            let touched: [Range<UInt64>] = [
                (base + UInt64(32 + 32 * index))..<(base + UInt64(64 + 32 * index)),
                (base + UInt64(entry.offset))..<(base + UInt64(entry.offset) + UInt64(item.count)),
            ]
            var pages: [UInt64: [UInt8]] = [:]
            for r in touched {
                var p = r.lowerBound & ~4095
                while p < r.upperBound {
                    if pages[p] == nil { pages[p] = try readFile(count: 4096, at: p) }
                    p += 4096
                }
            }
            func put(_ bytes: [UInt8], at offset: UInt64) {
                for (k, byte) in bytes.enumerated() {
                    let o = offset + UInt64(k)
                    pages[o & ~4095]![Int(o & 4095)] = byte
                }
            }
            var field = [UInt8](repeating: 0, count: 8)
            field.storeLE(entry.offset, at: 0)
            field.storeLE(entry.length, at: 4)
            put(field, at: base + UInt64(32 + 32 * index + 16))
            put(item, at: base + UInt64(entry.offset))
            try file.sync()
            try commit(pages: pages.keys.sorted().map { ($0, pages[$0]!) })
            metadata.entries[index] = entry
            metadata.parentLocator = locator
        }
    }
}
