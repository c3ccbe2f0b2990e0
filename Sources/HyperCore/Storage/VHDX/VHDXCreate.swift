/// Creating fixed, dynamic and differencing images (New-VHD).
///
/// Layout (the one Hyper-V uses): 1 MiB header section, log (1 MiB) at 1 MiB, metadata (1 MiB) at
/// 2 MiB, BAT at 3 MiB, payload after. Everything except the headers is written and flushed first,
/// the headers last: a crash during creation leaves a file with no valid header, which refuses to
/// open instead of looking like an empty disk.
public enum VHDXDiskType: String, Sendable, CaseIterable {
    case fixed, dynamic, differencing
}

public struct VHDXCreateOptions: Sendable {
    public var virtualSize: UInt64
    public var type: VHDXDiskType
    /// Zero picks the default: 32 MiB (Hyper-V's dynamic default), 2 MiB for differencing disks.
    public var blockSize: UInt32
    /// Zero takes the parent's (differencing) or 512.
    public var logicalSectorSize: UInt32
    public var physicalSectorSize: UInt32
    public var logSize: UInt32
    /// The parent of a differencing disk.
    public var parentPath: String?
    public var overwrite: Bool

    public init(virtualSize: UInt64 = 0, type: VHDXDiskType = .dynamic, blockSize: UInt32 = 0, logicalSectorSize: UInt32 = 0,
                physicalSectorSize: UInt32 = 4096, logSize: UInt32 = 1 << 20, parentPath: String? = nil, overwrite: Bool = false) {
        self.virtualSize = virtualSize
        self.type = type
        self.blockSize = blockSize
        self.logicalSectorSize = logicalSectorSize
        self.physicalSectorSize = physicalSectorSize
        self.logSize = logSize
        self.parentPath = parentPath
        self.overwrite = overwrite
    }
}

