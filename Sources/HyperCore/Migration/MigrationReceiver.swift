internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// What a sender offers: the machine to build, its storage mode, the caller's metadata and the
/// files that follow.
public struct MigrationOffer: Sendable {
    public var configuration: SnapshotConfiguration
    public var metadata: JSONValue
    public var storage: MigrationOptions.Storage
    public var files: [(name: String, size: UInt64)]
    /// Each file's modification time at the source (nanoseconds since the epoch), when given.
    public var fileTimes: [Int64?]
    /// Storage copy: the sizes of the writable disk files that are copied, in configuration order.
    public var copiedDiskSizes: [UInt64]
    /// What the guest sees of each disk (configuration order), so the machine can be built before
    /// the disks may be opened.
    var diskGeometry: [PlaceholderDisk] = []
    /// The offer as it came (what ``init(json:)`` reads back).
    public var json: JSONValue

    /// Decodes and checks an offer section's JSON.
    public init(json offer: JSONValue) throws(MigrationError) {
        guard let configurationValue = offer["configuration"] else { throw .protocolViolation("the offer has no configuration") }
        do throws(StateCodingError) { configuration = try StateCoder.decode(SnapshotConfiguration.self, from: configurationValue) } catch {
            throw .protocolViolation("the offer's configuration: \(error)")
        }
        guard configuration.memorySize >= 1 << 20, configuration.memorySize % 4096 == 0, configuration.memorySize <= GuestLayout.maximumRAM,
              (1...MachineConfiguration.maximumCPUs).contains(configuration.cpuCount) else {
            throw .protocolViolation("the offer asks for \(configuration.memorySize) bytes of RAM and \(configuration.cpuCount) vCPUs")
        }
        guard let mode = offer["storage"]?.stringValue.flatMap(MigrationOptions.Storage.init(rawValue:)) else {
            throw .protocolViolation("the offer has no storage mode")
        }
        storage = mode
        var list: [(String, UInt64)] = []
        var times: [Int64?] = []
        if case let .array(entries)? = offer["files"] {
            for entry in entries {
                guard let name = entry["name"]?.stringValue, let size = entry["size"]?.int64Value, size >= 0, size <= 1 << 42 else {
                    throw .protocolViolation("a file entry of the offer has no name or a bad size")
                }
                list.append((name, UInt64(size)))
                times.append(entry["mtime_ns"]?.int64Value)
            }
        }
        files = list
        fileTimes = times
        var sizes: [UInt64] = []
        if case let .array(entries)? = offer["disks"] {
            for entry in entries {
                guard let size = entry["size"]?.int64Value, size >= 0 else { throw .protocolViolation("a disk entry of the offer has no size") }
                sizes.append(UInt64(size))
            }
        }
        let writable = configuration.virtio.compactMap(\.disk).filter { !$0.readOnly }.count
        guard mode == .shared ? sizes.isEmpty : sizes.count == writable else {
            throw .protocolViolation("the offer copies \(sizes.count) disks with storage \(mode.rawValue); the machine has \(writable) writable disks")
        }
        copiedDiskSizes = sizes
        let diskCount = configuration.virtio.compactMap(\.disk).count
        if diskCount > 0 {
            guard case let .array(entries)? = offer["disk_geometry"] else { throw .protocolViolation("the offer has no disk_geometry") }
            var disks: [PlaceholderDisk] = []
            for entry in entries {
                guard let size = entry["virtual_size"]?.int64Value, size > 0,
                      let logical = entry["logical_sector"]?.int64Value, [512, 4096].contains(logical),
                      let physical = entry["physical_sector"]?.int64Value, [512, 4096].contains(physical),
                      case let .bool(readOnly)? = entry["read_only"] else {
                    throw .protocolViolation("a disk geometry entry of the offer is malformed: \(entry.rendered())")
                }
                disks.append(PlaceholderDisk(virtualSize: UInt64(size), logicalSectorSize: UInt32(logical),
                                             physicalSectorSize: UInt32(physical), isReadOnly: readOnly))
            }
            guard disks.count == diskCount else {
                throw .protocolViolation("the offer describes \(disks.count) disks; the machine has \(diskCount)")
            }
            diskGeometry = disks
        }
        metadata = offer["metadata"] ?? .null
        json = offer
    }
}

