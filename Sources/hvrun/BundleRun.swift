import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The process of one running VM of the store: `hvrun run --bundle DIR`, spawned by `hvrun vm start`.
///
/// It holds the write lock on the bundle's `lock` file (with its pid in it) for as long as it
/// lives — that lock *is* the VM's "running" state, and the kernel drops it when the process dies,
/// however it dies. It boots the VM from `vm.json` (or continues it from `saved/`, which it removes
/// once the guest runs), writes the serial console to `console.log`, serves `control.sock` and
/// `console.sock`, and re-boots the guest after a reset when `on_reset` is `restart`.
/// Exit status: 0 when the VM ended (power-off, reset with on_reset=stop, stop, save), 2 when
/// another process holds the VM, else as `hvrun run`.
struct BundleRun {
    let bundle: VMBundle
    /// A live migration's connection to receive the VM from (`hvrun vm receive`; BundleIncoming.swift).
    let incomingFD: Int32?

    init(path: String, incomingFD: Int32? = nil) {
        let absolute = StoreFiles.absolute(path)
        let name = absolute.split(separator: "/").last.map(String.init) ?? absolute
        bundle = VMBundle(name: name, path: absolute)
        self.incomingFD = incomingFD
    }

    func run() throws -> Int32 {
        // Nothing the starting command had open (a caller's pipes, say) stays open in a process
        // that outlives it.
        for fd in 3..<Int32(1024) where fd != incomingFD { close(fd) }
        guard let lock = try FileLock.acquire(bundle.lockPath, wait: false) else {
            printError("hvrun: VM \(bundle.name) is running (another process holds \(bundle.lockPath))")
            return 2
        }
        defer { withExtendedLifetime(lock) {} }
        lock.write("\(getpid())\n")
        // Locked: a delete that ran before us has removed vm.json; one after us cannot start.
        var configuration = try bundle.configuration()
        printError("hvrun: VM \(bundle.name) (pid \(getpid())): starting")
        // Checkpoint work a crash or a stop interrupted is finished before the disks open.
        if !configuration.pending.isEmpty {
            printError("hvrun: VM \(bundle.name): finishing interrupted checkpoint work first")
            try VMCheckpointStore(bundle: bundle).recover()
            configuration = try bundle.configuration()
        }
        var incoming: BundleIncoming?
        if let incomingFD {
            do { incoming = try BundleIncoming(bundle: bundle, fd: incomingFD) } catch {
                BundleIncoming.discard(bundle)
                throw error
            }
        }
        let nics: BundleNICs
        do { nics = try BundleNICs(configuration, store: SwitchStore(root: bundle.storeRoot)) } catch {
            if incoming != nil { BundleIncoming.discard(bundle) }
            throw error
        }
        defer { withExtendedLifetime(nics) {} }

        let console = try VMConsoleServer(logPath: bundle.consoleLogPath, socketPath: bundle.consoleSocketPath)
        let session = TerminalSession()   // stdin is /dev/null: only its SIGINT/SIGTERM handling is used
        let stop = StopRequest()
        session.onInterrupt { stop.request(signal: $0) }
        try console.serve()
        defer { console.removeSocket() }

        var restoreFrom: String? = StoreFiles.exists(bundle.savedPath + "/state") ? bundle.savedPath : nil
        while true {
            let disks = RunDisks()
            let exit: MachineExit
            let moved: Bool
            do {
                (exit, moved) = try runOnce(configuration, restoring: restoreFrom, incoming: incoming, disks: disks, nics: nics,
                                            console: console, stop: stop)
            } catch {
                for failure in disks.closeAll() { printError("hvrun: \(failure)") }
                if incoming != nil { BundleIncoming.discard(bundle) }
                throw error
            }
            restoreFrom = nil
            incoming = nil
            if moved { return BundleIncoming.finishMoved(bundle, disks: disks) }
            // Checkpoints taken while it ran moved its disks onto new files: boot again on those.
            configuration = try bundle.configuration()
            var status = RunCommand.status(for: exit, signal: stop.signal)
            let failures = disks.closeAll()
            for failure in failures { printError("hvrun: \(failure)") }
            if !failures.isEmpty, status == 0 { status = 1 }
            printError("hvrun: VM \(bundle.name): \(exit)")
            if exit == .reset, configuration.onReset == .restart, stop.signal == nil, !stop.stoppedByControl, failures.isEmpty {
                printError("hvrun: VM \(bundle.name): on_reset=restart, booting again")
                continue
            }
            return status
        }
    }

