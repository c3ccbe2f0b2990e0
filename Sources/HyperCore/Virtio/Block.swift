/// virtio-blk (virtio 1.2 §5.2) on any ``BlockBackend``: raw files, VHDX.
///
/// One request queue. Requests are served synchronously on the device's I/O thread with
/// positioned I/O straight into and out of guest memory (the chain's segments are already-checked
/// host pointers). Every request's range is checked against the disk before the backend sees it:
/// an out-of-range, misaligned or oversized request answers IOERR and touches nothing.
public final class VirtioBlock: VirtioDevice, @unchecked Sendable {
    public static let featureSegMax: UInt64 = 1 << 2
    public static let featureReadOnly: UInt64 = 1 << 5
    public static let featureBlockSize: UInt64 = 1 << 6
    public static let featureFlush: UInt64 = 1 << 9
    public static let featureDiscard: UInt64 = 1 << 13
    public static let featureWriteZeroes: UInt64 = 1 << 14

    public static let typeIn: UInt32 = 0
    public static let typeOut: UInt32 = 1
    public static let typeFlush: UInt32 = 4
    public static let typeGetID: UInt32 = 8
    public static let typeDiscard: UInt32 = 11
    public static let typeWriteZeroes: UInt32 = 13

    public static let statusOK: UInt8 = 0
    public static let statusIOError: UInt8 = 1
    public static let statusUnsupported: UInt8 = 2

    static let sector: UInt64 = 512
    static let idLength = 20
    /// Largest data transfer in one request; larger ones fail rather than tie the thread up.
    static let maximumTransfer: UInt64 = 64 << 20
    /// Largest range one discard or write-zeroes segment may cover, in sectors (1 GiB).
    static let maximumZeroSectors: UInt32 = 1 << 21

    /// The disk. Requests run under the device core's lock, and so does ``replaceBackend(_:)``
    /// (a checkpoint moving the guest onto a differencing child), so a request never sees two.
    public private(set) var backend: any BlockBackend
    public let queueSize: UInt16
    private let identifier: [UInt8]
    private let config: [UInt8]
    private var negotiated: UInt64 = 0
    public let deviceFeatures: UInt64

