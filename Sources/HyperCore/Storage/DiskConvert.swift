/// Copies any disk (raw, or a VHDX with its whole parent chain) into a new raw or VHDX file.
/// Regions that read as zeros are never written: a raw target stays sparse, a dynamic VHDX target
/// leaves those blocks unallocated.
public enum DiskConverter {
    public struct Target: Sendable {
        public var path: String
        public var format: DiskFormat
        public var type: VHDXDiskType
        public var blockSize: UInt32
        public var overwrite: Bool

        public init(path: String, format: DiskFormat, type: VHDXDiskType = .dynamic, blockSize: UInt32 = 0, overwrite: Bool = false) {
            self.path = path
            self.format = format
            self.type = type
            self.blockSize = blockSize
            self.overwrite = overwrite
        }
    }

    /// Bytes copied per step.
    static let chunk: UInt64 = 4 << 20

    public static func convert(source: any BlockBackend, to target: Target,
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws(VHDXError) {
        let size = source.virtualSize
        let sink: any BlockBackend
        var vhdx: VHDXImage?
        switch target.format {
        case .raw:
            try RawImage.create(path: target.path, size: size, overwrite: target.overwrite)
            sink = try RawImage(path: target.path, readOnly: false, logicalSectorSize: source.logicalSectorSize)
        case .vhdx:
            guard target.type != .differencing else { throw .invalidArgument("convert makes fixed or dynamic disks, not differencing ones") }
            try VHDXImage.create(path: target.path, options: VHDXCreateOptions(
                virtualSize: size, type: target.type, blockSize: target.blockSize,
                logicalSectorSize: source.logicalSectorSize, physicalSectorSize: source.physicalSectorSize, overwrite: target.overwrite))
            let image = try VHDXImage(path: target.path)
            vhdx = image
            sink = image
        }
        let sourceVHDX = source as? VHDXImage
        let step = vhdx.map { max(chunk, UInt64($0.blockSize)) } ?? chunk
        var buffer = [UInt8](repeating: 0, count: Int(min(step, max(size, 1))))
        var pos: UInt64 = 0
        while pos < size {
            progress?(pos, size)
            let n = min(step, size - pos)
            if let sourceVHDX, !sourceVHDX.isAllocated(offset: pos, length: n) { pos += n; continue }
            let r: Result<Void, VHDXError> = buffer.withUnsafeMutableBytes { buf in
                let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(n)])
                do throws(BlockError) {
                    try source.read(into: piece, at: pos)
                    // Write only the non-zero 1 MiB pieces (a whole block for VHDX targets, so
                    // each block is allocated once).
                    let grain = vhdx.map { UInt64($0.blockSize) } ?? MiB
                    var at: UInt64 = 0
                    while at < n {
                        let k = min(grain, n - at)
                        let sub = UnsafeRawBufferPointer(rebasing: piece[Int(at)..<Int(at + k)])
                        if !isZero(sub) { try sink.write(sub, at: pos + at) }
                        at += k
                    }
                    return .success(())
                } catch { return .failure(.io(path: target.path, operation: "convert: \(error)", offset: pos, errno: 0)) }
            }
            try r.get()
            pos += n
        }
        do throws(BlockError) { try sink.flush() } catch { throw .io(path: target.path, operation: "flush: \(error)", offset: 0, errno: 0) }
        try vhdx?.close()
        progress?(size, size)
    }
}
