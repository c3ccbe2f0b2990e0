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

    /// Writes this differencing disk's own data into its parent (Merge-VHD). The parent is opened
    /// read-write for the merge only; afterwards this child no longer matches its parent (the
    /// parent's DataWriteGuid changed) and should be deleted.
    public func mergeIntoParent(progress: ((UInt64, UInt64) -> Void)? = nil) throws(VHDXError) {
        guard metadata.hasParent, let parent else { throw .invalidArgument("\(path) is not a differencing disk") }
        let target = try VHDXImage(path: parent.path, options: OpenOptions(readOnly: false))
        if target.virtualSize < virtualSize { try target.resize(to: virtualSize) }
        let g = geometry
        var buffer = [UInt8](repeating: 0, count: Int(g.blockSize))
        for b in 0..<g.payloadBlocks {
            progress?(b, g.payloadBlocks)
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
