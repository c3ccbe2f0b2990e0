/// The block allocation table ([MS-VHDX] 2.5): one u64 per payload block, with a sector-bitmap
/// entry after every `chunkRatio` payload entries.
public enum PayloadBlockState: UInt8, Sendable {
    case notPresent = 0
    case undefined = 1
    case zero = 2
    case unmapped = 3
    /// The v0.95 draft's UNMAPPED; old files still carry it. Read as zeros.
    case unmappedV095 = 5
    case fullyPresent = 6
    case partiallyPresent = 7
}

/// Sector-bitmap block states: 0 not present, 6 present.
enum SectorBitmapState {
    static let notPresent: UInt8 = 0
    static let present: UInt8 = 6
}

struct BATEntry: Equatable, Sendable {
    var raw: UInt64
    init(raw: UInt64) { self.raw = raw }
    init(state: UInt8, fileOffset: UInt64) { raw = (fileOffset & ~0xF_FFFF) | UInt64(state & 7) }

    var state: UInt8 { UInt8(raw & 7) }
    var fileOffset: UInt64 { raw & ~0xF_FFFF }
    /// Bits 3–19 are reserved and must be zero.
    var reservedBits: UInt64 { raw & 0xF_FFF8 }
}

/// Index arithmetic of the BAT; the interleave lives only here.
struct BATGeometry: Equatable, Sendable {
    let blockSize: UInt64
    let logicalSectorSize: UInt64
    let virtualSize: UInt64
    let hasParent: Bool

    /// Payload blocks per sector-bitmap block: the chunk is 2^23 sectors whatever the block size.
    var chunkRatio: UInt64 { (UInt64(1) << 23) * logicalSectorSize / blockSize }
    var payloadBlocks: UInt64 { (virtualSize + blockSize - 1) / blockSize }
    var sectorBitmapBlocks: UInt64 { (payloadBlocks + chunkRatio - 1) / chunkRatio }
    var sectorsPerBlock: UInt64 { blockSize / logicalSectorSize }

    /// Entries a well-formed BAT holds. Differencing disks need every chunk's bitmap entry; the
    /// others need entries only up to the last payload block.
    var entryCount: UInt64 {
        if payloadBlocks == 0 { return 0 }
        return hasParent ? sectorBitmapBlocks * (chunkRatio + 1) : payloadBlocks + (payloadBlocks - 1) / chunkRatio
    }

    /// Bytes the BAT region needs, rounded to 1 MiB (sized for the bitmap entries too, so a
    /// dynamic disk could become a parent-backed layout without moving the BAT).
    var regionLength: UInt64 { max(MiB, roundUp(sectorBitmapBlocks * (chunkRatio + 1) * 8, MiB)) }

    @inline(__always) func payloadIndex(_ block: UInt64) -> Int { Int(block + block / chunkRatio) }
    @inline(__always) func bitmapIndex(chunk: UInt64) -> Int { Int(chunk * (chunkRatio + 1) + chunkRatio) }
    @inline(__always) func isBitmapIndex(_ index: Int) -> Bool { UInt64(index) % (chunkRatio + 1) == chunkRatio }

    /// Bytes of the virtual disk block `b` covers (the last block may be partial).
    func blockLength(_ block: UInt64) -> UInt64 {
        let start = block * blockSize
        return start >= virtualSize ? 0 : min(blockSize, virtualSize - start)
    }
}
