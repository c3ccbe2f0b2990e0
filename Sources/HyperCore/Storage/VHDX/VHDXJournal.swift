/// Writing metadata through the log ([MS-VHDX] 2.3): the write-ahead protocol every BAT, bitmap,
/// metadata and region-table change follows.
///
/// A session starts with an empty entry under a fresh LogGuid, made durable *before* the headers
/// publish that GUID, so a crash never leaves a LogGuid with no valid entry. Each commit writes one
/// entry (≤126 pages, so QEMU can replay it too) whose Tail points at itself — everything before it
/// is already applied — flushes, writes the pages in place and flushes again. Entries are at most
/// half the log, so a new entry never overwrites the previous one, which stays replayable until
/// the new one is complete.
struct LogSession: Sendable {
    var logGuid: GUID
    var nextSequence: UInt64
    /// Offset in the log ring where the next entry starts.
    var head: UInt64
}

extension VHDXImage {
    /// Starts the write session if needed: before the first change to the file, update the
    /// headers (new FileWriteGuid, and a new DataWriteGuid if the change is visible to readers).
    /// Caller holds the lock.
    func beginModification(userVisible: Bool) throws(VHDXError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        guard !closed else { throw .invalidArgument("\(path): the image is closed") }
        if session == nil {
            let h = headers.current
            let guid = GUID.random()
            let empty = VHDXLog.encode(sequenceNumber: 1, tail: 0, logGuid: guid, flushedFileOffset: fileSize & ~(MiB - 1),
                                       lastFileOffset: roundUp(fileSize, MiB), pages: [])
            try file.write(empty, at: h.logOffset)
            try file.sync()
            let newDataGuid = userVisible ? (plannedDataWriteGuid ?? GUID.random()) : h.dataWriteGuid
            for _ in 0..<2 {
                try headers.update(file) {
                    $0.fileWriteGuid = .random()
                    $0.dataWriteGuid = newDataGuid
                    $0.logGuid = guid
                }
            }
            session = LogSession(logGuid: guid, nextSequence: 2, head: UInt64(empty.count))
            dataWriteGuidChanged = userVisible
        } else if userVisible && !dataWriteGuidChanged {
            let newDataGuid = plannedDataWriteGuid ?? GUID.random()
            for _ in 0..<2 { try headers.update(file) { $0.dataWriteGuid = newDataGuid } }
            dataWriteGuidChanged = true
        }
    }

    /// Largest number of pages one entry may carry in this log.
    var pagesPerEntry: Int {
        let halfLogSectors = Int(headers.current.logLength) / 2 / VHDXLog.sector
        return max(1, min(VHDXLog.maxDescriptorsPerEntry, halfLogSectors - 1))
    }

    /// Writes `pages` (4 KiB each, 4 KiB aligned) through the log: entry, flush, in place, flush.
    /// The caller has already made any data these pages point at durable. Caller holds the lock.
    func commit(pages: [(fileOffset: UInt64, page: [UInt8])]) throws(VHDXError) {
        guard !pages.isEmpty else { return }
        guard var s = session else { throw .invalidArgument("\(path): metadata change outside a write session") }
        let h = headers.current
        let ring = UInt64(h.logLength)
        var start = 0
        while start < pages.count {
            let batch = Array(pages[start..<min(pages.count, start + pagesPerEntry)])
            start += batch.count
            let entry = VHDXLog.encode(sequenceNumber: s.nextSequence, tail: UInt32(s.head), logGuid: s.logGuid,
                                       flushedFileOffset: fileSize & ~(MiB - 1), lastFileOffset: roundUp(fileSize, MiB),
                                       pages: batch)
            // The entry may wrap around the end of the ring, sector by sector.
            let firstPart = Int(min(UInt64(entry.count), ring - s.head))
            try file.write(Array(entry[0..<firstPart]), at: h.logOffset + s.head)
            if firstPart < entry.count { try file.write(Array(entry[firstPart...]), at: h.logOffset) }
            try file.sync()
            for p in batch { try file.write(p.page, at: p.fileOffset) }
            try file.sync()
            s.head = (s.head + UInt64(entry.count)) % ring
            s.nextSequence += 1
            session = s
        }
    }