    public init(backend: any BlockBackend, identifier: String = "hypercore-disk", queueSize: UInt16 = 256) {
        self.backend = backend
        self.queueSize = queueSize
        self.identifier = Array(identifier.utf8.prefix(Self.idLength))
        var features = Self.featureSegMax | Self.featureBlockSize | Self.featureFlush
            | Self.featureDiscard | Self.featureWriteZeroes
        if backend.isReadOnly { features |= Self.featureReadOnly }
        deviceFeatures = features

        var config = [UInt8](repeating: 0, count: 60)
        func put(_ value: UInt64, at offset: Int, bytes: Int) {
            for i in 0..<bytes { config[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        }
        put(backend.virtualSize / Self.sector, at: 0, bytes: 8)                // capacity (512-byte sectors)
        put(UInt64(queueSize) - 2, at: 12, bytes: 4)                           // seg_max: header and status need two
        put(UInt64(backend.logicalSectorSize), at: 20, bytes: 4)               // blk_size
        put(UInt64(Self.maximumZeroSectors), at: 36, bytes: 4)                 // max_discard_sectors
        put(1, at: 40, bytes: 4)                                               // max_discard_seg
        put(UInt64(backend.logicalSectorSize) / Self.sector, at: 44, bytes: 4) // discard_sector_alignment
        put(UInt64(Self.maximumZeroSectors), at: 48, bytes: 4)                 // max_write_zeroes_sectors
        put(1, at: 52, bytes: 4)                                               // max_write_zeroes_seg
        config[56] = 1                                                         // write_zeroes_may_unmap
        self.config = config
    }

    public var deviceType: UInt16 { VirtioDeviceType.block }
    public var queueSizes: [UInt16] { [queueSize] }
    public var configSize: Int { config.count }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in 0..<data.count where offset + i < config.count { data[i] = config[offset + i] }
    }

    public func activate(_ context: VirtioDeviceContext) { negotiated = context.features }

    /// Puts another disk behind the device; the guest sees no change, so it must have the same
    /// size, sector sizes and read-only flag. Call with the core's lock held (``Machine/replaceDisk(_:with:)`` does).
    func replaceBackend(_ new: any BlockBackend) throws(MachineError) {
        guard new.virtualSize == backend.virtualSize, new.logicalSectorSize == backend.logicalSectorSize,
              new.physicalSectorSize == backend.physicalSectorSize, new.isReadOnly == backend.isReadOnly else {
            throw .invalidConfiguration("the replacement disk differs from the one the guest sees (size \(new.virtualSize) vs \(backend.virtualSize), sectors \(new.logicalSectorSize)/\(new.physicalSectorSize) vs \(backend.logicalSectorSize)/\(backend.physicalSectorSize), read-only \(new.isReadOnly) vs \(backend.isReadOnly))")
        }
        backend = new
    }

    /// Requests complete before a pause (the core quiesces under its lock), so only the
    /// negotiated features remain; the disk's contents are the disk's.
    struct State: Codable, Equatable { var negotiated: UInt64 }
    public func saveState() throws(SnapshotError) -> DeviceState { try DeviceState(State(negotiated: negotiated)) }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {
        negotiated = try state.decode(State.self, device: "virtio-blk").negotiated
    }
    public func reset() { negotiated = 0 }

    public func queueNotified(_ index: Int, _ context: VirtioDeviceContext) throws(VirtqueueError) {
        if try context.queues[index].drain({ chain in handle(chain) }) {
            context.signalUsed(queue: index)
        }
    }

    // MARK: Requests

    /// Serves one request; returns the bytes written into the chain (data in + status).
    public func handle(_ chain: DescriptorChain) -> UInt32 {
        // The status byte is the chain's last writable byte; without one nothing can be reported.
        guard chain.writableBytes >= 1, chain.readableBytes >= 16 else { return 0 }
        var header = [UInt8](repeating: 0, count: 16)
        copyOut(chain.readable, skip: 0, into: &header)
        let type = UInt32(header[0]) | UInt32(header[1]) << 8 | UInt32(header[2]) << 16 | UInt32(header[3]) << 24
        var sector: UInt64 = 0
        for i in 0..<8 { sector |= UInt64(header[8 + i]) << (8 * UInt64(i)) }

        let dataIn = chain.writableBytes - 1
        let dataOut = chain.readableBytes - 16
        var written: UInt64 = 0
        let status: UInt8
        switch type {
        case Self.typeIn:
            status = transfer(chain, sector: sector, length: dataIn, toGuest: true)
            if status == Self.statusOK { written = dataIn }
        case Self.typeOut:
            status = backend.isReadOnly ? Self.statusIOError : transfer(chain, sector: sector, length: dataOut, toGuest: false)
        case Self.typeFlush:
            status = (try? backend.flush()) != nil ? Self.statusOK : Self.statusIOError
        case Self.typeGetID:
            let count = Int(min(UInt64(Self.idLength), dataIn))
            var id = [UInt8](repeating: 0, count: count)
            for i in 0..<min(count, identifier.count) { id[i] = identifier[i] }
            copyIn(chain.writable, bytes: id)
            written = UInt64(count)
            status = Self.statusOK
        case Self.typeDiscard where negotiated & Self.featureDiscard != 0:
            status = zeroRanges(chain, length: dataOut, discard: true)
        case Self.typeWriteZeroes where negotiated & Self.featureWriteZeroes != 0:
            status = zeroRanges(chain, length: dataOut, discard: false)
        default:
            status = Self.statusUnsupported
        }
        writeStatus(status, chain)
        return UInt32(written + 1)
    }

    /// The disk byte range for `length` bytes from `sector`, if it is a valid request.
    private func range(sector: UInt64, length: UInt64) -> UInt64? {
        let (offset, overflow) = sector.multipliedReportingOverflow(by: Self.sector)
        guard !overflow, length <= Self.maximumTransfer, (try? backend.validate(offset: offset, length: length)) != nil else {
            return nil
        }
        return offset
    }

    /// IN or OUT: positioned I/O between the disk and the data segments.
    private func transfer(_ chain: DescriptorChain, sector: UInt64, length: UInt64, toGuest: Bool) -> UInt8 {
        guard let start = range(sector: sector, length: length) else { return Self.statusIOError }
        let alignment = UInt64(backend.logicalSectorSize)
        var pieces: [(UnsafeMutableRawPointer, Int)] = []
        pieces.reserveCapacity(chain.segments.count)
        // Data segments: IN uses the writable part minus the final status byte; OUT the readable
        // part after the 16-byte header.
        var skip: UInt64 = toGuest ? 0 : 16
        var remaining = length
        for segment in (toGuest ? chain.writable : chain.readable) where remaining > 0 {
            var segmentLength = UInt64(segment.length)
            var pointer = segment.pointer
            if skip > 0 {
                let skipped = min(skip, segmentLength)
                skip -= skipped
                segmentLength -= skipped
                pointer += Int(skipped)
            }
            let take = min(segmentLength, remaining)
            if take > 0 { pieces.append((pointer, Int(take))) }
            remaining -= take
        }
        // Backends take whole sectors; a chain split mid-sector goes through a bounce buffer.
        if pieces.allSatisfy({ UInt64($0.1) % alignment == 0 }) {
            var offset = start
            for (pointer, count) in pieces {
                do throws(BlockError) {
                    if toGuest {
                        try backend.read(into: UnsafeMutableRawBufferPointer(start: pointer, count: count), at: offset)
                    } else {
                        try backend.write(UnsafeRawBufferPointer(start: pointer, count: count), at: offset)
                    }
                } catch {
                    return Self.statusIOError
                }
                offset += UInt64(count)
            }
            return Self.statusOK
        }
        let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(length), alignment: 4096)
        defer { bounce.deallocate() }
        var cursor = 0
        do throws(BlockError) {
            if toGuest {
                try backend.read(into: bounce, at: start)
                for (pointer, count) in pieces {
                    pointer.copyMemory(from: bounce.baseAddress! + cursor, byteCount: count)
                    cursor += count
                }
            } else {
                for (pointer, count) in pieces {
                    (bounce.baseAddress! + cursor).copyMemory(from: pointer, byteCount: count)
                    cursor += count
                }
                try backend.write(UnsafeRawBufferPointer(bounce), at: start)
            }
        } catch {
            return Self.statusIOError
        }
        return Self.statusOK
    }