/// The destination side of a live migration (see ``MigrationSender`` for the protocol). In steps,
/// so that a caller can put the VM somewhere between them (hvrun: the handshake in `vm receive`,
/// the rest in the VM's own process):
///
/// 1. ``authenticate(token:)`` — preambles and the challenge-response; a wrong token ends it here.
/// 2. ``receiveOffer()`` and ``receiveFiles(_:into:)``.
/// 3. ``receiveMachine(_:options:)`` — builds RAM, says `ready`, takes the memory passes (with
///    storage copy, the writable disks' files too, written to ``RestoreOptions/diskPaths``) and
///    the state, checks it all, and returns the machine, not yet started. The caller removes
///    the files it named if this throws.
/// 4. ``switchOver(_:)`` — starts it paused, says `prepared`, waits for `go`, resumes, says `running`.
///
/// Nothing received is trusted: every section is checksummed, every page address checked to be
/// guest RAM, the state decoded and matched against the offer and the machine built from it,
/// before any vCPU runs. Any failure throws; the caller discards everything.
public final class MigrationReceiver: @unchecked Sendable {
    public let stream: MigrationStream
    public private(set) var pagesReceived: UInt64 = 0
    /// The guest was paused on the source when it moved: it stays paused here (``switchOver(_:commit:)``).
    public private(set) var arrivesPaused = false
    /// Storage copy: bytes of disk data received.
    public private(set) var diskBytesReceived: UInt64 = 0
    /// Storage copy: runs once every copied disk file is complete and durable, before the disks
    /// are checked and opened (hvrun re-points a copied differencing disk at its copied parent
    /// here).
    public var disksCopied: (() throws(MigrationError) -> Void)?

    /// Where the destination's part of the downtime went (nanoseconds each, in order): reading
    /// the final pages and the state (`receive`), decoding it (`decode_state`), completing and
    /// opening the disks (`disks`), checking the state against the machine (`check_state`),
    /// putting it into the vCPUs and devices (`start_paused`). Sent to the source with `prepared`.
    public var switchOverPhases: [(String, UInt64)] { switchOver.laps }
    private var switchOver = PhaseClock()

    /// Where a page's runs are read before they are checked and spread over the page.
    private let runScratch = UnsafeMutableRawPointer.allocate(byteCount: PageEncoding.maximumRunsSize, alignment: 8)

    public init(stream: MigrationStream) { self.stream = stream }

    deinit { runScratch.deallocate() }

    public func authenticate(token: String) throws(MigrationError) {
        try stream.sendPreamble()
        do throws(MigrationError) { try stream.receivePreamble() } catch {
            stream.abort("\(error)")
            throw error
        }
        let nonce = MigrationToken.randomBytes(32)
        try stream.send(.hello, json: .object([("nonce", .string(MigrationSender.hex(nonce))), ("version", .number(Int64(MigrationStream.version)))]))
        let auth = try stream.receiveJSON(.auth)
        guard let senderNonce = auth["nonce"]?.stringValue.flatMap(MigrationSender.unhex), senderNonce.count == 32,
              let proof = auth["proof"]?.stringValue.flatMap(MigrationSender.unhex) else {
            stream.abort("malformed auth section")
            throw .protocolViolation("the auth section has no nonce and proof")
        }
        let expected = MigrationToken.proof(token: token, role: "sender", receiverNonce: nonce, senderNonce: senderNonce)
        guard MigrationToken.constantTimeEqual(proof, expected) else {
            stream.abort("wrong token: the receiver did not accept the sender's proof")
            throw .authentication("the sender does not know the token")
        }
        let answer = MigrationToken.proof(token: token, role: "receiver", receiverNonce: nonce, senderNonce: senderNonce)
        try stream.send(.authOK, json: .object([("proof", .string(MigrationSender.hex(answer)))]))
    }

    public func receiveOffer() throws(MigrationError) -> MigrationOffer {
        try MigrationOffer(json: try stream.receiveJSON(.offer))
    }

