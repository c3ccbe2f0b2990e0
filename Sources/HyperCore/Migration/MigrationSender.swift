internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// What a migration's source asks for.
public struct MigrationOptions: Sendable {
    public enum Storage: String, Sendable { case shared, copy }
    /// The pause the guest may see at the switch-over; pre-copy goes on until the remaining
    /// dirty pages can be sent within it (at the bandwidth measured so far).
    public var maxDowntimeMilliseconds: Double = 50
    /// Abort (the VM runs on here) if the switch-over has not started after this long.
    public var timeoutSeconds: Double?
    /// `shared`: the destination opens the same disk files. `copy`: each writable disk file of
    /// the machine is copied while the guest runs and ends up identical at the destination, at
    /// the receiver's ``RestoreOptions/diskPaths``; any other file a disk needs (read-only disks,
    /// the parents of a differencing disk) goes in ``files`` or must already be there.
    public var storage: Storage = .shared
    /// Slow the vCPUs when the dirty set does not shrink (see ``VCPUThrottle``).
    public var autoConverge = true
    /// Opaque to the library, given to the receiver with the offer (hvrun: the VM's name and vm.json).
    public var metadata: JSONValue = .object([])
    /// Files sent before memory, by name (hvrun: the kernel and initrd of the VM's bundle).
    public var files: [MigrationFile] = []
    /// How long to wait for the peer at any step before giving up.
    public var peerTimeoutSeconds: Double = 30
    /// Caps the pre-copy's send rate (bytes per second; nil: as fast as the link goes). The
    /// switch-over is never capped.
    public var maxBandwidthBytesPerSecond: Double?
    /// Track dirty pages with KVM's manual protection (`KVM_CLEAR_DIRTY_LOG`, every page
    /// initially dirty) where KVM offers it: write-protection then comes a chunk at a time, just
    /// before each chunk is copied, instead of over all guest RAM when the migration starts.
    /// False: the classic log, which `KVM_GET_DIRTY_LOG` clears and re-protects as it reads it.
    public var manualDirtyLogProtection = true

    public init() {}
}

public struct MigrationFile: Sendable {
    public var name: String
    public var path: String
    public init(name: String, path: String) {
        self.name = name
        self.path = path
    }
}

/// Where a running migration is, for progress reports and `query-migrate`.
public struct MigrationProgress: Sendable {
    public enum Phase: String, Sendable { case setup, precopy, switchover, completed, failed }
    public var phase: Phase = .setup
    public var pass = 0
    public var bytesSent: UInt64 = 0
    public var pagesSent: UInt64 = 0
    /// Pages found dirty by the last dirty-log round.
    public var dirtyPages = 0
    /// Auto-converge's current vCPU throttle.
    public var throttlePercent = 0
    /// Guest memory (and disk) moved per second, a page counting 4 KiB however it was encoded:
    /// the rate that says how long a dirty set takes to send.
    public var bandwidthBytesPerSecond: Double = 0
    public var elapsedSeconds: Double = 0
}

