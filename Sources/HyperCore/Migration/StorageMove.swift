#if canImport(Glibc)
internal import Glibc
#endif

/// One writable disk of a running machine, to be moved to another file on this host.
public struct DiskMove: Sendable {
    /// The block device (configuration order, as ``Machine/blockBackends``).
    public var index: Int
    /// The new file; it must not exist.
    public var destination: String
    /// For a differencing VHDX: the copy of its parent the moved file must point at (nil: its
    /// parent stays where it is).
    public var parent: String?

    public init(index: Int, destination: String, parent: String? = nil) {
        self.index = index
        self.destination = destination
        self.parent = parent
    }
}

/// What a storage move did.
public struct StorageMoveReport: Sendable {
    public var bytesCopied: UInt64 = 0
    /// Copy passes while the guest ran (the first whole-file pass included).
    public var rounds = 0
    /// How long the guest's disk I/O waited at the switch (its vCPUs never stopped).
    public var stallNanoseconds: UInt64 = 0
    public var totalNanoseconds: UInt64 = 0
}

extension Machine {
    /// Storage migration on one host (Hyper-V's Move-VMStorage): each disk in `moves` is copied
    /// to its new file while the guest keeps running and writing it — the whole file, then
    /// what changed (``FileChanges``), pass after pass until the rest fits in
    /// `maxStallMilliseconds` at the measured copy rate — and then switched: the disks' I/O waits
    /// (the vCPUs run on), each old file is closed, the last changes are copied, the new files
    /// are made durable, re-pointed at their parents' copies, opened, and `commit` runs (the
    /// owner records the new paths) before any request reaches them.
    ///
    /// On failure — the copy, the switch or `commit` — every disk keeps (or gets back) its old
    /// file and the error is thrown; the caller removes the new files.
    public func moveDisks(_ moves: [DiskMove], maxStallMilliseconds: Double = 50,
                          commit: () throws(MigrationError) -> Void) throws(MigrationError) -> StorageMoveReport {
        let started = monotonicNanoseconds()
        var report = StorageMoveReport()
        let backends = blockBackends
        var mirrors: [DiskMirror] = []
        var targets: [DiskMirrorTarget] = []
        defer { mirrors.forEach { $0.changes.stop() } }
        for move in moves {
            guard backends.indices.contains(move.index), !backends[move.index].isReadOnly else {
                throw .usage("disk \(move.index) is not a writable disk of this machine")
            }
            let mirror = try DiskMirror(index: mirrors.count, backend: backends[move.index])
            mirror.shouldStop = { [weak self] in self?.exit != nil }
            mirror.changes.start()
            mirrors.append(mirror)
            targets.append(try DiskMirrorTarget(paths: [move.destination], exclusive: true))
        }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: DiskMirror.pieceSize, alignment: 4096)
        defer { buffer.deallocate() }

        // Pre-copy, as for memory: the whole files, then what changed, until the rest is small.
        var rate: Double = 200e6   // bytes/s, until measured
        var passStart = monotonicNanoseconds()
        for (mirror, target) in zip(mirrors, targets) {
            report.bytesCopied += try mirror.copyAll(to: FileSink(target: target, disk: 0), buffer)
        }
        report.rounds = 1
        while report.rounds < 30 {
            let elapsed = Double(monotonicNanoseconds() - passStart) / 1e9
            if elapsed > 0.001, report.bytesCopied > 1 << 20 { rate = max(rate / 4, Double(report.bytesCopied) / elapsed) }
            let pending = mirrors.reduce(UInt64(0)) { $0 + $1.pendingBytes }
            if Double(pending) / rate * 1000 <= maxStallMilliseconds / 2 { break }
            passStart = monotonicNanoseconds()
            for (mirror, target) in zip(mirrors, targets) {
                report.bytesCopied += try mirror.copyChanged(to: FileSink(target: target, disk: 0), buffer)
            }
            report.rounds += 1
        }
        for target in targets { try target.sync(0) }

        // The switch, disk inside disk: each one's I/O waits until the innermost has committed.
        var stallStart: UInt64 = 0
        func switchOver(_ position: Int) throws(MigrationError) {
            if position == moves.count {
                try commit()
                return
            }
            let move = moves[position], mirror = mirrors[position], target = targets[position]
            var failure: MigrationError?
            do throws(MachineError) {
                try exchangeDisk(move.index) { old throws(MachineError) -> any BlockBackend in
                    if position == 0 { stallStart = monotonicNanoseconds() }
                    do throws(MigrationError) {
                        do { try old.close() } catch { throw .machine("closing \(mirror.path): \(error)") }
                        report.bytesCopied += try mirror.copyChanged(to: FileSink(target: target, disk: 0), buffer)
                        let (size, time) = mirror.finalSizeAndTime()
                        try target.finish(0, size: size, mtimeNanoseconds: time)
                        if let parent = move.parent {
                            do throws(VHDXError) { try VHDXImage.reparent(childPath: move.destination, to: parent) } catch {
                                throw .machine("re-pointing \(move.destination) at \(parent): \(error)")
                            }
                        }
                        let fresh: any BlockBackend
                        do throws(VHDXError) { fresh = try openDisk(path: move.destination, readOnly: false) } catch {
                            throw .machine("opening the moved disk \(move.destination): \(error)")
                        }
                        do throws(MigrationError) { try switchOver(position + 1) } catch {
                            try? fresh.close()
                            throw error
                        }
                        return fresh
                    } catch {
                        // The guest keeps its old file: reopened as it was closed, clean.
                        failure = error
                        do throws(VHDXError) { return try openDisk(path: mirror.path, readOnly: false) } catch {
                            failure = .machine("\(failure!); and reopening \(mirror.path) failed: \(error) (the guest's disk I/O fails until the VM restarts)")
                            throw MachineError.invalidConfiguration("\(failure!)")
                        }
                    }
                }
            } catch {
                if failure == nil { failure = .machine("switching disk \(move.index): \(error)") }
            }
            if let failure { throw failure }
        }
        try switchOver(0)
        let end = monotonicNanoseconds()
        report.stallNanoseconds = stallStart > 0 ? end - stallStart : 0
        report.totalNanoseconds = end - started
        return report
    }
}
