import Testing
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// Facts about the test host that decide whether KVM tests can run.
enum TestHost {
    /// Whether /dev/kvm can be opened read-write by this user.
    static let kvmUsable: Bool = access("/dev/kvm", R_OK | W_OK) == 0

    static let kvmSkipReason: Comment = "/dev/kvm is missing or not accessible to this user: KVM integration tests skipped"

    /// The repository root (…/Tests/HyperCoreTests/Support/Host.swift → four levels up).
    static let repositoryRoot: String = {
        var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(4)
        return parts.joined(separator: "/")
    }()

    /// The `hvrun` binary built next to the test bundle (both live in the same `.build*/debug/`).
    static let hvrunPath: String? = {
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard length > 0 else { return nil }
        let executable = String(decoding: buffer[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let slash = executable.lastIndex(of: "/") else { return nil }
        let path = String(executable[..<slash]) + "/hvrun"
        return access(path, X_OK) == 0 ? String(path) : nil
    }()

    /// Runs the built hvrun with a deadline.
    static func hvrun(_ arguments: [String], stdin: String? = nil, timeoutSeconds: Double = 60,
                      signal: (after: String, number: Int32)? = nil) throws -> Subprocess.Result {
        guard let hvrunPath else { throw Subprocess.Failure.spawn("hvrun (not built next to the tests)", 2) }
        return try Subprocess.run(hvrunPath, arguments, stdin: stdin, timeoutSeconds: timeoutSeconds, signal: signal)
    }

    /// Whether an executable is on PATH.
    static func hasTool(_ name: String) -> Bool {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        return path.split(separator: ":").contains { access("\($0)/\(name)", X_OK) == 0 }
    }
}

extension Tag {
    /// Tests that run guests through /dev/kvm.
    @Tag static var kvm: Self
}

/// A scratch file holding `bytes`, removed when the value goes away.
final class TemporaryFile {
    let path: String

    init(bytes: [UInt8]) throws {
        var template = Array("/tmp/hypercore-test-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw Subprocess.Failure.spawn("mkstemp", errno) }
        defer { close(fd) }
        path = String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard written == bytes.count else {
            unlink(path)
            throw Subprocess.Failure.spawn(path, errno)
        }
    }

    /// The file's current contents (empty if it cannot be read).
    var bytes: [UInt8] { (try? ImageFile.read(path)) ?? [] }

    deinit { unlink(path) }
}
