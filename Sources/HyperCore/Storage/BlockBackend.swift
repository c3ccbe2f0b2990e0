/// A virtual disk as a device model sees it: a linear array of bytes addressed by offset.
///
/// Conformers: ``RawImage`` (a plain file) and the VHDX image. virtio-blk converts sector requests
/// into calls on this protocol; it never knows the on-disk format.
///
/// Contract for every method: `offset` and the buffer length are multiples of
/// ``logicalSectorSize``; a range that is not inside `0..<virtualSize` throws
/// ``BlockError/outOfRange(offset:length:size:)`` and touches nothing. Implementations use positioned
/// I/O only (`pread`/`pwrite`), so calls from several threads never share a file offset.
public protocol BlockBackend: AnyObject, Sendable {
    /// Size of the disk as the guest sees it, in bytes.
    var virtualSize: UInt64 { get }
    var logicalSectorSize: UInt32 { get }
    var physicalSectorSize: UInt32 { get }
    var isReadOnly: Bool { get }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError)
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError)
    /// Makes every completed write durable (`fdatasync` and, for VHDX, the log).
    func flush() throws(BlockError)
    /// Hints that a range's contents are no longer needed; reading it afterwards may return zeroes
    /// or the old data. Backends that cannot discard do nothing.
    func discard(offset: UInt64, length: UInt64) throws(BlockError)
    /// Makes a range read as zeroes.
    func writeZeroes(offset: UInt64, length: UInt64) throws(BlockError)
    /// Ends the session cleanly: flushes and, for VHDX, applies the log and rewrites both headers
    /// with a zero LogGuid, so other tools (qemu-img, Hyper-V) open the file without a replay.
    /// Call it once no device can issue more I/O (after the machine has stopped); later calls do
    /// nothing. Conformers throw their own typed error (``BlockError`` for raw files,
    /// ``VHDXError`` for VHDX), whose message names the file.
    func close() throws
}

/// Why a block request failed. Messages name the file and offset so a user can act on them.
public enum BlockError: Error, Equatable, Sendable, CustomStringConvertible {
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    case misaligned(offset: UInt64, length: UInt64, sectorSize: UInt32)
    case readOnly(path: String)
    case io(path: String, offset: UInt64, errno: Int32)
    case corrupt(path: String, detail: String)
    case unsupported(String)

    public var description: String {
        switch self {
        case let .outOfRange(offset, length, size):
            return "request at offset \(offset) length \(length) is outside the disk (size \(size) bytes)"
        case let .misaligned(offset, length, sectorSize):
            return "request at offset \(offset) length \(length) is not aligned to the \(sectorSize)-byte sector size"
        case let .readOnly(path):
            return "\(path): the disk is read-only"
        case let .io(path, offset, errno):
            return "\(path): I/O error at file offset \(offset): \(SystemError.describe(errno))"
        case let .corrupt(path, detail):
            return "\(path): corrupt image: \(detail)"
        case let .unsupported(what):
            return "unsupported: \(what)"
        }
    }
}

extension BlockBackend {
    /// Throws unless `offset..<offset+length` lies inside the disk and is sector-aligned.
    @inlinable
    public func validate(offset: UInt64, length: UInt64) throws(BlockError) {
        let sector = UInt64(logicalSectorSize)
        guard offset % sector == 0, length % sector == 0 else {
            throw .misaligned(offset: offset, length: length, sectorSize: logicalSectorSize)
        }
        let (end, overflow) = offset.addingReportingOverflow(length)
        guard !overflow, end <= virtualSize else {
            throw .outOfRange(offset: offset, length: length, size: virtualSize)
        }
    }
}
