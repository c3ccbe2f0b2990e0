import ArgumentParser

struct DiskCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "disk", abstract: "Create, inspect and convert VHDX disks.")
    func run() throws {}
}
