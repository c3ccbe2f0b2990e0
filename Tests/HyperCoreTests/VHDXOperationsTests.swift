import Foundation
import Testing
@testable import HyperCore

/// Resize, compact and convert (Resize-VHD, Optimize-VHD, qemu-img convert), through the library
/// and through `hvrun disk`.
@Suite(.serialized) struct VHDXOperationsTests {
    @Test func resizeGrowsAndShrinksOnlyAnUnallocatedTail() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/r.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: (10 << 20) + 512 * 3, blockSize: 2 << 20))
        do {
            let image = try VHDXImage(path: path)
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x31, count: 1536), at: 10 << 20)   // partial last block
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x32, count: 4096), at: 0)
            try image.resize(to: 64 << 20)
            #expect(image.virtualSize == 64 << 20)
            // The old tail of the partial block reads as zeros; the new space too; writes work there.
            #expect(try VHDXTestSupport.read(image, at: (10 << 20) + 1536, count: 4096) == [UInt8](repeating: 0, count: 4096))
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x33, count: 4096), at: (12 << 20) - 4096)
            try image.close()
        }
        do {
            let image = try VHDXImage(path: path)
            #expect(image.virtualSize == 64 << 20)
            #expect(try VHDXTestSupport.read(image, at: (12 << 20) - 4096, count: 4096) == [UInt8](repeating: 0x33, count: 4096))
            #expect(throws: VHDXError.self) { try image.resize(to: 8 << 20) }   // blocks past 8 MiB hold data
            try image.resize(to: 12 << 20)
            #expect(image.virtualSize == 12 << 20)
            try image.close()
        }
        #expect(VHDXImage.check(path: path).isClean)
        if VHDXTestSupport.hasQemu {
            #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path]).status == 0)
            let r = VHDXTestSupport.qemuIO(["-r", "-c", "read -P 0x32 0 4096", "-c", "read -P 0x31 \(10 << 20) 1536", "-c", "read -P 0x33 \((12 << 20) - 4096) 4096", path])
            #expect(r.status == 0 && !r.output.contains("verification failed"), "\(r.output)")
        }
    }

    @Test(arguments: [(UInt32(1 << 20), UInt32(512)), (256 << 20, 512), (256 << 20, 4096), (1 << 20, 4096)])
    func extremeBlockAndSectorSizes(blockSize: UInt32, sector: UInt32) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/x.vhdx"
        let size: UInt64 = (600 << 20) + UInt64(sector) * 3
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: size, blockSize: blockSize, logicalSectorSize: sector, physicalSectorSize: 4096))
        let writes: [(UInt64, UInt8)] = [(0, 1), (UInt64(blockSize) - UInt64(sector), 2), (300 << 20, 3), (size - UInt64(sector), 4)]
        do {
            let image = try VHDXImage(path: path)
            for (o, v) in writes { try VHDXTestSupport.write(image, [UInt8](repeating: v, count: Int(sector)), at: o) }
            try image.close()
        }
        let image = try VHDXImage(path: path, options: .init(readOnly: true))
        #expect(image.blockSize == blockSize && image.logicalSectorSize == sector)
        for (o, v) in writes {
            #expect(try VHDXTestSupport.read(image, at: o, count: Int(sector)) == [UInt8](repeating: v, count: Int(sector)), "offset \(o)")
        }
        #expect(try VHDXTestSupport.read(image, at: 200 << 20, count: Int(sector)) == [UInt8](repeating: 0, count: Int(sector)))
        #expect(VHDXImage.check(path: path).isClean)
        if sector == 512 && VHDXTestSupport.hasQemu {
            #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path]).status == 0)
            var args = ["-r"]
            for (o, v) in writes { args += ["-c", "read -P \(v) \(o) \(sector)"] }
            let r = VHDXTestSupport.qemuIO(args + [path])
            #expect(r.status == 0 && !r.output.contains("verification failed"), "\(r.output)")
        }
    }

    @Test func growingPastTheBATRegionMovesTheBAT() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/big.vhdx"
        // 1 MiB blocks: a 1 MiB BAT region addresses 128 GiB; growing to 200 GiB must move it.
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 1 << 30, blockSize: 1 << 20, physicalSectorSize: 512))
        do {
            let image = try VHDXImage(path: path)
            let oldBAT = image.regions.bat!
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x51, count: 4096), at: 5 << 20)
            try image.resize(to: 200 << 30)
            #expect(image.regions.bat!.fileOffset != oldBAT.fileOffset)
            #expect(image.regions.bat!.length > oldBAT.length)
            try VHDXTestSupport.write(image, [UInt8](repeating: 0x52, count: 4096), at: 150 << 30)
            try image.close()
        }
        let image = try VHDXImage(path: path, options: .init(readOnly: true))
        #expect(image.virtualSize == 200 << 30)
        #expect(try VHDXTestSupport.read(image, at: 5 << 20, count: 4096) == [UInt8](repeating: 0x51, count: 4096))
        #expect(try VHDXTestSupport.read(image, at: 150 << 30, count: 4096) == [UInt8](repeating: 0x52, count: 4096))
        let report = VHDXImage.check(path: path)
        #expect(report.isClean, "\(report.problems)")
        if VHDXTestSupport.hasQemu {
            #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path]).status == 0)
            let r = VHDXTestSupport.qemuIO(["-r", "-c", "read -P 0x51 \(5 << 20) 4096", "-c", "read -P 0x52 \(150 << 30) 4096", path])
            #expect(r.status == 0 && !r.output.contains("verification failed"), "\(r.output)")
        }
    }

    @Test func compactDropsZeroBlocksAndShortensTheFile() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/c.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 32 << 20, blockSize: 1 << 20))
        var model = [UInt8](repeating: 0, count: 32 << 20)
        do {
            let image = try VHDXImage(path: path)
            for b in 0..<16 {
                // Even blocks get data, odd ones only zeros (allocated all the same).
                let data = b % 2 == 0 ? VHDXTestSupport.pattern(1 << 20, seed: UInt8(b)) : [UInt8](repeating: 0, count: 1 << 20)
                try VHDXTestSupport.write(image, data, at: UInt64(b) << 21)
                model.replaceSubrange((b << 21)..<((b << 21) + (1 << 20)), with: data)
            }
            try image.close()
        }
        let before = try DiskFile(path: path, readOnly: true).size()
        let image = try VHDXImage(path: path)
        let result = try image.compact()
        try image.close()
        #expect(result.blocksZeroed == 8)
        #expect(result.blocksMoved > 0)
        let after = try DiskFile(path: path, readOnly: true).size()
        #expect(after == before - (8 << 20), "before \(before) after \(after)")
        let reopened = try VHDXImage(path: path, options: .init(readOnly: true))
        #expect(VHDXTestSupport.firstDifference(try VHDXTestSupport.readAll(reopened), model) == nil)
        #expect(VHDXImage.check(path: path).isClean)
        if VHDXTestSupport.hasQemu { #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path]).status == 0) }
    }

    @Test func convertBetweenRawFixedAndDynamic() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let raw = dir + "/src.raw"
        try RawImage.create(path: raw, size: 20 << 20)
        var model = [UInt8](repeating: 0, count: 20 << 20)
        do {
            let r = try RawImage(path: raw, readOnly: false)
            for (o, n, s) in [(0, 4096, 1), (5 << 20, 3 << 20, 2), ((20 << 20) - 512, 512, 3)] as [(Int, Int, UInt8)] {
                let d = VHDXTestSupport.pattern(n, seed: s)
                try VHDXTestSupport.write(r, d, at: UInt64(o))
                model.replaceSubrange(o..<o + n, with: d)
            }
        }
        let dyn = dir + "/d.vhdx", fixed = dir + "/f.vhdx", back = dir + "/back.raw"
        try DiskConverter.convert(source: try openDisk(path: raw, readOnly: true), to: .init(path: dyn, format: .vhdx, type: .dynamic, blockSize: 1 << 20))
        try DiskConverter.convert(source: try openDisk(path: dyn, readOnly: true), to: .init(path: fixed, format: .vhdx, type: .fixed))
        try DiskConverter.convert(source: try openDisk(path: fixed, readOnly: true), to: .init(path: back, format: .raw))
        #expect(VHDXTestSupport.fileBytes(back) == model)
        let d = try VHDXImage(path: dyn, options: .init(readOnly: true))
        #expect(d.allocatedBytes == 5 << 20, "zero blocks stay unallocated: \(d.allocatedBytes)")
        #expect(try VHDXImage(path: fixed, options: .init(readOnly: true)).isFixed)
        #expect(try openDisk(path: back, readOnly: true) is RawImage)
        #expect(throws: VHDXError.self) {
            try FileManager.default.copyItem(atPath: raw, toPath: dir + "/fake.vhdx")
            _ = try openDisk(path: dir + "/fake.vhdx", readOnly: true)
        }
    }
}