/// What a finished migration did.
public struct MigrationReport: Sendable {
    /// Memory passes, the final (paused) one included.
    public var passes = 0
    /// How dirty pages were tracked: `manual-protect` (``MigrationOptions/manualDirtyLogProtection``
    /// where KVM offers it, with every page initially dirty where it offers that too:
    /// `manual-protect+initially-set`) or `get-and-clear` (the classic log).
    public var dirtyLog = "get-and-clear"
    /// Time spent reading the dirty log (`KVM_GET_DIRTY_LOG`, which under the classic log also
    /// write-protects what it reports) and, under manual protection, re-arming it (`KVM_CLEAR_DIRTY_LOG`).
    public var dirtyLogNanoseconds: UInt64 = 0
    public var bytesSent: UInt64 = 0
    public var pagesSent: UInt64 = 0
    public var zeroPagesSent: UInt64 = 0
    /// Pages sent as their non-zero runs (``PageEncoding/runs``).
    public var runPagesSent: UInt64 = 0
    /// Pages sent while the guest was paused.
    public var finalPages = 0
    /// Bytes of disk sent (storage copy).
    public var diskBytesSent: UInt64 = 0
    public var totalNanoseconds: UInt64 = 0
    /// From the source's pause to the destination's confirmation that the guest runs.
    public var downtimeNanoseconds: UInt64 = 0
    /// The destination's own measure: from receiving the last section to resuming the guest.
    public var destinationResumeNanoseconds: UInt64 = 0
    public var maximumThrottlePercent = 0
    public var bandwidthBytesPerSecond: Double = 0
    /// Where the downtime went, in order: `pause`, `final_pages`, `capture` (state captured and
    /// encoded), `send_state`, `prepared` (the destination checked and started the machine),
    /// `running` (go → the destination's confirmation); nanoseconds each.
    public var switchOverPhases: [(String, UInt64)] = []
    /// Where the time before the pause went, in order: `handshake` (preambles, token, offer,
    /// files), `ready` (the destination starting its VM process, if any, and building RAM), `dirty_logging`,
    /// `precopy` (every pass, acknowledged); nanoseconds each.
    public var phases: [(String, UInt64)] = []
    /// The destination's own account of its part (``MigrationReceiver/switchOverPhases``), from
    /// the source's `pass` acknowledgement to `prepared`; nanoseconds each.
    public var destinationPhases: [(String, UInt64)] = []
}

/// The source side of a live migration over any connected stream (``MigrationStream``).
///
/// 1. Handshake: preambles, token challenge-response (``MigrationToken``), the offer (the
///    machine's configuration and the caller's metadata), the files; the receiver answers
///    `ready` once it has built RAM for the guest.
/// 2. Pre-copy: dirty logging on; pass 1 sends every page the guest ever touched that is not
///    zero (and with storage copy, first every data extent of each writable disk file: see
///    ``DiskMirror``); each later pass sends what the dirty log (and ``VMMWriteLog``) reports
///    since the previous one, and the disk chunks written meanwhile, until sending it would fit
///    in ``MigrationOptions/maxDowntimeMilliseconds`` at the measured bandwidth. A dirty set
///    that does not shrink raises the vCPU throttle (auto-converge: 20 %, then +10 % a pass, up
///    to 99 %); the timeout aborts.
/// 3. Switch-over: pause; the pages dirtied since the last pass; the complete machine state
///    (``MachineSnapshot``, the save format); the disks closed (storage copy: what changed
///    since the last pass, then each file's size and time with `complete`); `complete`. The
///    receiver checks everything,
///    builds the machine paused and says `prepared`; the source sends `go`; the receiver resumes
///    the guest and says `running`.
///
/// Any failure before `go` aborts: the receiver removes what it made, and here dirty logging and
/// throttling stop and the guest resumes (if it was paused by the migration). After `go`, only an
/// explicit abort from the receiver lets the source resume; a lost connection leaves the guest
/// paused here (``MigrationError/switchOverUnknown(_:)``), never running twice.
public final class MigrationSender: @unchecked Sendable {
    public let machine: Machine
    public let stream: MigrationStream
    public let options: MigrationOptions
    private let token: String
    private let cancelled = Atomic<Bool>(false)
    private let progressLock = PthreadLock()
    private var currentProgress = MigrationProgress()
    private var started: UInt64 = 0
    private var staging: UnsafeMutableRawPointer
    /// Storage copy: the writable disks being copied (empty with shared storage).
    private var mirrors: [DiskMirror] = []
    /// The dirty-log protection in effect while logging is on (empty: classic).
    private var protection: VirtualMachine.DirtyLogProtection = []
    /// ``MigrationReport/dirtyLogNanoseconds`` so far.
    private var dirtyLogNanoseconds: UInt64 = 0
    /// Called after each pass and phase change (on the migrating thread).
    public var onProgress: (@Sendable (MigrationProgress) -> Void)?