    /// Receives the offer's files in order; `write(index, offset, bytes)` stores each piece.
    public func receiveFiles(_ offer: MigrationOffer, into write: (Int, UInt64, ArraySlice<UInt8>) throws(MigrationError) -> Void) throws(MigrationError) {
        for (index, file) in offer.files.enumerated() {
            var offset: UInt64 = 0
            repeat {
                let payload = try stream.receive(.file)
                guard payload.count >= 16 else { throw .protocolViolation("a file section of \(payload.count) bytes") }
                let fileIndex = Int(stream.load(UInt32.self, payload, 0))
                let at = stream.load(UInt64.self, payload, 8)
                let data = payload[16...]
                guard fileIndex == index, at == offset, offset + UInt64(data.count) <= file.size, !data.isEmpty || file.size == 0 else {
                    throw .protocolViolation("file section for file \(fileIndex) at \(at); expected file \(index) at \(offset)")
                }
                try write(index, offset, data)
                offset += UInt64(data.count)
            } while offset < file.size
        }
    }

    /// Builds the machine's RAM, says `ready`, builds the machine, receives pre-copy and the switch-over's sections,
    /// and returns the machine with its state in place (not started). Disks are opened (from
    /// `options.diskPaths`) only once the state has arrived: the source has closed them then.
    public func receiveMachine(_ offer: MigrationOffer, options: RestoreOptions) throws(MigrationError) -> Machine {
        let saved = offer.configuration
        let memory: GuestMemory
        do throws(GuestMemoryError) { memory = try GuestMemory(size: saved.memorySize) } catch { throw .machine("\(error)") }
        // `ready` goes now, not after the build below: the sender turns dirty logging on and
        // starts its first pass meanwhile, which socket buffers take until this thread reads.
        try stream.send(.ready, json: .object([]))
        // The machine (KVM VM, irqchip, devices) is built now, off the downtime; its disks are
        // placeholders until the source has closed them (the state has arrived), then the real
        // files are checked and put in their place.
        let machine = try assemble(offer, placeholders: offer.diskGeometry, memory: memory, options: options)
        var copies: DiskMirrorTarget?
        if offer.storage == .copy {
            let disks = saved.virtio.compactMap(\.disk)
            var paths: [String] = []
            for (index, disk) in disks.enumerated() where !disk.readOnly {
                guard index < options.diskPaths.count, let path = options.diskPaths[index] else {
                    throw .usage("storage copy needs a destination path for disk \(index) (\(disk.path)) in RestoreOptions.diskPaths")
                }
                paths.append(path)
            }
            copies = try DiskMirrorTarget(paths: paths)
        }
        while true {
            let (type, length, crc) = try stream.receiveHeader()
            switch type {
            case .memory:
                try receivePages(length: length, crc: crc, into: memory)
            case .pass:
                // The sender is about to pause the guest: everything before this is in place.
                let payload = try stream.read(length)
                guard MigrationStream.crc(payload) == crc else { throw .protocolViolation("pass section payload checksum mismatch") }
                try stream.send(.pass, json: .object([("pages", .number(Int64(pagesReceived)))]))
                // The guest pauses at the source about now: the downtime's phases start here.
                switchOver.restart()
            case .disk:
                guard let copies else { throw .protocolViolation("a disk section with shared storage") }
                guard length <= 24 + MigrationStream.chunkSize else { throw .protocolViolation("a disk section of \(length) bytes") }
                let payload = try stream.read(length)
                guard MigrationStream.crc(payload) == crc else { throw .protocolViolation("disk section payload checksum mismatch") }
                try copies.apply(payload, stream)
                diskBytesReceived = copies.bytesReceived
            case .state:
                let payload = try stream.read(length)
                guard MigrationStream.crc(payload) == crc else { throw .protocolViolation("state section payload checksum mismatch") }
                switchOver.lap("receive")
                let snapshot: MachineSnapshot
                do {
                    snapshot = try StateCoder.decode(MachineSnapshot.self, from: try JSONValue.parse(payload))
                } catch {
                    throw .protocolViolation("the machine state does not decode: \(error)")
                }
                guard Self.sameMachine(snapshot.configuration, saved) else {
                    throw .protocolViolation("the machine state describes another machine than the offer")
                }
                switchOver.lap("decode_state")
                let complete = try stream.receiveJSON(.complete)
                guard complete["pages"]?.int64Value == Int64(pagesReceived) else {
                    throw .protocolViolation("the sender sent \(complete["pages"]?.rendered() ?? "?") pages, \(pagesReceived) arrived")
                }
                arrivesPaused = complete["paused"] == .bool(true)
                if let copies {
                    try copies.finish(complete["disks"])
                    try disksCopied?()
                }
                let disks = try openCheckedDisks(snapshot, options: options)
                for (index, disk) in disks.enumerated() {
                    do throws(MachineError) { try machine.replaceDisk(index, with: disk) } catch {
                        Self.drop(disks)
                        throw .machine("disk \(index): \(error)")
                    }
                }
                switchOver.lap("disks")
                try place(snapshot, into: machine, memory: memory)
                switchOver.lap("check_state")
                return machine
            case .abort:
                let payload = try stream.read(length)
                throw .peerAborted(String(decoding: payload, as: UTF8.self))
            default:
                throw .protocolViolation("unexpected \(type) section during pre-copy")
            }
        }
    }

