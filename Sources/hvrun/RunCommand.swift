import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun run`: boot a guest, connect its console to the terminal, exit with the guest.
///
/// Exit status: 0 when the guest resets or powers off; the byte the guest wrote to the debug-exit
/// port (0x501); 3 when the guest fails (triple fault, KVM internal error); 124 when --timeout
/// expires; 130 on Ctrl-C (SIGINT), 143 on SIGTERM; 1 for a host or usage error. Every disk is
/// closed cleanly (``RunDisks/closeAll()``) before the process exits, however the run ended.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest and exit with it (the default command).",
        discussion: """
            Without --kernel, runs the small guest embedded in hvrun. A Linux bzImage is booted through \
            the 64-bit boot protocol, an ELF through PVH (Tests/Linux/make-guest.sh builds both and an \
            initramfs). The guest's serial console (COM1) is this terminal.
            Exit status: 0 guest reset or power-off; N the guest wrote N to the debug-exit port 0x501; \
            3 guest failure (triple fault, KVM internal error); 124 --timeout expired; 130 SIGINT, 143 SIGTERM; \
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

    // .unconditional: `--timeout -1` is a (bad) value, not a missing one followed by an option.
    @Option(parsing: .unconditional, help: ArgumentHelp("Stop the guest after this many seconds (exit status 124).", valueName: "seconds"))
    var timeout: Double?

    @Option(help: ArgumentHelp("Also write the console output to this file.", valueName: "file"), completion: .file())
    var consoleLog: String?

    @Option(name: .customLong("disk"),
            help: ArgumentHelp("A virtio-blk disk: a raw or VHDX image, `,readonly` (or `,ro`) to attach it read-only. Repeatable.",
                               valueName: "path[,readonly]"),
            completion: .file(), transform: DiskOption.parse)
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
        let memoryRange = (minimum: UInt64(1) << 20, maximum: GuestLayout.maximumRAM)
        guard (memoryRange.minimum...memoryRange.maximum).contains(memory.bytes), memory.bytes % 4096 == 0 else {
            throw ValidationError("--memory \(memory) is out of range: use a multiple of 4K between \(ByteCount(bytes: memoryRange.minimum)) and \(ByteCount(bytes: memoryRange.maximum)), e.g. 256M or 2G")
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

        // Signals are blocked and collected before any disk is opened, so a Ctrl-C at any moment
        // ends in the same orderly shutdown: stop the machine, close every disk, then exit.
        let session = TerminalSession()
        let stop = StopRequest()
        session.onInterrupt { stop.request(signal: $0) }
        let openDisks = RunDisks()
        var status: Int32
        do {
            status = try runMachine(configuration, disks: openDisks, session: session, stop: stop)
        } catch {
            session.restore()
            for failure in openDisks.closeAll() { printError("hvrun: \(failure)") }
            throw error
        }
        session.restore()
        if let timer { printError("hvrun: boot time\n" + timer.report()) }
        let failures = openDisks.closeAll()
        for failure in failures { printError("hvrun: \(failure)") }
        if !failures.isEmpty, status == 0 { status = 1 }
        throw ExitCode(status)
    }

    /// Opens the disks into `configuration`, builds the machine and runs it to the end; returns the
    /// exit status. The caller closes `opened` whatever happens here.
    private func runMachine(_ configuration: MachineConfiguration, disks opened: RunDisks, session: TerminalSession,
                      stop: StopRequest) throws -> Int32 {
        var configuration = configuration
        let transport: VirtioDeviceConfiguration.Transport = virtioTransport == .mmio ? .mmio : .pci
        for (index, disk) in self.disks.enumerated() {
            let backend = try opened.open(disk)
            configuration.virtioDevices.append(.init(.block(backend, identifier: "hvrun-disk\(index)"), transport: transport))
        }
        if console == .virtio {
            configuration.virtioDevices.append(.init(.console(output: configuration.console, input: 0), transport: transport))
        }
        if rng { configuration.virtioDevices.append(.init(.entropy, transport: transport)) }

        let machine = try Machine(configuration)
        guard !stop.attach(machine) else {
            printError("hvrun: interrupted; the guest was not started")
            return 128 + (stop.signal ?? SIGINT)
        }
        // With a virtio console, host input goes to hvc0 (its I/O thread reads stdin), not COM1.
        if console == .serial { session.forwardInput(to: machine.serial) }
        let exit: MachineExit
        do {
            exit = try machine.run(timeout: timeout.map { .milliseconds(Int64(($0 * 1000).rounded())) })
        } catch {
            machine.stop()
            throw error
        }
        return Self.status(for: exit, signal: stop.signal)
    }

    /// Maps how the run ended to the process exit status (and says why on stderr when it failed).
    /// `signal` is the SIGINT or SIGTERM that stopped the run, if one did (status 128 + signal).
    static func status(for exit: MachineExit, signal: Int32?) -> Int32 {
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
            guard let signal else { return 0 }
            printError("hvrun: interrupted (\(signal == SIGTERM ? "SIGTERM" : "SIGINT")); the guest was stopped")
            return 128 + signal
        case let .hostError(message):
            printError("hvrun: \(message)")
            return 1
        }
    }
}

/// `--disk PATH[,OPTION...]`: the path, then comma-separated options; an unknown option is refused
/// by name (it used to become part of the file name).
struct DiskOption: Sendable, Equatable {
    let path: String
    let readOnly: Bool

    /// The options `--disk` accepts after the path.
    static let validOptions = ["readonly", "ro"]

    init(path: String, readOnly: Bool) {
        self.path = path
        self.readOnly = readOnly
    }

    /// Parses `PATH[,readonly]`; the error says which option is unknown and lists the valid ones.
    static func parse(_ argument: String) throws -> DiskOption {
        var parts = argument.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let path = parts.removeFirst()
        guard !path.isEmpty else { throw ValidationError("--disk needs a file name before any option, as in --disk disk.vhdx,readonly") }
        var readOnly = false
        for option in parts {
            switch option {
            case "readonly", "ro": readOnly = true
            default:
                throw ValidationError("unknown disk option '\(option)' in --disk \(argument) (valid options: \(validOptions.joined(separator: ", ")))")
            }
        }
        return DiskOption(path: path, readOnly: readOnly)
    }
}

enum ConsoleKind: String, ExpressibleByArgument, Sendable { case serial, virtio }
enum TransportKind: String, ExpressibleByArgument, Sendable { case pci, mmio }
