import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// A port device for realmode.bin: answers reads at 0x520 and records writes at 0x521.
final class EchoPorts: BusDevice, @unchecked Sendable {
    func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    func restoreState(_ state: DeviceState) throws(SnapshotError) {}
    let replies: [Int: UInt64] = [1: 0x41, 2: 0x1234, 4: 0xDEAD_BEEF]
    private let log = SpinLockedState<[(offset: UInt64, width: Int, value: UInt64)]>([])
    var writes: [(offset: UInt64, width: Int, value: UInt64)] { log.value }

    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        if offset == 0 { data.storeLittleEndian(replies[data.count] ?? 0) }
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        let value = data.littleEndianValue
        log.update { $0.append((offset, data.count, value)) }
    }
}

/// An MMIO device for mmio.elf: records stores, answers loads at +0x10 and +0x18.
final class RecordingMMIO: BusDevice, @unchecked Sendable {
    func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    func restoreState(_ state: DeviceState) throws(SnapshotError) {}
    static let read32: UInt64 = 0xCAFE_F00D
    static let read64: UInt64 = 0x1122_3344_5566_7788
    private let log = SpinLockedState<[(offset: UInt64, width: Int, value: UInt64)]>([])
    var writes: [(offset: UInt64, width: Int, value: UInt64)] { log.value }

    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        switch (offset, data.count) {
        case (0x10, 4): data.storeLittleEndian(Self.read32)
        case (0x18, 8): data.storeLittleEndian(Self.read64)
        default: data.storeLittleEndian(0)
        }
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        let value = data.littleEndianValue
        log.update { $0.append((offset, data.count, value)) }
    }
}

