import ArgumentParser

/// `hvrun`: a one-shot VM launcher, a host capability check and VHDX tooling.
@main
struct HVRun: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hvrun",
        abstract: "Run a micro-VM on Linux KVM, check the host, and manage VHDX disks.",
        discussion: """
            With no subcommand, hvrun runs: with no arguments at all it boots the small guest embedded \
            in the binary, which prints what it sees from inside the VM and powers off.
            """,
        version: "0.1.0",
        subcommands: [RunCommand.self, CheckCommand.self, DiskCommand.self],
        defaultSubcommand: RunCommand.self
    )
}
