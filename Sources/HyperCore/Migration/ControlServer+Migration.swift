internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// The VM process's outgoing live migration, driven from its control socket:
///
/// - `migrate` `{"uri": "HOST:PORT"|"unix:PATH", "token": T, "storage": "shared"|"copy",
///   "max_downtime_ms": N, "timeout_s": N, "dirty_log": "manual"|"classic", "metadata": {…},
///   "files": [{"name","path"}]}` replies
///   `{"status":"active"}` at once, then the migration runs on its own thread and the client
///   that asked gets QMP-style events on the same connection: `{"event":"MIGRATION_PASS",
///   "data":{…progress…}}` after each pass and one `{"event":"MIGRATION","data":{"status":
///   "completed"|"failed", …}}` at the end. On completion the machine's run ends
///   (``hasMoved`` tells the owner the VM now runs elsewhere); on failure the guest runs on here.
/// - `query-migrate`: the status and progress, for any client.
/// - `migrate-cancel`: aborts a migration that has not reached the switch-over.
public final class OutgoingMigration: @unchecked Sendable {
    private let lock = PthreadLock()
    private var sender: MigrationSender?
    private var status = "none"
    private var lastError: String?
    private var report: MigrationReport?

    /// True once the destination confirmed the guest runs there.
    public var hasMoved: Bool { lock.withLock { status == "completed" } }

    var isActive: Bool { lock.withLock { status == "active" } }

    func begin() -> Bool {
        lock.withLock {
            guard status != "active", status != "completed" else { return false }
            status = "active"
            lastError = nil
            report = nil
            return true
        }
    }

    func attach(_ sender: MigrationSender) { lock.withLock { self.sender = sender } }

    func finish(_ result: Result<MigrationReport, MigrationError>) {
        lock.withLock {
            switch result {
            case let .success(value):
                status = "completed"
                report = value
            case let .failure(error):
                status = "failed"
                lastError = error.description
            }
            sender = nil
        }
    }

    func cancel() -> Bool {
        lock.withLock {
            guard let sender else { return false }
            sender.cancel()
            return true
        }
    }

    func query() -> [(String, JSONValue)] {
        lock.withLock {
            var members: [(String, JSONValue)] = [("status", .string(status))]
            if let sender { members += Self.progress(sender.progress) }
            if let report { members += Self.report(report) }
            if let lastError { members.append(("error", .string(lastError))) }
            return members
        }
    }

    static func progress(_ progress: MigrationProgress) -> [(String, JSONValue)] {
        [("phase", .string(progress.phase.rawValue)), ("pass", .number(Int64(progress.pass))),
         ("bytes_sent", .number(Int64(progress.bytesSent))), ("pages_sent", .number(Int64(progress.pagesSent))),
         ("dirty_pages", .number(Int64(progress.dirtyPages))), ("throttle_percent", .number(Int64(progress.throttlePercent))),
         ("bandwidth_mbps", .double((progress.bandwidthBytesPerSecond / 1e6 * 10).rounded() / 10)),
         ("elapsed_ms", .double((progress.elapsedSeconds * 1e4).rounded() / 10))]
    }

    static func report(_ report: MigrationReport) -> [(String, JSONValue)] {
        [("passes", .number(Int64(report.passes))), ("bytes_sent", .number(Int64(report.bytesSent))),
         ("dirty_log", .string(report.dirtyLog)), ("dirty_log_ms", PhaseClock.milliseconds(report.dirtyLogNanoseconds)),
         ("pages_sent", .number(Int64(report.pagesSent))), ("zero_pages_sent", .number(Int64(report.zeroPagesSent))),
         ("run_pages_sent", .number(Int64(report.runPagesSent))),
         ("final_pages", .number(Int64(report.finalPages))), ("disk_bytes_sent", .number(Int64(report.diskBytesSent))),
         ("total_ms", PhaseClock.milliseconds(report.totalNanoseconds)), ("downtime_ms", PhaseClock.milliseconds(report.downtimeNanoseconds)),
         ("destination_resume_ms", PhaseClock.milliseconds(report.destinationResumeNanoseconds)),
         ("max_throttle_percent", .number(Int64(report.maximumThrottlePercent))),
         ("bandwidth_mbps", .double((report.bandwidthBytesPerSecond / 1e6 * 10).rounded() / 10)),
         ("phases_ms", PhaseClock.json(report.phases)), ("switchover_ms", PhaseClock.json(report.switchOverPhases)),
         ("destination_ms", PhaseClock.json(report.destinationPhases))]
    }
}