    func receivePages(length: Int, crc expected: UInt32, into memory: GuestMemory) throws(MigrationError) {
        guard length >= 8 else { throw .protocolViolation("a memory section of \(length) bytes") }
        let head = try stream.read(8)
        let count = Int(stream.load(UInt32.self, head, 0))
        guard count >= 1, count <= MigrationStream.pagesPerSection, stream.load(UInt32.self, head, 4) == 0 else {
            throw .protocolViolation("a memory section announcing \(count) pages")
        }
        let table = try stream.read(16 * count)
        var crc = MigrationStream.crc(table, MigrationStream.crc(head))
        var targets: [(address: UInt64, pointer: UnsafeMutableRawPointer, encoding: PageEncoding, size: Int)] = []
        var payload = 0
        for i in 0..<count {
            let entry = stream.load(UInt64.self, table, 16 * i)
            let form = stream.load(UInt32.self, table, 16 * i + 8)
            let size = Int(stream.load(UInt32.self, table, 16 * i + 12))
            guard entry & 0xFFF == 0, let pointer = memory.pointer(at: entry, count: MigrationStream.pageSize) else {
                throw .protocolViolation("a page entry 0x\(String(entry, radix: 16)) that is not guest RAM")
            }
            let encoding = PageEncoding(rawValue: form)
            let sizeFits = switch encoding {
            case .raw: size == MigrationStream.pageSize
            case .zero: size == 0
            case .runs: size > 0 && size <= PageEncoding.maximumRunsSize
            case nil: false
            }
            guard let encoding, sizeFits else {
                throw .protocolViolation("page 0x\(String(entry, radix: 16)) in encoding \(form) with \(size) bytes")
            }
            payload += size
            targets.append((entry, pointer, encoding, size))
        }
        guard length == 8 + 16 * count + payload else {
            throw .protocolViolation("a memory section of \(length) bytes for \(count) entries with \(payload) bytes of pages")
        }
        populateRuns(of: targets.lazy.filter { $0.encoding != .zero }.map(\.address), in: memory)
        // The guest is not running here: pages go straight into its RAM, and a checksum mismatch
        // fails the whole migration before any vCPU runs.
        for (address, pointer, encoding, size) in targets {
            switch encoding {
            case .zero:
                pointer.initializeMemory(as: UInt8.self, repeating: 0, count: MigrationStream.pageSize)
            case .raw:
                try stream.read(into: pointer, size)
                crc = MigrationStream.crc(pointer, size, crc)
            case .runs:
                try stream.read(into: runScratch, size)
                crc = MigrationStream.crc(runScratch, size, crc)
                if let problem = PageEncoding.decodeRuns(UnsafeRawBufferPointer(start: runScratch, count: size), into: pointer) {
                    throw .protocolViolation("the runs of page 0x\(String(address, radix: 16)): \(problem)")
                }
            }
        }
        guard crc == expected else { throw .protocolViolation("memory section payload checksum mismatch") }
        pagesReceived += UInt64(count)
    }

