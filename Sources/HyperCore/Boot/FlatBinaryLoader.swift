/// Loads a raw binary (no headers) and starts it in real mode at its first byte — the smallest
/// possible guest, for tests and bring-up. The image is placed at `loadAddress`, which must be
/// 16-byte aligned and below 1 MiB so a real-mode segment can reach it; the CPU starts at
/// CS:IP = (loadAddress >> 4):0 with the stack at the top of that 64 KiB segment.
public enum FlatBinaryLoader {
    public static func load(image: [UInt8], name: String, at loadAddress: UInt64 = 0x10000,
                            into memory: GuestMemory) throws(BootError) -> BootState {
        guard loadAddress % 16 == 0, loadAddress < 0x100000 else {
            throw .unsupported(file: name, detail: "load address 0x\(String(loadAddress, radix: 16)) must be 16-byte aligned and below 1 MiB for real mode")
        }
        guard !image.isEmpty, image.count <= 0x10000, memory.contains(loadAddress, count: image.count) else {
            throw .doesNotFit(file: name, what: "flat image", address: loadAddress, size: UInt64(image.count), memory: memory.size)
        }
        try PVHLoader.fitting(name) { () throws(GuestMemoryError) in try memory.write(at: loadAddress, bytes: image) }
        var registers = Registers()
        registers.rip = 0
        registers.rsp = 0xFFF0
        registers.rflags = 0x2
        return BootState(registers: registers, mode: .real(segment: UInt16(loadAddress >> 4)))
    }
}
