import Foundation
import Testing
@testable import HyperCore

/// Logs written "by a second writer": crafted here entry by entry, then replayed on open.
@Suite(.serialized) struct VHDXLogReplayTests {
    /// A 64 MiB dynamic disk with 1 MiB blocks; block 0 holds 0x11.
    func makeBase(_ dir: String) throws -> String {
        let path = dir + "/log.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 64 << 20, type: .dynamic, blockSize: 1 << 20, physicalSectorSize: 512))
        let image = try VHDXImage(path: path)
        try VHDXTestSupport.write(image, [UInt8](repeating: 0x11, count: 1 << 20), at: 0)
        try image.close()
        return path
    }

    struct Layout {
        var logOffset: UInt64
        var logLength: UInt64
        var batOffset: UInt64
        var fileSize: UInt64
        var batPage: [UInt8]
    }

    func layout(_ path: String) throws -> Layout {
        let image = try VHDXImage(path: path, options: .init(readOnly: true))
        let h = image.headers.current
        let file = try DiskFile(path: path, readOnly: true)
        let bat = image.regions.bat!.fileOffset
        return Layout(logOffset: h.logOffset, logLength: UInt64(h.logLength), batOffset: bat,
                      fileSize: try file.size(), batPage: try file.read(count: 4096, at: bat))
    }

    /// Appends a 1 MiB block filled with `fill` and returns its offset (as a second writer would,
    /// durable before it is logged).
    func appendBlock(_ path: String, fill: UInt8) throws -> UInt64 {
        let file = try DiskFile(path: path, readOnly: false)
        let offset = try file.size()
        try file.write([UInt8](repeating: fill, count: 1 << 20), at: offset)
        try file.sync()
        return offset
    }

    func writeLog(_ path: String, at ringOffset: UInt64, _ entry: [UInt8], layout: Layout) throws {
        let file = try DiskFile(path: path, readOnly: false)
        let first = Int(min(UInt64(entry.count), layout.logLength - ringOffset))
        try file.write(Array(entry[0..<first]), at: layout.logOffset + ringOffset)
        if first < entry.count { try file.write(Array(entry[first...]), at: layout.logOffset) }
        try file.sync()
    }

    func setLogGuid(_ path: String, _ guid: GUID) throws {
        let file = try DiskFile(path: path, readOnly: false)
        var (pair, _) = try HeaderPair.read(file, fileSize: try file.size())
        try pair.update(file) { $0.logGuid = guid }
    }

    func batPage(_ page: [UInt8], setting block: Int, to entry: BATEntry) -> [UInt8] {
        var p = page
        p.storeLE(entry.raw, at: 8 * block)   // blocks below the chunk ratio (4096) map 1:1
        return p
    }

    @Test func singleEntryReplaysAndReadOnlyOpenNeverWrites() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = try makeBase(dir)
        let block = try appendBlock(path, fill: 0x5A)
        let l = try layout(path)
        let guid = GUID.random()
        let page = batPage(l.batPage, setting: 5, to: BATEntry(state: 6, fileOffset: block))
        let entry = VHDXLog.encode(sequenceNumber: 77, tail: 0, logGuid: guid, flushedFileOffset: l.fileSize,
                                   lastFileOffset: l.fileSize, pages: [(l.batOffset, page)])
        try writeLog(path, at: 0, entry, layout: l)
        try setLogGuid(path, guid)

        let before = VHDXTestSupport.fileBytes(path)
        do {
            let ro = try VHDXImage(path: path, options: .init(readOnly: true))
            #expect(ro.logWasPending)
            #expect(try VHDXTestSupport.read(ro, at: 5 << 20, count: 4096) == [UInt8](repeating: 0x5A, count: 4096))
            #expect(try VHDXTestSupport.read(ro, at: 0, count: 4096) == [UInt8](repeating: 0x11, count: 4096))
        }
        #expect(VHDXTestSupport.fileBytes(path) == before, "a read-only open replays in memory only")
        #expect(VHDXImage.check(path: path).logPending)

        do {
            let rw = try VHDXImage(path: path)
            #expect(rw.logWasPending)
            #expect(rw.logGuid.isZero)
            #expect(try VHDXTestSupport.read(rw, at: 5 << 20, count: 4096) == [UInt8](repeating: 0x5A, count: 4096))
        }
        let report = VHDXImage.check(path: path)
        #expect(report.isClean && !report.logPending, "\(report.problems)")
        let ro = try VHDXImage(path: path, options: .init(readOnly: true))
        #expect(!ro.logWasPending)
        #expect(try VHDXTestSupport.read(ro, at: 5 << 20, count: 4096) == [UInt8](repeating: 0x5A, count: 4096))
        if VHDXTestSupport.hasQemu { #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path]).status == 0) }
    }

