import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `vm move --storage copy`, the bundle's side: which files go to the destination and under which
/// names. The writable disks' active files are copied by the library while the guest writes
/// them (``MigrationOptions/Storage/copy``); every other file a disk chain needs — the frozen
/// files of checkpoints, read-only disks, parents outside the bundle — and the checkpoints'
/// memory are sent whole before memory, as files named by their place in the new bundle
/// (``VMRelocation``). The destination re-points each differencing disk at its copied parent.
struct StorageCopyPlan {
    let relocation: VMRelocation
    /// Files sent whole: (bundle-relative name, source path).
    let files: [(name: String, path: String)]

    init(bundle: VMBundle, configuration: VMConfiguration) throws {
        let source = VMBundle(name: bundle.name, path: StoreFiles.canonical(bundle.path))
        relocation = try VMRelocation(bundle: source, configuration: configuration)
        let copiedLive = Set(configuration.disks.filter { !$0.readonly }.map { StoreFiles.canonical(source.activePath(of: $0)) })
        var files = relocation.placed.filter { !copiedLive.contains($0.key) }.map { (name: $0.value, path: $0.key) }.sorted { $0.name < $1.name }
        for checkpoint in configuration.checkpoints where checkpoint.hasMemory {
            let directory = "checkpoints/" + checkpoint.id
            for entry in StoreFiles.list(source.file(directory)) {
                files.append((directory + "/" + entry, source.file(directory + "/" + entry)))
            }
        }
        self.files = files
    }

    /// Whether `name` may be created in a receiving bundle: relative, inside it, not one of the
    /// bundle's own files.
    static func isSafeName(_ name: String) -> Bool {
        let parts = name.split(separator: "/", omittingEmptySubsequences: false)
        guard !name.hasPrefix("/"), !parts.isEmpty, parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else { return false }
        let reserved: Set<Substring> = ["vm.json", "lock", "incoming", "control.sock", "console.sock", "console.log", "console.log.1", "process.log", "saved"]
        return !reserved.contains(parts[0])
    }

    /// The (child, parent) pairs of the offer's metadata, checked.
    static func reparentPairs(_ metadata: JSONValue) throws -> [(child: String, parent: String)] {
        guard case let .array(entries)? = metadata["reparent"] else { return [] }
        return try entries.map { entry in
            guard case let .array(pair) = entry, pair.count == 2, let child = pair[0].stringValue, let parent = pair[1].stringValue,
                  isSafeName(child), isSafeName(parent) else {
                throw StoreError.failed("the offer's reparent list holds \(entry.rendered())")
            }
            return (child, parent)
        }
    }

    /// Re-points each copied differencing disk in `pairs` at its copied parent, in `bundle`.
    static func reparent(_ pairs: [(child: String, parent: String)], in bundle: VMBundle) throws(MigrationError) {
        do throws(StoreError) { try VMRelocation.reparent(pairs, under: bundle.path) } catch { throw .machine("\(error)") }
    }
}
