import Testing
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
