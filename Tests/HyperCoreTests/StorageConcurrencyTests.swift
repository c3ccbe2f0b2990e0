import Foundation
import Testing
@testable import HyperCore

/// Several threads writing and reading disjoint ranges of one image at once (positioned I/O,
/// serialised metadata), then everything checked; and the raw backend's basics.
@Suite(.serialized) struct StorageConcurrencyTests {
    @Test(arguments: ["dynamic", "differencing", "raw"])
    func parallelWritersAndReaders(_ kind: String) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let size: UInt64 = 32 << 20
        let disk: any BlockBackend
        switch kind {
        case "raw":
            try RawImage.create(path: dir + "/d.img", size: size)
            disk = try openDisk(path: dir + "/d.img", readOnly: false)
            #expect(disk is RawImage)
        case "differencing":
            try VHDXImage.create(path: dir + "/b.vhdx", options: VHDXCreateOptions(virtualSize: size, blockSize: 1 << 20))
            try VHDXImage.create(path: dir + "/d.avhdx", options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: dir + "/b.vhdx"))
            disk = try openDisk(path: dir + "/d.avhdx", readOnly: false)
        default:
            try VHDXImage.create(path: dir + "/d.vhdx", options: VHDXCreateOptions(virtualSize: size, blockSize: 1 << 20))
            disk = try openDisk(path: dir + "/d.vhdx", readOnly: false)
        }
        // Thread t owns every 4th 64 KiB stripe starting at t; stripes share blocks, so
        // allocations race with writes into the same block from other threads.
        let threads = 4, stripe = 64 << 10
        let stripes = Int(size) / stripe
        let errors = LockedCounter()
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            for s in stride(from: t, to: stripes, by: threads) {
                let data = [UInt8](repeating: UInt8(s % 250 + 1), count: stripe)
                do {
                    try VHDXTestSupport.write(disk, data, at: UInt64(s * stripe))
                    if s % 16 == t { try disk.flush() }
                    if try VHDXTestSupport.read(disk, at: UInt64(s * stripe), count: stripe) != data { errors.add() }
                } catch { errors.add() }
            }
        }
        #expect(errors.value == 0)
        try disk.flush()
        let all = try VHDXTestSupport.readAll(disk)
        for s in 0..<stripes where all[s * stripe] != UInt8(s % 250 + 1) || all[s * stripe + stripe - 1] != UInt8(s % 250 + 1) {
            Issue.record("stripe \(s) lost its data")
        }
        if let vhdx = disk as? VHDXImage {
            try vhdx.close()
            #expect(VHDXImage.check(path: vhdx.path).isClean)
        }
    }

    @Test func rawImageBasics() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        try RawImage.create(path: dir + "/r.raw", size: 1 << 20)
        let raw = try RawImage(path: dir + "/r.raw", readOnly: false)
        try VHDXTestSupport.write(raw, [UInt8](repeating: 9, count: 8192), at: 4096)
        try raw.writeZeroes(offset: 4096, length: 4096)
        #expect(try VHDXTestSupport.read(raw, at: 4096, count: 8192) == [UInt8](repeating: 0, count: 4096) + [UInt8](repeating: 9, count: 4096))
        #expect(throws: BlockError.self) { try VHDXTestSupport.write(raw, [1], at: 0) }
        #expect(throws: BlockError.self) { try VHDXTestSupport.read(raw, at: 1 << 20, count: 512) }
        let ro = try RawImage(path: dir + "/r.raw", readOnly: true)
        #expect(throws: BlockError.readOnly(path: dir + "/r.raw")) { try VHDXTestSupport.write(ro, [UInt8](repeating: 0, count: 512), at: 0) }
    }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.lock(); count += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}
