/// The write path: payload writes, block allocation, write-zeroes and discard.
///
/// Payload data never goes through the log. A write to a FULLY_PRESENT block goes straight to the
/// file. Any other state allocates: a new block at the 1 MiB-aligned end of the file (fresh space
/// reads as zeros, which is what ZERO/UNMAPPED/NOT_PRESENT blocks of a non-differencing disk read
/// as). A differencing disk's NOT_PRESENT block becomes PARTIALLY_PRESENT with sector-bitmap bits
/// set for what was written, so unwritten sectors still come from the parent; it is promoted to
/// FULLY_PRESENT once every bit is set.
extension VHDXImage {
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        try validate(offset: offset, length: UInt64(buffer.count))
        do throws(VHDXError) { try writeVirtual(buffer, at: offset) } catch { throw error.blockError }
    }

    func writeVirtual(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(VHDXError) {
        let bs = geometry.blockSize
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let block = pos / bs, inBlock = pos % bs
            let n = Int(min(UInt64(buffer.count - done), bs - inBlock))
            let piece = UnsafeRawBufferPointer(rebasing: buffer[done..<done + n])
            // Fast path: an allocated block is written outside the lock.
            let target = try lock.withLock { () throws(VHDXError) -> UInt64? in
                try beginModification(userVisible: true)
                let e = BATEntry(raw: bat[geometry.payloadIndex(block)])
                return e.state == PayloadBlockState.fullyPresent.rawValue ? e.fileOffset + inBlock : nil
            }
            if let target {
                try file.write(piece, at: target)
            } else {
                try lock.withLock { () throws(VHDXError) in try writeLocked(piece, block: block, inBlock: inBlock) }
            }
            done += n
        }
    }

    /// Writes within one block, allocating as needed. Caller holds the lock and has begun the session.
    func writeLocked(_ data: UnsafeRawBufferPointer, block: UInt64, inBlock: UInt64) throws(VHDXError) {
        let index = geometry.payloadIndex(block)
        let entry = BATEntry(raw: bat[index])
        let lss = geometry.logicalSectorSize
        let firstSector = (block * geometry.blockSize + inBlock) / lss
        let sectors = firstSector..<firstSector + UInt64(data.count) / lss
        switch entry.state {
        case PayloadBlockState.fullyPresent.rawValue:
            try file.write(data, at: entry.fileOffset + inBlock)
        case PayloadBlockState.partiallyPresent.rawValue:
            try file.write(data, at: entry.fileOffset + inBlock)
            try setBitmapBits(sectors: sectors)
            if try blockFullyMapped(block) {
                setBATEntry(index, BATEntry(state: PayloadBlockState.fullyPresent.rawValue, fileOffset: entry.fileOffset))
            }
        case PayloadBlockState.notPresent.rawValue where metadata.hasParent
            && !(inBlock == 0 && UInt64(data.count) == geometry.blockLength(block)):
            // Copy-on-write at sector granularity: the rest of the block stays with the parent.
            let chunk = block / geometry.chunkRatio
            let sbIndex = geometry.bitmapIndex(chunk: chunk)
            if BATEntry(raw: bat[sbIndex]).state != SectorBitmapState.present {
                let sb = try allocate(MiB)
                setBATEntry(sbIndex, BATEntry(state: SectorBitmapState.present, fileOffset: sb))
            }
            let offset = try allocate(geometry.blockSize)
            try file.write(data, at: offset + inBlock)
            setBATEntry(index, BATEntry(state: PayloadBlockState.partiallyPresent.rawValue, fileOffset: offset))
            try setBitmapBits(sectors: sectors)
        default:
            // NOT_PRESENT (or a whole-block write in a child), ZERO, UNMAPPED, UNDEFINED: a new block
            // whose unwritten part reads as zeros, as the block did before.
            let offset = try allocate(geometry.blockSize)
            try file.write(data, at: offset + inBlock)
            setBATEntry(index, BATEntry(state: PayloadBlockState.fullyPresent.rawValue, fileOffset: offset))
        }
    }

    /// Unallocated states that read as zeros in this disk (not the parent).
    func readsAsZeros(_ state: UInt8) -> Bool {
        switch state {
        case PayloadBlockState.zero.rawValue, PayloadBlockState.unmapped.rawValue,
             PayloadBlockState.undefined.rawValue, PayloadBlockState.unmappedV095.rawValue: return true
        case PayloadBlockState.notPresent.rawValue: return !metadata.hasParent
        default: return false
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        try validate(offset: offset, length: length)
        do throws(VHDXError) { try zeroVirtual(offset: offset, length: length) } catch { throw error.blockError }
    }

    func zeroVirtual(offset: UInt64, length: UInt64) throws(VHDXError) {
        let bs = geometry.blockSize
        let zeros = [UInt8](repeating: 0, count: Int(min(length, MiB)))
        var pos = offset
        while pos < offset + length {
            let block = pos / bs, inBlock = pos % bs
            let n = min(offset + length - pos, bs - inBlock)
            try lock.withLock { () throws(VHDXError) in
                let index = geometry.payloadIndex(block)
                let e = BATEntry(raw: bat[index])
                if readsAsZeros(e.state) { return }
                try beginModification(userVisible: true)
                if e.state == PayloadBlockState.fullyPresent.rawValue {
                    // Keep the block; give its host space back where the range allows.
                    try zeroFileRange(e.fileOffset + inBlock, n)
                } else if e.state == PayloadBlockState.notPresent.rawValue && inBlock == 0 && n == geometry.blockLength(block) {
                    // A whole child block: ZERO hides the parent without storing anything.
                    setBATEntry(index, BATEntry(state: PayloadBlockState.zero.rawValue, fileOffset: 0))
                } else {
                    var done: UInt64 = 0
                    while done < n {
                        let k = Int(min(n - done, UInt64(zeros.count)))
                        let r: Result<Void, VHDXError> = zeros.withUnsafeBytes { z in
                            do throws(VHDXError) {
                                try writeLocked(UnsafeRawBufferPointer(rebasing: z[0..<k]), block: block, inBlock: inBlock + done)
                                return .success(())
                            } catch { return .failure(error) }
                        }
                        try r.get()
                        done += UInt64(k)
                    }
                }
            }
            pos += n
        }
    }

    /// Zeros a file range: whole 4 KiB pages are punched out, the edges written.
    func zeroFileRange(_ start: UInt64, _ length: UInt64) throws(VHDXError) {
        let end = start + length
        let lo = roundUp(start, 4096), hi = end & ~4095
        if lo < hi && !metadata.leaveBlocksAllocated {
            if start < lo { try file.writeZeros(at: start, length: lo - start) }
            try file.punchHole(at: lo, length: hi - lo)
            if hi < end { try file.writeZeros(at: hi, length: end - hi) }
        } else {
            try file.writeZeros(at: start, length: length)
        }
    }

    /// Frees host space under whole pages of allocated blocks. Unallocated ranges are left alone
    /// (in a child they keep showing the parent, which discard allows), and fixed disks keep their
    /// preallocated space.
    public func discard(offset: UInt64, length: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        try validate(offset: offset, length: length)
        guard !metadata.leaveBlocksAllocated || metadata.hasParent else { return }
        let bs = geometry.blockSize
        var pos = offset
        do throws(VHDXError) {
            while pos < offset + length {
                let block = pos / bs, inBlock = pos % bs
                let n = min(offset + length - pos, bs - inBlock)
                try lock.withLock { () throws(VHDXError) in
                    let e = BATEntry(raw: bat[geometry.payloadIndex(block)])
                    guard e.state == PayloadBlockState.fullyPresent.rawValue else { return }
                    let lo = roundUp(e.fileOffset + inBlock, 4096), hi = (e.fileOffset + inBlock + n) & ~4095
                    guard lo < hi else { return }
                    try beginModification(userVisible: true)
                    try file.punchHole(at: lo, length: hi - lo)
                }
                pos += n
            }
        } catch { throw error.blockError }
    }
}
