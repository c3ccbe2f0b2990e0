import ArgumentParser
import HyperCore

/// `hvrun run`: boot a guest, connect its console to the terminal, exit with the guest.
///
/// Exit status: 0 when the guest resets or powers off; the byte the guest wrote to the debug-exit
/// port (0x501); 3 when the guest fails (triple fault, KVM internal error); 124 when --timeout
/// expires; 130 on Ctrl-C; 1 for a host or usage error.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest and exit with it (the default command).",
        discussion: """
            Without --kernel, runs the small guest embedded in hvrun. A Linux bzImage is booted through \
            the 64-bit boot protocol, an ELF through PVH (Tests/Linux/make-guest.sh builds both and an \
            initramfs). The guest's serial console (COM1) is this terminal.
            Exit status: 0 guest reset or power-off; N the guest wrote N to the debug-exit port 0x501; \
            3 guest failure (triple fault, KVM internal error); 124 --timeout expired; 130 interrupted; \
            1 host or usage error.
            """
    )

    @Option(name: [.short, .long], help: ArgumentHelp("Kernel to boot: a Linux bzImage, or a PVH ELF (a vmlinux, or a test guest).", valueName: "file"),
            completion: .file())
    var kernel: String?

    @Option(help: ArgumentHelp("Initial ramdisk (bzImage: through the zero page; PVH: as module 0).", valueName: "file"), completion: .file())
    var initrd: String?

    @Option(help: ArgumentHelp("Kernel command line.", valueName: "string"))
    var cmdline: String = "console=ttyS0"

    @Option(name: [.short, .long], help: ArgumentHelp("Guest RAM, e.g. 256M or 2G (a bare number is MiB).", valueName: "size"))
    var memory: ByteCount = ByteCount(bytes: 256 << 20)

    @Option(name: [.short, .long], help: "Number of vCPUs.")
    var cpus: Int = 1

    @Option(help: ArgumentHelp("Stop the guest after this many seconds (exit status 124).", valueName: "seconds"))
    var timeout: Double?

    @Option(help: ArgumentHelp("Also write the console output to this file.", valueName: "file"), completion: .file())
    var consoleLog: String?

    @Option(name: .customLong("disk"),
            help: ArgumentHelp("A virtio-blk disk: a raw or VHDX image, `,readonly` to attach it read-only. Repeatable.",
                               valueName: "path[,readonly]"),
            completion: .file())
    var disks: [DiskOption] = []

    @Option(help: ArgumentHelp("Where the guest console is: `serial` (COM1, ttyS0) or `virtio` (virtio-console port 0, hvc0; COM1 stays too).",
                               valueName: "serial|virtio"))
    var console: ConsoleKind = .serial

    @Flag(help: "Add a virtio-rng device fed from the host's getrandom.")
    var rng = false

    @Option(help: ArgumentHelp("Transport for virtio devices: `pci` (default) or `mmio` (virtio_mmio.device= is added to the command line).",
                               valueName: "pci|mmio"))
    var virtioTransport: TransportKind = .pci

    @Flag(help: ArgumentHelp("Report on stderr the time from process start to the guest's first serial byte, the kernel's first line and the init's ready marker (write 123 to port 0x3F0 or MMIO 0xFEBFF000)."))
    var bootTime = false

    @Option(help: ArgumentHelp("CPUID features to hide (name or -name) or force (+name), comma-separated: x2apic, kvmclock, … or LEAF[.SUB]:REG:BIT. Write --cpuid=-name when the list starts with a minus.", valueName: "list"))
    var cpuid: String?

    func validate() throws {
        guard (1...MachineConfiguration.maximumCPUs).contains(cpus) else {
            throw ValidationError("--cpus must be between 1 and \(MachineConfiguration.maximumCPUs)")
        }
        if let timeout, !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
        if initrd != nil, kernel == nil { throw ValidationError("--initrd needs --kernel") }
    }

    func run() throws {
        let boot: MachineConfiguration.Boot
        if let kernel {
            let kernelBytes = try ImageFile.read(kernel)
            let initrdBytes = try initrd.map { path throws(BootError) in try ImageFile.read(path) }
            // A bzImage starts with a boot sector carrying "HdrS"; anything else must be a PVH ELF
            // (the ELF loader explains what is wrong with a file that is neither).
            if BzImageHeader.looksLikeBzImage(kernelBytes) {
                boot = .linux(kernel: kernelBytes, kernelName: kernel, initrd: initrdBytes, commandLine: cmdline)
            } else {
                boot = .pvh(kernel: kernelBytes, kernelName: kernel, initrd: initrdBytes, commandLine: cmdline)
            }
        } else {
            boot = .pvh(kernel: embeddedGuestELF, kernelName: "embedded guest", initrd: nil, commandLine: cmdline)
        }
        var configuration = MachineConfiguration(boot: boot)
        configuration.memorySize = memory.bytes
        configuration.cpuCount = cpus
        if let cpuid {
            let policy = try CPUIDPolicy.parse(cpuid)
            configuration.cpuidPolicy = { policy.apply(to: &$0) }
        }
        let timer = bootTime ? BootTimer(origin: BootTimer.processStart() ?? BootTimer.now()) : nil
        configuration.bootTimer = timer
        if let consoleLog {
            configuration.console = TeeOutput([FileDescriptorOutput.standardOutput, try FileDescriptorOutput(path: consoleLog)])
        }

        let transport: VirtioDeviceConfiguration.Transport = virtioTransport == .mmio ? .mmio : .pci
        for (index, disk) in disks.enumerated() {
            let backend = try openDisk(path: disk.path, readOnly: disk.readOnly)
            configuration.virtioDevices.append(.init(.block(backend, identifier: "hvrun-disk\(index)"), transport: transport))
        }
        if console == .virtio {
            configuration.virtioDevices.append(.init(.console(output: configuration.console, input: 0), transport: transport))
        }
        if rng { configuration.virtioDevices.append(.init(.entropy, transport: transport)) }

        let session = TerminalSession()
        let machine = try Machine(configuration)
        // With a virtio console, host input goes to hvc0 (its I/O thread reads stdin), not COM1.
        if console == .serial { session.forwardInput(to: machine.serial) }
        session.onInterrupt { machine.stop() }
        let exit = try machine.run(timeout: timeout.map { .milliseconds(Int64(($0 * 1000).rounded())) })
        session.restore()
        if let timer { printError("hvrun: boot time\n" + timer.report()) }
        throw ExitCode(Self.status(for: exit, interrupted: session.wasInterrupted))
    }

    /// Maps how the run ended to the process exit status (and says why on stderr when it failed).
    static func status(for exit: MachineExit, interrupted: Bool) -> Int32 {
        switch exit {
        case .reset, .powerOff, .halted:
            return 0
        case let .debugExit(code):
            return Int32(code)
        case let .guestFailure(failure):
            printError("hvrun: the guest failed: \(failure)")
            return 3
        case .timedOut:
            printError("hvrun: --timeout expired; the guest was stopped")
            return 124
        case .stopped:
            if interrupted { printError("hvrun: interrupted; the guest was stopped") }
            return interrupted ? 130 : 0
        case let .hostError(message):
            printError("hvrun: \(message)")
            return 1
        }
    }
}

/// `--disk PATH[,readonly]`.
struct DiskOption: ExpressibleByArgument, Sendable {
    let path: String
    let readOnly: Bool

    init?(argument: String) {
        var parts = argument.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        var readOnly = false
        while let last = parts.last, parts.count > 1, last == "readonly" || last == "ro" {
            readOnly = true
            parts.removeLast()
        }
        let path = parts.joined(separator: ",")
        guard !path.isEmpty else { return nil }
        self.path = path
        self.readOnly = readOnly
    }
}

enum ConsoleKind: String, ExpressibleByArgument, Sendable { case serial, virtio }
enum TransportKind: String, ExpressibleByArgument, Sendable { case pci, mmio }
