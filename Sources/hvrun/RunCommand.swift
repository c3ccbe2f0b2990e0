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

    @Option(name: [.short, .long], help: ArgumentHelp("Guest RAM (default: 256M), e.g. 2G; a bare number is MiB. With --restore, must match the snapshot.", valueName: "size"))
    var memory: ByteCount?

    @Option(name: [.short, .long], help: ArgumentHelp("Number of vCPUs (default: 1). With --restore, must match the snapshot.", valueName: "n"))
    var cpus: Int?

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

    @Option(name: .customLong("nic"),
            help: ArgumentHelp("A virtio-net NIC: SWITCH (a virtual switch of the store, see `hvrun switch`), `tap=NAME` (a host TAP interface, created if missing; needs CAP_NET_ADMIN) or `none` (link down), then `,mac=MAC` (default: random, locally administered). Repeatable.",
                               valueName: "switch|tap=NAME|none[,mac=MAC]"),
            transform: NICOption.parse)
    var nics: [NICOption] = []

    @Option(help: ArgumentHelp("Where the guest console is: `serial` (COM1, ttyS0) or `virtio` (virtio-console port 0, hvc0; COM1 stays too).",
                               valueName: "serial|virtio"))
    var console: ConsoleKind = .serial

    @Flag(help: "Add a virtio-rng device fed from the host's getrandom.")
    var rng = false

    @Option(help: ArgumentHelp("Transport for virtio devices: `pci` (default) or `mmio` (virtio_mmio.device= is added to the command line).",
                               valueName: "pci|mmio"))
    var virtioTransport: TransportKind = .pci

    @Flag(help: ArgumentHelp("Report on stderr the time from process start to the guest's first serial byte, the kernel's first line and the init's ready marker (write 123 to port 0x3F0 or MMIO 0xFEBFF000), and the instructions completed for KVM's emulator."))
    var bootTime = false

    @Option(help: ArgumentHelp("CPUID features to hide (name or -name) or force (+name), comma-separated: x2apic, kvmclock, … or LEAF[.SUB]:REG:BIT. Write --cpuid=-name when the list starts with a minus.", valueName: "list"))
    var cpuid: String?

    @Option(help: ArgumentHelp("A control socket (mode 0600) speaking QMP-shaped JSON lines: info, pause, resume, save, snapshot, stop. See Docs/snapshots.md.", valueName: "path"), completion: .file())
    var control: String?

    @Option(help: ArgumentHelp("Start from a snapshot directory instead of booting: memory, vCPUs and devices come from it; --disk may give its disks new paths, in order.", valueName: "dir"), completion: .directory)
    var restore: String?

    @Flag(help: "With --restore: stay paused until a `resume` on the control socket.")
    var paused = false

    @Flag(help: "With --restore: read all of guest RAM now instead of mapping the snapshot's memory file copy-on-write.")
    var eagerMemory = false

    @Option(help: ArgumentHelp("On SIGUSR1, save the machine into this directory and exit 0 (what `save` on the control socket does).", valueName: "dir"), completion: .directory)
    var saveOnSignal: String?

    /// Internal: run the store VM in this bundle directory (what `hvrun vm start` spawns).
    @Option(help: .private)
    var bundle: String?
    /// Internal: with --bundle, receive the VM from a live migration on this descriptor (what `hvrun vm receive` spawns).
    @Option(help: .private)
    var incomingFd: Int32?
    /// Internal: wait on this descriptor for a bundle and a migration to receive into it (what
    /// `hvrun vm receive` spawns ahead of the sender: StandbyVMProcess.swift).
    @Option(help: .private)
    var standbyFd: Int32?

    func validate() throws {
        if bundle != nil || standbyFd != nil { return }
        if let cpus, !(1...MachineConfiguration.maximumCPUs).contains(cpus) {
            throw ValidationError("--cpus must be between 1 and \(MachineConfiguration.maximumCPUs)")
        }
        let memoryRange = (minimum: UInt64(1) << 20, maximum: GuestLayout.maximumRAM)
        if let memory, !(memoryRange.minimum...memoryRange.maximum).contains(memory.bytes) || memory.bytes % 4096 != 0 {
            throw ValidationError("--memory \(memory) is out of range: use a multiple of 4K between \(ByteCount(bytes: memoryRange.minimum)) and \(ByteCount(bytes: memoryRange.maximum)), e.g. 256M or 2G")
        }
        if let timeout, !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
        if initrd != nil, kernel == nil { throw ValidationError("--initrd needs --kernel") }
        if restore != nil {
            for (given, name) in [(kernel != nil, "--kernel"), (initrd != nil, "--initrd"), (rng, "--rng"), (!nics.isEmpty, "--nic"), (cpuid != nil, "--cpuid")] where given {
                throw ValidationError("\(name) cannot be used with --restore: the snapshot holds the guest and its devices")
            }
        } else if paused {
            throw ValidationError("--paused needs --restore")
        } else if eagerMemory {
            throw ValidationError("--eager-memory needs --restore")
        }
    }

    func run() throws {
        if let bundle { throw ExitCode(try BundleRun(path: bundle, incomingFD: incomingFd).run()) }
        if let standbyFd { throw ExitCode(try StandbyVMProcess.serve(descriptor: standbyFd)) }
        // SIGUSR1 (with --save-on-signal), SIGINT and SIGTERM are blocked and collected before any
        // disk is opened or thread started, so each ends in the same orderly shutdown: stop the
        // machine, close every disk, then exit.
        let saveSignal = saveOnSignal.map { SaveOnSignal(directory: $0) }
        let session = TerminalSession()
        let stop = StopRequest()
        session.onInterrupt { stop.request(signal: $0) }
        let openDisks = RunDisks()
        var status: Int32
        do {
            status = try runMachine(disks: openDisks, session: session, stop: stop, saveSignal: saveSignal)
        } catch {
            session.restore()
            for failure in openDisks.closeAll() { printError("hvrun: \(failure)") }
            throw error
        }
        session.restore()
        let failures = openDisks.closeAll()
        for failure in failures { printError("hvrun: \(failure)") }
        if !failures.isEmpty, status == 0 { status = 1 }
        throw ExitCode(status)
    }

    /// Builds the machine (booting or restoring), serves its control socket, runs it to the end
    /// and returns the exit status. The caller closes `opened` whatever happens here.
    private func runMachine(disks opened: RunDisks, session: TerminalSession, stop: StopRequest,
                            saveSignal: SaveOnSignal?) throws -> Int32 {
        let origin = BootTimer.processStart() ?? BootTimer.now()
        let entered = BootTimer.now()
        let machine = restore == nil ? try bootMachine(disks: opened) : try restoreMachine(disks: opened)
        let built = BootTimer.now()
        guard !stop.attach(machine) else {
            printError("hvrun: interrupted; the guest was not started")
            return 128 + (stop.signal ?? SIGINT)
        }
        // With a virtio console, host input goes to hvc0 (its I/O thread reads stdin), not COM1.
        if !machine.configuration.virtioDevices.contains(where: { if case .console = $0.kind { true } else { false } }) {
            session.forwardInput(to: machine.serial)
        }
        let server = try control.map { path throws(ControlError) in try ControlServer(path: path, machine: machine) }
        defer { server?.close() }
        do {
            // Bound before the guest starts (a bad path fails the run first), served once it has
            // started: a client's greeting already says running or paused.
            try machine.start(paused: paused)
            try server?.start()
        } catch {
            machine.stop()
            throw error
        }
        if restore != nil, bootTime {
            func ms(_ from: UInt64, _ to: UInt64) -> String {
                let tenths = (to &- from) / 100_000
                return "\(tenths / 10).\(tenths % 10) ms"
            }
            let running = BootTimer.now()
            printError("hvrun: restore time: process start → main \(ms(origin, entered)), snapshot read and machine rebuilt +\(ms(entered, built)), state loaded and vCPUs released +\(ms(built, running)); total \(ms(origin, running))")
        }
        saveSignal?.watch(machine)
        let exit = machine.wait(timeout: timeout.map { .milliseconds(Int64(($0 * 1000).rounded())) })
        server?.close()
        opened.adoptDisks(of: machine)
        if restore == nil, let timer = machine.configuration.bootTimer { printError("hvrun: boot time\n" + timer.report()) }
        if bootTime { printError("hvrun: instructions completed for KVM's emulator\n" + machine.emulationCompletions.report()) }
        return Self.status(for: exit, signal: stop.signal)
    }

    private var consoleOutput: any ConsoleOutput {
        get throws {
            guard let consoleLog else { return FileDescriptorOutput.standardOutput }
            return TeeOutput([FileDescriptorOutput.standardOutput, try FileDescriptorOutput(path: consoleLog)])
        }
    }

    /// A machine from a snapshot directory (`--restore`); its disks are handed to `opened` to close.
    private func restoreMachine(disks opened: RunDisks) throws -> Machine {
        var options = RestoreOptions()
        options.console = try consoleOutput
        options.virtioConsoleInput = 0
        options.diskPaths = disks.map(\.path)
        options.eagerMemory = eagerMemory
        options.expectedCPUCount = cpus
        options.expectedMemorySize = memory?.bytes
        if bootTime { options.bootTimer = BootTimer(origin: BootTimer.processStart() ?? BootTimer.now()) }
        let machine = try Machine(restoring: restore!, options: options)
        opened.adoptDisks(of: machine)
        return machine
    }

    /// The command line for `kernel`: on a PVM host a Linux kernel gets `clearcpuid=` for the
    /// features whose instructions KVM's emulator lacks (`PVMLinuxPolicy`), unless `--cpuid` was
    /// given or the command line already has `clearcpuid=`. Test guests are left alone.
    private func linuxCommandLine(for kernel: [UInt8]) -> String {
        guard PVMLinuxPolicy.isLinuxKernel(kernel), PVMLinuxPolicy.hostIsPVM() else { return cmdline }
        if cpuid != nil {
            printError("hvrun: PVM host: --cpuid given, so no clearcpuid= is added to the kernel command line")
            return cmdline
        }
        guard let extended = PVMLinuxPolicy.commandLine(cmdline) else { return cmdline }
        printError("hvrun: PVM host: added clearcpuid=\(PVMLinuxPolicy.clearedFeatures.joined(separator: ",")) to the kernel command line (instructions KVM's emulator lacks; --cpuid or an explicit clearcpuid= turns this off)")
        return extended
    }

    /// A machine that boots a kernel (or the embedded guest), with its disks opened into `opened`.
    private func bootMachine(disks opened: RunDisks) throws -> Machine {
        let boot: MachineConfiguration.Boot
        var pvmLinux = false
        if let kernel {
            let kernelBytes = try ImageFile.read(kernel)
            pvmLinux = cpuid == nil && PVMLinuxPolicy.isLinuxKernel(kernelBytes) && PVMLinuxPolicy.hostIsPVM()
            let initrdBytes = try initrd.map { path throws(BootError) in try ImageFile.read(path) }
            // A bzImage starts with a boot sector carrying "HdrS"; anything else must be a PVH ELF
            // (the ELF loader explains what is wrong with a file that is neither).
            let commandLine = linuxCommandLine(for: kernelBytes)
            if BzImageHeader.looksLikeBzImage(kernelBytes) {
                boot = .linux(kernel: kernelBytes, kernelName: kernel, initrd: initrdBytes, commandLine: commandLine)
            } else {
                boot = .pvh(kernel: kernelBytes, kernelName: kernel, initrd: initrdBytes, commandLine: commandLine)
            }
        } else {
            boot = .pvh(kernel: embeddedGuestELF, kernelName: "embedded guest", initrd: nil, commandLine: cmdline)
        }
        var configuration = MachineConfiguration(boot: boot)
        configuration.memorySize = memory?.bytes ?? 256 << 20
        configuration.cpuCount = cpus ?? 1
        if let cpuid {
            let policy = try CPUIDPolicy.parse(cpuid)
            configuration.cpuidPolicy = { policy.apply(to: &$0) }
        } else if pvmLinux {
            // KVM hypercalls hang on PVM hosts (Docs/linux-boot.md): hide the features that make them.
            let policy = PVMLinuxPolicy.cpuidPolicy
            configuration.cpuidPolicy = { policy.apply(to: &$0) }
            printError("hvrun: PVM host: hid KVM's hypercall features (\(policy.hidden.map(\.description).joined(separator: ", "))) from the kernel (--cpuid turns this off)")
        }
        configuration.bootTimer = bootTime ? BootTimer(origin: BootTimer.processStart() ?? BootTimer.now()) : nil
        configuration.console = try consoleOutput
        let transport: VirtioDeviceConfiguration.Transport = virtioTransport == .mmio ? .mmio : .pci
        for (index, disk) in self.disks.enumerated() {
            let backend = try opened.open(disk)
            configuration.virtioDevices.append(.init(.block(backend, identifier: "hvrun-disk\(index)"), transport: transport))
        }
        if console == .virtio {
            configuration.virtioDevices.append(.init(.console(output: configuration.console, input: 0), transport: transport))
        }
        if rng { configuration.virtioDevices.append(.init(.entropy, transport: transport)) }
        for (index, nic) in nics.enumerated() { configuration.virtioDevices.append(.init(try nic.deviceKind(index: index), transport: transport)) }
        return try Machine(configuration)
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
        case .saved:
            return 0
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
