/// The file type identifier (offset 0) and the two 4 KiB headers (64 KiB and 128 KiB) — [MS-VHDX] 2.1, 2.2.
///
/// The headers are the only structure updated in place without the log, because they locate the
/// log. An update writes the non-current slot with SequenceNumber + 1 and flushes; doing it twice
/// leaves both slots with the new state.
enum VHDXLayout {
    static let fileIdentifierOffset: UInt64 = 0
    static let headerOffsets: [UInt64] = [64 << 10, 128 << 10]
    static let regionTableOffsets: [UInt64] = [192 << 10, 256 << 10]
    static let headerSize = 4096
    static let regionTableSize = 64 << 10
    /// Everything below this offset is the header section; objects start at or after it.
    static let headerSectionSize: UInt64 = MiB
    static let maxVirtualSize: UInt64 = 64 << 40
}

struct VHDXHeader: Equatable, Sendable {
    var sequenceNumber: UInt64
    var fileWriteGuid: GUID
    var dataWriteGuid: GUID
    var logGuid: GUID
    var logVersion: UInt16
    var version: UInt16
    var logLength: UInt32
    var logOffset: UInt64

    /// Decodes one header slot; returns why it is not valid instead of throwing, because one bad
    /// slot is normal after a crash.
    static func decode(_ b: [UInt8]) -> Result<VHDXHeader, HeaderProblem> {
        guard b.count == VHDXLayout.headerSize else { return .failure(.init("short read")) }
        guard b.hasSignature("head", at: 0) else { return .failure(.init("no \"head\" signature")) }
        let stored = b.u32(4)
        let computed = CRC32C.checksum(b, zeroingFieldAt: 4)
        guard stored == computed else {
            return .failure(.init("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))"))
        }
        return .success(VHDXHeader(
            sequenceNumber: b.u64(8), fileWriteGuid: GUID(b, at: 16), dataWriteGuid: GUID(b, at: 32),
            logGuid: GUID(b, at: 48), logVersion: b.u16(64), version: b.u16(66),
            logLength: b.u32(68), logOffset: b.u64(72)))
    }

    /// 4096 bytes with the reserved area zero and the CRC filled in.
    func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: VHDXLayout.headerSize)
        b.putSignature("head", at: 0)
        b.storeLE(sequenceNumber, at: 8)
        b.putGUID(fileWriteGuid, at: 16)
        b.putGUID(dataWriteGuid, at: 32)
        b.putGUID(logGuid, at: 48)
        b.storeLE(logVersion, at: 64)
        b.storeLE(version, at: 66)
        b.storeLE(logLength, at: 68)
        b.storeLE(logOffset, at: 72)
        b.storeLE(CRC32C.checksum(b), at: 4)
        return b
    }

    /// Field rules that hold for the current header, checked against the file size.
    func validate(path: String, slotOffset: UInt64, fileSize: UInt64) throws(VHDXError) {
        func bad(_ detail: String) -> VHDXError { .corrupt(path: path, structure: "header", offset: slotOffset, detail: detail) }
        guard version == 1 else { throw .unsupported(path: path, detail: "header version \(version) (only version 1 exists)") }
        if logVersion != 0 && !logGuid.isZero {
            throw .unsupported(path: path, detail: "log version \(logVersion) with a pending log")
        }
        guard logOffset % MiB == 0, logOffset >= VHDXLayout.headerSectionSize else { throw bad("LogOffset \(logOffset) is not a 1 MiB multiple after the header section") }
        guard logLength > 0, UInt64(logLength) % MiB == 0 else { throw bad("LogLength \(logLength) is not a non-zero multiple of 1 MiB") }
        guard fits(logOffset, UInt64(logLength), within: fileSize) else {
            throw bad("log region \(logOffset)+\(logLength) extends past the end of the file (\(fileSize) bytes)")
        }
    }
}

struct HeaderProblem: Error, Sendable {
    let detail: String
    init(_ detail: String) { self.detail = detail }
}

/// The two header slots as found on disk, and which one is current.
struct HeaderPair: Sendable {
    var slots: [Result<VHDXHeader, HeaderProblem>]
    var currentSlot: Int

    var current: VHDXHeader { try! slots[currentSlot].get() }

    /// Reads the identifier and both headers and picks the current one: the valid header with the
    /// larger sequence number (slot 1 when they are equal).
    static func read(_ file: DiskFile, fileSize: UInt64) throws(VHDXError) -> (HeaderPair, creator: String) {
        guard fileSize >= VHDXLayout.headerSectionSize else {
            let ident = try file.read(count: 8, at: 0)
            if !ident.hasSignature("vhdxfile", at: 0) { throw .notVHDX(path: file.path) }
            throw .corrupt(path: file.path, structure: "file", offset: 0,
                           detail: "file is \(fileSize) bytes, shorter than the 1 MiB header section (truncated?)")
        }
        let ident = try file.read(count: 520, at: 0)
        guard ident.hasSignature("vhdxfile", at: 0) else { throw .notVHDX(path: file.path) }
        var units: [UInt16] = []
        for i in 0..<256 {
            let u = ident.u16(8 + 2 * i)
            if u == 0 { break }
            units.append(u)
        }
        let creator = String(decoding: units, as: UTF16.self)

        var slots: [Result<VHDXHeader, HeaderProblem>] = []
        for off in VHDXLayout.headerOffsets {
            slots.append(VHDXHeader.decode(try file.read(count: VHDXLayout.headerSize, at: off)))
        }
        let current: Int
        switch (slots[0], slots[1]) {
        case let (.success(a), .success(b)): current = b.sequenceNumber > a.sequenceNumber ? 1 : 0
        case (.success, .failure): current = 0
        case (.failure, .success): current = 1
        case let (.failure(p1), .failure(p2)):
            throw .corrupt(path: file.path, structure: "headers", offset: VHDXLayout.headerOffsets[0],
                           detail: "neither header is valid (header 1: \(p1.detail); header 2: \(p2.detail))")
        }
        let pair = HeaderPair(slots: slots, currentSlot: current)
        try pair.current.validate(path: file.path, slotOffset: VHDXLayout.headerOffsets[current], fileSize: fileSize)
        return (pair, creator)
    }

    /// Writes `header` (with the next sequence number) into the non-current slot and flushes; that
    /// slot becomes current. Call twice to bring both copies up to date.
    mutating func update(_ file: DiskFile, _ change: (inout VHDXHeader) -> Void) throws(VHDXError) {
        var next = current
        change(&next)
        let (seq, overflow) = current.sequenceNumber.addingReportingOverflow(1)
        guard !overflow else {
            throw .corrupt(path: file.path, structure: "header", offset: VHDXLayout.headerOffsets[currentSlot], detail: "sequence number cannot grow")
        }
        next.sequenceNumber = seq
        let target = 1 - currentSlot
        try file.write(next.encode(), at: VHDXLayout.headerOffsets[target])
        try file.sync()
        slots[target] = .success(next)
        currentSlot = target
    }
}

/// The 64 KiB file type identifier: "vhdxfile" and a UTF-16 creator string.
func encodeFileIdentifier(creator: String) -> [UInt8] {
    var b = [UInt8](repeating: 0, count: 64 << 10)
    b.putSignature("vhdxfile", at: 0)
    for (i, u) in creator.utf16.prefix(255).enumerated() { b.storeLE(u, at: 8 + 2 * i) }
    return b
}
