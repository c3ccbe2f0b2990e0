/// A raw disk image: the file's bytes are the disk's bytes. Positioned I/O only, `fdatasync` on
/// flush, hole punching for discard and write-zeroes.
public final class RawImage: BlockBackend, Sendable {
    public let path: String
    let file: DiskFile
    public let virtualSize: UInt64
    public let logicalSectorSize: UInt32
    public let physicalSectorSize: UInt32
    public var isReadOnly: Bool { file.isReadOnly }

    public init(path: String, readOnly: Bool, logicalSectorSize: UInt32 = 512, physicalSectorSize: UInt32 = 4096) throws(VHDXError) {
        file = try DiskFile(path: path, readOnly: readOnly)
        self.path = path
        let size = try file.size()
        self.virtualSize = size - size % UInt64(logicalSectorSize)
        self.logicalSectorSize = logicalSectorSize
        self.physicalSectorSize = physicalSectorSize
    }

    /// Creates a sparse raw file of `size` bytes.
    public static func create(path: String, size: UInt64, overwrite: Bool = false) throws(VHDXError) {
        let f = try DiskFile(creating: path, overwrite: overwrite)
        try f.truncate(to: size)
        try f.sync()
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError) {
        try validate(offset: offset, length: UInt64(buffer.count))
        do throws(VHDXError) { try file.read(into: buffer, at: offset) } catch { throw error.blockError }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        try validate(offset: offset, length: UInt64(buffer.count))
        do throws(VHDXError) { try file.write(buffer, at: offset) } catch { throw error.blockError }
    }

    public func flush() throws(BlockError) {
        do throws(VHDXError) { try file.sync() } catch { throw error.blockError }
    }

    /// A raw file has nothing to finish: close makes the data durable, as flush does.
    public func close() throws(BlockError) {
        guard !isReadOnly else { return }
        try flush()
    }

    public func discard(offset: UInt64, length: UInt64) throws(BlockError) {
        try writeZeroes(offset: offset, length: length)
    }

    public func writeZeroes(offset: UInt64, length: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: path) }
        try validate(offset: offset, length: length)
        do throws(VHDXError) { try file.punchHole(at: offset, length: length) } catch { throw error.blockError }
    }
}
