import Testing
@testable import HyperCore

/// Encoders and decoders of the on-disk structures, checked against values from the specification.
@Suite struct VHDXFormatTests {
    @Test func crc32cCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        // Slicing-by-8 and the byte loop must agree at every length and alignment.
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 999] {
            var bytewise: UInt32 = 0xFFFF_FFFF
            for b in data[0..<n] {
                bytewise ^= UInt32(b)
                for _ in 0..<8 { bytewise = bytewise & 1 != 0 ? (bytewise >> 1) ^ 0x82F6_3B78 : bytewise >> 1 }
            }
            #expect(CRC32C.checksum(Array(data[0..<n])) == ~bytewise, "length \(n)")
        }
        // Continuing a checksum gives the same result as one pass.
        let whole = CRC32C.checksum(data)
        let part = data.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<333])) }
        let rest = data.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[333...]), continuing: part) }
        #expect(rest == whole)
    }

    @Test func guidMixedEndianLayout() {
        let bat = GUID("2DC27766-F623-4200-9D64-115E9BFD4A08")!
        #expect(bat.bytes == [0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08])
        #expect(bat.description == "2dc27766-f623-4200-9d64-115e9bfd4a08")
        #expect(GUID("{2dc27766-f623-4200-9d64-115e9bfd4a08}") == bat)
        #expect(GUID("not-a-guid") == nil)
        let r = GUID.random()
        #expect(GUID(r.braced) == r)
        #expect(r != GUID.random())
    }

    @Test func headerRoundTripAndChecksum() throws {
        let h = VHDXHeader(sequenceNumber: 42, fileWriteGuid: .random(), dataWriteGuid: .random(), logGuid: .zero,
                           logVersion: 0, version: 1, logLength: 1 << 20, logOffset: 1 << 20)
        var bytes = h.encode()
        #expect(bytes.count == 4096)
        #expect(Array(bytes[0..<4]) == Array("head".utf8))
        #expect(try VHDXHeader.decode(bytes).get() == h)
        bytes[100] ^= 1   // reserved area is covered by the CRC
        #expect(throws: HeaderProblem.self) { try VHDXHeader.decode(bytes).get() }
    }

    @Test func regionTableRejectsOverlapAndUnknownRequired() throws {
        var t = VHDXRegionTable(entries: [
            .init(guid: VHDXRegionTable.batGUID, fileOffset: 3 << 20, length: 1 << 20, required: true),
            .init(guid: VHDXRegionTable.metadataGUID, fileOffset: 2 << 20, length: 1 << 20, required: true),
        ])
        #expect(try VHDXRegionTable.decode(t.encode(), fileSize: 8 << 20).get() == t)
        t.entries[1].fileOffset = 3 << 20
        #expect(throws: HeaderProblem.self) { try VHDXRegionTable.decode(t.encode(), fileSize: 8 << 20).get() }
        t.entries[1].fileOffset = 7 << 20
        #expect(throws: HeaderProblem.self) { try VHDXRegionTable.decode(t.encode(), fileSize: 7 << 20).get() }
    }

    @Test func batInterleave() {
        // 10 GiB, 16 MiB blocks, 512-byte sectors: chunk ratio 256; the write at 4 GiB lands in BAT[257].
        let g = BATGeometry(blockSize: 16 << 20, logicalSectorSize: 512, virtualSize: 10 << 30, hasParent: false)
        #expect(g.chunkRatio == 256)
        #expect(g.payloadIndex((4 << 30) / (16 << 20)) == 257)
        #expect(g.bitmapIndex(chunk: 0) == 256)
        #expect(g.isBitmapIndex(256) && !g.isBitmapIndex(257))
        #expect(g.entryCount == 640 + 639 / 256)
        let d = BATGeometry(blockSize: 2 << 20, logicalSectorSize: 4096, virtualSize: 100 << 30, hasParent: true)
        #expect(d.chunkRatio == 16384)
        #expect(d.entryCount == d.sectorBitmapBlocks * (d.chunkRatio + 1))
    }

    @Test func logEntryRoundTrip() throws {
        let guid = GUID.random()
        let pages = (0..<3).map { i in (fileOffset: UInt64(3 << 20) + UInt64(i) * 4096, page: VHDXTestSupport.pattern(4096, seed: UInt8(i))) }
        let entry = VHDXLog.encode(sequenceNumber: 0x1_0000_0005, tail: 0, logGuid: guid, flushedFileOffset: 8 << 20,
                                   lastFileOffset: 9 << 20, pages: pages)
        #expect(entry.count == 4096 * 4)
        var log = [UInt8](repeating: 0, count: 1 << 20)
        log.replaceSubrange(0..<entry.count, with: entry)
        let decoded = try #require(VHDXLog.decodeEntry(log: log, at: 0, logGuid: guid))
        #expect(decoded.header.sequenceNumber == 0x1_0000_0005)
        #expect(decoded.descriptors == pages.map { .data(fileOffset: $0.fileOffset, page: $0.page) })
        #expect(VHDXLog.decodeEntry(log: log, at: 0, logGuid: .random()) == nil, "another LogGuid's entry is invalid")
        log[4096 + 100] ^= 0xFF   // data sectors are covered by the checksum
        #expect(VHDXLog.decodeEntry(log: log, at: 0, logGuid: guid) == nil)
    }
}
