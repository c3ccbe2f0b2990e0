import Foundation
import Testing
@testable import HyperCore

/// Differencing chains: fall-through reads, sector-granular partial blocks, merge, linkage.
@Suite(.serialized) struct VHDXDifferencingTests {
    static let size: UInt64 = 24 << 20

    /// base ← mid ← top, each with its own writes; returns the paths and the expected bytes of top.
    func makeChain(_ dir: String, logicalSector: UInt32 = 512) throws -> (base: String, mid: String, top: String, expected: [UInt8]) {
        let base = dir + "/base.vhdx", mid = dir + "/mid.avhdx", top = dir + "/sub/top.avhdx"
        try FileManager.default.createDirectory(atPath: dir + "/sub", withIntermediateDirectories: true)
        var model = [UInt8](repeating: 0, count: Int(Self.size))
        func apply(_ image: VHDXImage, _ writes: [(Int, Int, UInt8)]) throws {
            for (o, n, seed) in writes {
                let data = VHDXTestSupport.pattern(n, seed: seed)
                try VHDXTestSupport.write(image, data, at: UInt64(o))
                model.replaceSubrange(o..<o + n, with: data)
            }
            try image.close()
        }
        let ls = Int(logicalSector)
        try VHDXImage.create(path: base, options: VHDXCreateOptions(virtualSize: Self.size, type: .dynamic, blockSize: 2 << 20, logicalSectorSize: logicalSector))
        try apply(VHDXImage(path: base), [(0, 6 << 20, 1), (10 << 20, 1 << 20, 2), (Int(Self.size) - ls, ls, 3)])
        try VHDXImage.create(path: mid, options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: base))
        // Partial writes inside blocks the base holds, a whole block, and a zeroed range.
        try apply(VHDXImage(path: mid), [(ls * 3, ls * 2, 4), ((1 << 20) + 4096, 8192, 5), (4 << 20, 1 << 20, 6), (12 << 20, ls, 7)])
        do {
            let m = try VHDXImage(path: mid)
            try m.writeZeroes(offset: 2 << 20, length: 1 << 20)            // whole block: ZERO state
            try m.writeZeroes(offset: (10 << 20) + 4096, length: 4096)      // partial: zeros stored
            model.replaceSubrange((2 << 20)..<(3 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
            model.replaceSubrange(((10 << 20) + 4096)..<((10 << 20) + 8192), with: [UInt8](repeating: 0, count: 4096))
            try m.close()
        }
        try VHDXImage.create(path: top, options: VHDXCreateOptions(type: .differencing, blockSize: 2 << 20, parentPath: mid))
        try apply(VHDXImage(path: top), [(ls, ls, 8), ((1 << 20) + 8192, ls, 9), (20 << 20, 3 << 20, 10)])
        return (base, mid, top, model)
    }

    @Test(arguments: [UInt32(512), 4096])
    func threeDeepChainReadsFallThrough(_ logicalSector: UInt32) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let chain = try makeChain(dir, logicalSector: logicalSector)
        let top = try VHDXImage(path: chain.top, options: .init(readOnly: true))
        #expect(top.chainPaths.count == 3)
        #expect(top.isDifferencing)
        let bytes = try VHDXTestSupport.readAll(top, chunk: 3 * Int(logicalSector) * 5)
        #expect(VHDXTestSupport.firstDifference(bytes, chain.expected) == nil)
        // The middle disk holds sector-granular partial blocks backed by bitmaps.
        let mid = try VHDXImage(path: chain.mid, options: .init(readOnly: true))
        let states = (0..<mid.geometry.payloadBlocks).map { BATEntry(raw: mid.bat[mid.geometry.payloadIndex($0)]).state }
        #expect(states.contains(PayloadBlockState.partiallyPresent.rawValue))
        #expect(states.contains(PayloadBlockState.zero.rawValue))
        #expect(VHDXImage.check(path: chain.top).isClean)
        #expect(VHDXImage.check(path: chain.mid).isClean)
    }

    @Test func mergeGivesTheSameBytesAsConvert() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let chain = try makeChain(dir)
        let flat = dir + "/flat.raw"
        try DiskConverter.convert(source: try openDisk(path: chain.top, readOnly: true), to: .init(path: flat, format: .raw))
        #expect(VHDXTestSupport.fileBytes(flat) == chain.expected)

