import Testing
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// hvrun's usage and error messages as a user sees them (issue 8 items 7 and 9). None of these
/// needs KVM: every one fails before a machine is built.
@Suite("hvrun messages", .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct HVRunMessageTests {
    @Test("--disk refuses an unknown option by name and lists the valid ones")
    func unknownDiskOption() throws {
        let result = try TestHost.hvrun(["run", "--disk", "file.vhdx,bogus"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("unknown disk option 'bogus'"), "\(result.stderr)")
        #expect(result.stderr.contains("readonly"), "\(result.stderr)")
    }

    @Test("--disk PATH,readonly and PATH,ro still parse (the file is then opened, and is missing here)")
    func knownDiskOptions() throws {
        for argument in ["/nonexistent/d.img,readonly", "/nonexistent/d.img,ro"] {
            let result = try TestHost.hvrun(["run", "--disk", argument])
            #expect(result.status == 1)
            #expect(result.stderr.contains("/nonexistent/d.img:"), "\(result.stderr)")
            #expect(!result.stderr.contains("unknown disk option"), "\(result.stderr)")
        }
    }

    @Test("run --help shows the memory default as a size")
    func memoryDefault() throws {
        let help = try TestHost.hvrun(["run", "--help"])
        #expect(help.stdout.contains("(default: 256M)"), "\(help.stdout)")
        #expect(!help.stdout.contains("ByteCount"))
    }

    @Test("--memory 0 and --memory 100T both get the valid range")
    func memoryRange() throws {
        for value in ["0", "100T"] {
            let result = try TestHost.hvrun(["run", "--memory", value])
            #expect(result.status == 1)
            #expect(result.stderr.contains("between 1M and 1T"), "\(value): \(result.stderr)")
        }
    }

    @Test("--timeout -1 is a bad value, not a missing one")
    func negativeTimeout() throws {
        let result = try TestHost.hvrun(["run", "--timeout", "-1"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("positive"), "\(result.stderr)")
        #expect(!result.stderr.lowercased().contains("missing"), "\(result.stderr)")
    }

    @Test("a missing disk is named without a meaningless file offset")
    func missingFile() throws {
        let result = try TestHost.hvrun(["disk", "info", "/nonexistent/disk.vhdx"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("/nonexistent/disk.vhdx") && result.stderr.contains("No such file"), "\(result.stderr)")
        #expect(!result.stderr.contains("offset"), "\(result.stderr)")
    }

    @Test("disk check does not tell the user to run disk check")
    func checkDoesNotSuggestItself() throws {
        let dir = VHDXTestSupport.scratchDirectory()
        defer { VHDXTestSupport.cleanup(dir) }
        let path = dir + "/trunc.vhdx"
        try #require(try TestHost.hvrun(["disk", "create", path, "--size", "64M"]).status == 0)
        try #require(truncate(path, 300_000) == 0)
        let check = try TestHost.hvrun(["disk", "check", path])
        #expect(check.status == 1)
        #expect(check.stdout.contains("problem:"), "\(check.stdout)")
        #expect(!check.stdout.contains("disk check"), "\(check.stdout)")
        // Elsewhere the advice stays.
        let info = try TestHost.hvrun(["disk", "info", path])
        #expect(info.stderr.contains("hvrun disk check"), "\(info.stderr)")
    }

    @Test("a bad --size gets disk create's usage, not the top-level one")
    func createUsage() throws {
        let result = try TestHost.hvrun(["disk", "create", "/tmp/never.vhdx", "--size", "abc"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("cannot read size 'abc'"), "\(result.stderr)")
        #expect(result.stderr.contains("hvrun disk create"), "\(result.stderr)")
    }
}