    @Test func multiEntrySequenceWrapsAndIgnoresOtherGuids() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = try makeBase(dir)
        let b1 = try appendBlock(path, fill: 0xA1)
        let b2 = try appendBlock(path, fill: 0xA2)
        let b3 = try appendBlock(path, fill: 0xA3)
        let l = try layout(path)
        let guid = GUID.random()
        let size = l.fileSize
        // Entry 1 starts in the last log sector, so its data sector wraps to offset 0.
        let p1 = batPage(l.batPage, setting: 1, to: BATEntry(state: 6, fileOffset: b1))
        let e1 = VHDXLog.encode(sequenceNumber: 1000, tail: UInt32(l.logLength - 4096), logGuid: guid,
                                flushedFileOffset: size, lastFileOffset: size, pages: [(l.batOffset, p1)])
        var p2 = batPage(p1, setting: 2, to: BATEntry(state: 6, fileOffset: b2))
        p2 = batPage(p2, setting: 1, to: BATEntry(state: 6, fileOffset: b3))   // later entries win
        let e2 = VHDXLog.encode(sequenceNumber: 1001, tail: UInt32(l.logLength - 4096), logGuid: guid,
                                flushedFileOffset: size, lastFileOffset: size, pages: [(l.batOffset, p2)])
        // Entry 3 zeroes the first 64 KiB of block b2 and asks for a larger file.
        let e3 = VHDXLog.encode(sequenceNumber: 1002, tail: UInt32(l.logLength - 4096), logGuid: guid,
                                flushedFileOffset: size, lastFileOffset: size + (2 << 20), pages: [],
                                zeros: [(b2, 64 << 10)])
        try writeLog(path, at: l.logLength - 4096, e1, layout: l)
        try writeLog(path, at: 4096, e2, layout: l)
        try writeLog(path, at: 4096 + UInt64(e2.count), e3, layout: l)
        // A stale entry of another session with a higher sequence number must be ignored.
        let stale = VHDXLog.encode(sequenceNumber: 5000, tail: 64 << 10, logGuid: GUID.random(), flushedFileOffset: size,
                                   lastFileOffset: size, pages: [(l.batOffset, batPage(l.batPage, setting: 9, to: BATEntry(state: 6, fileOffset: 1 << 20)))])
        try writeLog(path, at: 64 << 10, stale, layout: l)
        try setLogGuid(path, guid)

        let expected: [(UInt64, UInt8)] = [(1 << 20, 0xA3), ((2 << 20) + (64 << 10), 0xA2), (2 << 20, 0), (9 << 20, 0), (0, 0x11)]
        let ro = try VHDXImage(path: path, options: .init(readOnly: true))
        for (o, v) in expected { #expect(try VHDXTestSupport.read(ro, at: o, count: 512) == [UInt8](repeating: v, count: 512), "offset \(o), read-only") }
        let rw = try VHDXImage(path: path)
        for (o, v) in expected { #expect(try VHDXTestSupport.read(rw, at: o, count: 512) == [UInt8](repeating: v, count: 512), "offset \(o), replayed") }
        #expect(try DiskFile(path: path, readOnly: true).size() >= size + (2 << 20), "the file is extended to LastFileOffset")
    }

    @Test func logGuidWithoutValidEntryOrTruncatedFileRefuses() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = try makeBase(dir)
        try setLogGuid(path, GUID.random())
        #expect(throws: VHDXError.self) { try VHDXImage(path: path, options: .init(readOnly: true)) }
        #expect(!VHDXImage.check(path: path).isClean)

        try FileManager.default.createDirectory(atPath: dir + "/b", withIntermediateDirectories: true)
        let path2 = try makeBase(dir + "/b")
        let l = try layout(path2)
        let guid = GUID.random()
        let entry = VHDXLog.encode(sequenceNumber: 1, tail: 0, logGuid: guid, flushedFileOffset: l.fileSize + (8 << 20),
                                   lastFileOffset: l.fileSize + (8 << 20), pages: [])
        try writeLog(path2, at: 0, entry, layout: l)
        try setLogGuid(path2, guid)
        do {
            _ = try VHDXImage(path: path2)
            Issue.record("opened a file shorter than the log's FlushedFileOffset")
        } catch {
            #expect("\(error)".contains("truncated"))
        }
    }

    @Test func ourCrashLeftoverLogReplaysInQemu() throws {
        guard VHDXTestSupport.hasQemu else { print("skipped: qemu-img/qemu-io not installed"); return }
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/dirty.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 64 << 20, type: .dynamic, blockSize: 1 << 20, physicalSectorSize: 512))
        do {
            // Flushed but never closed: the LogGuid stays set, as after a crash.
            let image = try VHDXImage(path: path)
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x42, count: 8192), at: 3 << 20)
            try image.flush()
            image.closed = true
        }
        let ro = VHDXTestSupport.qemuIO(["-r", "-c", "read 0 512", path])
        #expect(ro.status != 0 || ro.output.contains("replay"), "qemu refuses a dirty read-only open: \(ro.output)")
        let repair = VHDXTestSupport.qemuImg(["check", "-r", "all", "-f", "vhdx", path])
        #expect(repair.status == 0, "\(repair.output)")
        let r = VHDXTestSupport.qemuIO(["-r", "-c", "read -P 0x42 \(3 << 20) 8192", path])
        #expect(r.status == 0 && !r.output.contains("verification failed"), "\(r.output)")
    }
}