    public init(machine: Machine, stream: MigrationStream, token: String, options: MigrationOptions = MigrationOptions()) {
        self.machine = machine
        self.stream = stream
        self.token = token
        self.options = options
        staging = UnsafeMutableRawPointer.allocate(byteCount: MigrationStream.pagesPerSection * MigrationStream.pageSize, alignment: 4096)
        stream.readTimeoutSeconds = options.peerTimeoutSeconds
    }

    deinit { staging.deallocate() }

    /// Asks a running migration to stop before the switch-over (it aborts at the next pass).
    public func cancel() { cancelled.store(true, ordering: .releasing) }

    public var progress: MigrationProgress { progressLock.withLock { currentProgress } }

    private func update(_ body: (inout MigrationProgress) -> Void) {
        let snapshot: MigrationProgress = progressLock.withLock {
            body(&currentProgress)
            currentProgress.bytesSent = stream.bytesSent
            currentProgress.elapsedSeconds = Double(monotonicNanoseconds() - started) / 1e9
            return currentProgress
        }
        onProgress?(snapshot)
    }

    /// Runs the migration to its end. On return the guest is paused here and running on the
    /// destination; the caller ends this machine's run.
    public func run() throws(MigrationError) -> MigrationReport {
        started = monotonicNanoseconds()
        var report = MigrationReport()
        var goSent = false
        var pausedByUs = false
        var logging = false
        var handedOver: [(index: Int, path: String)] = []
        let wasRunning = machine.runState == .running
        do throws(MigrationError) {
            guard machine.runState == .running || machine.runState == .paused else {
                throw .machine("the machine is \(machine.runState.rawValue); only a running or paused machine can move")
            }
            defer { mirrors.forEach { $0.changes.stop() } }
            var steps = PhaseClock(startingAt: started)
            try handshake()
            steps.lap("handshake")
            // The destination builds RAM before it says ready (the machine after).
            _ = try stream.receiveJSON(.ready)
            steps.lap("ready")
            do throws(KVMError) {
                protection = try machine.setDirtyLogging(true, manualProtection: options.manualDirtyLogProtection)
            } catch {
                throw .machine("cannot turn on dirty-page logging: \(error)")
            }
            logging = true
            report.dirtyLog = protection.contains(.initiallySet) ? "manual-protect+initially-set"
                : protection.contains(.manual) ? "manual-protect" : "get-and-clear"
            steps.lap("dirty_logging")
            update { $0.phase = .precopy }
            try precopy(&report)
            // Drain: the receiver may still be working through the last passes (socket buffers
            // hold megabytes). Waiting for its acknowledgement here, while the guest runs, keeps
            // that backlog out of the pause.
            try acknowledgedPass(report)
            steps.lap("precopy")
            report.phases = steps.laps
            // Switch-over.
            update { $0.phase = .switchover }
            let pauseStart = monotonicNanoseconds()
            var switchOver = PhaseClock(startingAt: pauseStart)
            if wasRunning {
                do throws(MachineError) { try machine.pause() } catch { throw .machine("cannot pause: \(error)") }
                pausedByUs = true
            }
            switchOver.lap("pause")
            machine.lifecycle.throttle.clear()
            let final = try dirtyPages()
            report.finalPages = final.count
            try sendPass(final, rearm: false, &report)
            report.passes += 1
            switchOver.lap("final_pages")
            var snapshot: MachineSnapshot
            do throws(SnapshotError) { snapshot = try machine.captureState() } catch {
                throw .machine("capturing the machine state: \(error)")
            }
            handedOver = try handOverDisks(&snapshot)
            if !mirrors.isEmpty {
                // The disks are closed: what their close wrote is the last of it.
                for mirror in mirrors { report.diskBytesSent += try mirror.sendChanged(stream, staging) }
            }
            switchOver.lap("disks")
            let state: [UInt8]
            do throws(StateCodingError) { state = Array(try StateCoder.encode(snapshot).rendered().utf8) } catch {
                throw .machine("encoding the machine state: \(error)")
            }
            switchOver.lap("capture")
            try stream.send(.state, state)
            var complete: [(String, JSONValue)] = [("pages", .number(Int64(report.pagesSent))), ("passes", .number(Int64(report.passes))),
                                                   ("paused", .bool(!wasRunning))]
            if options.storage == .copy { complete.append(("disks", .array(mirrors.map { $0.finalDescription() }))) }
            try stream.send(.complete, json: .object(complete))
            switchOver.lap("send_state")
            let prepared = try stream.receiveJSON(.prepared)
            switchOver.lap("prepared")
            if case let .object(phases)? = prepared["phases_ms"] {
                report.destinationPhases = phases.compactMap { name, value in value.doubleValue.map { (name, UInt64(max(0, $0) * 1e6)) } }
            }
            try stream.send(.go, [])
            goSent = true
            let running = try stream.receiveJSON(.running)
            switchOver.lap("running")
            report.switchOverPhases = switchOver.laps
            let end = monotonicNanoseconds()
            report.downtimeNanoseconds = end - pauseStart
            report.destinationResumeNanoseconds = UInt64(max(0, running["resume_ns"]?.int64Value ?? 0))
            report.totalNanoseconds = end - started
            report.bytesSent = stream.bytesSent
            report.dirtyLogNanoseconds = dirtyLogNanoseconds
            _ = try? machine.setDirtyLogging(false)
            update { $0.phase = .completed }
            return report
        } catch {
            machine.lifecycle.throttle.clear()
            if logging { _ = try? machine.setDirtyLogging(false) }
            update { $0.phase = .failed }
            if goSent {
                if case .peerAborted = error {
                    // The receiver said it will not run the guest: it is still ours.
                    if pausedByUs { try? machine.resume() }
                    throw error
                }
                throw .switchOverUnknown("\(error)")
            }
            stream.abort("\(error)")
            let reopened = takeBackDisks(handedOver)
            if pausedByUs { try? machine.resume() }
            if let reopened { throw .machine("\(error); and taking its disks back failed: \(reopened)") }
            throw error
        }
    }

