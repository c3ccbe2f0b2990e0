import Foundation
import Testing
@testable import HyperCore
import DiskTestWorkload

/// A writer process (`disk-test-tool crash-writer`, Tests/DiskTestSupport) is killed with SIGKILL at a random moment during
/// its writes and flushes. Reopening must replay the log, `check` must be clean, and every write
/// acknowledged by a completed flush must be there; a sector may hold a later, unflushed write, but
/// never anything else.
///
/// Iterations: 40 by default; `VHDX_CRASH_ITERATIONS=2000 swift test --filter VHDXCrashTests` soaks.
@Suite(.serialized) struct VHDXCrashTests {
    static let diskSize: UInt64 = 16 << 20

    @Test(arguments: [false, true])
    func killedWriterLosesNoFlushedWrite(differencing: Bool) throws {
        guard let tool = VHDXTestSupport.builtExecutable("disk-test-tool") else {
            Issue.record("disk-test-tool not found next to the test bundle; build it with swift build --build-tests")
            return
        }
        let iterations = Int(ProcessInfo.processInfo.environment["VHDX_CRASH_ITERATIONS"] ?? "") ?? 40
        let ops = 600
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        var killedMidway = 0
        var acknowledgedTotal = 0
        for iteration in 0..<iterations {
            let seed = UInt64.random(in: 1...UInt64.max)
            let path = dir + "/crash\(iteration).vhdx"
            var baseModel: [Int32]? = nil
            if differencing {
                // A base with a few blocks of its own, so the child's partial blocks matter.
                let base = dir + "/base\(iteration).vhdx"
                try VHDXImage.create(path: base, options: VHDXCreateOptions(virtualSize: Self.diskSize, blockSize: 2 << 20))
                let b = try VHDXImage(path: base)
                try VHDXTestSupport.write(b, [UInt8](repeating: 0xEE, count: 4 << 20), at: 0)
                try b.close()
                try VHDXImage.create(path: path, options: VHDXCreateOptions(type: .differencing, blockSize: 1 << 20, parentPath: base))
                baseModel = [Int32](repeating: 0, count: Int(Self.diskSize / 512))
            } else {
                try VHDXImage.create(path: path, options: VHDXCreateOptions(virtualSize: Self.diskSize, blockSize: 1 << 20))
            }
            let p = Process()
            p.executableURL = URL(fileURLWithPath: tool)
            p.arguments = ["crash-writer", path, "--seed", "\(seed)", "--ops", "\(ops)", "--flush-every", "\(Int.random(in: 1...8))"]
            let pipe = Pipe()
            p.standardOutput = pipe
            p.standardError = FileHandle.nullDevice
            try p.run()
            let collector = VHDXTestSupport.OutputCollector(pipe.fileHandleForReading)
            usleep(UInt32.random(in: 2_000...120_000))
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let output = collector.finish()
            let acknowledged = output.split(separator: "\n").compactMap { $0.hasPrefix("F ") ? Int($0.dropFirst(2)) : nil }.max() ?? 0
            if !output.contains("DONE") { killedMidway += 1 }
            acknowledgedTotal += acknowledged

            // Read-only first (log replayed in memory), then read-write (replayed to the file).
            for readOnly in [true, false] {
                let image = try VHDXImage(path: path, options: .init(readOnly: readOnly))
                try verify(image, seed: seed, ops: ops, acknowledged: acknowledged, base: baseModel, context: "iteration \(iteration) seed \(seed) readOnly \(readOnly)")
                if !readOnly { try image.close() }
            }
            let report = VHDXImage.check(path: path)
            #expect(report.isClean, "iteration \(iteration) seed \(seed): \(report.problems)")
            if !differencing && VHDXTestSupport.hasQemu && iteration % 10 == 0 {
                let q = VHDXTestSupport.qemuImg(["check", "-f", "vhdx", path])
                #expect(q.status == 0, "qemu-img check, iteration \(iteration): \(q.output)")
            }
            try? FileManager.default.removeItem(atPath: path)
        }
        print("crash test (differencing: \(differencing)): \(iterations) iterations, \(killedMidway) killed before finishing, on average after \(acknowledgedTotal / max(1, iterations)) of \(ops) writes were flushed")
        #expect(killedMidway > 0, "no iteration was actually interrupted; the kill window is too late")
    }

    /// Every sector must hold the last acknowledged write to it, or a later (unacknowledged) one.
    /// Each sector names the op that wrote it in its first 4 bytes; the fill byte is checked too.
    func verify(_ image: VHDXImage, seed: UInt64, ops: Int, acknowledged: Int, base: [Int32]?, context: String) throws {
        let sectors = Int(Self.diskSize / 512)
        let baseSectors = base == nil ? 0 : (4 << 20) / 512
        var workload = CrashWorkload(seed: seed, diskSize: Self.diskSize, sectorSize: 512)
        var opStart = [Int](repeating: 0, count: ops)
        var lastAcked = [Int32](repeating: -1, count: sectors)
        var laterWriters = [[Int32]](repeating: [], count: sectors)
        for i in 0..<ops {
            let op = workload.next(index: i)
            let first = Int(op.offset / 512)
            opStart[i] = first
            for s in first..<first + Int(op.length / 512) {
                if i < acknowledged { lastAcked[s] = Int32(i) } else { laterWriters[s].append(Int32(i)) }
            }
        }
        let disk = try VHDXTestSupport.readAll(image)
        var bad = 0
        disk.withUnsafeBytes { d in
            for s in 0..<sectors {
                let raw = d.loadUnaligned(fromByteOffset: s * 512, as: UInt32.self)
                let last = d[s * 512 + 511]
                let ok: Bool
                let emptyByte: UInt8 = s < baseSectors ? 0xEE : 0
                if raw == 0 || (base != nil && raw == 0xEEEE_EEEE) {
                    // Never written here: valid only if no acknowledged write covers it.
                    ok = lastAcked[s] < 0 && raw == UInt32(emptyByte) * 0x0101_0101 && last == emptyByte
                } else {
                    let tag = Int32(truncatingIfNeeded: raw) - 1
                    let known = tag >= 0 && Int(tag) < ops && (tag == lastAcked[s] || laterWriters[s].contains(tag))
                    let fill = known ? UInt8((Int(tag) * 31 + (s - opStart[Int(tag)])) % 251 + 1) : 0
                    ok = known && last == fill
                }
                if !ok {
                    bad += 1
                    if bad <= 3 { Issue.record("\(context): sector \(s) holds 0x\(String(raw, radix: 16)), expected op \(lastAcked[s]) or one of \(laterWriters[s])") }
                }
            }
        }
        #expect(bad == 0, "\(context): \(bad) bad sectors")
    }
}