        // Merge top into mid, interrupted halfway: the chain still opens and reads the same bytes.
        do {
            let top = try VHDXImage(path: chain.top)
            try top.mergeIntoParent(progress: nil, stopAfterBlocks: 11)
            try top.close()
        }
        let halfway = try VHDXImage(path: chain.top, options: .init(readOnly: true))
        #expect(VHDXTestSupport.firstDifference(try VHDXTestSupport.readAll(halfway), chain.expected) == nil)
        let announced = try #require(halfway.parentLocator?["parent_linkage2"].flatMap(GUID.init))
        #expect(announced == halfway.parent?.dataWriteGuid, "the parent carries the announced GUID")
        // Merge again to the end, then mid into base: base alone reads like the whole chain. The
        // merged children remain valid (parent_linkage2) and read the same.
        do {
            let top = try VHDXImage(path: chain.top)
            try top.mergeIntoParent()
            try top.close()
        }
        let mergedTop = try VHDXImage(path: chain.top, options: .init(readOnly: true))
        #expect(mergedTop.parent?.dataWriteGuid == announced, "a resumed merge keeps the announced GUID")
        #expect(VHDXTestSupport.firstDifference(try VHDXTestSupport.readAll(mergedTop), chain.expected) == nil)
        let midAlone = try VHDXImage(path: chain.mid, options: .init(readOnly: true))
        #expect(VHDXTestSupport.firstDifference(try VHDXTestSupport.readAll(midAlone), chain.expected) == nil)
        do {
            let mid = try VHDXImage(path: chain.mid)
            try mid.mergeIntoParent()
            try mid.close()
        }
        // top's linkage names mid's merge-time GUID only; base changed under mid, not under top.
        #expect(VHDXImage.check(path: chain.mid).isClean)
        let base = try VHDXImage(path: chain.base, options: .init(readOnly: true))
        #expect(VHDXTestSupport.firstDifference(try VHDXTestSupport.readAll(base), chain.expected) == nil)
        #expect(VHDXImage.check(path: chain.base).isClean)
        if VHDXTestSupport.hasQemu {
            #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", chain.base]).status == 0)
            let raw = dir + "/qemu.raw"
            #expect(VHDXTestSupport.qemuImg(["convert", "-f", "vhdx", "-O", "raw", chain.base, raw]).status == 0)
            #expect(VHDXTestSupport.fileBytes(raw) == chain.expected)
        }
    }

    @Test func changedParentIsRefusedWithTheReason() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let base = dir + "/p.vhdx", child = dir + "/c.avhdx"
        try VHDXImage.create(path: base, options: VHDXCreateOptions(virtualSize: 8 << 20, blockSize: 1 << 20))
        try VHDXImage.create(path: child, options: VHDXCreateOptions(type: .differencing, parentPath: base))
        _ = try VHDXImage(path: child, options: .init(readOnly: true))
        let before = VHDXTestSupport.fileBytes(base)
        _ = try VHDXImage(path: child)   // opening the child read-write never writes the parent
        #expect(VHDXTestSupport.fileBytes(base) == before)
        do {
            let p = try VHDXImage(path: base)
            try VHDXTestSupport.write(p, [1, 2, 3, 4] + [UInt8](repeating: 0, count: 508), at: 0)
            try p.close()
        }
        do {
            _ = try VHDXImage(path: child, options: .init(readOnly: true))
            Issue.record("a child of a modified parent opened")
        } catch {
            #expect("\(error)".contains("changed since"), "\(error)")
        }
        // A missing parent names the paths it tried.
        try FileManager.default.removeItem(atPath: base)
        do {
            _ = try VHDXImage(path: child, options: .init(readOnly: true))
            Issue.record("a child without its parent opened")
        } catch {
            #expect("\(error)".contains("parent not found"), "\(error)")
        }
    }

    @Test func parentLoopIsRefused() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let a = dir + "/a.vhdx", b = dir + "/b.avhdx"
        try VHDXImage.create(path: a, options: VHDXCreateOptions(virtualSize: 8 << 20, blockSize: 1 << 20))
        try VHDXImage.create(path: b, options: VHDXCreateOptions(type: .differencing, parentPath: a))
        // Make a child of b, then rename it over a: a's parent is b, b's parent is a.
        let c = dir + "/c.avhdx"
        try VHDXImage.create(path: c, options: VHDXCreateOptions(type: .differencing, parentPath: b))
        try FileManager.default.removeItem(atPath: a)
        try FileManager.default.moveItem(atPath: c, toPath: a)
        do {
            _ = try VHDXImage(path: b, options: .init(readOnly: true))
            Issue.record("a parent loop opened")
        } catch {
            #expect("\(error)".contains("loop") || "\(error)".contains("deeper"), "\(error)")
        }
    }
}
