// disk-test-tool: the processes the storage tests and Benchmarks/disk drive. Not part of hvrun or
// the library (it used to be hvrun's hidden `disk _crash-writer` and `disk _bench-io`).
//
//   disk-test-tool crash-writer PATH --seed N [--ops N] [--flush-every N]
//       Writes CrashWorkload's deterministic sequence into a VHDX and prints "F <n>" after each
//       completed flush (the n first writes are then durable), "DONE" at the end. The crash test
//       kills it with SIGKILL at a random moment and checks the image.
//   disk-test-tool bench-io PATH SCRIPT
//       Runs a qemu-io style script (`write -P PATTERN OFFSET LENGTH`, `flush`) against a disk, so
//       our numbers and qemu-io's come from the same workload; prints "elapsed <seconds>".
import HyperCore
import DiskTestWorkload
#if canImport(Glibc)
import Glibc
#endif

struct UsageError: Error, CustomStringConvertible {
    let description: String
}

func crashWriter(_ arguments: [String]) throws {
    guard let path = arguments.first else { throw UsageError(description: "crash-writer needs PATH") }
    var seed: UInt64?
    var ops = 400, flushEvery = 4
    var rest = arguments.dropFirst()
    while let option = rest.popFirst() {
        guard let value = rest.popFirst() else { throw UsageError(description: "\(option) needs a value") }
        switch option {
        case "--seed": seed = UInt64(value)
        case "--ops": ops = Int(value) ?? -1
        case "--flush-every": flushEvery = Int(value) ?? 0
        default: throw UsageError(description: "unknown option \(option) (valid: --seed, --ops, --flush-every)")
        }
    }
    guard let seed, ops >= 0, flushEvery > 0 else { throw UsageError(description: "--seed N is required; --ops ≥ 0, --flush-every > 0") }
    let image = try VHDXImage(path: path)
    var workload = CrashWorkload(seed: seed, diskSize: image.virtualSize, sectorSize: UInt64(image.logicalSectorSize))
    for i in 0..<ops {
        let op = workload.next(index: i)
        let data = CrashWorkload.pattern(op: i, length: Int(op.length), sectorSize: Int(image.logicalSectorSize))
        try data.withUnsafeBytes { try image.write($0, at: op.offset) }
        if (i + 1) % flushEvery == 0 {
            try image.flush()
            print("F \(i + 1)")
            fflush(nil)
        }
    }
    try image.close()
    print("DONE")
}

func benchIO(_ arguments: [String]) throws {
    guard arguments.count == 2 else { throw UsageError(description: "bench-io needs PATH SCRIPT") }
    let disk = try openDisk(path: arguments[0], readOnly: false)
    let text = try DiskFile(path: arguments[1], readOnly: true)
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
            throw UsageError(description: "unsupported script line: \(line)")
        }
    }
    var end = timespec()
    clock_gettime(CLOCK_MONOTONIC, &end)
    try disk.close()
    let seconds = Double(end.tv_sec - start.tv_sec) + Double(end.tv_nsec - start.tv_nsec) / 1e9
    print("elapsed \(seconds)")
}

let arguments = Array(CommandLine.arguments.dropFirst())
do {
    switch arguments.first {
    case "crash-writer": try crashWriter(Array(arguments.dropFirst()))
    case "bench-io": try benchIO(Array(arguments.dropFirst()))
    default: throw UsageError(description: "usage: disk-test-tool crash-writer PATH --seed N [--ops N] [--flush-every N] | bench-io PATH SCRIPT")
    }
} catch {
    var message = "disk-test-tool: \(error)\n"
    message.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    exit(1)
}
