import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The test guests from Tests/Guests, built once per test process with `make` (they are part of
/// the test, not checked-in binaries).
enum GuestImages {
    static let outputDirectory = TestHost.repositoryRoot + "/.build/test-guests"

    /// nil when the build succeeded, else make's output.
    static let buildFailure: String? = {
        do {
            let result = try Subprocess.run("make", ["-s", "-C", TestHost.repositoryRoot + "/Tests/Guests",
                                                     "OUT=" + outputDirectory], timeoutSeconds: 300)
            return result.status == 0 ? nil : "make failed (\(result.status)):\n\(result.stdout)\(result.stderr)"
        } catch {
            return "cannot run make: \(error)"
        }
    }()

    /// The bytes of `name` (e.g. "pvhinfo.elf"), building the guests first if needed.
    static func bytes(_ name: String) throws -> [UInt8] {
        try ImageFile.read(path(name))
    }

    /// The path of a built guest (building the guests first if needed).
    static func path(_ name: String) throws -> String {
        if let buildFailure { throw GuestBuildError(message: buildFailure) }
        return outputDirectory + "/" + name
    }

    struct GuestBuildError: Error, CustomStringConvertible {
        let message: String
        var description: String { message }
    }
}

/// Runs a test guest on HyperCore and collects what it printed.
struct GuestRun {
    let exit: MachineExit
    let console: String

    /// `key=value` lines as a dictionary (last one wins) and as ordered pairs.
    var values: [String: String] {
        var result: [String: String] = [:]
        for (key, value) in pairs { result[key] = value }
        return result
    }

    var pairs: [(String, String)] {
        console.split(separator: "\n").compactMap { line -> (String, String)? in
            let parts = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            return parts.count == 2 ? (String(parts[0]), String(parts[1])) : nil
        }
    }

    /// The configuration of a machine booting test guest `guest` through PVH, its console kept
    /// in memory (read it back from `configuration.console as! BufferOutput`).
    static func configuration(_ guest: String, commandLine: String = "", initrd: [UInt8]? = nil,
                              memory: UInt64 = 64 << 20, cpus: Int = 1) throws -> MachineConfiguration {
        var configuration = MachineConfiguration(boot: .pvh(kernel: try GuestImages.bytes(guest), kernelName: guest,
                                                            initrd: initrd, commandLine: commandLine))
        configuration.memorySize = memory
        configuration.cpuCount = cpus
        configuration.console = BufferOutput()
        return configuration
    }

    static func pvh(_ guest: String, commandLine: String = "", initrd: [UInt8]? = nil, memory: UInt64 = 64 << 20,
                    cpus: Int = 1, timeout: Duration = .seconds(30),
                    configure: (inout MachineConfiguration) -> Void = { _ in }) throws -> GuestRun {
        var configuration = try Self.configuration(guest, commandLine: commandLine, initrd: initrd, memory: memory, cpus: cpus)
        configure(&configuration)
        let console = configuration.console as! BufferOutput
        let exit = try Machine(configuration).run(timeout: timeout)
        return GuestRun(exit: exit, console: console.text)
    }
}
