import Foundation
import PropertyBased
import Testing
@testable import HyperCore

/// Random sequences of writes, write-zeroes, flushes and reopens, compared after every step with an
/// in-memory model of the disk — for dynamic, fixed and differencing images, 512- and 4096-byte sectors.
@Suite(.serialized) struct VHDXPropertyTests {
    static let size = 6 << 20

    enum Kind: String, CaseIterable, Sendable { case dynamic, fixed, differencing }

    @Test(arguments: [(Kind.dynamic, UInt32(512)), (.fixed, 512), (.differencing, 512), (.dynamic, 4096), (.differencing, 4096)])
    func randomOperationsMatchTheModel(kind: Kind, sector: UInt32) async {
        await propertyCheck(count: 8, input: Gen.int(in: 0...Int.max).array(of: 1...40)) { seeds in
            do { try run(kind: kind, sector: Int(sector), seeds: seeds) } catch { Issue.record("\(error)") }
        }
    }

    func run(kind: Kind, sector: Int, seeds: [Int]) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/p.vhdx"
        var model = [UInt8](repeating: 0, count: Self.size)
        switch kind {
        case .dynamic, .fixed:
            try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: UInt64(Self.size), type: kind == .fixed ? .fixed : .dynamic,
                                                                        blockSize: 1 << 20, logicalSectorSize: UInt32(sector)))
        case .differencing:
            let base = dir + "/base.vhdx"
            try VHDXImage.create(path: base, options: VHDXCreateOptions(virtualSize: UInt64(Self.size), blockSize: 2 << 20, logicalSectorSize: UInt32(sector)))
            let b = try VHDXImage(path: base)
            let data = VHDXTestSupport.pattern(3 << 20, seed: 99)
            try VHDXTestSupport.write(b, data, at: 1 << 20)
            model.replaceSubrange((1 << 20)..<(4 << 20), with: data)
            try b.close()
            try VHDXImage.create(path: path, options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: base))
        }
        var image = try VHDXImage(path: path)
        let sectors = Self.size / sector
        for (step, seed) in seeds.enumerated() {
            var rng = SplitMix(seed: UInt64(seed))
            let count = Int(rng.next() % 48) + 1
            let start = Int(rng.next() % UInt64(sectors - count + 1))
            let offset = start * sector, length = count * sector
            switch rng.next() % 10 {
            case 0...5:
                let data = VHDXTestSupport.pattern(length, seed: UInt8(truncatingIfNeeded: seed))
                try VHDXTestSupport.write(image, data, at: UInt64(offset))
                model.replaceSubrange(offset..<offset + length, with: data)
            case 6:
                try image.writeZeroes(offset: UInt64(offset), length: UInt64(length))
                model.replaceSubrange(offset..<offset + length, with: [UInt8](repeating: 0, count: length))
            case 7:
                // Whole-block zeroing exercises the ZERO state (and hiding the parent).
                let block = Int(rng.next() % 6)
                try image.writeZeroes(offset: UInt64(block << 20), length: 1 << 20)
                model.replaceSubrange((block << 20)..<((block + 1) << 20), with: [UInt8](repeating: 0, count: 1 << 20))
            case 8:
                try image.flush()
            default:
                try image.close()
                image = try VHDXImage(path: path, options: .init(readOnly: rng.next() % 2 == 0))
                if image.isReadOnly {
                    try check(image, model, "step \(step) read-only reopen")
                    image = try VHDXImage(path: path)
                }
            }
            let probe = Int(rng.next() % UInt64(sectors - 16)) * sector
            #expect(try VHDXTestSupport.read(image, at: UInt64(probe), count: 16 * sector) == Array(model[probe..<probe + 16 * sector]), "step \(step)")
        }
        try check(image, model, "before close")
        try image.close()
        let report = VHDXImage.check(path: path)
        #expect(report.isClean, "\(report.problems)")
        try check(try VHDXImage(path: path, options: .init(readOnly: true)), model, "after close")
    }

    func check(_ image: VHDXImage, _ model: [UInt8], _ context: String) throws {
        let bytes = try VHDXTestSupport.readAll(image, chunk: 1536 * 1024)
        #expect(VHDXTestSupport.firstDifference(bytes, model) == nil, "\(context)")
    }
}

struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