/// Issue 8 item 3: convert skips unallocated and all-zero ranges, as qemu-img does — holes in a raw
/// target, not-present blocks and holes in a dynamic VHDX target — and the data stays the same.
@Suite(.serialized) struct SparseConvertTests {
    /// A 64 MiB dynamic VHDX (32 MiB blocks, the default) holding 4 MiB of data in 1 MiB pieces
    /// spread over both blocks, and the same bytes as a model.
    static func source(in dir: String) throws -> (path: String, model: [UInt8]) {
        let path = dir + "/dyn.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 64 << 20))
        var model = [UInt8](repeating: 0, count: 64 << 20)
        let image = try VHDXImage(path: path)
        for (k, offset) in [0, 10 << 20, 40 << 20, 63 << 20].enumerated() {
            let data = VHDXTestSupport.pattern(1 << 20, seed: UInt8(k + 1))
            try VHDXTestSupport.write(image, data, at: UInt64(offset))
            model.replaceSubrange(offset..<offset + data.count, with: data)
        }
        try image.close()
        return (path, model)
    }

    @Test("dynamic VHDX -> raw allocates only the data, not the whole written blocks")
    func vhdxToRawIsSparse() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let (src, model) = try Self.source(in: dir)
        let out = dir + "/out.raw"
        try DiskConverter.convert(source: try openDisk(path: src, readOnly: true), to: .init(path: out, format: .raw))
        #expect(VHDXTestSupport.fileBytes(out) == model)
        let allocated = try DiskFile(path: out, readOnly: true).allocatedBytes()
        #expect(allocated <= 5 << 20, "raw target allocates \(allocated) bytes for 4 MiB of data")
    }

    @Test("raw -> dynamic VHDX writes no zero ranges into the blocks it allocates")
    func rawToDynamicVHDXIsSparse() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let (src, model) = try Self.source(in: dir)
        let raw = dir + "/mid.raw", out = dir + "/out.vhdx"
        try DiskConverter.convert(source: try openDisk(path: src, readOnly: true), to: .init(path: raw, format: .raw))
        try DiskConverter.convert(source: try openDisk(path: raw, readOnly: true), to: .init(path: out, format: .vhdx, type: .dynamic))
        let image = try VHDXImage(path: out, options: .init(readOnly: true))
        #expect(try VHDXTestSupport.readAll(image) == model)
        let allocated = try DiskFile(path: out, readOnly: true).allocatedBytes()
        // 4 MiB of data plus the VHDX's own structures (headers, log, BAT, metadata: about 4 MiB
        // at most); qemu-img's result is 5.3 MiB. Writing whole blocks gave 65 MiB.
        #expect(allocated <= 9 << 20, "dynamic VHDX target allocates \(allocated) bytes for 4 MiB of data")
        #expect(VHDXImage.check(path: out).isClean)
        if VHDXTestSupport.hasQemu { #expect(VHDXTestSupport.qemuImg(["check", "-f", "vhdx", out]).status == 0) }
    }
}