    /// Allocates the destination pages behind each run of consecutive page addresses in one
    /// call. On a fresh destination nearly every page of the first pass is a first write, and a
    /// page fault per page costs more than the copy (measured in `Docs/benchmarks.md`); scattered
    /// pages of later passes are already there and are left to fault as usual.
    private func populateRuns(of addresses: some Sequence<UInt64>, in memory: GuestMemory) {
        for run in Self.consecutiveRuns(of: addresses, pageSize: UInt64(MigrationStream.pageSize), shortest: 16) {
            memory.populate(at: run.lowerBound, count: Int(run.upperBound - run.lowerBound))
        }
    }

    /// The byte ranges covered by runs of at least `shortest` consecutive pages, in order.
    static func consecutiveRuns(of addresses: some Sequence<UInt64>, pageSize: UInt64, shortest: UInt64) -> [Range<UInt64>] {
        var runs: [Range<UInt64>] = []
        var start: UInt64? = nil
        var next: UInt64 = 0
        func close() {
            if let start, next - start >= shortest * pageSize { runs.append(start..<next) }
        }
        for address in addresses {
            if start == nil || address != next {
                close()
                start = address
            }
            next = address &+ pageSize
        }
        close()
        return runs
    }

    /// The disks, opened and checked (each file opened once: this is in the downtime).
    private func openCheckedDisks(_ snapshot: MachineSnapshot, options: RestoreOptions) throws(MigrationError) -> [any BlockBackend] {
        var opened: [any BlockBackend] = []
        do throws(MigrationError) {
            for (index, disk) in snapshot.configuration.virtio.compactMap(\.disk).enumerated() {
                let path = (index < options.diskPaths.count ? options.diskPaths[index] : nil) ?? disk.path
                let backend: any BlockBackend
                do throws(VHDXError) { backend = try openDisk(path: path, readOnly: disk.readOnly) } catch {
                    throw .machine("\(SnapshotError.diskChanged(path: path, detail: "cannot be opened (\(error))"))")
                }
                opened.append(backend)
                let current: DiskIdentity
                if let image = backend as? VHDXImage {
                    current = DiskIdentity(format: "vhdx", virtualSize: image.virtualSize, dataWriteGuid: image.dataWriteGuid.braced)
                } else {
                    do throws(SnapshotError) { current = try DiskIdentity.current(path: path) } catch { throw .machine("\(error)") }
                }
                guard current == disk.identity else {
                    throw .machine("\(SnapshotError.diskChanged(path: path, detail: "is not the disk the source flushed (here: \(current); the source: \(disk.identity))"))")
                }
            }
        } catch {
            Self.drop(opened)
            throw error
        }
        return opened
    }

    /// Lets go of disks the machine will not use, without a close: a file that is not the
    /// expected disk is not written to.
    private static func drop(_ disks: [any BlockBackend]) {
        for disk in disks { if let image = disk as? VHDXImage { image.abandon() } else { try? disk.close() } }
    }

    /// The machine the offer describes, on `memory`, not started and without its state; its
    /// disks are placeholders (see ``PlaceholderDisk``).
    private func assemble(_ offer: MigrationOffer, placeholders: [PlaceholderDisk], memory: GuestMemory, options: RestoreOptions) throws(MigrationError) -> Machine {
        do throws(SnapshotError) {
            let configuration = try Machine.restoredConfiguration(offer.configuration, diskPaths: [], disks: placeholders, options: options,
                                                                  source: "the migration stream")
            do throws(MachineError) { return try Machine(configuration, restoring: nil, incoming: memory) } catch {
                throw SnapshotError.machine("\(error)")
            }
        } catch {
            throw .machine("\(error)")
        }
    }

