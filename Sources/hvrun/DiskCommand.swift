import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun disk`: create, inspect, check and convert disk images (qemu-img and the Hyper-V cmdlets
/// New-VHD, Get-VHD, Merge-VHD, Resize-VHD, Optimize-VHD in one place).
struct DiskCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disk",
        abstract: "Create, inspect and convert VHDX disks.",
        subcommands: [DiskCreate.self, DiskInfo.self, DiskCheck.self, DiskConvert.self, DiskMerge.self,
                      DiskResize.self, DiskCompact.self]
    )
}

/// Turns a library error into a one-line message and exit status 1 (2 for usage errors is
/// ArgumentParser's).
func fail(_ message: String) -> any Error {
    var err = FileHandleStderr()
    print("hvrun disk: \(message)", to: &err)
    return ExitCode(1)
}

struct FileHandleStderr: TextOutputStream {
    mutating func write(_ string: String) { writeStderr(string) }
}

func writeStderr(_ s: String) {
    var bytes = Array(s.utf8)
    _ = bytes.withUnsafeMutableBytes { Glibc.write(2, $0.baseAddress, $0.count) }
}

/// "10G", "512M", "64K", "1T" or plain bytes; binary units.
func parseSize(_ text: String) throws -> UInt64 {
    var digits = text.uppercased()
    if digits.hasSuffix("IB") { digits.removeLast(2) } else if digits.hasSuffix("B") && digits.count > 1 && !digits.dropLast().allSatisfy(\.isNumber) { digits.removeLast() }
    var shift: UInt64 = 0
    switch digits.last {
    case "K": shift = 10
    case "M": shift = 20
    case "G": shift = 30
    case "T": shift = 40
    default: break
    }
    if shift > 0 { digits.removeLast() }
    guard let n = UInt64(digits), n <= (UInt64.max >> shift) else {
        throw ValidationError("cannot read size '\(text)' (use bytes or a K/M/G/T suffix, e.g. 10G)")
    }
    return n << shift
}

func formatBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var v = Double(n)
    var u = 0
    while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
    if u == 0 { return "\(n) B" }
    let rounded = (v * 10).rounded() / 10
    return "\(rounded) \(units[u]) (\(n) bytes)"
}

/// A progress bar on stderr, only when stderr is a terminal.
final class ProgressBar {
    let enabled = isatty(2) != 0
    var lastPercent = -1
    let label: String
    init(_ label: String) { self.label = label }

    func update(_ done: UInt64, _ total: UInt64) {
        guard enabled, total > 0 else { return }
        let percent = Int(done * 100 / total)
        guard percent != lastPercent else { return }
        lastPercent = percent
        let width = 40
        let filled = percent * width / 100
        let bar = String(repeating: "#", count: filled) + String(repeating: " ", count: width - filled)
        writeStderr("\r\(label) [\(bar)] \(percent)%")
        if done >= total { writeStderr("\n") }
    }
}

struct DiskCreate: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a new disk (New-VHD).")

    @Argument(help: "Path of the new disk; .vhdx/.avhdx makes a VHDX, .img/.raw a raw file.") var path: String
    @Option(help: "Virtual size, e.g. 10G (taken from the parent when --parent is given).") var size: String?
    @Option(help: "dynamic or fixed (a parent implies differencing).") var type: String = "dynamic"
    @Option(name: .customLong("block-size"), help: "VHDX block size, 1M to 256M (default 32M, 2M for differencing).") var blockSize: String?
    @Option(name: .customLong("logical-sector"), help: "512 or 4096.") var logicalSector: UInt32?
    @Option(name: .customLong("physical-sector"), help: "512 or 4096.") var physicalSector: UInt32 = 4096
    @Option(help: "Parent disk: creates a differencing disk.") var parent: String?

    /// Sizes are checked while parsing, so a bad one is reported with `disk create`'s usage.
    func validate() throws {
        _ = try size.map(parseSize)
        _ = try blockSize.map(parseSize)
    }

    func run() throws {
        guard let format = DiskFormat.fromExtension(path) else {
            throw ValidationError("cannot tell the format from '\(path)': use a .vhdx, .avhdx, .img or .raw name")
        }
        let bytes = try size.map(parseSize)
        do {
            switch format {
            case .raw:
                guard parent == nil else { throw ValidationError("a raw disk cannot have a parent") }
                guard let bytes else { throw ValidationError("--size is required") }
                try RawImage.create(path: path, size: bytes)
            case .vhdx:
                let diskType: VHDXDiskType
                if parent != nil { diskType = .differencing } else {
                    guard let t = VHDXDiskType(rawValue: type), t != .differencing else {
                        throw ValidationError("--type must be dynamic or fixed (use --parent for differencing)")
                    }
                    diskType = t
                }
                guard bytes != nil || parent != nil else { throw ValidationError("--size is required") }
                let bs = try blockSize.map(parseSize) ?? 0
                guard bs <= UInt64(UInt32.max) else { throw ValidationError("block size too large") }
                try VHDXImage.create(path: path, options: VHDXCreateOptions(
                    virtualSize: bytes ?? 0, type: diskType, blockSize: UInt32(bs), logicalSectorSize: logicalSector ?? 0,
                    physicalSectorSize: physicalSector, parentPath: parent))
            }
        } catch let e as VHDXError {
            throw fail(e.description)
        }
    }
}

struct DiskInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Describe a disk (Get-VHD).")

    @Argument var path: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        do {
            let info = try DiskInfoData(path: path)
            print(json ? info.json : info.text)
        } catch {
            throw fail(error.description)
        }
    }
}

/// What `info` reports.
struct DiskInfoData {
    var format: String
    var type: String
    var virtualSize: UInt64
    var blockSize: UInt64?
    var logicalSectorSize: UInt32
    var physicalSectorSize: UInt32
    var allocatedBytes: UInt64
    var fileSize: UInt64
    var parent: String?
    var chain: [String]
    var logPending: Bool
    var diskID: String?
    var parentProblem: String?

    init(path: String) throws(VHDXError) {
        switch try detectDiskFormat(path: path) {
        case .raw:
            let raw = try RawImage(path: path, readOnly: true)
            let f = try DiskFile(path: path, readOnly: true)
            format = "raw"; type = "raw"; virtualSize = raw.virtualSize; blockSize = nil
            logicalSectorSize = raw.logicalSectorSize; physicalSectorSize = raw.physicalSectorSize
            allocatedBytes = try f.allocatedBytes(); fileSize = try f.size()
            parent = nil; chain = [path]; logPending = false; diskID = nil
        case .vhdx:
            // Read-only: a pending log is replayed in memory, never written. A broken chain still
            // gets its own description, with the parent problem shown.
            let image: VHDXImage
            var parentProblem: String?
            do {
                image = try VHDXImage(path: path, options: .init(readOnly: true))
            } catch {
                guard case let .parent(_, detail) = error else { throw error }
                image = try VHDXImage(path: path, options: .init(readOnly: true, openParents: false))
                parentProblem = detail
            }
            format = "vhdx"
            type = image.isDifferencing ? "differencing" : image.isFixed ? "fixed" : "dynamic"
            virtualSize = image.virtualSize
            blockSize = UInt64(image.blockSize)
            logicalSectorSize = image.logicalSectorSize
            physicalSectorSize = image.physicalSectorSize
            allocatedBytes = image.allocatedBytes
            fileSize = try DiskFile(path: path, readOnly: true).size()
            parent = image.parent?.path ?? image.parentLocator.flatMap { $0["relative_path"] ?? $0["absolute_win32_path"] }
            chain = image.chainPaths
            self.parentProblem = parentProblem
            logPending = image.logWasPending
            diskID = image.diskID.description
        }
    }

    var text: String {
        var lines = [
            "file:                 \(chain[0])",
            "format:               \(format)",
            "type:                 \(type)",
            "virtual size:         \(formatBytes(virtualSize))",
        ]
        if let blockSize { lines.append("block size:           \(formatBytes(blockSize))") }
        lines += [
            "logical sector size:  \(logicalSectorSize)",
            "physical sector size: \(physicalSectorSize)",
            "allocated:            \(formatBytes(allocatedBytes))",
            "file size:            \(formatBytes(fileSize))",
        ]
        if let diskID { lines.append("disk id:              \(diskID)") }
        if chain.count > 1 { lines.append("parent chain:         " + chain.dropFirst().joined(separator: " -> ")) }
        if let parentProblem { lines.append("parent:               \(parent ?? "?") — UNUSABLE: \(parentProblem)") }
        if format == "vhdx" { lines.append("log replay pending:   \(logPending ? "yes" : "no")") }
        return lines.joined(separator: "\n")
    }

    var json: String {
        func str(_ s: String?) -> String {
            guard let s else { return "null" }
            var out = "\""
            for u in s.unicodeScalars {
                switch u {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case _ where u.value < 0x20: out += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16)
                default: out.unicodeScalars.append(u)
                }
            }
            return out + "\""
        }
        let fields: [(String, String)] = [
            ("format", str(format)), ("type", str(type)), ("virtual_size", "\(virtualSize)"),
            ("block_size", blockSize.map { "\($0)" } ?? "null"),
            ("logical_sector_size", "\(logicalSectorSize)"), ("physical_sector_size", "\(physicalSectorSize)"),
            ("allocated_bytes", "\(allocatedBytes)"), ("file_size", "\(fileSize)"), ("parent", str(parent)),
            ("parent_chain", "[" + chain.dropFirst().map { str($0) }.joined(separator: ", ") + "]"),
            ("log_pending", logPending ? "true" : "false"), ("disk_id", str(diskID)),
            ("parent_problem", str(parentProblem)),
        ]
        return "{\n" + fields.map { "  \(str($0.0)): \($0.1)" }.joined(separator: ",\n") + "\n}"
    }
}

struct DiskCheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check", abstract: "Validate every structure of a VHDX.",
        discussion: "Exit status 0: clean; 1: problems found (listed). --repair replays a pending log and rewrites a damaged spare header or region table copy.")

    @Argument var path: String
    @Flag(help: "Replay the log and fix what is safe to fix.") var repair = false

    func run() throws {
        if repair {
            do {
                for action in try VHDXImage.repair(path: path) { print("repaired: \(action)") }
            } catch {
                print("repair failed: \(error.description)")
            }
        }
        if (try? detectDiskFormat(path: path)) == .raw {
            print("\(path): raw image; it has no structure to check")
            return
        }
        let report = VHDXImage.check(path: path)
        for n in report.notes { print("note: \(n)") }
        for p in report.problems { print("problem: \(p)") }
        if report.isClean {
            print("\(path): no problems found")
        } else {
            print("\(path): \(report.problems.count) problem(s) found")
            throw ExitCode(1)
        }
    }
}

struct DiskConvert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert", abstract: "Copy a disk into a new raw or VHDX file; a differencing chain is flattened.")

    @Argument var source: String
    @Argument var destination: String
    @Option(help: "raw or vhdx (default: from the destination's extension).") var format: String?
    @Option(help: "dynamic or fixed, for a VHDX destination.") var type: String = "dynamic"
    @Option(name: .customLong("block-size"), help: "VHDX block size of the destination.") var blockSize: String?
    @Flag(help: "Replace the destination if it exists.") var force = false
    @Flag(name: .customLong("no-sync"), help: "Skip the final flush of a raw destination (like qemu-img's default cache=unsafe).") var noSync = false

    func validate() throws { _ = try blockSize.map(parseSize) }

    func run() throws {
        let fmt: DiskFormat
        if let format {
            guard let f = DiskFormat(rawValue: format) else { throw ValidationError("--format must be raw or vhdx") }
            fmt = f
        } else {
            guard let f = DiskFormat.fromExtension(destination) else { throw ValidationError("give --format: cannot tell it from '\(destination)'") }
            fmt = f
        }
        guard let t = VHDXDiskType(rawValue: type), t != .differencing else { throw ValidationError("--type must be dynamic or fixed") }
        let bs = try blockSize.map(parseSize) ?? 0
        do {
            let src = try openDisk(path: source, readOnly: true)
            let bar = ProgressBar("converting")
            var target = DiskConverter.Target(path: destination, format: fmt, type: t, blockSize: UInt32(bs), overwrite: force)
            target.sync = !noSync
            try DiskConverter.convert(source: src, to: target, progress: bar.update)
        } catch {
            throw fail(error.description)
        }
    }
}

struct DiskMerge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge", abstract: "Merge a differencing disk into its parent (Merge-VHD), then delete the child.",
        discussion: "An interrupted merge leaves a chain that still reads correctly; run the merge again.")

    @Argument var child: String
    @Flag(name: .customLong("keep-child"), help: "Keep the child file (it stays valid: its parent_linkage2 names the merged parent).") var keepChild = false

    func run() throws {
        do {
            let image = try VHDXImage(path: child)
            guard let parent = image.parent else { throw fail("\(child) is not a differencing disk") }
            let bar = ProgressBar("merging")
            try image.mergeIntoParent(progress: bar.update)
            try image.close()
            if !keepChild { unlink(child) }
            print("merged \(child) into \(parent.path)")
        } catch let e as VHDXError {
            throw fail(e.description)
        }
    }
}

struct DiskResize: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize", abstract: "Change the virtual size (Resize-VHD); shrinking needs an unallocated tail.")

    @Argument var path: String
    @Option(help: "New virtual size, e.g. 20G.") var size: String

    func validate() throws { _ = try parseSize(size) }

    func run() throws {
        let bytes = try parseSize(size)
        do {
            switch try detectDiskFormat(path: path) {
            case .raw:
                let f = try DiskFile(path: path, readOnly: false)
                try f.truncate(to: bytes)
                try f.sync()
            case .vhdx:
                let image = try VHDXImage(path: path)
                try image.resize(to: bytes)
                try image.close()
            }
        } catch {
            throw fail(error.description)
        }
    }
}

struct DiskCompact: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compact", abstract: "Drop all-zero blocks and shorten the file (Optimize-VHD).")

    @Argument var path: String

    func run() throws {
        do {
            let image = try VHDXImage(path: path)
            let r = try image.compact()
            try image.close()
            print("\(path): \(r.blocksZeroed) zero block(s) dropped, \(r.blocksMoved) block(s) moved, file \(formatBytes(r.oldFileSize)) -> \(formatBytes(r.newFileSize))")
        } catch {
            throw fail(error.description)
        }
    }
}