    /// The pending BAT and bitmap pages, as they should be on disk. Caller holds the lock.
    func dirtyPages() -> [(fileOffset: UInt64, page: [UInt8])] {
        var pages: [(fileOffset: UInt64, page: [UInt8])] = []
        let batOffset = regions.bat!.fileOffset
        for p in dirtyBATPages.sorted() {
            var page = [UInt8](repeating: 0, count: 4096)
            for i in 0..<512 { page.storeLE(bat[p * 512 + i], at: 8 * i) }
            pages.append((batOffset + UInt64(p) * 4096, page))
        }
        for o in dirtyBitmapPages.sorted() { pages.append((o, bitmapPages[o]!)) }
        return pages
    }

    /// Makes everything written so far durable: data first, then the metadata that exposes it.
    /// Caller holds the lock.
    func flushLocked() throws(VHDXError) {
        guard !isReadOnly else { return }
        try file.sync()
        let pages = dirtyPages()
        if !pages.isEmpty {
            try commit(pages: pages)
            dirtyBATPages.removeAll()
            dirtyBitmapPages.removeAll()
        }
    }

    public func flush() throws(BlockError) {
        do throws(VHDXError) { try lock.withLock { () throws(VHDXError) in try flushLocked() } } catch { throw error.blockError }
    }

    /// Flushes and, if this session changed the file, clears the LogGuid so the file is clean.
    public func close() throws(VHDXError) {
        try lock.withLock { () throws(VHDXError) in
            guard !closed else { return }
            if !isReadOnly {
                try flushLocked()
                if session != nil {
                    for _ in 0..<2 { try headers.update(file) { $0.logGuid = .zero } }
                    session = nil
                }
            }
            closed = true
        }
    }

    /// Drops the image without the clean-close header update, leaving the log pending exactly as a
    /// crash after the last flush would (the fuzzer's templates and the tests use it).
    public func abandon() {
        lock.withLock { closed = true }
    }

    // MARK: - BAT and bitmap changes (held in memory until flush)

    func setBATEntry(_ index: Int, _ entry: BATEntry) {
        bat[index] = entry.raw
        dirtyBATPages.insert(index / 512)
    }

    /// Appends `length` bytes (a multiple of 1 MiB) at the 1 MiB-aligned end of the file and returns
    /// their offset. Fresh space reads as zeros. Caller holds the lock.
    func allocate(_ length: UInt64) throws(VHDXError) -> UInt64 {
        let offset = roundUp(fileSize, MiB)
        try file.truncate(to: offset + length)
        fileSize = offset + length
        return offset
    }

    /// Sets the bitmap bits of `sectors` (absolute virtual sector numbers) to 1. Caller holds the lock.
    func setBitmapBits(sectors: Range<UInt64>) throws(VHDXError) {
        var s = sectors.lowerBound
        while s < sectors.upperBound {
            guard let loc = try bitmapLocation(sector: s) else {
                throw .corrupt(path: path, structure: "sector bitmap", offset: 0, detail: "no bitmap block for sector \(s)")
            }
            var page = try bitmapPage(loc.page)
            var byte = loc.byte, bit = loc.bit
            // A page covers 32768 sectors and never crosses a chunk, so stay within it.
            let end = min(sectors.upperBound, s + UInt64((4096 - byte) * 8 - bit))
            while s < end {
                if bit == 0 && end - s >= 8 {
                    page[byte] = 0xFF
                    s += 8
                    byte += 1
                } else {
                    page[byte] |= 1 << bit
                    s += 1
                    bit += 1
                    if bit == 8 { bit = 0; byte += 1 }
                }
            }
            bitmapPages[loc.page] = page
            dirtyBitmapPages.insert(loc.page)
        }
    }

    /// True when every sector of `block` has its bit set (a partially present block that can become
    /// fully present). Caller holds the lock.
    func blockFullyMapped(_ block: UInt64) throws(VHDXError) -> Bool {
        let lss = geometry.logicalSectorSize
        var s = block * geometry.blockSize / lss
        let end = s + geometry.blockLength(block) / lss
        while s < end {
            guard let loc = try bitmapLocation(sector: s) else { return false }
            let page = try bitmapPage(loc.page)
            if loc.bit == 0 && end - s >= 8 {
                let bytes = Int(min((end - s) / 8, UInt64(4096 - loc.byte)))
                for i in 0..<bytes where page[loc.byte + i] != 0xFF { return false }
                s += UInt64(bytes) * 8
            } else {
                if page[loc.byte] & (1 << loc.bit) == 0 { return false }
                s += 1
            }
        }
        return true
    }
}
