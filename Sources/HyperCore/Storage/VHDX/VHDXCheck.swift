/// `hvrun disk check`: validate every structure and list what is wrong; `repair` fixes what is safe
/// to fix (log replay, a damaged header slot or region table copy).
public struct VHDXCheckReport: Sendable {
    /// Damage: anything here makes the check fail.
    public var problems: [String] = []
    /// Worth knowing but not damage (a torn spare header after a crash, unreferenced space).
    public var notes: [String] = []
    public var logPending = false
    public var isClean: Bool { problems.isEmpty }
}

extension VHDXImage {
    public static func check(path: String) -> VHDXCheckReport {
        var report = VHDXCheckReport()
        let file: DiskFile
        let size: UInt64
        do throws(VHDXError) {
            file = try DiskFile(path: path, readOnly: true)
            size = try file.size()
            let (pair, _) = try HeaderPair.read(file, fileSize: size)
            for (i, slot) in pair.slots.enumerated() {
                if case let .failure(p) = slot {
                    report.notes.append("header \(i + 1) at offset \(VHDXLayout.headerOffsets[i]) is not valid (\(p.detail)); the other header is current and this one is rewritten on the next write (or by --repair)")
                }
            }
            if !pair.current.logGuid.isZero {
                report.logPending = true
                report.notes.append("the log (LogGuid \(pair.current.logGuid)) has not been replayed; a read-write open or --repair replays it")
                _ = try LogReplay.plan(file: file, header: pair.current, fileSize: size)
            }
        } catch {
            report.problems.append(error.problemDescription)
            return report
        }

        var options = OpenOptions(readOnly: true, openParents: false)
        options.validateBAT = false
        let image: VHDXImage
        do throws(VHDXError) { image = try VHDXImage(file: file, options: options) } catch {
            report.problems.append(error.problemDescription)
            return report
        }
        for (i, copy) in image.regionCopies.enumerated() {
            switch copy {
            case let .failure(p): report.problems.append("\(path): region table \(i + 1) at offset \(VHDXLayout.regionTableOffsets[i]) is not valid: \(p.detail)")
            case let .success(t) where t != image.regions:
                report.problems.append("\(path): region table \(i + 1) at offset \(VHDXLayout.regionTableOffsets[i]) differs from the copy in use")
            default: break
            }
        }
        let h = image.headers.current
        batProblems(bat: image.bat, geometry: image.geometry, regions: image.regions, header: h,
                    fileSize: image.fileSize, path: path, stopAtFirst: false) { report.problems.append($0.problemDescription) }
        let g = image.geometry
        for b in 0..<g.payloadBlocks {
            let e = BATEntry(raw: image.bat[g.payloadIndex(b)])
            if (e.state == PayloadBlockState.notPresent.rawValue || e.state == PayloadBlockState.zero.rawValue) && e.fileOffset != 0 {
                report.notes.append("BAT entry \(g.payloadIndex(b)) (block \(b)): state \(e.state) carries file offset \(e.fileOffset), which should be 0")
            }
        }
        if image.metadata.hasParent {
            do throws(VHDXError) { _ = try VHDXImage(path: path, options: OpenOptions(readOnly: true)) } catch {
                report.problems.append(error.problemDescription)
            }
        }
        return report
    }

    /// Replays the log and rewrites damaged redundant copies (a header slot, a region table).
    /// Returns what it did.
    public static func repair(path: String) throws(VHDXError) -> [String] {
        var actions: [String] = []
        let image = try VHDXImage(path: path, options: OpenOptions(readOnly: false, openParents: false))
        if image.logWasPending { actions.append("replayed the log") }
        try image.lock.withLock { () throws(VHDXError) in
            let slotsBad = image.headers.slots.contains { if case .failure = $0 { return true } else { return false } }
            if slotsBad {
                try image.beginModification(userVisible: false)
                actions.append("rewrote both headers")
            }
            let good = image.regions.encode()
            var pages: [(fileOffset: UInt64, page: [UInt8])] = []
            for (i, copy) in image.regionCopies.enumerated() {
                if case let .success(t) = copy, t == image.regions { continue }
                for p in 0..<16 { pages.append((VHDXLayout.regionTableOffsets[i] + UInt64(p * 4096), Array(good[p * 4096..<(p + 1) * 4096]))) }
                actions.append("rewrote region table \(i + 1) through the log")
            }
            if !pages.isEmpty {
                try image.beginModification(userVisible: false)
                try image.commit(pages: pages)
            }
        }
        try image.close()
        return actions
    }
}

/// Helpers for the fuzzer: recompute the checksums of headers, region tables and log entries after
/// a mutation, so mutated images get past the CRC checks into the decoders.
public enum FuzzSupport {
    public static func fixChecksums(_ file: DiskFile) throws(VHDXError) {
        let size = try file.size()
        func fix(_ offset: UInt64, _ length: Int) throws(VHDXError) {
            guard offset + UInt64(length) <= size else { return }
            var b = try file.read(count: length, at: offset)
            b.storeLE(CRC32C.checksum(b, zeroingFieldAt: 4), at: 4)
            try file.write(Array(b[4..<8]), at: offset + 4)
        }
        for off in VHDXLayout.headerOffsets { try fix(off, VHDXLayout.headerSize) }
        for off in VHDXLayout.regionTableOffsets { try fix(off, VHDXLayout.regionTableSize) }
        // Non-wrapping log entries in the templates' 1 MiB log at 1 MiB.
        let end = min(size, 2 * MiB)
        var o = MiB
        while o + 4096 <= end {
            let e = try file.read(count: 64, at: o)
            let length = UInt64(e.u32(8))
            if e.hasSignature("loge", at: 0), length >= 4096, length % 4096 == 0, o + length <= end {
                try fix(o, Int(length))
                o += length
            } else {
                o += 4096
            }
        }
    }
}
