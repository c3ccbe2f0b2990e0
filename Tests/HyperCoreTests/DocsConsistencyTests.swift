import Testing
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The documents agree with the code and stand on their own (issue 8 items 6, 8, 11).
@Suite("documentation")
struct DocsConsistencyTests {
    static func text(_ relativePath: String) throws -> String {
        String(decoding: try ImageFile.read(TestHost.repositoryRoot + "/" + relativePath), as: UTF8.self)
    }

    /// Every Markdown file of the repository (outside build folders), relative paths.
    static func markdownFiles() -> [String] {
        var found: [String] = []
        func walk(_ relative: String) {
            guard let dir = opendir(TestHost.repositoryRoot + "/" + relative) else { return }
            defer { closedir(dir) }
            while let entry = readdir(dir) {
                let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
                guard !name.hasPrefix(".") else { continue }
                let path = relative.isEmpty ? name : relative + "/" + name
                if entry.pointee.d_type == UInt8(DT_DIR) { walk(path) } else if name.hasSuffix(".md") { found.append(path) }
            }
        }
        walk("")
        return found
    }

    @Test("no document cites a file outside the repository")
    func selfContained() throws {
        let files = Self.markdownFiles()
        #expect(files.contains("Docs/hosts.md"))
        #expect(files.contains("Tests/Guests/README.md"))
        for file in files {
            let text = try Self.text(file)
            for outside in ["/work/", "../shared", "shared/KVM-HERE", "shared/notes/"] {
                #expect(!text.contains(outside), "\(file) cites \(outside)…, which a clone does not have")
            }
        }
    }

    @Test("hvrun-disk.md lists every key disk info --json prints", .enabled(if: TestHost.hvrunPath != nil, "hvrun is not built"))
    func infoJSONKeysDocumented() throws {
        let manual = try Self.text("Docs/hvrun-disk.md")
        let path = "/tmp/hypercore-docs-\(getpid()).vhdx"
        defer { unlink(path) }
        try #require(try TestHost.hvrun(["disk", "create", path, "--size", "8M"]).status == 0)
        let info = try TestHost.hvrun(["disk", "info", "--json", path])
        let keys = info.stdout.split(separator: "\n").compactMap { line -> String? in
            let parts = line.split(separator: "\"")
            return line.contains("\":") && parts.count >= 2 ? String(parts[1]) : nil
        }
        #expect(keys.count >= 10, "\(info.stdout)")
        for key in keys { #expect(manual.contains("`\(key)`"), "disk info --json prints \(key), which Docs/hvrun-disk.md does not list") }
    }

    @Test("hvrun-disk.md states the exit status a usage error really has", .enabled(if: TestHost.hvrunPath != nil, "hvrun is not built"))
    func diskUsageExitStatus() throws {
        let usage = try TestHost.hvrun(["disk", "create", "/tmp/never.vhdx", "--size", "abc"])
        #expect(usage.status == 1)
        let manual = try Self.text("Docs/hvrun-disk.md")
        #expect(!manual.contains("2 on a usage error"))
        #expect(manual.contains("1 on any failure, usage errors included"))
    }

    @Test("virtio.md describes what Tests/Fuzz/regressions holds")
    func regressionsDescribed() throws {
        let virtio = try Self.text("Docs/virtio.md")
        #expect(!virtio.contains("`Tests/Fuzz/regressions/` is empty"))
        guard let dir = opendir(TestHost.repositoryRoot + "/Tests/Fuzz/regressions") else { return }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard !name.hasPrefix(".") else { continue }
            #expect(virtio.contains(name), "Docs/virtio.md does not mention the regression input \(name)")
        }
    }
}
