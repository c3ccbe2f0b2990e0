import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// Hidden helper for the crash test: writes a deterministic sequence of patterned writes into a VHDX
/// and prints "F <n>" after each completed flush (so the n first writes are durable). The test
/// kills it with SIGKILL at a random moment and checks the image.
struct DiskCrashWriter: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "_crash-writer", shouldDisplay: false)

    @Argument var path: String
    @Option var seed: UInt64
    @Option var ops: Int = 400
    @Option(name: .customLong("flush-every")) var flushEvery: Int = 4

    func run() throws {
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
}
