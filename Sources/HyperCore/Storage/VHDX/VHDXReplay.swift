/// Log replay on open ([MS-VHDX] 2.3.3). A writable open applies the active sequence to the file; a
/// read-only open keeps it as an in-memory overlay on every read, so the file is never modified.
struct ReplayOverlay: Sendable {
    /// The descriptors in replay order (later ones win where they overlap).
    var operations: [VHDXLog.Descriptor] = []

    var isEmpty: Bool { operations.isEmpty }

    /// Patches `buffer`, which holds file bytes read from `offset`, with the replayed writes.
    func apply(to buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) {
        let end = offset + UInt64(buffer.count)
        for op in operations {
            switch op {
            case let .data(fileOffset, page):
                let lo = max(offset, fileOffset), hi = min(end, fileOffset + UInt64(page.count))
                guard lo < hi else { continue }
                page.withUnsafeBytes { src in
                    (buffer.baseAddress! + Int(lo - offset)).copyMemory(
                        from: src.baseAddress! + Int(lo - fileOffset), byteCount: Int(hi - lo))
                }
            case let .zero(fileOffset, length):
                let lo = max(offset, fileOffset), hi = min(end, fileOffset + length)
                guard lo < hi else { continue }
                (buffer.baseAddress! + Int(lo - offset)).initializeMemory(as: UInt8.self, repeating: 0, count: Int(hi - lo))
            }
        }
    }
}

enum LogReplay {
    /// The active sequence of the log named by `header`, checked against the file: the entries to
    /// apply, in order, and the file size the head entry asks for.
    struct Plan: Sendable {
        var descriptors: [VHDXLog.Descriptor]
        var lastFileOffset: UInt64
        var entryCount: Int
    }

    /// A file can never legitimately need to be larger than this (64 TiB of payload plus its BAT and
    /// bitmaps); a LastFileOffset beyond it is corruption, not a reason to grow the file.
    static let maxPlausibleFileSize: UInt64 = VHDXLayout.maxVirtualSize + (1 << 40)

    /// The whole log is read into memory to search it; real logs are 1 MiB (Hyper-V, QEMU's default).
    static let maxLogLength: UInt32 = 256 << 20

    static func plan(file: DiskFile, header: VHDXHeader, fileSize: UInt64) throws(VHDXError) -> Plan {
        guard header.logLength <= maxLogLength else {
            throw .unsupported(path: file.path, detail: "a pending log of \(header.logLength) bytes (more than \(maxLogLength) bytes is not replayed)")
        }
        let logBytes = try file.read(count: Int(header.logLength), at: header.logOffset)
        guard let sequence = VHDXLog.findActiveSequence(log: logBytes, logGuid: header.logGuid) else {
            throw .corrupt(path: file.path, structure: "log", offset: header.logOffset,
                           detail: "the header's LogGuid \(header.logGuid) is set but the log holds no valid entry sequence for it")
        }
        let head = sequence.last.header
        let headOffset = header.logOffset + UInt64(sequence.headOffset)
        guard fileSize >= head.flushedFileOffset else {
            throw .corrupt(path: file.path, structure: "log entry \(head.sequenceNumber)", offset: headOffset,
                           detail: "the file is \(fileSize) bytes but the log says \(head.flushedFileOffset) bytes were durable: the file was truncated")
        }
        guard head.lastFileOffset <= maxPlausibleFileSize else {
            throw .corrupt(path: file.path, structure: "log entry \(head.sequenceNumber)", offset: headOffset,
                           detail: "LastFileOffset \(head.lastFileOffset) is implausibly large")
        }
        let limit = max(fileSize, head.lastFileOffset)
        let logRange = header.logOffset..<header.logOffset + UInt64(header.logLength)
        var descriptors: [VHDXLog.Descriptor] = []
        for e in sequence.entries {
            for d in e.descriptors {
                let (start, length): (UInt64, UInt64)
                switch d {
                case let .data(o, _): (start, length) = (o, 4096)
                case let .zero(o, l): (start, length) = (o, l)
                }
                let (end, overflow) = start.addingReportingOverflow(length)
                // Targets must avoid the identifier and headers (never logged), the log itself, and
                // stay within the file size the entry declares.
                guard !overflow, start >= VHDXLayout.regionTableOffsets[0], end <= limit,
                      end <= logRange.lowerBound || start >= logRange.upperBound else {
                    throw .corrupt(path: file.path, structure: "log entry \(e.header.sequenceNumber)", offset: headOffset,
                                   detail: "descriptor targets \(start)..<\(start &+ length), outside the area a log may write")
                }
                descriptors.append(d)
            }
        }
        return Plan(descriptors: descriptors, lastFileOffset: head.lastFileOffset, entryCount: sequence.entries.count)
    }

    /// Writes the plan to the file and makes it durable (the caller has already changed the
    /// FileWriteGuid and clears the LogGuid afterwards).
    static func apply(_ plan: Plan, to file: DiskFile) throws(VHDXError) {
        var size = try file.size()
        for d in plan.descriptors {
            switch d {
            case let .data(o, page):
                try file.write(page, at: o)
                size = max(size, o + 4096)
            case let .zero(o, l):
                // Zeros past the end of the file come from extending it; only the part inside the
                // file needs writing.
                if o < size { try file.writeZeros(at: o, length: min(l, size - o)) }
                if o + l > size { try file.truncate(to: o + l); size = o + l }
            }
        }
        if size < plan.lastFileOffset { try file.truncate(to: plan.lastFileOffset) }
        try file.sync()
    }
}
