/// The metadata log ([MS-VHDX] 2.3): a ring of 4 KiB sectors holding entries that describe
/// metadata page writes. This file encodes and decodes entries and finds the active sequence to
/// replay, exactly following the specification's search (2.3.3).
enum VHDXLog {
    static let sector = 4096
    /// Descriptors in an entry's first sector; QEMU cannot replay entries with more, so none of
    /// ours ever has more.
    static let maxDescriptorsPerEntry = 126

    struct EntryHeader: Equatable, Sendable {
        var entryLength: UInt32
        var tail: UInt32
        var sequenceNumber: UInt64
        var descriptorCount: UInt32
        var logGuid: GUID
        var flushedFileOffset: UInt64
        var lastFileOffset: UInt64
    }

    /// A write to apply: a full 4 KiB page, or `zeroLength` bytes of zeros.
    enum Descriptor: Equatable, Sendable {
        case data(fileOffset: UInt64, page: [UInt8])
        case zero(fileOffset: UInt64, length: UInt64)
    }

    struct Entry: Equatable, Sendable {
        var header: EntryHeader
        var descriptors: [Descriptor]
    }

    /// Builds an entry: header + descriptors in the descriptor sectors, then one data sector per page.
    static func encode(sequenceNumber: UInt64, tail: UInt32, logGuid: GUID, flushedFileOffset: UInt64,
                       lastFileOffset: UInt64, pages: [(fileOffset: UInt64, page: [UInt8])],
                       zeros: [(fileOffset: UInt64, length: UInt64)] = []) -> [UInt8] {
        let descriptorBytes = 64 + 32 * (pages.count + zeros.count)
        let descriptorSectors = (descriptorBytes + sector - 1) / sector
        let length = (descriptorSectors + pages.count) * sector
        var b = [UInt8](repeating: 0, count: length)
        b.putSignature("loge", at: 0)
        b.storeLE(UInt32(length), at: 8)
        b.storeLE(tail, at: 12)
        b.storeLE(sequenceNumber, at: 16)
        b.storeLE(UInt32(pages.count + zeros.count), at: 24)
        b.putGUID(logGuid, at: 32)
        b.storeLE(flushedFileOffset, at: 48)
        b.storeLE(lastFileOffset, at: 56)
        for (i, p) in pages.enumerated() {
            precondition(p.page.count == sector && p.fileOffset % UInt64(sector) == 0)
            let d = 64 + 32 * i
            b.putSignature("desc", at: d)
            b.storeLE(p.page.u32(4092), at: d + 4)          // trailing bytes 4092..4095
            b.storeLE(p.page.u64(0), at: d + 8)             // leading bytes 0..7
            b.storeLE(p.fileOffset, at: d + 16)
            b.storeLE(sequenceNumber, at: d + 24)
            let s = (descriptorSectors + i) * sector
            b.putSignature("data", at: s)
            b.storeLE(UInt32(sequenceNumber >> 32), at: s + 4)
            b.replaceSubrange(s + 8..<s + 4092, with: p.page[8..<4092])
            b.storeLE(UInt32(sequenceNumber & 0xFFFF_FFFF), at: s + 4092)
        }
        for (k, z) in zeros.enumerated() {
            let d = 64 + 32 * (pages.count + k)
            b.putSignature("zero", at: d)
            b.storeLE(z.length, at: d + 8)
            b.storeLE(z.fileOffset, at: d + 16)
            b.storeLE(sequenceNumber, at: d + 24)
        }
        b.storeLE(CRC32C.checksum(b), at: 4)
        return b
    }