    /// DISCARD and WRITE_ZEROES: a list of {sector, num_sectors, flags} after the header.
    private func zeroRanges(_ chain: DescriptorChain, length: UInt64, discard: Bool) -> UInt8 {
        // We advertise one segment per request.
        guard length == 16 else { return length % 16 == 0 && length > 0 ? Self.statusUnsupported : Self.statusIOError }
        var bytes = [UInt8](repeating: 0, count: 16)
        copyOut(chain.readable, skip: 16, into: &bytes)
        var sector: UInt64 = 0
        for i in 0..<8 { sector |= UInt64(bytes[i]) << (8 * UInt64(i)) }
        let count = UInt32(bytes[8]) | UInt32(bytes[9]) << 8 | UInt32(bytes[10]) << 16 | UInt32(bytes[11]) << 24
        let flags = UInt32(bytes[12]) | UInt32(bytes[13]) << 8 | UInt32(bytes[14]) << 16 | UInt32(bytes[15]) << 24
        // Discard takes no flags; write-zeroes only UNMAP (bit 0).
        guard flags & (discard ? ~0 : ~1) == 0 else { return Self.statusUnsupported }
        guard count <= Self.maximumZeroSectors else { return Self.statusIOError }
        let (offset, overflow) = sector.multipliedReportingOverflow(by: Self.sector)
        let bytesLength = UInt64(count) * Self.sector
        guard !overflow, (try? backend.validate(offset: offset, length: bytesLength)) != nil else { return Self.statusIOError }
        guard !backend.isReadOnly else { return Self.statusIOError }
        do throws(BlockError) {
            if discard { try backend.discard(offset: offset, length: bytesLength) } else { try backend.writeZeroes(offset: offset, length: bytesLength) }
        } catch {
            return Self.statusIOError
        }
        return Self.statusOK
    }

    // MARK: Scatter-gather helpers

    /// Copies bytes from readable segments, starting `skip` bytes in, until `out` is full.
    private func copyOut(_ segments: ArraySlice<DescriptorSegment>, skip: Int, into out: inout [UInt8]) {
        var position = 0  // position in the readable stream
        var filled = 0
        for segment in segments where filled < out.count {
            let length = Int(segment.length)
            let begin = max(skip + filled - position, 0)
            if begin < length {
                let count = min(length - begin, out.count - filled)
                out.withUnsafeMutableBytes { buffer in
                    (buffer.baseAddress! + filled).copyMemory(from: segment.pointer + begin, byteCount: count)
                }
                filled += count
            }
            position += length
        }
    }

    /// Copies `bytes` to the start of the writable segments.
    private func copyIn(_ segments: ArraySlice<DescriptorSegment>, bytes: [UInt8]) {
        var done = 0
        for segment in segments where done < bytes.count {
            let count = min(Int(segment.length), bytes.count - done)
            bytes.withUnsafeBytes { segment.pointer.copyMemory(from: $0.baseAddress! + done, byteCount: count) }
            done += count
        }
    }

    /// The status byte: the last byte of the last writable segment.
    private func writeStatus(_ status: UInt8, _ chain: DescriptorChain) {
        guard let last = chain.segments.last, last.writable, last.length > 0 else { return }
        (last.pointer + Int(last.length) - 1).storeBytes(of: status, as: UInt8.self)
    }
}
