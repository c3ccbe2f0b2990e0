import Foundation
import Testing
@testable import HyperCore
import DiskTestWorkload

/// Power loss, not just SIGKILL: every write, truncate and fdatasync of a workload is recorded, then
/// the disk states a power cut could leave are rebuilt — everything before the last completed sync,
/// plus a random subset of the 4 KiB pages written after it — and each is reopened. The log must
/// replay, `check` must be clean, and every write acknowledged by a completed flush must be there.
/// (A SIGKILL keeps the page cache, so only this test exercises the write-ahead ordering itself.)
@Suite(.serialized) struct VHDXPowerLossTests {
    @Test(arguments: [false, true])
    func everyCrashStateReplaysToAcknowledgedData(differencing: Bool) throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let size = VHDXCrashTests.diskSize
        let path = dir + "/p.vhdx"
        var base: [Int32]? = nil
        if differencing {
            let parent = dir + "/base.vhdx"
            try VHDXImage.create(path: parent, options: VHDXCreateOptions(virtualSize: size, blockSize: 2 << 20))
            let b = try VHDXImage(path: parent)
            try VHDXTestSupport.write(b, [UInt8](repeating: 0xEE, count: 4 << 20), at: 0)
            try b.close()
            try VHDXImage.create(path: path, options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: parent))
            base = []
        } else {
            try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: size, blockSize: 1 << 20))
        }
        let initial = VHDXTestSupport.fileBytes(path)

        // The workload, recorded.
        let seed = UInt64.random(in: 1...UInt64.max)
        let ops = 160, flushEvery = Int.random(in: 2...6)
        let recorder = IORecorder()
        do {
            let image = try VHDXImage(file: try DiskFile(path: path, recorder: recorder), options: .init())
            var workload = CrashWorkload(seed: seed, diskSize: size, sectorSize: 512)
            for i in 0..<ops {
                let op = workload.next(index: i)
                try VHDXTestSupport.write(image, CrashWorkload.pattern(op: i, length: Int(op.length), sectorSize: 512), at: op.offset)
                if (i + 1) % flushEvery == 0 {
                    try image.flush()
                    recorder.record(.acknowledged(i + 1))
                }
            }
            image.abandon()
        }
        let events = recorder.events
        let syncs = events.indices.filter { if case .sync = events[$0] { return true } else { return false } }
        #expect(syncs.count > 10)

        // Cut points: right after every 3rd sync, and at random events.
        var cuts = Set(stride(from: 0, to: syncs.count, by: 3).map { syncs[$0] + 1 })
        var rng = SplitMix(seed: seed)
        while cuts.count < 60 { cuts.insert(Int(rng.next() % UInt64(events.count + 1))) }
        let crashPath = dir + "/crash.vhdx"
        for cut in cuts.sorted() {
            var state = initial
            let durableUpTo = (syncs.last { $0 < cut }).map { $0 + 1 } ?? 0
            var acknowledged = 0
            for (k, event) in events[0..<cut].enumerated() {
                switch event {
                case let .write(offset, bytes):
                    let o = Int(offset)
                    if o + bytes.count > state.count { state += [UInt8](repeating: 0, count: o + bytes.count - state.count) }
                    if k < durableUpTo {
                        state.replaceSubrange(o..<o + bytes.count, with: bytes)
                    } else {
                        // After the last sync each page independently made it or not.
                        var p = 0
                        while p < bytes.count {
                            let n = min(4096 - (o + p) % 4096, bytes.count - p)
                            if rng.next() % 2 == 0 { state.replaceSubrange((o + p)..<(o + p + n), with: bytes[p..<p + n]) }
                            p += n
                        }
                    }
                case let .truncate(newSize):
                    let n = Int(newSize)
                    if n < state.count { state.removeLast(state.count - n) } else { state += [UInt8](repeating: 0, count: n - state.count) }
                case .sync: break
                case let .acknowledged(n): acknowledged = n
                }
            }
            try Data(state).write(to: URL(fileURLWithPath: crashPath))
            let context = "seed \(seed) cut \(cut)/\(events.count) acknowledged \(acknowledged)"
            do {
                let image = try VHDXImage(path: crashPath)
                try VHDXCrashTests().verify(image, seed: seed, ops: ops, acknowledged: acknowledged, base: base, context: context)
                try image.close()
            } catch {
                Issue.record("\(context): \(error)")
                continue
            }
            let report = VHDXImage.check(path: crashPath)
            #expect(report.isClean, "\(context): \(report.problems)")
        }
    }
}
