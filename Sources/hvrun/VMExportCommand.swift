import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

struct VMExportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export", abstract: "Export a VM to DIR/NAME: its configuration, every disk of every checkpoint chain, checkpoints and saved state (Export-VM).",
        discussion: "Works on an off, saved or running VM. A running VM is exported as it is at a temporary checkpoint (one short pause): the export holds it saved at that point, the guest keeps running, and the temporary checkpoint is deleted (merged) afterwards. Refuses to overwrite DIR/NAME.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Argument(help: ArgumentHelp("The directory to export into (DIR/NAME is created).", valueName: "dir"), completion: .directory) var directory: String

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            let state = store.status(of: bundle).state
            let start = monotonicSeconds()
            let destination: String
            if state == .running || state == .paused {
                let connection = try ControlConnection(path: bundle.controlSocketPath)
                let reply = try connection.execute("vm-checkpoint", arguments: [("name", .string("hvrun export \(getpid())"))], timeoutSeconds: 600)
                guard let id = reply["id"]?.stringValue else { throw StoreError.failed("VM \(name) did not report its temporary checkpoint") }
                defer {
                    // The temporary checkpoint goes whatever happened; its merge runs in the VM's process.
                    if (try? connection.execute("vm-checkpoint-delete", arguments: [("checkpoint", .string(id))])) == nil {
                        printError("hvrun: could not delete the temporary checkpoint \(id) of VM \(name): hvrun vm checkpoint delete \(name) \(id)")
                    }
                }
                let configuration = try bundle.configuration()
                guard let temporary = configuration.checkpoints.first(where: { $0.id == id }) else {
                    throw StoreError.failed("VM \(name) lost its temporary checkpoint \(id)")
                }
                let (exported, saved) = VMStore.exportConfiguration(configuration, asOf: temporary, bundle: bundle)
                destination = try store.export(bundle, configuration: exported, saved: saved, to: directory)
                let pause = reply["pause_ms"]?.doubleValue.map { ", guest paused \(($0 * 10).rounded() / 10) ms" } ?? ""
                printOut("exported running VM \(name) to \(destination) in \(milliseconds(since: start)) ms\(pause)\n")
                return
            }
            destination = try withVMLock(store, bundle, for: "export") { () throws -> String in
                let checkpoints = VMCheckpointStore(bundle: bundle)
                try checkpoints.recover()
                let configuration = try bundle.configuration()
                let saved = StoreFiles.exists(bundle.savedPath + "/state") ? bundle.savedPath : nil
                return try store.export(bundle, configuration: configuration, saved: saved, to: directory)
            }
            printOut("exported VM \(name) to \(destination) in \(milliseconds(since: start)) ms\n")
        }
    }
}

private func milliseconds(since start: Double) -> Int { Int((monotonicSeconds() - start) * 1000) }

/// `--mode`, parsed here (the library type stays free of the argument parser).
enum ImportModeArgument: String, ExpressibleByArgument, Sendable {
    case register, restore, copy
    var mode: VMImportMode { VMImportMode(rawValue: rawValue)! }
}

struct VMImportCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import", abstract: "Import an exported VM (Import-VM): register it in place, restore it into the store, or copy it as a new VM.",
        discussion: "Everything is checked first (missing kernel or disk files, chains that do not open, switches missing on this host, a name or ID already in the store, more CPUs or memory than the host has): any problem refuses the import, listing every one, and nothing is imported. A copy gets a new ID and new generated MACs (static MACs are kept, with a warning) and comes without saved memory.")
    @Argument(help: ArgumentHelp("The exported VM: the DIR/NAME directory export wrote.", valueName: "path"), completion: .directory) var path: String
    @Option(help: "register (use the files in place, keep the ID), restore (copy into the store, keep the ID) or copy (new VM).")
    var mode: ImportModeArgument = .register
    @Option(help: ArgumentHelp("The name in this store (default: the exported VM's).", valueName: "name")) var name: String?

    func run() throws {
        try storeCommand { store in
            let start = monotonicSeconds()
            let result = try store.importVM(from: path, mode: mode.mode, name: name)
            for warning in result.warnings { printError("hvrun: warning: \(warning)") }
            printOut("imported VM \(result.bundle.name) (\(mode.rawValue), id \(result.id)) in \(milliseconds(since: start)) ms\n")
        }
    }
}