    /// The source closes its writable disks (VHDX: log applied, headers clean) so that the
    /// destination opens them as a clean file — the same file with shared storage, the copy made
    /// of it with storage copy — and records their identity after the close.
    private func handOverDisks(_ snapshot: inout MachineSnapshot) throws(MigrationError) -> [(index: Int, path: String)] {
        var closed: [(index: Int, path: String)] = []
        var diskIndex = 0
        let backends = machine.blockBackends
        for (deviceIndex, device) in snapshot.configuration.virtio.enumerated() where device.disk != nil {
            defer { diskIndex += 1 }
            guard let disk = device.disk, !disk.readOnly, diskIndex < backends.count else { continue }
            do {
                try backends[diskIndex].close()
                closed.append((diskIndex, disk.path))
                snapshot.configuration.virtio[deviceIndex].disk?.identity = try DiskIdentity.current(path: disk.path)
            } catch {
                _ = takeBackDisks(closed)
                throw .machine("closing disk \(disk.path) for the destination: \(error)")
            }
        }
        return closed
    }

    /// Reopens the disks handed over (the migration failed before the destination took them).
    /// Returns what failed, if anything.
    private func takeBackDisks(_ disks: [(index: Int, path: String)]) -> String? {
        var failures: [String] = []
        for (index, path) in disks {
            do {
                let backend = try openDisk(path: path, readOnly: false)
                try machine.replaceDisk(index, with: backend)
            } catch {
                failures.append("\(path): \(error)")
            }
        }
        return failures.isEmpty ? nil : failures.joined(separator: "; ")
    }

    // MARK: Handshake