extension ControlServer {
    func migration(_ verb: String, _ arguments: JSONValue, id: JSONValue?, clientFD: Int32) -> (JSONValue, (() -> Void)?) {
        switch verb {
        case "query-migrate":
            return (Self.success(outgoing.query(), id: id), nil)
        case "migrate-cancel":
            guard outgoing.cancel() else { return (Self.error("GenericError", "no migration is running", id: id), nil) }
            return (Self.success([("status", .string("cancelling"))], id: id), nil)
        default:
            break
        }
        let options: MigrationOptions
        let endpoint: MigrationEndpoint
        let token: String
        do throws(MigrationError) {
            guard let uri = arguments["uri"]?.stringValue, let given = arguments["token"]?.stringValue else {
                throw .usage("migrate needs {\"uri\": \"HOST:PORT\" or \"unix:PATH\", \"token\": TOKEN}")
            }
            endpoint = try MigrationEndpoint(parsing: uri)
            try MigrationToken.validate(given)
            token = given
            var parsed = MigrationOptions()
            if let storage = arguments["storage"]?.stringValue {
                guard let mode = MigrationOptions.Storage(rawValue: storage) else { throw .usage("storage must be shared or copy") }
                parsed.storage = mode
            }
            if let downtime = arguments["max_downtime_ms"]?.doubleValue {
                guard downtime >= 1, downtime <= 60_000 else { throw .usage("max_downtime_ms must be between 1 and 60000") }
                parsed.maxDowntimeMilliseconds = downtime
            }
            if let timeout = arguments["timeout_s"]?.doubleValue {
                guard timeout > 0 else { throw .usage("timeout_s must be positive") }
                parsed.timeoutSeconds = timeout
            }
            if let autoConverge = arguments["auto_converge"], case let .bool(value) = autoConverge { parsed.autoConverge = value }
            if let dirtyLog = arguments["dirty_log"]?.stringValue {
                guard dirtyLog == "manual" || dirtyLog == "classic" else { throw .usage("dirty_log must be manual or classic") }
                parsed.manualDirtyLogProtection = dirtyLog == "manual"
            }
            if let bandwidth = arguments["max_bandwidth_mbps"]?.doubleValue {
                guard bandwidth > 0 else { throw .usage("max_bandwidth_mbps must be positive") }
                parsed.maxBandwidthBytesPerSecond = bandwidth * 1e6
            }
            parsed.metadata = arguments["metadata"] ?? .object([])
            if case let .array(files)? = arguments["files"] {
                for file in files {
                    guard let name = file["name"]?.stringValue, let path = file["path"]?.stringValue else {
                        throw .usage("files entries are {\"name\": NAME, \"path\": PATH}")
                    }
                    parsed.files.append(MigrationFile(name: name, path: path))
                }
            }
            options = parsed
        } catch {
            return (Self.error("GenericError", error.description, id: id), nil)
        }
        guard machine.runState == .running || machine.runState == .paused else {
            return (Self.error("GenericError", "the machine is \(machine.runState.rawValue); only a running or paused machine can move", id: id), nil)
        }
        if let reason = migrationBlocker?() { return (Self.error("Refused", reason, id: id), nil) }
        guard outgoing.begin() else { return (Self.error("GenericError", "a migration is already running or done", id: id), nil) }
        let events = events(for: clientFD)
        let machine = self.machine
        let outgoing = self.outgoing
        return (Self.success([("status", .string("active"))], id: id), {
            startDetachedThread {
                ckvm_thread_set_name("migrate")
                var blocked = sigset_t()
                sigfillset(&blocked)
                pthread_sigmask(SIG_BLOCK, &blocked, nil)
                @Sendable func event(_ name: String, _ data: [(String, JSONValue)]) { events.send(name, data) }
                let result: Result<MigrationReport, MigrationError>
                do throws(MigrationError) {
                    let fd = try endpoint.connect()
                    defer { Glibc.close(fd) }
                    let sender = MigrationSender(machine: machine, stream: MigrationStream(fd: fd), token: token, options: options)
                    sender.onProgress = { progress in
                        if progress.phase == .precopy || progress.phase == .switchover { event("MIGRATION_PASS", OutgoingMigration.progress(progress)) }
                    }
                    outgoing.attach(sender)
                    result = .success(try sender.run())
                } catch {
                    result = .failure(error)
                }
                outgoing.finish(result)
                switch result {
                case let .success(report):
                    event("MIGRATION", [("status", .string("completed"))] + OutgoingMigration.report(report))
                    // The guest runs on the destination: this machine's run is over.
                    machine.finish(.stopped)
                case let .failure(error):
                    var data: [(String, JSONValue)] = [("status", .string("failed")), ("error", .string(error.description))]
                    if case .switchOverUnknown = error { data.append(("switch_over_unknown", .bool(true))) }
                    event("MIGRATION", data)
                }
            }
        })
    }
}