    /// The same machine, disks' identities aside (the source closes its disks at the switch-over,
    /// after the offer was made; the state carries the identities the destination must find).
    static func sameMachine(_ a: SnapshotConfiguration, _ b: SnapshotConfiguration) -> Bool {
        func strip(_ value: SnapshotConfiguration) -> SnapshotConfiguration {
            var copy = value
            for index in copy.virtio.indices { copy.virtio[index].disk?.identity = DiskIdentity(format: "", virtualSize: 0) }
            return copy
        }
        return strip(a) == strip(b)
    }

    /// Checks the state against the machine's devices and gives it to the machine for its start.
    private func place(_ snapshot: MachineSnapshot, into machine: Machine, memory: GuestMemory) throws(MigrationError) {
        guard snapshot.vcpus.count == snapshot.configuration.cpuCount,
              snapshot.vcpus.enumerated().allSatisfy({ UInt32($0.offset) == $0.element.id }) else {
            throw .protocolViolation("the state holds \(snapshot.vcpus.count) vCPU states for \(snapshot.configuration.cpuCount) vCPUs")
        }
        do throws(SnapshotError) { try machine.checkDeviceLayout(snapshot, source: "the migration stream") } catch {
            throw .protocolViolation("\(error)")
        }
        machine.restoreBox.update { $0 = RestorePlan(snapshot: snapshot, memory: memory) }
    }

    /// Starts the machine paused (its state put back), says `prepared`, waits for `go`, resumes
    /// the guest (unless it was paused on the source: ``arrivesPaused``) and says `running`. Returns the nanoseconds from entering to resuming. Throws
    /// (the machine stopped) when `go` does not come.
    ///
    /// `commit` runs after `go`, before the guest resumes: the caller makes the VM its own there
    /// (hvrun: the bundle stops being an incoming one). If it throws, the guest does not run.
    public func switchOver(_ machine: Machine, commit: () throws(MigrationError) -> Void = {}) throws(MigrationError) -> UInt64 {
        let start = monotonicNanoseconds()
        do throws(MachineError) { try machine.start(paused: true) } catch {
            stream.abort("the destination cannot start the machine: \(error)")
            throw .machine("starting the machine: \(error)")
        }
        switchOver.lap("start_paused")
        do throws(MigrationError) {
            try stream.send(.prepared, json: .object([("phases_ms", PhaseClock.json(switchOver.laps))]))
            _ = try stream.receive(.go)
            try commit()
        } catch {
            machine.stop()
            stream.abort("the destination will not run the guest: \(error)")
            throw error
        }
        // A guest that was paused on the source stays paused: it moved as it was.
        if !arrivesPaused {
            do throws(MachineError) { try machine.resume() } catch {
                machine.stop()
                stream.abort("the destination cannot resume the guest: \(error)")
                throw .machine("resuming: \(error)")
            }
        }
        let resumed = monotonicNanoseconds() - start
        // The guest runs here now; a lost confirmation does not change that.
        try? stream.send(.running, json: .object([("resume_ns", .number(Int64(resumed)))]))
        return resumed
    }
}

/// A disk that is not open yet: what the guest will see (size, sectors, read-only) for a machine
/// built before its disk files may be opened — a migration's destination, while the source still
/// writes them. Never given I/O: the machine does not run until the real disk replaces it.
final class PlaceholderDisk: BlockBackend, @unchecked Sendable {
    let virtualSize: UInt64
    let logicalSectorSize: UInt32
    let physicalSectorSize: UInt32
    let isReadOnly: Bool

    init(virtualSize: UInt64, logicalSectorSize: UInt32, physicalSectorSize: UInt32, isReadOnly: Bool) {
        self.virtualSize = virtualSize
        self.logicalSectorSize = logicalSectorSize
        self.physicalSectorSize = physicalSectorSize
        self.isReadOnly = isReadOnly
    }

    private static let notOpen = BlockError.unsupported("I/O before the migrated disk was opened")
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BlockError) { throw Self.notOpen }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(BlockError) { throw Self.notOpen }
    func flush() throws(BlockError) { throw Self.notOpen }
    func discard(offset: UInt64, length: UInt64) throws(BlockError) { throw Self.notOpen }
    func writeZeroes(offset: UInt64, length: UInt64) throws(BlockError) { throw Self.notOpen }
    func close() throws {}
}
