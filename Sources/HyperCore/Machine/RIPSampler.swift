internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// A diagnostic for long guest runs that print nothing: with `HYPERCORE_SAMPLE_RIP=<seconds>` in
/// the environment, every vCPU is kicked out of `KVM_RUN` at that interval and prints one line on
/// stderr with its RIP, RSP, RFLAGS.IF, the exits it took since the last sample, and the values
/// on the top of its stack that look like kernel text addresses (Linux is built without frame
/// pointers, so this is a raw scan, like the kernel's own "?" backtrace entries):
///
///     hvrun: sample vcpu0 +120.0s rip=0xffffffff8104a1b2 rsp=0xffffffff82a03e48 if=0 exits io=3 mmio=0 intr=1 emul=0 stack 0xffffffff81... 0xffffffff81...
///
/// Map the addresses with the kernel's System.map (`Tests/Linux/symbolize.py`). The kick is the
/// one pause and stop use, so sampling changes nothing for the guest beyond a short stall.
enum RIPSampler {
    /// The interval in nanoseconds, from `HYPERCORE_SAMPLE_RIP` (seconds, fractions allowed; at
    /// least 10 ms), or nil when unset or not a number.
    static let interval: UInt64? = {
        guard let text = getenv("HYPERCORE_SAMPLE_RIP"), let seconds = Double(String(cString: text)),
              seconds.isFinite, seconds > 0 else { return nil }
        return UInt64(max(seconds, 0.01) * 1e9)
    }()

    /// The guest virtual address from `HYPERCORE_SAMPLE_PEEK`, or nil.
    static let peek: UInt64? = {
        guard let text = getenv("HYPERCORE_SAMPLE_PEEK") else { return nil }
        var digits = Substring(String(cString: text))
        if digits.hasPrefix("0x") { digits = digits.dropFirst(2) }
        return UInt64(digits, radix: 16)
    }()

    /// Starts the thread that asks for samples, when the variable is set. It ends with the run.
    static func startIfRequested(_ lifecycle: Lifecycle) {
        guard let interval else { return }
        startDetachedThread {
            var next = monotonicNanoseconds() &+ interval
            while !lifecycle.stopRequested {
                let now = monotonicNanoseconds()
                if now < next {
                    var pause = timespec(tv_sec: Int(min(next - now, 100_000_000) / 1_000_000_000),
                                         tv_nsec: Int(min(next - now, 100_000_000) % 1_000_000_000))
                    nanosleep(&pause, nil)
                    continue
                }
                next &+= interval
                lifecycle.sampleGeneration.add(1, ordering: .releasing)
                lifecycle.kickAll()
            }
        }
    }

    /// Exits a vCPU took since its last sample.
    struct ExitCounts {
        var io = 0, mmio = 0, intr = 0, emulation = 0
    }

    /// Prints one sample line for `vcpu` (called on its thread, out of `KVM_RUN`).
    static func sample(_ vcpu: VCPU, _ memory: GuestMemory, since start: UInt64, exits: ExitCounts) {
        guard let registers = try? vcpu.registers(), let special = try? vcpu.specialRegisters() else { return }
        let tenths = (monotonicNanoseconds() &- start) / 100_000_000
        var line = "hvrun: sample vcpu\(vcpu.id) +\(tenths / 10).\(tenths % 10)s rip=\(hex(registers.rip))"
        line += " rsp=\(hex(registers.rsp)) if=\(registers.rflags >> 9 & 1)"
        line += " exits io=\(exits.io) mmio=\(exits.mmio) intr=\(exits.intr) emul=\(exits.emulation)"
        if let peek, let value = readQuad(peek, special, memory) { line += " peek=\(hex(value))" }
        let text = stackText(registers.rsp, special, memory)
        if !text.isEmpty { line += " stack " + text.map(hex).joined(separator: " ") }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
    }

    /// Up to 12 values from the 64 quadwords at `rsp` that fall in the kernel's text mapping
    /// (0xffffffff80000000 up), read through the guest's page tables.
    private static func stackText(_ rsp: UInt64, _ special: SpecialRegisters, _ memory: GuestMemory) -> [UInt64] {
        var found: [UInt64] = []
        var address = rsp & ~7
        for _ in 0..<64 where found.count < 12 {
            guard let value = readQuad(address, special, memory) else { break }
            if value >= 0xFFFF_FFFF_8000_0000 && value < 0xFFFF_FFFF_C000_0000 { found.append(value) }
            address &+= 8
        }
        return found
    }

    /// The 8 bytes at guest virtual `address` (supervisor read), nil when unmapped or not RAM.
    private static func readQuad(_ address: UInt64, _ special: SpecialRegisters, _ memory: GuestMemory) -> UInt64? {
        guard address & 0xFFF <= 0xFF8, case let .success(physical) = PageWalk.translate(
            address, access: .init(write: false, user: false), cr0: special.cr0, cr3: special.cr3,
            cr4: special.cr4, rflags: 1 << 18, memory: memory),
            let pointer = memory.pointer(at: physical, count: 8) else { return nil }
        return UInt64(littleEndian: pointer.loadUnaligned(as: UInt64.self))
    }

    private static func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
}