    /// Decodes and fully validates the entry starting at `offset` of the in-memory log (`log` is
    /// the whole ring; entries wrap per sector). Returns nil for anything that is not a valid entry
    /// of `logGuid`.
    static func decodeEntry(log: [UInt8], at offset: Int, logGuid: GUID) -> Entry? {
        let ring = log.count
        guard ring >= sector, offset % sector == 0, offset < ring else { return nil }
        // Most positions of a log are not entry starts: reject them before copying anything.
        guard log.hasSignature("loge", at: offset) else { return nil }
        func sectorBytes(_ index: Int) -> [UInt8] {
            let start = (offset + index * sector) % ring
            return Array(log[start..<start + sector])
        }
        let first = sectorBytes(0)
        guard first.hasSignature("loge", at: 0) else { return nil }
        let length = Int(first.u32(8)), count = Int(first.u32(24))
        guard length >= sector, length % sector == 0, length <= ring else { return nil }
        let h = EntryHeader(entryLength: first.u32(8), tail: first.u32(12), sequenceNumber: first.u64(16),
                            descriptorCount: first.u32(24), logGuid: GUID(first, at: 32),
                            flushedFileOffset: first.u64(48), lastFileOffset: first.u64(56))
        guard h.logGuid == logGuid, h.sequenceNumber > 0, first.u32(28) == 0,
              Int(h.tail) % sector == 0, Int(h.tail) < ring,
              h.flushedFileOffset % MiB == 0, h.lastFileOffset % MiB == 0 else { return nil }
        let descriptorSectors = (64 + 32 * count + sector - 1) / sector
        guard descriptorSectors <= length / sector else { return nil }

        // Gather the whole entry (it may wrap) and check the CRC over all of it.
        var bytes: [UInt8] = []
        bytes.reserveCapacity(length)
        for i in 0..<length / sector { bytes += sectorBytes(i) }
        guard bytes.u32(4) == CRC32C.checksum(bytes, zeroingFieldAt: 4) else { return nil }

        var descriptors: [Descriptor] = []
        var dataSector = descriptorSectors
        for i in 0..<count {
            let d = 64 + 32 * i
            guard bytes.u64(d + 24) == h.sequenceNumber else { return nil }
            let fileOffset = bytes.u64(d + 16)
            guard fileOffset % UInt64(sector) == 0 else { return nil }
            if bytes.hasSignature("zero", at: d) {
                let zl = bytes.u64(d + 8)
                guard bytes.u32(d + 4) == 0, zl % UInt64(sector) == 0 else { return nil }
                descriptors.append(.zero(fileOffset: fileOffset, length: zl))
            } else if bytes.hasSignature("desc", at: d) {
                guard dataSector < length / sector else { return nil }
                let s = dataSector * sector
                dataSector += 1
                guard bytes.hasSignature("data", at: s),
                      bytes.u32(s + 4) == UInt32(h.sequenceNumber >> 32),
                      bytes.u32(s + 4092) == UInt32(h.sequenceNumber & 0xFFFF_FFFF) else { return nil }
                var page = [UInt8](repeating: 0, count: sector)
                page.storeLE(bytes.u64(d + 8), at: 0)
                page.replaceSubrange(8..<4092, with: bytes[s + 8..<s + 4092])
                page.storeLE(bytes.u32(d + 4), at: 4092)
                descriptors.append(.data(fileOffset: fileOffset, page: page))
            } else {
                return nil
            }
        }
        // The length must be exactly the descriptor sectors plus one sector per data descriptor.
        guard dataSector == length / sector else { return nil }
        return Entry(header: h, descriptors: descriptors)
    }

    struct Sequence: Sendable {
        var entries: [Entry]
        var tailOffset: Int
        var headOffset: Int   // where the sequence's last entry starts
        var last: Entry { entries[entries.count - 1] }
    }

    /// The specification's search for the active sequence: from every candidate tail, extend a run of
    /// entries with consecutive sequence numbers; a run is valid when its last entry's Tail lies
    /// within the run; the valid run with the largest last sequence number wins.
    static func findActiveSequence(log: [UInt8], logGuid: GUID) -> Sequence? {
        let ring = log.count
        guard ring >= sector else { return nil }
        var candidate: Sequence?
        var tail = 0
        var oldTail = 0
        // Memoise decoded entries: the same offset is tried from several tails.
        var cache: [Int: Entry?] = [:]
        func entry(at o: Int) -> Entry? {
            if let e = cache[o] { return e }
            let e = decodeEntry(log: log, at: o, logGuid: logGuid)
            cache[o] = e
            return e
        }
        while true {
            var current: [Entry] = []
            var offsets: [Int] = []
            var head = tail
            var consumed = 0
            while consumed < ring, let e = entry(at: head) {
                if let prev = current.last, e.header.sequenceNumber != prev.header.sequenceNumber &+ 1 { break }
                current.append(e)
                offsets.append(head)
                consumed += Int(e.header.entryLength)
                guard consumed <= ring else { current.removeLast(); offsets.removeLast(); break }
                head = (head + Int(e.header.entryLength)) % ring
            }
            var valid = false
            if let last = current.last {
                // The head's Tail must be the start of one of the entries of this run.
                let t = Int(last.header.tail)
                if let i = offsets.firstIndex(of: t) {
                    let seq = Sequence(entries: Array(current[i...]), tailOffset: t, headOffset: offsets.last!)
                    valid = true
                    if candidate == nil || last.header.sequenceNumber > candidate!.last.header.sequenceNumber {
                        candidate = seq
                    }
                }
            }
            if current.isEmpty || !valid {
                tail = (tail + sector) % ring
            } else {
                tail = head
            }
            if tail <= oldTail { break }
            oldTail = tail
        }
        return candidate
    }
}
