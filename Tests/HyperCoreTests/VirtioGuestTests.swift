import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The project's virtio guest driver (Tests/Guests/virtio.c) against HyperCore's devices through
/// /dev/kvm, and the same guest against QEMU's devices: both must print the same results.
@Suite("Virtio devices with the project's guest driver", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct VirtioGuestTests {
    static let exitOK = MachineExit.debugExit(0x40)
    static let diskSectors = 2048

    static func diskImage() -> [UInt8] {
        (0..<(diskSectors * 512)).map { UInt8(truncatingIfNeeded: ($0 / 512) &* 13 &+ $0 % 512) }
    }

    /// Runs virtio.elf on HyperCore with `devices`.
    static func hypercore(_ commandLine: String, _ devices: [VirtioDeviceConfiguration],
                          memory: UInt64 = 64 << 20) throws -> (run: GuestRun, machineDevices: [VirtioDeviceCore]) {
        var cores: [VirtioDeviceCore] = []
        var configuration = try GuestRun.configuration("virtio.elf", commandLine: commandLine, memory: memory)
        let console = configuration.console as! BufferOutput
        configuration.virtioDevices = devices
        let machine = try Machine(configuration)
        let exit = try machine.run(timeout: .seconds(60))
        cores = machine.virtioDevices
        return (GuestRun(exit: exit, console: console.text), cores)
    }

    /// Lines both VMMs must agree on (all of them, except the virtio-mmio QueueNumMax QEMU sets to 1024).
    static func compare(_ ours: [String: String], _ qemu: [String: String], ignoring: Set<String> = []) {
        let keys = Set(ours.keys).union(qemu.keys).subtracting(ignoring)
        for key in keys.sorted() {
            #expect(ours[key] == qemu[key], "\(key): HyperCore \(ours[key] ?? "-") vs QEMU \(qemu[key] ?? "-")")
        }
    }

    func blockRun(_ commandLine: String, readOnly: Bool = false, transport: VirtioDeviceConfiguration.Transport) throws {
        let image = Self.diskImage()
        let file = try TemporaryFile(bytes: image)
        let backend = try RawImage(path: file.path, readOnly: readOnly)
        let (run, cores) = try Self.hypercore(commandLine, [.init(.block(backend, identifier: "hypercore-disk"), transport: transport)])
        #expect(run.exit == Self.exitOK, "\(run.exit)\n\(run.console)")
        let values = run.values
        #expect(values["error"] == nil, "\(run.console)")
        #expect(values["capacity"] == "\(Self.diskSectors)")
        #expect(values["status"] == "0xf")
        #expect(values["out_of_range"] == "1")
        #expect(values["straddling_end"] == "1")
        #expect(values["last_read"] == "0")
        #expect(values["unsupported"] == "2")
        #expect(values["inflight"] == "ok")
        #expect(values["indirect"] == "0" && values["indirect_match"] == "1")
        #expect(values["id"] == "hypercore-disk")
        if readOnly {
            #expect(values["f_ro"] == "1" && values["write"] == "1")
            #expect(file.bytes == image, "a read-only disk changed")
        } else {
            #expect(values["verify"] == "ok" && values["write_zeroes"] == "0" && values["zeroed"] == "1")
            let after = file.bytes
            #expect(after.count == image.count)
            #expect(Array(after[512..<1024]) == (0..<512).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) })
            #expect(after[1024..<1536].allSatisfy { $0 == 0 })
            #expect(after[1536...] == image[1536...], "bytes outside the written sectors changed")
        }
        #expect(cores.first?.lastError == nil)

        guard QEMUVirtio.available else { return }
        let qemuFile = try TemporaryFile(bytes: image)
        let drive = "file=\(qemuFile.path),if=none,id=d0,format=raw" + (readOnly ? ",readonly=on" : "")
        let device = transport == .mmio ? "virtio-blk-device,drive=d0,serial=hypercore-disk"
                                        : "virtio-blk-pci,drive=d0,disable-legacy=on,serial=hypercore-disk"
        let qemu = try QEMUVirtio.run(commandLine: commandLine, mmio: transport == .mmio, arguments: ["-drive", drive, "-device", device])
        #expect(qemu.status == (0x40 << 1) | 1, "QEMU: \(qemu.output)")
        Self.compare(values, qemu.values, ignoring: transport == .mmio ? ["queue_max"] : [])
        if !readOnly { #expect(qemuFile.bytes == file.bytes, "HyperCore and QEMU left different disk contents") }
    }

    @Test("virtio-blk over PCI, polling the used ring; same results as QEMU virtio-blk-pci", .timeLimit(.minutes(2)))
    func blockPCIPolling() throws { try blockRun("dev=2", transport: .pci) }

    @Test("virtio-blk over PCI driven by MSI-X interrupts (irqfd) with EVENT_IDX; same as QEMU", .timeLimit(.minutes(2)))
    func blockPCIInterrupts() throws { try blockRun("dev=2 irq=1", transport: .pci) }

    @Test("virtio-blk read-only disk: RO feature, writes fail with IOERR, file unchanged; same as QEMU", .timeLimit(.minutes(2)))
    func blockReadOnly() throws { try blockRun("dev=2 ro=1", readOnly: true, transport: .pci) }

    @Test("virtio-blk over virtio-mmio v2 (virtio_mmio.device= on the command line); same as QEMU microvm", .timeLimit(.minutes(2)))
    func blockMMIO() throws { try blockRun("dev=2 mmio=1", transport: .mmio) }

    func consoleRun(transport: VirtioDeviceConfiguration.Transport, irq: Bool) throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        _ = "ping\n".withCString { write(fds[1], $0, 5) }
        close(fds[1])
        let output = BufferOutput()
        let commandLine = "dev=3 rx=1" + (transport == .mmio ? " mmio=1" : "") + (irq ? " irq=1" : "")
        let (run, _) = try Self.hypercore(commandLine, [.init(.console(output: output, input: fds[0]), transport: transport)])
        #expect(run.exit == Self.exitOK, "\(run.console)")
        #expect(run.values["console_tx"] == "ok")
        #expect(run.values["console_rx"] == "ping")
        #expect(output.text == "hello from virtio-console\n")

        guard QEMUVirtio.available else { return }
        let outFile = try TemporaryFile(bytes: [])
        let bus = transport == .mmio ? "virtio-serial-device" : "virtio-serial-pci,disable-legacy=on"
        let qemu = try QEMUVirtio.run(commandLine: "dev=3" + (transport == .mmio ? " mmio=1" : "") + (irq ? " irq=1" : ""),
                                      mmio: transport == .mmio,
                                      arguments: ["-device", bus, "-chardev", "file,id=c0,path=\(outFile.path)", "-device", "virtconsole,chardev=c0"])
        #expect(qemu.status == (0x40 << 1) | 1, "QEMU: \(qemu.output)")
        Self.compare(run.values, qemu.values, ignoring: Set(["console_rx"] + (transport == .mmio ? ["queue_max"] : [])))
        #expect(String(decoding: outFile.bytes, as: UTF8.self) == output.text)
    }

    @Test("virtio-console over PCI: output to the host, input from a pipe; output same as QEMU virtconsole", .timeLimit(.minutes(2)))
    func consolePCI() throws { try consoleRun(transport: .pci, irq: true) }

    @Test("virtio-console over virtio-mmio; same as QEMU microvm", .timeLimit(.minutes(2)))
    func consoleMMIO() throws { try consoleRun(transport: .mmio, irq: false) }

    func rngRun(transport: VirtioDeviceConfiguration.Transport) throws {
        let commandLine = "dev=4" + (transport == .mmio ? " mmio=1" : " irq=1")
        let (run, _) = try Self.hypercore(commandLine, [.init(.entropy, transport: transport)])
        #expect(run.exit == Self.exitOK, "\(run.console)")
        #expect(run.values["rng_bytes"] == "64,64")
        #expect(run.values["rng_random"] == "yes")
        guard QEMUVirtio.available else { return }
        let device = transport == .mmio ? "virtio-rng-device" : "virtio-rng-pci,disable-legacy=on"
        let qemu = try QEMUVirtio.run(commandLine: commandLine, mmio: transport == .mmio, arguments: ["-device", device])
        #expect(qemu.status == (0x40 << 1) | 1, "QEMU: \(qemu.output)")
        Self.compare(run.values, qemu.values, ignoring: transport == .mmio ? ["queue_max"] : [])
    }

    @Test("virtio-rng over PCI with MSI-X: random bytes from getrandom; same as QEMU virtio-rng-pci", .timeLimit(.minutes(2)))
    func rngPCI() throws { try rngRun(transport: .pci) }

    @Test("virtio-rng over virtio-mmio; same as QEMU microvm", .timeLimit(.minutes(2)))
    func rngMMIO() throws { try rngRun(transport: .mmio) }
}
