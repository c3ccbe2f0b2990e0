// libFuzzer target over the split-virtqueue walker and the virtio-blk request parser.
//
// Build and run (see Docs/virtio.md):
//   swift build -c release --scratch-path .build-fuzz-virtio --product virtqueue-fuzz \
//     -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xswiftc -DFUZZING
//   .build-fuzz-virtio/release/virtqueue-fuzz -runs=10000000 Tests/Fuzz/corpus
// A plain `swift build` produces a replay tool instead: `virtqueue-fuzz FILE...` runs each file
// through the same function (how crash inputs in Tests/Fuzz/regressions are re-checked).
//
// Input layout: byte 0 = queue size - 1 (1...64), byte 1 = flags (bit 0 INDIRECT_DESC, bit 1
// EVENT_IDX), byte 2 = how many chains to pop, then up to 64 KiB copied to guest-physical 0
// (descriptor table at 0, avail ring at 0x400, used ring at 0x800, anything else is buffers and
// indirect tables). The rest of the 1 MiB guest is zero. The layout is compact so short inputs
// (libFuzzer's default max_len is 4096) reach every part.
// Flags bit 2 selects virtio-net instead of virtio-blk: first a frame of 12 + (flags >> 3) × 2100
// bytes is placed in the ring as received (receive placement, MRG_RXBUF off), then the popped
// chains are sent as transmit chains (copy-out and header checks; the NIC is not connected).
import HyperCore

final class FuzzDisk: BlockBackend, @unchecked Sendable {
    var storage = [UInt8](repeating: 0x5A, count: 64 * 512)
    var virtualSize: UInt64 { UInt64(storage.count) }
    var logicalSectorSize: UInt32 { 512 }
    var physicalSectorSize: UInt32 { 512 }
    var isReadOnly: Bool { false }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError) {
        try validate(offset: offset, length: UInt64(buffer.count))
        storage.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError) {
        try validate(offset: offset, length: UInt64(buffer.count))
        storage.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count]).copyMemory(from: buffer) }
    }
    func flush() throws(BlockError) {}
    func close() throws(BlockError) {}
    func discard(offset: UInt64, length: UInt64) throws(BlockError) { try validate(offset: offset, length: length) }
    func writeZeroes(offset: UInt64, length: UInt64) throws(BlockError) {
        try validate(offset: offset, length: length)
        for i in Int(offset)..<Int(offset + length) { storage[i] = 0 }
    }
}

let memory = try! GuestMemory(size: 1 << 20)
let disk = FuzzDisk()
let block = VirtioBlock(backend: disk, queueSize: 64)
nonisolated(unsafe) var chain = DescriptorChain()
let net = VirtioNet(backend: .disconnected, mac: MACAddress(bytes: [2, 0, 0, 0, 0, 1])!)
let frame = [UInt8](repeating: 0xA5, count: VirtioNet.maximumFrame)

func runOne(_ data: UnsafeRawBufferPointer) {
    guard data.count >= 3 else { return }
    let size = UInt16(data[0] % 64) + 1
    let flags = data[1]
    let pops = Int(data[2] % 8) + 1
    let payload = UnsafeRawBufferPointer(rebasing: data[3..<min(data.count, 3 + 65536)])
    let region = memory.regions[0]
    let base = UnsafeMutableRawPointer(bitPattern: region.hostAddress)!
    base.initializeMemory(as: UInt8.self, repeating: 0, count: 65536 + 4096)
    base.copyMemory(from: payload.baseAddress!, byteCount: payload.count)

    let queue = Virtqueue(maximumSize: 64, memory: memory)
    queue.size = size
    queue.descriptorTableAddress = 0
    queue.availableRingAddress = 0x400
    queue.usedRingAddress = 0x800
    queue.enabled = true
    do {
        try queue.activate(eventIndex: flags & 2 != 0, indirect: flags & 1 != 0)
        let network = flags & 4 != 0
        if network {
            let length = 12 + Int(flags >> 3) * 2100
            let usedBefore = queue.usedIndex
            _ = try frame.withUnsafeBytes { bytes throws(VirtqueueError) in
                try net.placeFrame(UnsafeRawBufferPointer(rebasing: bytes[0..<length]), in: queue)
            }
            // Without MRG_RXBUF a frame takes one buffer or none.
            precondition(queue.usedIndex &- usedBefore <= 1)
        }
        for _ in 0..<pops {
            guard try queue.pop(into: &chain) else { break }
            // Invariant: every segment lies inside guest RAM, exactly where its address says.
            for segment in chain.segments {
                let start = UInt(bitPattern: segment.pointer)
                precondition(start >= region.hostAddress && start + UInt(segment.length) <= region.hostAddress + UInt(region.size))
                precondition(UInt64(start - region.hostAddress) == segment.address - region.guestAddress)
            }
            precondition(chain.segments.count <= Int(size))
            let written = network ? net.transmit(chain) : block.handle(chain)
            precondition(UInt64(written) <= chain.writableBytes || chain.writableBytes == 0)
            queue.pushUsed(head: chain.head, length: written)
        }
        _ = queue.shouldSignal()
        _ = queue.rearm()
    } catch {
        // A broken ring is an expected outcome: the device would set NEEDS_RESET.
    }
}

#if FUZZING
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    runOne(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
func runDriver(_ argc: UnsafeMutablePointer<Int32>,
               _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
               _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32) -> Int32

// SwiftPM links executables with `main` aliased to `<module>_main`; hand control to libFuzzer there.
@_cdecl("virtqueue_fuzz_main")
public func fuzzMain(_ argc: Int32, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> Int32 {
    var count = argc
    var arguments = argv
    return runDriver(&count, &arguments) { data, size in
        guard let data else { return 0 }
        runOne(UnsafeRawBufferPointer(start: data, count: size))
        return 0
    }
}
#else
#if canImport(Glibc)
import Glibc
#endif

@main
struct VirtqueueReplay {
    static func main() {
        for path in CommandLine.arguments.dropFirst() {
            guard let file = fopen(path, "rb") else { print("\(path): cannot open"); continue }
            var bytes: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&buffer, 1, buffer.count, file)
                if n <= 0 { break }
                bytes += buffer[0..<n]
            }
            fclose(file)
            bytes.withUnsafeBytes { runOne($0) }
            print("\(path): ok")
        }
    }
}
#endif
