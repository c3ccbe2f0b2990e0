import HyperCore
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory ``BlockBackend`` for tests: records every access so a test can prove nothing
/// outside the disk was touched.
final class MemoryDisk: BlockBackend, @unchecked Sendable {
    private let lock = SpinLock()
    private var storage: [UInt8]
    let isReadOnly: Bool
    var virtualSize: UInt64 { UInt64(storage.count) }
    var logicalSectorSize: UInt32 { 512 }
    var physicalSectorSize: UInt32 { 4096 }
    private(set) var accesses: [(kind: String, offset: UInt64, length: UInt64)] = []
    private(set) var flushes = 0

    init(bytes: [UInt8], readOnly: Bool = false) {
        storage = bytes
        isReadOnly = readOnly
    }

    convenience init(sectors: Int, readOnly: Bool = false) {
        self.init(bytes: (0..<(sectors * 512)).map { UInt8(truncatingIfNeeded: ($0 / 512) &* 13 &+ $0 % 512) }, readOnly: readOnly)
    }

    var bytes: [UInt8] { lock.with { storage } }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError) {
        try validate(offset: offset, length: UInt64(buffer.count))
        lock.with {
            accesses.append(("read", offset, UInt64(buffer.count)))
            storage.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: "memory") }
        try validate(offset: offset, length: UInt64(buffer.count))
        lock.with {
            accesses.append(("write", offset, UInt64(buffer.count)))
            storage.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count]).copyMemory(from: buffer) }
        }
    }

    func flush() throws(BlockError) { lock.with { flushes += 1 } }
    func close() throws(BlockError) {}
    func discard(offset: UInt64, length: UInt64) throws(BlockError) { try writeZeroes(offset: offset, length: length) }
    func writeZeroes(offset: UInt64, length: UInt64) throws(BlockError) {
        guard !isReadOnly else { throw .readOnly(path: "memory") }
        try validate(offset: offset, length: length)
        lock.with {
            accesses.append(("zero", offset, length))
            for i in Int(offset)..<Int(offset + length) { storage[i] = 0 }
        }
    }
}

final class SpinLock: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    func with<R>(_ body: () throws -> R) rethrows -> R {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}

/// Runs the project's virtio guest (Tests/Guests/virtio.c) on QEMU, the reference device models.
enum QEMUVirtio {
    static let available = TestHost.hasTool("qemu-system-x86_64") && TestHost.kvmUsable
    static let skipReason: Comment = "qemu-system-x86_64 (with KVM) is not installed: QEMU comparison skipped"

    /// Boots `virtio.elf` with `commandLine` and device arguments; returns key=value pairs and the exit status.
    static func run(commandLine: String, mmio: Bool, arguments: [String], timeout: Double = 60) throws -> (values: [String: String], status: Int32, output: String) {
        var args = ["-accel", "kvm", "-m", "128", "-nodefaults", "-nographic", "-no-reboot", "-display", "none",
                    "-monitor", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0x501,iosize=2",
                    "-kernel", try GuestImages.path("virtio.elf"), "-append", commandLine]
        args += mmio ? ["-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false"] : ["-M", "q35"]
        args += arguments
        _ = try GuestImages.bytes("virtio.elf")
        let result = try Subprocess.run("qemu-system-x86_64", args, timeoutSeconds: timeout)
        // SeaBIOS prints before the guest, without a newline after "Booting from ROM..".
        var bytes = Array(result.stdout.utf8.filter { $0 != 13 })
        let marker = Array("Booting from ROM..".utf8)
        if bytes.count >= marker.count {
            for start in stride(from: bytes.count - marker.count, through: 0, by: -1) where Array(bytes[start..<start + marker.count]) == marker {
                bytes = Array(bytes[(start + marker.count)...])
                break
            }
        }
        let text = String(decoding: bytes, as: UTF8.self)
        return (keyValues(text), result.status, text)
    }

    static func keyValues(_ text: String) -> [String: String] {
        var values: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            if parts.count == 2 { values[String(parts[0])] = String(parts[1]) }
        }
        return values
    }
}