extension VHDXImage {
    /// Creates an image at `path` and returns it (closed; open it to use it).
    public static func create(path: String, options: VHDXCreateOptions, creator: String = "HyperCore hvrun") throws(VHDXError) {
        var o = options
        var parentInfo: (path: String, dataWriteGuid: GUID, diskID: GUID)?
        var diskID = GUID.random()
        if o.type == .differencing {
            guard let parentPath = o.parentPath else { throw .invalidArgument("a differencing disk needs a parent") }
            // Parents are only ever opened read-only: writing one would orphan its children.
            let parent = try VHDXImage(path: parentPath, options: OpenOptions(readOnly: true))
            if o.virtualSize == 0 { o.virtualSize = parent.virtualSize }
            if o.logicalSectorSize == 0 { o.logicalSectorSize = parent.logicalSectorSize }
            guard o.logicalSectorSize == parent.logicalSectorSize else {
                throw .invalidArgument("the child's logical sector size (\(o.logicalSectorSize)) must equal the parent's (\(parent.logicalSectorSize))")
            }
            o.physicalSectorSize = parent.physicalSectorSize
            diskID = parent.diskID
            parentInfo = (parentPath, parent.dataWriteGuid, parent.diskID)
            if o.blockSize == 0 { o.blockSize = 2 << 20 }
        }
        if o.logicalSectorSize == 0 { o.logicalSectorSize = 512 }
        if o.blockSize == 0 { o.blockSize = 32 << 20 }
        guard o.logicalSectorSize == 512 || o.logicalSectorSize == 4096 else { throw .invalidArgument("logical sector size must be 512 or 4096") }
        guard o.physicalSectorSize == 512 || o.physicalSectorSize == 4096 else { throw .invalidArgument("physical sector size must be 512 or 4096") }
        guard o.blockSize >= 1 << 20, o.blockSize <= 256 << 20, o.blockSize & (o.blockSize - 1) == 0 else {
            throw .invalidArgument("block size must be a power of two from 1 MiB to 256 MiB")
        }
        guard o.virtualSize > 0, o.virtualSize <= VHDXLayout.maxVirtualSize, o.virtualSize % UInt64(o.logicalSectorSize) == 0 else {
            throw .invalidArgument("size must be a non-zero multiple of \(o.logicalSectorSize) bytes, at most 64 TiB")
        }
        guard o.logSize >= 1 << 20, UInt64(o.logSize) % MiB == 0 else { throw .invalidArgument("log size must be a multiple of 1 MiB") }

        let geometry = BATGeometry(blockSize: UInt64(o.blockSize), logicalSectorSize: UInt64(o.logicalSectorSize),
                                   virtualSize: o.virtualSize, hasParent: o.type == .differencing)
        let logOffset = MiB
        let metadataOffset = logOffset + UInt64(o.logSize)
        let batOffset = metadataOffset + MiB
        let batLength = geometry.regionLength
        guard batLength <= UInt64(UInt32.max) & ~(MiB - 1) else { throw .invalidArgument("the BAT would exceed 4 GiB; use a larger block size") }
        let payloadOffset = batOffset + batLength

        var locator: ParentLocator?
        if let p = parentInfo {
            let childAbs = ParentResolver.absolute(path)
            let parentAbs = ParentResolver.absolute(p.path)
            let rel = ParentResolver.relative(parentAbs, from: ParentResolver.directory(of: childAbs))
            locator = ParentLocator(entries: [
                ("parent_linkage", p.dataWriteGuid.braced),
                ("relative_path", ParentResolver.windowsPath(rel)),
                ("absolute_win32_path", ParentResolver.windowsPath(parentAbs)),
            ])
        }
        let metadataRegion = VHDXMetadata.encodeRegion(
            blockSize: o.blockSize, leaveBlocksAllocated: o.type == .fixed, hasParent: o.type == .differencing,
            virtualSize: o.virtualSize, diskID: diskID, logicalSectorSize: o.logicalSectorSize,
            physicalSectorSize: o.physicalSectorSize, parentLocator: locator)
        let regions = VHDXRegionTable(entries: [
            .init(guid: VHDXRegionTable.batGUID, fileOffset: batOffset, length: UInt32(batLength), required: true),
            .init(guid: VHDXRegionTable.metadataGUID, fileOffset: metadataOffset, length: UInt32(MiB), required: true),
        ])

        let file = try DiskFile(creating: path, overwrite: o.overwrite)
        try file.write(encodeFileIdentifier(creator: creator), at: 0)
        let rt = regions.encode()
        for off in VHDXLayout.regionTableOffsets { try file.write(rt, at: off) }
        try file.write(metadataRegion, at: metadataOffset)
        var fileEnd = payloadOffset
        if o.type == .fixed {
            // Every block present and contiguous; the BAT is written in 1 MiB pieces.
            let payloadLength = geometry.payloadBlocks * geometry.blockSize
            try file.preallocate(offset: payloadOffset, length: payloadLength)
            fileEnd = payloadOffset + payloadLength
            var piece = [UInt8](repeating: 0, count: Int(MiB))
            var pieceStart = 0
            for b in 0..<geometry.payloadBlocks {
                let index = geometry.payloadIndex(b)
                while index >= pieceStart + piece.count / 8 {
                    try file.write(piece, at: batOffset + UInt64(pieceStart) * 8)
                    piece = [UInt8](repeating: 0, count: Int(MiB))
                    pieceStart += Int(MiB) / 8
                }
                piece.storeLE(BATEntry(state: PayloadBlockState.fullyPresent.rawValue, fileOffset: payloadOffset + b * geometry.blockSize).raw,
                              at: (index - pieceStart) * 8)
            }
            try file.write(piece, at: batOffset + UInt64(pieceStart) * 8)
        }
        try file.truncate(to: max(fileEnd, payloadOffset))
        try file.sync()
        let dataGuid = GUID.random()
        for (slot, seq) in [(0, UInt64(1)), (1, UInt64(2))] {
            let h = VHDXHeader(sequenceNumber: seq, fileWriteGuid: .random(), dataWriteGuid: dataGuid, logGuid: .zero,
                               logVersion: 0, version: 1, logLength: o.logSize, logOffset: logOffset)
            try file.write(h.encode(), at: VHDXLayout.headerOffsets[slot])
            try file.sync()
        }
    }
}