@Suite("Guests on HyperCore", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct GuestIntegrationTests {
    @Test("real-mode flat binary: port I/O both ways at every width", .timeLimit(.minutes(1)))
    func realModePortIO() throws {
        let echo = EchoPorts()
        let console = BufferOutput()
        var configuration = MachineConfiguration(boot: .flat(image: try GuestImages.bytes("realmode.bin"), name: "realmode.bin",
                                                             loadAddress: 0x10000))
        configuration.memorySize = 16 << 20
        configuration.console = console
        configuration.portDevices = [.init(base: 0x520, size: 2, device: echo)]
        let exit = try Machine(configuration).run(timeout: .seconds(30))
        #expect(exit == .debugExit(0x34))
        #expect(console.text == "rm ok\n")
        let writes = echo.writes.map { "\($0.offset):\($0.width):\(String($0.value, radix: 16))" }
        #expect(writes == ["1:1:42", "1:2:1235", "1:4:deadbef0"])
    }

    @Test("PVH start info: command line, memory map and initrd module as the guest sees them", .timeLimit(.minutes(1)))
    func pvhStartInfo() throws {
        let initrd: [UInt8] = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        let run = try GuestRun.pvh("pvhinfo.elf", commandLine: "console=ttyS0 hello=world", initrd: initrd)
        #expect(run.exit == .debugExit(0x31))
        let values = run.values
        #expect(values["magic"] == "0x336ec578")
        #expect(values["version"] == "1")
        #expect(values["cmdline"] == "console=ttyS0 hello=world")
        let memmap = run.pairs.filter { $0.0 == "memmap" }.map(\.1)
        #expect(memmap == ["0x0,0xa0000,1", "0xa0000,0x60000,2", "0x100000,0x3f00000,1", "0xfec00000,0x1400000,2"])
        #expect(values["modules"] == "1")
        let module = try #require(values["module0"]).split(separator: ",")
        #expect(module.count == 2)
        #expect(module.last == "0x2000")
        let address = try #require(UInt64(module[0].dropFirst(2), radix: 16))
        #expect(address % 4096 == 0 && address >= 0x100000 && address + 8192 <= 64 << 20)
        let head = initrd.prefix(16).map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        #expect(values["module0_head"] == head)
    }

    @Test("RAM above the MMIO hole is reported and mapped at 4 GiB", .timeLimit(.minutes(1)))
    func highMemoryLayout() throws {
        let run = try GuestRun.pvh("pvhinfo.elf", memory: 4 << 30)
        #expect(run.exit == .debugExit(0x31))
        let memmap = run.pairs.filter { $0.0 == "memmap" }.map(\.1)
        #expect(memmap.contains("0x100000,0xbff00000,1"))
        #expect(memmap.contains("0x100000000,0x40000000,1"))
    }

    @Test("MMIO loads and stores reach a device on the MMIO bus", .timeLimit(.minutes(1)))
    func mmioBus() throws {
        let device = RecordingMMIO()
        let run = try GuestRun.pvh("mmio.elf", commandLine: "mmio=0xd0000000") { configuration in
            configuration.mmioDevices = [.init(base: 0xD000_0000, size: 0x1000, device: device)]
        }
        #expect(run.exit == .debugExit(0x33))
        let writes = device.writes.map { "\($0.offset):\($0.width):\(String($0.value, radix: 16))" }
        #expect(writes == ["0:1:12", "2:2:3456", "4:4:789abcde", "8:8:123456789abcdef"])
        #expect(run.values["read32"] == "0xcafef00d")
        #expect(run.values["read64"] == "0x1122334455667788")
    }

    @Test("16550A registers read back as Linux's 8250 probe and QEMU expect", .timeLimit(.minutes(1)))
    func uartRegisters() throws {
        let run = try GuestRun.pvh("uart.elf")
        #expect(run.exit == .debugExit(0x32))
        let expected: [(String, String)] = [
            ("scr", "0x5a,0xa5"), ("lcr_dlab", "0x83"), ("divisor", "0x0c,0x00"), ("lcr", "0x03"),
            ("ier", "0x0f,0x00"), ("iir_nofifo", "0x01"), ("iir_fifo", "0xc1"), ("iir_thri", "0xc2,0xc1"),
            ("lsr_idle", "0x60"), ("mcr_loop", "0x1f"), ("msr_loop", "0x00,0x90,0xf0"), ("lsr_loop", "0x61"),
            ("loop_rx", "0x41,0x42"), ("lsr_drained", "0x60"),
        ]
        #expect(run.pairs.map { "\($0.0)=\($0.1)" } == expected.map { "\($0.0)=\($0.1)" })
    }

    @Test("the UART's IRQ 4 reaches the guest through the in-kernel IOAPIC: THR-empty, then host input", .timeLimit(.minutes(1)))
    func uartInterruptsThroughIOAPIC() throws {
        let configuration = try GuestRun.configuration("uartirq.elf", memory: 32 << 20)
        let console = configuration.console as! BufferOutput
        let machine = try Machine(configuration)
        try machine.start()
        // Host input arrives from another thread, once the guest sleeps waiting for it.
        let deadline = ContinuousClock.now + .seconds(20)
        while !console.text.contains("ready\n"), machine.exit == nil, ContinuousClock.now < deadline { usleep(1000) }
        machine.serial.receive([UInt8(ascii: "Z")])
        let exit = machine.wait(timeout: .seconds(20))
        #expect(exit == .debugExit(0x37), "\(console.text)")
        let run = GuestRun(exit: exit, console: console.text)
        #expect(run.values["thre_irqs"] == "1")
        #expect(run.values["rx_irqs"] == "1")
        #expect(run.values["rx"] == "Z")
        #expect(run.values["other_irqs"] == "0")
    }

    @Test("i8042 pulse-reset ends the run as a reset", .timeLimit(.minutes(1)))
    func keyboardControllerReset() throws {
        let run = try GuestRun.pvh("reset.elf")
        #expect(run.exit == .reset)
        #expect(run.console == "resetting\n")
    }

    @Test("debug-exit port carries the guest's exit code", .timeLimit(.minutes(1)), arguments: [0, 1, 42, 200, 255])
    func debugExitCodes(code: Int) throws {
        let run = try GuestRun.pvh("exit.elf", commandLine: "code=\(code)")
        #expect(run.exit == .debugExit(UInt8(code)))
        #expect(run.values["code"] == "\(code)")
    }

    @Test("exceptions are delivered through the guest IDT and resumed with iretq", .timeLimit(.minutes(1)))
    func guestExceptions() throws {
        let run = try GuestRun.pvh("exc.elf")
        #expect(run.exit == .debugExit(0x36))
        #expect(run.values["ud"] == "1")
        #expect(run.values["de"] == "1")
    }

    @Test("a guest spinning with interrupts off is stopped at the deadline", .timeLimit(.minutes(1)))
    func deadlineStopsSpinningGuest() throws {
        let start = ContinuousClock.now
        let run = try GuestRun.pvh("spin.elf", timeout: .milliseconds(1500))
        let elapsed = ContinuousClock.now - start
        #expect(run.exit == .timedOut)
        #expect(run.console.contains("spinning"))
        #expect(elapsed < .seconds(15))
    }

    @Test("stop() from another thread kicks a spinning vCPU out of KVM_RUN", .timeLimit(.minutes(1)))
    func stopFromAnotherThread() throws {
        let machine = try Machine(try GuestRun.configuration("spin.elf", memory: 32 << 20, cpus: 2))
        try machine.start()
        usleep(300_000)
        let before = ContinuousClock.now
        machine.stop()
        #expect(ContinuousClock.now - before < .seconds(5))
        #expect(machine.exit == .stopped)
        #expect(machine.wait() == .stopped)
    }

    @Test("two vCPUs: the guest starts the AP with INIT/SIPI and both run", .timeLimit(.minutes(2)))
    func twoVCPUs() throws {
        let run = try GuestRun.pvh("smp.elf", commandLine: "cpus=2", cpus: 2, timeout: .seconds(60))
        #expect(run.exit == .debugExit(0x35))
        #expect(run.values["aps"] == "1")
        #expect(run.values["ap_apic_id"] == "1")
    }

    @Test("a guest that crashes its vCPU ends the run with a failure report", .timeLimit(.minutes(1)))
    func guestFailureIsReported() throws {
        // int3 with an empty IDT: a triple fault on hardware; KVM's emulator refuses it on PVM hosts.
        let image = TinyELF.make(code: [0x90, 0xCC, 0xF4])
        var configuration = MachineConfiguration(boot: .pvh(kernel: image, kernelName: "crash.elf", initrd: nil, commandLine: ""))
        configuration.memorySize = 16 << 20
        configuration.console = BufferOutput()
        let exit = try Machine(configuration).run(timeout: .seconds(20))
        guard case let .guestFailure(failure) = exit else {
            Issue.record("expected a guest failure, got \(exit)")
            return
        }
        #expect(failure.vcpu == 0)
        let rip = try #require(failure.registers?.rip)
        #expect((0x100000...0x100003).contains(rip))
        #expect(failure.description.contains("rip=0x10000"))
    }
}
