import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// Hidden helper for Benchmarks/disk: runs a qemu-io style script (the subset `write -P PATTERN
/// OFFSET LENGTH` and `flush`) against a disk, so our numbers and qemu-io's come from the exact
/// same workload. Prints the elapsed wall time.
struct DiskBenchIO: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_bench-io", shouldDisplay: false)

    @Argument var path: String
    @Argument var script: String

    func run() throws {
        let disk = try openDisk(path: path, readOnly: false)
        let text = try DiskFile(path: script, readOnly: true)
        let bytes = try text.read(count: Int(try text.size()), at: 0)
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n")
        var buffers: [UInt8: [UInt8]] = [:]
        var start = timespec()
        clock_gettime(CLOCK_MONOTONIC, &start)
        for line in lines {
            let words = line.split(separator: " ")
            if words.first == "flush" {
                try disk.flush()
            } else if words.count == 5, words[0] == "write", words[1] == "-P",
                      let pattern = UInt8(words[2].dropFirst(2), radix: 16), let offset = UInt64(words[3]),
                      let length = words[4].hasSuffix("k") ? Int(words[4].dropLast()).map({ $0 * 1024 }) : Int(words[4]) {
                let data = buffers[pattern] ?? [UInt8](repeating: pattern, count: length)
                buffers[pattern] = data
                try data.withUnsafeBytes { try disk.write(UnsafeRawBufferPointer(rebasing: $0[0..<length]), at: offset) }
            } else {
                throw ValidationError("unsupported script line: \(line)")
            }
        }
        var end = timespec()
        clock_gettime(CLOCK_MONOTONIC, &end)
        if let vhdx = disk as? VHDXImage { try vhdx.close() }
        let seconds = Double(end.tv_sec - start.tv_sec) + Double(end.tv_nsec - start.tv_nsec) / 1e9
        print("elapsed \(seconds)")
    }
}
