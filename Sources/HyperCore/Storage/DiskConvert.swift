internal import Dispatch
#if canImport(Glibc)
internal import Glibc
#endif

/// Copies any disk (raw, or a VHDX with its whole parent chain) into a new raw or VHDX file.
/// Regions that read as zeros are never written: a raw target stays sparse (holes where the source
/// has none or zeros), a dynamic VHDX target leaves those blocks not present and the zero parts of
/// its allocated blocks as holes.
public enum DiskConverter {
    public struct Target: Sendable {
        public var path: String
        public var format: DiskFormat
        public var type: VHDXDiskType
        public var blockSize: UInt32
        public var overwrite: Bool
        /// Flush the target at the end (qemu-img's default, cache=unsafe, does not).
        public var sync: Bool = true

        public init(path: String, format: DiskFormat, type: VHDXDiskType = .dynamic, blockSize: UInt32 = 0, overwrite: Bool = false) {
            self.path = path
            self.format = format
            self.type = type
            self.blockSize = blockSize
            self.overwrite = overwrite
        }
    }

    /// VHDX → raw: blocks stored whole in the file are copied in the kernel (copy_file_range) by
    /// several threads at once, blocks that read as zeros are skipped (the raw file stays sparse),
    /// anything else (partially present blocks, data from a parent) goes through the read path.
    static func copyBlocks(from source: VHDXImage, to sink: RawImage, progress: ((UInt64, UInt64) -> Void)?) throws(VHDXError) {
        let bs = UInt64(source.blockSize)
        enum Step: Sendable { case copy(from: UInt64, to: UInt64, length: UInt64), read(at: UInt64, length: UInt64) }
        var steps: [Step] = []
        var pos: UInt64 = 0
        while pos < source.virtualSize {
            let n = min(bs, source.virtualSize - pos)
            let runs = try source.lock.withLock { () throws(VHDXError) -> [(VHDXImage.Source, Int)] in
                try source.resolve(virtualOffset: pos, maxLength: Int(n))
            }
            if runs.count == 1, case let .file(fileOffset) = runs[0].0 {
                steps.append(.copy(from: fileOffset, to: pos, length: n))
            } else if runs.count == 1, case .zeros = runs[0].0 {
                // Already zeros in the sparse target.
            } else if runs.count == 1, case .parent = runs[0].0, !source.isAllocated(offset: pos, length: n) {
                // Nothing anywhere in the chain.
            } else {
                steps.append(.read(at: pos, length: n))
            }
            pos += n
        }
        let plan = steps
        nonisolated(unsafe) let report = progress
        let workers = max(1, min(4, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))))
        let failure = PthreadLock()
        nonisolated(unsafe) var firstError: VHDXError?
        nonisolated(unsafe) var completed = 0
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            var buffer: [UInt8] = []
            for k in stride(from: worker, to: plan.count, by: workers) {
                if failure.withLock({ firstError != nil }) { return }
                do throws(VHDXError) {
                    switch plan[k] {
                    case let .copy(from, to, length):
                        // Only the parts of the block the source file holds data for: its holes
                        // (never written since the block was allocated) stay holes in the target.
                        for extent in source.file.dataExtents(offset: from, length: length) {
                            try sink.file.copy(from: source.file, at: extent.lowerBound, to: to + (extent.lowerBound - from),
                                               length: UInt64(extent.count))
                        }
                    case let .read(at, length):
                        if buffer.isEmpty { buffer = [UInt8](repeating: 0, count: Int(bs)) }
                        let r: Result<Void, VHDXError> = buffer.withUnsafeMutableBytes { buf in
                            let piece = UnsafeMutableRawBufferPointer(rebasing: buf[0..<Int(length)])
                            do throws(VHDXError) {
                                try source.readVirtual(into: piece, at: at)
                                if !isZero(UnsafeRawBufferPointer(piece)) { try sink.file.write(UnsafeRawBufferPointer(piece), at: at) }
                                return .success(())
                            } catch { return .failure(error) }
                        }
                        try r.get()
                    }
                } catch {
                    failure.withLock { if firstError == nil { firstError = error } }
                }
                let done = failure.withLock { completed += 1; return completed }
                if worker == 0 { report?(UInt64(done), UInt64(plan.count)) }
            }
        }
        if let firstError { throw firstError }
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
        if case .raw = target.format, let sourceVHDX, let rawSink = sink as? RawImage, sourceVHDX.overlay.isEmpty {
            try copyBlocks(from: sourceVHDX, to: rawSink, progress: progress)
            if target.sync { try rawSink.file.sync() }
            progress?(size, size)
            return
        }
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
                    // Write only the non-zero 1 MiB pieces: a raw target keeps holes, a VHDX target
                    // allocates only blocks that hold data, and within a new block writes only its
                    // non-zero pieces (the rest of a freshly allocated block is a hole reading as zeros).
                    let grain = MiB
                    var at: UInt64 = 0
                    while at < n {
                        let k = min(grain, n - at)
                        let sub = UnsafeRawBufferPointer(rebasing: piece[Int(at)..<Int(at + k)])
                        if !isZero(sub) { try sink.write(sub, at: pos + at) }
                        at += k
                    }
                    return .success(())
                } catch { return .failure(VHDXError(error, path: target.path, offset: pos)) }
            }
            try r.get()
            pos += n
        }
        do throws(BlockError) { if target.sync || vhdx != nil { try sink.flush() } } catch { throw VHDXError(error, path: target.path, offset: 0) }
        try vhdx?.close()
        progress?(size, size)
    }
}
