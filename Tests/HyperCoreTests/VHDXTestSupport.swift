import Foundation
import Testing
@testable import HyperCore

/// Helpers shared by the VHDX and storage tests: scratch directories, subprocesses with deadlines,
/// whole-disk reads.
enum VHDXTestSupport {
    /// A fresh directory under the system temp dir, removed by `cleanup`.
    static func scratchDirectory(_ name: String = #function) -> String {
        let safe = name.filter { $0.isLetter || $0.isNumber }
        let dir = NSTemporaryDirectory() + "hypercore-vhdx-\(safe)-\(UInt32.random(in: 0...UInt32.max))"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    static func cleanup(_ dir: String) { try? FileManager.default.removeItem(atPath: dir) }

    static func which(_ tool: String) -> String? {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin"] where FileManager.default.isExecutableFile(atPath: "\(dir)/\(tool)") {
            return "\(dir)/\(tool)"
        }
        return nil
    }

    static var hasQemu: Bool { which("qemu-img") != nil && which("qemu-io") != nil }

    struct ProcessResult {
        var status: Int32
        var output: String
        var timedOut: Bool
    }

    /// Runs a program to completion or until `deadline` seconds pass (then it is killed).
    @discardableResult
    static func run(_ program: String, _ args: [String], deadline: Double = 120) -> ProcessResult {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try! p.run()
        let reader = OutputCollector(pipe.fileHandleForReading)
        let start = Date()
        while p.isRunning && Date().timeIntervalSince(start) < deadline { usleep(2000) }
        var timedOut = false
        if p.isRunning { kill(p.processIdentifier, SIGKILL); timedOut = true }
        p.waitUntilExit()
        return ProcessResult(status: p.terminationStatus, output: reader.finish(), timedOut: timedOut)
    }

    /// Drains a pipe on a background thread so a chatty child never blocks on a full pipe.
    final class OutputCollector: @unchecked Sendable {
        private var data = Data()
        private let lock = NSLock()
        private let done = DispatchSemaphore(value: 0)
        init(_ handle: FileHandle) {
            Thread.detachNewThread { [self] in
                while true {
                    let chunk = handle.availableData
                    if chunk.isEmpty { break }
                    lock.lock(); data.append(chunk); lock.unlock()
                }
                done.signal()
            }
        }
        func finish() -> String {
            _ = done.wait(timeout: .now() + 10)
            lock.lock(); defer { lock.unlock() }
            return String(decoding: data, as: UTF8.self)
        }
    }

    static func qemuImg(_ args: [String]) -> ProcessResult { run(which("qemu-img")!, args) }
    static func qemuIO(_ args: [String]) -> ProcessResult { run(which("qemu-io")!, args) }

    /// The hvrun binary built next to the test bundle (.build/<config>/hvrun).
    static var hvrunPath: String? { builtExecutable("hvrun") }

    /// An executable of this package built next to the test bundle (.build/<config>/NAME).
    static func builtExecutable(_ name: String) -> String? {
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        if let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            dir = URL(fileURLWithPath: exe)
        }
        // Walk up from the test binary (inside the .xctest bundle) to the build folder.
        for _ in 0..<5 {
            dir = dir.deletingLastPathComponent()
            let candidate = dir.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    static func readAll(_ disk: any BlockBackend, chunk: Int = 4 << 20) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(disk.virtualSize))
        var pos = 0
        while pos < out.count {
            let n = min(chunk, out.count - pos)
            try out.withUnsafeMutableBytes { try disk.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[pos..<pos + n]), at: UInt64(pos)) }
            pos += n
        }
        return out
    }

    static func read(_ disk: any BlockBackend, at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try disk.read(into: $0, at: offset) }
        return out
    }

    static func write(_ disk: any BlockBackend, _ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try disk.write($0, at: offset) }
    }

    static func fileBytes(_ path: String) -> [UInt8] { [UInt8](FileManager.default.contents(atPath: path) ?? Data()) }

    /// Compares two byte arrays and describes the first difference (for readable failures).
    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String? {
        if a.count != b.count { return "sizes differ: \(a.count) vs \(b.count)" }
        return a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                if memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0 { return nil }
                let i = (0..<a.count).first { a[$0] != b[$0] }!
                return "first difference at byte \(i) (sector \(i / 512)): \(a[i]) vs \(b[i])"
            }
        }
    }

    static func pattern(_ count: Int, seed: UInt8) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed) &* 13 &+ ($0 >> 9)) | 1 }
    }
}