    /// Boots (or restores) the machine once and runs it to its end.
    private func runOnce(_ configuration: VMConfiguration, restoring saved: String?, incoming: BundleIncoming?, disks: RunDisks,
                         nics: BundleNICs, console: VMConsoleServer, stop: StopRequest) throws -> (MachineExit, moved: Bool) {
        let machine: Machine
        if let incoming {
            machine = try incoming.receiveMachine(configuration, console: console)
            disks.adoptDisks(of: machine)
        } else if let saved {
            var options = RestoreOptions()
            options.console = console
            options.diskPaths = configuration.disks.map { bundle.activePath(of: $0) }
            options.diskIdentities = configuration.savedDiskIdentities
            options.expectedCPUCount = configuration.cpus
            options.expectedMemorySize = configuration.memoryBytes
            options.networkBackends = nics.devices.map(\.backend)
            machine = try Machine(restoring: saved, options: options)
            disks.adoptDisks(of: machine)
        } else {
            let kernelPath = bundle.file(configuration.boot.kernel)
            let kernel = try ImageFile.read(kernelPath)
            let initrd = try configuration.boot.initrd.map { name throws(BootError) in try ImageFile.read(bundle.file(name)) }
            let cmdline = configuration.boot.cmdline
            var machineConfiguration = MachineConfiguration(boot: BzImageHeader.looksLikeBzImage(kernel)
                ? .linux(kernel: kernel, kernelName: kernelPath, initrd: initrd, commandLine: cmdline)
                : .pvh(kernel: kernel, kernelName: kernelPath, initrd: initrd, commandLine: cmdline))
            machineConfiguration.memorySize = configuration.memoryBytes
            machineConfiguration.cpuCount = configuration.cpus
            machineConfiguration.console = console
            for (index, disk) in configuration.disks.enumerated() {
                let backend = try disks.open(DiskOption(path: bundle.activePath(of: disk), readOnly: disk.readonly))
                machineConfiguration.virtioDevices.append(.init(.block(backend, identifier: "hvrun-disk\(index)"), transport: .pci))
            }
            for nic in nics.devices { machineConfiguration.virtioDevices.append(.init(.network(nic.backend, mac: nic.mac), transport: .pci)) }
            machine = try Machine(machineConfiguration)
        }
        guard !stop.attach(machine) else { return (.stopped, false) }
        console.attach(machine.serial)
        let server = try ControlServer(path: bundle.controlSocketPath, machine: machine)
        server.onStop = { stop.requestFromControl() }
        let checkpoints = BundleCheckpoints(bundle: bundle, machine: machine)
        checkpoints.install(on: server)
        BundleStorageMove(bundle: bundle, machine: machine, checkpoints: checkpoints).install(on: server)
        defer { server.close() }
        do {
            if let incoming { try incoming.switchOver(machine) } else { try machine.start() }
            try server.start()
        } catch {
            machine.stop()
            throw error
        }
        if let saved {
            // The guest runs on from here: the saved state is spent (its memory stays mapped privately).
            let spent = bundle.path + "/.saved-spent-\(getpid())"
            if rename(saved, spent) == 0 { try? StoreFiles.removeTree(spent) }
            if !configuration.savedDiskIdentities.isEmpty {
                var updated = try bundle.configuration()
                updated.savedDiskIdentities = []
                try StoreFiles.writeAtomically(bundle.configurationPath, Array(try updated.encoded().utf8))
            }
            printError("hvrun: VM \(bundle.name): continued from its saved state")
        }
        let exit = machine.wait()
        server.close()
        // A background merge stops at its next step once the machine has ended (it works on
        // this machine's disks, which close next); the rest stays pending for the next start.
        checkpoints.waitUntilIdle()
        disks.adoptDisks(of: machine)
        return (exit, server.outgoing.hasMoved)
    }
}
