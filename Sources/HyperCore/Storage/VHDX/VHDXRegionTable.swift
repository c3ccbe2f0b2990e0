/// The region table ([MS-VHDX] 2.2.3): where the BAT, the metadata region and any other regions
/// live. Two 64 KiB copies at 192 KiB and 256 KiB, each with a CRC over all 64 KiB.
struct VHDXRegionTable: Equatable, Sendable {
    struct Entry: Equatable, Sendable {
        var guid: GUID
        var fileOffset: UInt64
        var length: UInt32
        var required: Bool
    }

    static let batGUID = GUID("2DC27766-F623-4200-9D64-115E9BFD4A08")!
    static let metadataGUID = GUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")!
    static let maxEntries = 2047

    var entries: [Entry]

    var bat: Entry? { entries.first { $0.guid == Self.batGUID } }
    var metadata: Entry? { entries.first { $0.guid == Self.metadataGUID } }

    /// Decodes one copy and checks each entry on its own and against the others and the file size.
    static func decode(_ b: [UInt8], fileSize: UInt64) -> Result<VHDXRegionTable, HeaderProblem> {
        guard b.count == VHDXLayout.regionTableSize else { return .failure(.init("short read")) }
        guard b.hasSignature("regi", at: 0) else { return .failure(.init("no \"regi\" signature")) }
        let stored = b.u32(4), computed = CRC32C.checksum(b, zeroingFieldAt: 4)
        guard stored == computed else {
            return .failure(.init("checksum mismatch (stored 0x\(String(stored, radix: 16)), computed 0x\(String(computed, radix: 16)))"))
        }
        let count = Int(b.u32(8))
        guard count <= maxEntries else { return .failure(.init("EntryCount \(count) exceeds 2047")) }
        var entries: [Entry] = []
        for i in 0..<count {
            let o = 16 + 32 * i
            let e = Entry(guid: GUID(b, at: o), fileOffset: b.u64(o + 16), length: b.u32(o + 24), required: b.u32(o + 28) & 1 != 0)
            guard e.fileOffset % MiB == 0, e.fileOffset >= VHDXLayout.headerSectionSize else {
                return .failure(.init("entry \(i) (\(e.guid)): FileOffset \(e.fileOffset) is not a 1 MiB multiple after the header section"))
            }
            guard e.length > 0, UInt64(e.length) % MiB == 0 else {
                return .failure(.init("entry \(i) (\(e.guid)): Length \(e.length) is not a non-zero multiple of 1 MiB"))
            }
            guard fits(e.fileOffset, UInt64(e.length), within: fileSize) else {
                return .failure(.init("entry \(i) (\(e.guid)): region \(e.fileOffset)+\(e.length) extends past the end of the file (\(fileSize) bytes)"))
            }
            if let dup = entries.firstIndex(where: { $0.guid == e.guid }) {
                return .failure(.init("entries \(dup) and \(i) have the same GUID \(e.guid)"))
            }
            if let other = entries.firstIndex(where: { $0.fileOffset < e.fileOffset + UInt64(e.length) && e.fileOffset < $0.fileOffset + UInt64($0.length) }) {
                return .failure(.init("entries \(other) and \(i) overlap"))
            }
            entries.append(e)
        }
        return .success(VHDXRegionTable(entries: entries))
    }

    func encode() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: VHDXLayout.regionTableSize)
        b.putSignature("regi", at: 0)
        b.storeLE(UInt32(entries.count), at: 8)
        for (i, e) in entries.enumerated() {
            let o = 16 + 32 * i
            b.putGUID(e.guid, at: o)
            b.storeLE(e.fileOffset, at: o + 16)
            b.storeLE(e.length, at: o + 24)
            b.storeLE(UInt32(e.required ? 1 : 0), at: o + 28)
        }
        b.storeLE(CRC32C.checksum(b), at: 4)
        return b
    }

    /// Reads both copies and returns the first valid one, refusing unknown required regions and
    /// tables without a BAT or metadata region. `read` applies any in-memory log replay.
    static func read(path: String, fileSize: UInt64, read: (UInt64, Int) throws(VHDXError) -> [UInt8])
        throws(VHDXError) -> (table: VHDXRegionTable, copies: [Result<VHDXRegionTable, HeaderProblem>])
    {
        var copies: [Result<VHDXRegionTable, HeaderProblem>] = []
        for off in VHDXLayout.regionTableOffsets {
            copies.append(decode(try read(off, VHDXLayout.regionTableSize), fileSize: fileSize))
        }
        let table: VHDXRegionTable
        switch (copies[0], copies[1]) {
        case let (.success(t), _), let (.failure, .success(t)): table = t
        case let (.failure(p1), .failure(p2)):
            throw .corrupt(path: path, structure: "region tables", offset: VHDXLayout.regionTableOffsets[0],
                           detail: "neither copy is valid (table 1: \(p1.detail); table 2: \(p2.detail))")
        }
        for e in table.entries where e.required && e.guid != batGUID && e.guid != metadataGUID {
            throw .unsupported(path: path, detail: "required region \(e.guid) at file offset \(e.fileOffset) is unknown to this implementation")
        }
        guard table.bat != nil else {
            throw .corrupt(path: path, structure: "region table", offset: VHDXLayout.regionTableOffsets[0], detail: "no BAT region")
        }
        guard table.metadata != nil else {
            throw .corrupt(path: path, structure: "region table", offset: VHDXLayout.regionTableOffsets[0], detail: "no metadata region")
        }
        return (table, copies)
    }
}