    private func handshake() throws(MigrationError) {
        try stream.sendPreamble()
        try stream.receivePreamble()
        let hello = try stream.receiveJSON(.hello)
        guard let receiverNonce = hello["nonce"]?.stringValue.flatMap(Self.unhex), receiverNonce.count == 32 else {
            throw .protocolViolation("the hello section has no 32-byte nonce")
        }
        let senderNonce = MigrationToken.randomBytes(32)
        let proof = MigrationToken.proof(token: token, role: "sender", receiverNonce: receiverNonce, senderNonce: senderNonce)
        try stream.send(.auth, json: .object([("nonce", .string(Self.hex(senderNonce))), ("proof", .string(Self.hex(proof)))]))
        let accepted: JSONValue
        do throws(MigrationError) { accepted = try stream.receiveJSON(.authOK) } catch {
            if case let .peerAborted(reason) = error { throw .authentication(reason) }
            throw error
        }
        let expected = MigrationToken.proof(token: token, role: "receiver", receiverNonce: receiverNonce, senderNonce: senderNonce)
        guard let answer = accepted["proof"]?.stringValue.flatMap(Self.unhex), MigrationToken.constantTimeEqual(answer, expected) else {
            throw .authentication("the receiver does not know the token (is something else listening at that address?)")
        }
        let configuration: JSONValue
        do throws(SnapshotError) {
            let saved = try machine.snapshotConfiguration()
            do throws(StateCodingError) { configuration = try StateCoder.encode(saved) } catch {
                throw SnapshotError.machine("\(error)")
            }
        } catch {
            throw .machine("describing the machine: \(error)")
        }
        var files: [JSONValue] = []
        var sizes: [UInt64] = []
        for file in options.files {
            var info = stat()
            guard stat(file.path, &info) == 0 else { throw .io(operation: "stat \(file.path)", errno: errno) }
            sizes.append(UInt64(info.st_size))
            let mtime = Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec)
            files.append(.object([("name", .string(file.name)), ("size", .number(Int64(info.st_size))), ("mtime_ns", .number(mtime))]))
        }
        // What the guest sees of each disk: the destination builds the machine before it may open them.
        let geometry: [JSONValue] = machine.blockBackends.map { disk in
            .object([("virtual_size", .number(Int64(disk.virtualSize))), ("logical_sector", .number(Int64(disk.logicalSectorSize))),
                     ("physical_sector", .number(Int64(disk.physicalSectorSize))), ("read_only", .bool(disk.isReadOnly))])
        }
        var offer: [(String, JSONValue)] = [("configuration", configuration), ("metadata", options.metadata),
                                            ("storage", .string(options.storage.rawValue)), ("files", .array(files)),
                                            ("disk_geometry", .array(geometry))]
        if options.storage == .copy {
            // Tracking starts before anything is read, so no write is missed.
            mirrors = try DiskMirror.start(machine)
            offer.append(("disks", .array(mirrors.map { .object([("size", .number(Int64($0.fileSize)))]) })))
        }
        try stream.send(.offer, json: .object(offer))
        for (index, file) in options.files.enumerated() {
            try sendFile(index: index, path: file.path, size: sizes[index])
        }
    }

    private func sendFile(index: Int, path: String, size: UInt64) throws(MigrationError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io(operation: "open \(path)", errno: errno) }
        defer { close(fd) }
        var offset: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: MigrationStream.chunkSize)
        repeat {
            let want = Int(min(UInt64(MigrationStream.chunkSize), size - offset))
            var done = 0
            while done < want {
                let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, want - done, off_t(offset) + off_t(done)) }
                if got < 0, errno == EINTR { continue }
                guard got > 0 else { throw .io(operation: "read \(path)", errno: got < 0 ? errno : EIO) }
                done += got
            }
            var payload: [UInt8] = []
            stream.append(&payload, UInt32(index))
            stream.append(&payload, UInt32(0))
            stream.append(&payload, offset)
            payload += buffer[0..<want]
            try stream.send(.file, payload)
            offset += UInt64(want)
        } while offset < size
    }

    // MARK: Pre-copy

    private func checkDeadline() throws(MigrationError) {
        if cancelled.load(ordering: .acquiring) { throw .cancelled("cancelled before the switch-over") }
        if let timeout = options.timeoutSeconds, Double(monotonicNanoseconds() - started) / 1e9 > timeout {
            throw .cancelled("the dirty set did not fit the \(Int(options.maxDowntimeMilliseconds)) ms downtime budget within --timeout \(timeout) s")
        }
        if machine.exit != nil { throw .machine("the guest's run ended during the migration (\(machine.exit!))") }
    }

    private func precopy(_ report: inout MigrationReport) throws(MigrationError) {
        var bandwidth: Double = 1e9   // bytes/s, until measured
        var passStart = monotonicNanoseconds()
        var before = moved(report)
        for mirror in mirrors { report.diskBytesSent += try mirror.sendAll(stream, staging) }
        try sendPass(nil, rearm: true, &report)
        report.passes = 1
        try acknowledgedPass(report)
        bandwidth = measure(bytes: moved(report) - before, since: passStart, previous: bandwidth)
        report.bandwidthBytesPerSecond = bandwidth
        var previousDirty = Int.max
        var throttle = 0
        update { $0.pass = 1; $0.bandwidthBytesPerSecond = bandwidth }
        while true {
            try checkDeadline()
            let dirty = try dirtyPages()
            let diskBytes = mirrors.reduce(UInt64(0)) { $0 + $1.pendingBytes }
            let estimate = (Double(dirty.count * MigrationStream.pageSize) + Double(diskBytes)) / bandwidth * 1000
            update { $0.dirtyPages = dirty.count }
            if estimate <= options.maxDowntimeMilliseconds {
                // Sending this set while the guest runs takes about the budget; what it dirties
                // meanwhile is what the pause must carry.
                try sendPass(dirty, rearm: true, &report)
                for mirror in mirrors { report.diskBytesSent += try mirror.sendChanged(stream, staging) }
                report.passes += 1
                return
            }
            if options.autoConverge, report.passes >= 2, Double(dirty.count) > 0.7 * Double(previousDirty) {
                throttle = throttle == 0 ? 20 : min(99, throttle + 10)
                machine.lifecycle.throttle.set(throttle, lifecycle: machine.lifecycle)
                report.maximumThrottlePercent = max(report.maximumThrottlePercent, throttle)
            }
            previousDirty = dirty.count
            passStart = monotonicNanoseconds()
            before = moved(report)
            try sendPass(dirty, rearm: true, &report)
            for mirror in mirrors { report.diskBytesSent += try mirror.sendChanged(stream, staging) }
            report.passes += 1
            try acknowledgedPass(report)
            bandwidth = measure(bytes: moved(report) - before, since: passStart, previous: bandwidth)
            report.bandwidthBytesPerSecond = bandwidth
            let pass = report.passes
            update { $0.pass = pass; $0.throttlePercent = throttle; $0.bandwidthBytesPerSecond = bandwidth; $0.pagesSent = report.pagesSent }
        }
    }

    /// Ends a pass: waits until the receiver has placed everything sent so far. A pass's rate
    /// is then what reached the destination's RAM, not what fitted into socket buffers (which
    /// hold tens of thousands of pages sent as runs), and the pause never starts with a backlog.
    private func acknowledgedPass(_ report: MigrationReport) throws(MigrationError) {
        try stream.send(.pass, json: .object([("passes", .number(Int64(report.passes)))]))
        _ = try stream.receiveJSON(.pass)
    }

    /// Guest bytes moved so far: pages at 4 KiB each, however they were encoded, and disk bytes.
    /// Rates come from this, not from the stream's bytes, since what matters is how long a
    /// dirty set of N pages takes.
    private func moved(_ report: MigrationReport) -> UInt64 {
        report.pagesSent * UInt64(MigrationStream.pageSize) + report.diskBytesSent
    }

    /// Bandwidth from a pass big enough to say something (≥ 4 MiB), else the previous estimate.
    private func measure(bytes: UInt64, since start: UInt64, previous: Double) -> Double {
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        guard bytes >= 4 << 20, seconds > 0 else { return previous }
        return Double(bytes) / seconds
    }

    /// Dirty pages, one bitmap per memory region (bit i: the region's page i).
    private struct DirtyPages {
        var maps: [[UInt64]]
        var count: Int
    }

    /// Reads the dirty log (and the VMM's own writes). Under manual protection this re-arms
    /// nothing: ``sendPass(_:rearm:_:)`` does, a chunk at a time.
    private func dirtyPages() throws(MigrationError) -> DirtyPages {
        let start = monotonicNanoseconds()
        defer { dirtyLogNanoseconds += monotonicNanoseconds() - start }
        let maps: [[UInt64]]
        do throws(KVMError) { maps = try machine.takeDirtyPages() } catch { throw .machine("reading the dirty log: \(error)") }
        return DirtyPages(maps: maps, count: maps.reduce(0) { $0 + $1.reduce(0) { $0 + $1.nonzeroBitCount } })
    }

    /// Pages re-armed together under manual protection (16 MiB): small enough that the guest's
    /// write-protection stalls stay short and a page is read soon after its re-arm, large enough
    /// that the ioctls cost nothing next to the copying.
    static let rearmChunkPages = 4096
    private static let everyPage = [UInt64](repeating: ~0, count: rearmChunkPages / 64)

    /// Sends one pass, region by region, a chunk of ``rearmChunkPages`` at a time.
    ///
    /// `dirty` nil is the first pass: every page the guest has touched (present or swapped in this
    /// process, per `/proc/self/pagemap`) and not zero; pages never touched are holes and stay
    /// holes. Otherwise the pass sends what `dirty` names. With `rearm` under manual protection,
    /// each chunk's bits are cleared in KVM's log before any of its pages is read, so a write
    /// that lands after the read is logged for the next pass; the first pass re-arms whole chunks
    /// (every page starts dirty) and reads the pagemap only after that, so a page first touched
    /// meanwhile is either seen here or logged. The paused final pass needs no re-arm.
    private func sendPass(_ dirty: DirtyPages?, rearm: Bool, _ report: inout MigrationReport) throws(MigrationError) {
        let pageSize = MigrationStream.pageSize
        let pagemap = dirty == nil ? open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC) : -1
        defer { if pagemap >= 0 { close(pagemap) } }
        var entries = [UInt64](repeating: 0, count: dirty == nil ? Self.rearmChunkPages : 0)   // pagemap, first pass only
        var pending: [UInt64] = []
        pending.reserveCapacity(2 * Self.rearmChunkPages)
        let rearmDirty = rearm && protection.contains(.manual)
        let rearmAll = rearm && protection.contains(.initiallySet)
        for (index, region) in machine.memory.regions.enumerated() {
            let regionPages = Int(region.size) / pageSize
            var first = 0
            while first < regionPages {
                let count = min(Self.rearmChunkPages, regionPages - first)
                defer { first += count }
                if let dirty {
                    let map = dirty.maps[index]
                    let words = first / 64..<min(map.count, (first + count + 63) / 64)
                    guard map[words].contains(where: { $0 != 0 }) else { continue }
                    if rearmDirty {
                        try rearmChunk(region: index, first: first, count: count, bitmap: map, word: first / 64)
                    }
                    for wordIndex in words {
                        var bits = map[wordIndex]
                        while bits != 0 {
                            let bit = bits.trailingZeroBitCount
                            bits &= bits - 1
                            pending.append(region.guestAddress + UInt64((wordIndex * 64 + bit) * pageSize))
                        }
                    }
                } else {
                    if rearmAll {
                        try rearmChunk(region: index, first: first, count: count, bitmap: Self.everyPage, word: 0)
                    }
                    var known = false
                    if pagemap >= 0 {
                        let offset = off_t((Int(region.hostAddress) / pageSize + first) * 8)
                        known = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress, count * 8, offset) } == count * 8
                    }
                    for i in 0..<count where !known || entries[i] & (3 << 62) != 0 {
                        pending.append(region.guestAddress + UInt64((first + i) * pageSize))
                    }
                }
                if pending.count >= Self.rearmChunkPages {
                    try sendPages(pending, skipZero: dirty == nil, &report)
                    pending.removeAll(keepingCapacity: true)
                }
            }
        }
        if !pending.isEmpty { try sendPages(pending, skipZero: dirty == nil, &report) }
    }

    /// Re-arms `count` pages of a region from its page `first`, those whose bits are set in
    /// `bitmap` from its word `word`.
    private func rearmChunk(region: Int, first: Int, count: Int, bitmap: [UInt64], word: Int) throws(MigrationError) {
        let start = monotonicNanoseconds()
        defer { dirtyLogNanoseconds += monotonicNanoseconds() - start }
        let failure: KVMError? = bitmap.withUnsafeBytes { raw in
            do throws(KVMError) {
                try machine.rearmDirtyPages(region: region, firstPage: first, pages: count, bitmap: raw.baseAddress! + word * 8)
            } catch { return error }
            return nil
        }
        if let failure { throw .machine("re-arming the dirty log: \(failure)") }
    }

    /// Sends pages in sections of up to 256, each in one of ``PageEncoding``'s forms, encoded or
    /// copied into the staging buffer (the guest may write it meanwhile; the checksum must cover
    /// what is sent): zero pages are skipped (`skipZero`: the destination's RAM is
    /// zero there) or sent as an entry without data, mostly-zero pages as their runs, the rest whole.
    private func sendPages(_ pages: [UInt64], skipZero: Bool, _ report: inout MigrationReport) throws(MigrationError) {
        let memory = machine.memory
        var index = 0
        while index < pages.count {
            // First word: count (u32) and reserved (u32); then per page its address and a word of
            // encoding (u32) and payload length (u32).
            var entries: [UInt64] = [0]
            var used = 0
            while index < pages.count, entries.count / 2 < MigrationStream.pagesPerSection {
                let address = pages[index]
                index += 1
                guard let source = memory.pointer(at: address, count: MigrationStream.pageSize) else { continue }
                let slot = staging + used
                // Zero pages and runs are read straight from guest RAM: whatever a concurrent
                // guest write leaves them describing is a page the dirty log sends again, and
                // the checksum covers the encoded bytes here, not RAM. A whole page is copied
                // first, so that the checksum and the wire see the same bytes.
                let encoding: PageEncoding
                var length = 0
                if MemoryFile.isZero(UnsafeRawPointer(source)) {
                    if skipZero { continue }
                    encoding = .zero
                    report.zeroPagesSent += 1
                } else if let runs = PageEncoding.encodeRuns(UnsafeRawPointer(source), into: slot) {
                    encoding = .runs
                    length = runs
                    report.runPagesSent += 1
                } else {
                    slot.copyMemory(from: source, byteCount: MigrationStream.pageSize)
                    encoding = .raw
                    length = MigrationStream.pageSize
                }
                used += length
                entries.append(address.littleEndian)
                entries.append((UInt64(encoding.rawValue) | UInt64(length) << 32).littleEndian)
            }
            guard entries.count > 1 else { continue }
            let count = entries.count / 2
            entries[0] = UInt64(count).littleEndian
            report.pagesSent += UInt64(count)
            let failure: MigrationError? = entries.withUnsafeBytes { raw in
                do throws(MigrationError) {
                    try stream.send(.memory, buffers: [(raw.baseAddress!, raw.count), (UnsafeRawPointer(staging), used)])
                } catch { return error }
                return nil
            }
            if let failure { throw failure }
            try limitRate()
        }
    }

    /// Sleeps as long as the pre-copy is ahead of ``MigrationOptions/maxBandwidthBytesPerSecond``.
    private func limitRate() throws(MigrationError) {
        guard let limit = options.maxBandwidthBytesPerSecond, !machine.isPausedForMigration else { return }
        let due = Double(stream.bytesSent) / limit
        let elapsed = Double(monotonicNanoseconds() - started) / 1e9
        if due > elapsed { usleep(UInt32(min(1.0, due - elapsed) * 1e6)) }
    }

    static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        return String(decoding: bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] }, as: UTF8.self)
    }

    static func unhex(_ text: String) -> [UInt8]? {
        let bytes = Array(text.utf8)
        guard bytes.count % 2 == 0 else { return nil }
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            default: nil
            }
        }
        var result: [UInt8] = []
        for i in stride(from: 0, to: bytes.count, by: 2) {
            guard let high = value(bytes[i]), let low = value(bytes[i + 1]) else { return nil }
            result.append(high << 4 | low)
        }
        return result
    }
}