/// `hvrun disk` end to end: the binary built next to the tests.
@Suite(.serialized) struct VHDXCommandLineTests {
    func hvrun(_ args: [String]) throws -> VHDXTestSupport.ProcessResult {
        let path = try #require(VHDXTestSupport.hvrunPath, "hvrun not built next to the tests")
        return VHDXTestSupport.run(path, ["disk"] + args, deadline: 60)
    }

    @Test func createInfoCheckConvertMergeCompact() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        #expect(try hvrun(["create", dir + "/base.vhdx", "--size", "5G", "--block-size", "8M"]).status == 0)
        #expect(try hvrun(["create", dir + "/child.avhdx", "--parent", dir + "/base.vhdx"]).status == 0)
        let info = try hvrun(["info", "--json", dir + "/child.avhdx"])
        #expect(info.status == 0)
        for needle in ["\"format\": \"vhdx\"", "\"type\": \"differencing\"", "\"virtual_size\": 5368709120", "\"block_size\": 2097152",
                       "\"logical_sector_size\": 512", "\"physical_sector_size\": 4096", "\"allocated_bytes\": 0",
                       "\"parent\": \"\(dir)/base.vhdx\"", "\"log_pending\": false"] {
            #expect(info.output.contains(needle), "missing \(needle) in \(info.output)")
        }
        // Data in the child past the first 4 GiB chunk, then merge and convert.
        do {
            let child = try VHDXImage(path: dir + "/child.avhdx")
            try VHDXTestSupport.write(child, [UInt8](repeating: 0x61, count: 8192), at: (4 << 30) + 4096)
            try child.close()
        }
        let check = try hvrun(["check", dir + "/child.avhdx"])
        #expect(check.status == 0, "\(check.output)")
        #expect(try hvrun(["merge", dir + "/child.avhdx"]).status == 0)
        #expect(!FileManager.default.fileExists(atPath: dir + "/child.avhdx"))
        #expect(try hvrun(["convert", dir + "/base.vhdx", dir + "/flat.vhdx"]).status == 0)
        let flat = try VHDXImage(path: dir + "/flat.vhdx", options: .init(readOnly: true))
        #expect(try VHDXTestSupport.read(flat, at: (4 << 30) + 4096, count: 8192) == [UInt8](repeating: 0x61, count: 8192))
        #expect(try hvrun(["resize", dir + "/flat.vhdx", "--size", "6G"]).status == 0)
        #expect(try VHDXImage(path: dir + "/flat.vhdx", options: .init(readOnly: true)).virtualSize == 6 << 30)
        #expect(try hvrun(["compact", dir + "/flat.vhdx"]).status == 0)

        // check: exit 1 with the problem listed.
        do {
            let f = try DiskFile(path: dir + "/flat.vhdx", readOnly: false)
            let image = try VHDXImage(path: dir + "/flat.vhdx", options: .init(readOnly: true))
            try f.write(withUnsafeBytes(of: UInt64((1 << 40) | 6).littleEndian) { Array($0) }, at: image.regions.bat!.fileOffset + 8)
        }
        let bad = try hvrun(["check", dir + "/flat.vhdx"])
        #expect(bad.status == 1)
        #expect(bad.output.contains("BAT entry 1"), "\(bad.output)")
        let notVHDX = try hvrun(["info", "/etc/hostname"])
        #expect(notVHDX.status == 0, "a non-VHDX file is reported as raw")
        let missing = try hvrun(["info", dir + "/missing.vhdx"])
        #expect(missing.status == 1 && missing.output.contains("missing.vhdx"))
    }
}
