import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

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
        subcommands: [RunCommand.self, CheckCommand.self, DiskCommand.self, VMCommand.self, SwitchCommand.self],
        defaultSubcommand: RunCommand.self
    )

    /// Runs the command with hvrun's exit statuses: usage and host errors are one line on stderr
    /// and status 1 (ArgumentParser's default for usage errors is 64); commands report their own
    /// statuses by throwing `ExitCode`.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
            Glibc.exit(0)
        } catch let code as ExitCode {
            Glibc.exit(code.rawValue)
        } catch {
            switch exitCode(for: error) {
            case .success: exit(withError: error) // --help and --version arrive as errors
            case .validationFailure: printError(fullMessage(for: error))
            default: printError("hvrun: \(error)")
            }
            Glibc.exit(1)
        }
    }
}
