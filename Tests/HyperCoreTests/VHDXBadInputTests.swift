import Foundation
import Testing
@testable import HyperCore

/// Damaged and hostile files: each gives a VHDXError naming the structure, never a crash, and the
/// file is never written.
@Suite(.serialized) struct VHDXBadInputTests {
    struct Damage: CustomTestStringConvertible, Sendable {
        var name: String
        /// What the error message must mention.
        var mentions: String
        var fixCRCs: Bool
        var apply: @Sendable (DiskFile) throws -> Void
        var testDescription: String { name }
    }

    /// A 64 MiB dynamic disk, 1 MiB blocks, block 0 and block 5 written; BAT at 3 MiB, metadata at 2 MiB.
    func makeImage(_ dir: String, differencing: Bool = false) throws -> String {
        let path = dir + "/bad.vhdx"
        try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: 64 << 20, blockSize: 1 << 20))
        let image = try VHDXImage(path: path)
        try VHDXTestSupport.write(image, [UInt8](repeating: 7, count: 4096), at: 0)
        try VHDXTestSupport.write(image, [UInt8](repeating: 8, count: 4096), at: 5 << 20)
        try image.close()
        if !differencing { return path }
        let child = dir + "/child.avhdx"
        try VHDXImage.create(path: child, options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: path))
        return child
    }

    static func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    static let damages: [Damage] = [
        Damage(name: "not a VHDX", mentions: "not a VHDX", fixCRCs: false) { try $0.write(Array("qcowfile".utf8), at: 0) },
        Damage(name: "truncated below the header section", mentions: "truncated", fixCRCs: false) { try $0.truncate(to: 300 << 10) },
        Damage(name: "truncated through the BAT", mentions: "region", fixCRCs: false) { try $0.truncate(to: (3 << 20) + 4096) },
        Damage(name: "both header CRCs corrupt", mentions: "neither header", fixCRCs: false) { f in
            try f.write([0xFF], at: (64 << 10) + 200); try f.write([0xFF], at: (128 << 10) + 200)
        },
        Damage(name: "both region tables corrupt", mentions: "region tables", fixCRCs: false) { f in
            try f.write([0xFF], at: (192 << 10) + 9000); try f.write([0xFF], at: (256 << 10) + 9000)
        },
        Damage(name: "BAT entry points outside the file", mentions: "BAT entry", fixCRCs: false) { f in
            try f.write(le64((40 << 30) | 6), at: 3 << 20)
        },
        Damage(name: "BAT entries overlap", mentions: "overlaps", fixCRCs: false) { f in
            let first = try f.read(count: 8, at: 3 << 20)
            try f.write(first, at: (3 << 20) + 8 * 5)
        },
        Damage(name: "BAT entry points into the metadata region", mentions: "overlaps", fixCRCs: false) { f in
            try f.write(le64((2 << 20) | 6), at: (3 << 20) + 16)
        },
        Damage(name: "invalid block state", mentions: "state 4", fixCRCs: false) { f in try f.write(le64(4), at: (3 << 20) + 24) },
        Damage(name: "regions overlap", mentions: "overlap", fixCRCs: true) { f in
            // Both copies: metadata region moved onto the BAT.
            for t in [UInt64(192 << 10), 256 << 10] {
                let table = try f.read(count: 80, at: t)
                for e in 0..<2 where table[16 + 32 * e] == 0x06 { try f.write(le64(3 << 20), at: t + 16 + 32 * UInt64(e) + 16) }
            }
        },
        Damage(name: "unknown required region", mentions: "required region", fixCRCs: true) { f in
            for t in [UInt64(192 << 10), 256 << 10] {
                try f.write(le32(3), at: t + 8)
                try f.write([UInt8](repeating: 0x42, count: 16) + le64(5 << 20) + le32(1 << 20) + le32(1), at: t + 16 + 64)
            }
        },
        Damage(name: "absurd virtual size", mentions: "Virtual Disk Size", fixCRCs: false) { f in
            try f.write(le64(1 << 62), at: (2 << 20) + (64 << 10) + 8)
        },
        Damage(name: "block size not a power of two", mentions: "block size", fixCRCs: false) { f in
            try f.write(le32(3 << 20), at: (2 << 20) + (64 << 10))
        },
        Damage(name: "unknown required metadata item", mentions: "required metadata item", fixCRCs: false) { f in
            let md = UInt64(2 << 20)
            try f.write([UInt8](repeating: 0x99, count: 16), at: md + 32)   // retag the File Parameters item
        },
        Damage(name: "metadata item outside its region", mentions: "metadata entry", fixCRCs: false) { f in
            try f.write(le32(2 << 20), at: (2 << 20) + 32 + 16)
        },
        Damage(name: "log offset past the end of the file", mentions: "log", fixCRCs: true) { f in
            for h in [UInt64(64 << 10), 128 << 10] { try f.write(le64(1 << 40), at: h + 72) }
        },
    ]

    @Test(arguments: damages)
    func damagedFileIsRefusedWithoutWriting(_ damage: Damage) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = try makeImage(dir)
        do {
            let f = try DiskFile(path: path, readOnly: false)
            try damage.apply(f)
            if damage.fixCRCs { try FuzzSupport.fixChecksums(f) }
        }
        let before = VHDXTestSupport.fileBytes(path)
        for readOnly in [true, false] {
            do {
                let image = try VHDXImage(path: path, options: .init(readOnly: readOnly))
                Issue.record("opened (readOnly \(readOnly)) a file with \(damage.name): size \(image.virtualSize)")
            } catch {
                #expect(error.description.contains(damage.mentions), "\(damage.name): \(error)")
                #expect(error.description.contains(path), "the message names the file")
            }
        }
        #expect(VHDXTestSupport.fileBytes(path) == before, "a refused open never writes")
        let report = VHDXImage.check(path: path)
        #expect(!report.isClean, "check finds the \(damage.name)")
        #expect(VHDXTestSupport.fileBytes(path) == before, "check never writes")
    }

    @Test func oneDamagedHeaderOrRegionCopyIsToleratedAndRepaired() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = try makeImage(dir)
        do {
            let f = try DiskFile(path: path, readOnly: false)
            try f.write([0xFF], at: (64 << 10) + 300)
            try f.write([0xFF], at: (192 << 10) + 300)
        }
        let image = try VHDXImage(path: path, options: .init(readOnly: true))
        #expect(try VHDXTestSupport.read(image, at: 5 << 20, count: 4096) == [UInt8](repeating: 8, count: 4096))
        let report = VHDXImage.check(path: path)
        #expect(!report.isClean, "a damaged region table copy is a problem")
        #expect(report.notes.contains { $0.contains("header 1") })
        let actions = try VHDXImage.repair(path: path)
        #expect(actions.contains { $0.contains("region table 1") })
        let after = VHDXImage.check(path: path)
        #expect(after.isClean && after.notes.isEmpty, "\(after.problems) \(after.notes)")
    }

    /// Found by the fuzzer: a differencing BAT covers whole chunks, and an entry for a block past
    /// the end of the disk that claims to be present made the length arithmetic overflow.
    @Test func presentEntryPastTheDiskEndInADifferencingBAT() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let child = try makeImage(dir, differencing: true)
        let image = try VHDXImage(path: child, options: .init(readOnly: true))
        let batOffset = image.regions.bat!.fileOffset
        #expect(image.geometry.entryCount > image.geometry.payloadBlocks)
        do {
            let f = try DiskFile(path: child, readOnly: false)
            try f.write(Self.le64((1 << 20) | 6), at: batOffset + 8 * 100)   // block 100 of a 64-block disk
        }
        #expect(throws: VHDXError.self) { try VHDXImage(path: child, options: .init(readOnly: true)) }
        #expect(!VHDXImage.check(path: child).isClean)
    }

    @Test func requestsOutsideTheDiskAndOnReadOnlyImagesFail() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = try makeImage(dir)
        let ro = try VHDXImage(path: path, options: .init(readOnly: true))
        #expect(throws: BlockError.readOnly(path: path)) { try VHDXTestSupport.write(ro, [UInt8](repeating: 1, count: 512), at: 0) }
        #expect(throws: BlockError.self) { try VHDXTestSupport.read(ro, at: 64 << 20, count: 512) }
        #expect(throws: BlockError.self) { try VHDXTestSupport.read(ro, at: 100, count: 512) }
    }
}

/// Inputs that once crashed the fuzzer (Tests/Fuzz/regressions), replayed through the plain build
/// of the fuzz target, which runs the same code path.
@Suite struct VHDXFuzzRegressionTests {
    @Test func fuzzRegressionInputsRunClean() throws {
        let hvrun = try #require(VHDXTestSupport.hvrunPath, "build products not found next to the tests")
        let replay = URL(fileURLWithPath: hvrun).deletingLastPathComponent().appendingPathComponent("vhdx-fuzz").path
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fuzz/regressions").path
        let inputs = try FileManager.default.contentsOfDirectory(atPath: dir).sorted().map { dir + "/" + $0 }
        try #require(!inputs.isEmpty)
        let r = VHDXTestSupport.run(replay, inputs, deadline: 60)
        #expect(r.status == 0 && !r.timedOut, "\(r.output)")
        #expect(r.output.components(separatedBy: "ok: ").count - 1 == inputs.count)
    }
}
