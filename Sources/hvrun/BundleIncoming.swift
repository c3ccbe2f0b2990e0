import Dispatch
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The VM process's side of `hvrun vm receive`: the connection arrives as a descriptor, already
/// authenticated, with the offer written into the bundle's `incoming` marker (after the
/// receiving command's pid). This process builds the machine from the stream into its own
/// memory, and at the switch-over removes the marker (the VM becomes one of this store's) before
/// the guest resumes. Any failure before that removes the whole bundle.
final class BundleIncoming {
    let bundle: VMBundle
    let fd: Int32
    let receiver: MigrationReceiver
    let offer: MigrationOffer
    /// `vm receive` wrote the bundle without waiting for the disk (the sender waits for `ready`
    /// meanwhile); it is made durable here while memory flows, and the switch-over waits for it
    /// before the VM becomes this store's.
    private let durability: BackgroundWork

    init(bundle: VMBundle, fd: Int32) throws {
        self.bundle = bundle
        self.fd = fd
        let marker = try StoreFiles.read(bundle.incomingPath)
        guard let newline = marker.firstIndex(of: UInt8(ascii: "\n")) else {
            throw StoreError.failed("\(bundle.incomingPath) holds no offer")
        }
        offer = try MigrationOffer(json: try JSONValue.parse(Array(marker[(newline + 1)...])))
        receiver = MigrationReceiver(stream: MigrationStream(fd: fd))
        let parent = Int32(String(decoding: marker[..<newline], as: UTF8.self)) ?? -1
        guard ParentDeathSignal.kill(whenParentDies: parent) else {
            throw StoreError.failed("hvrun vm receive (pid \(parent)) ended before the VM process started")
        }
        let path = bundle.path
        durability = BackgroundWork { () throws(StoreError) in try StoreFiles.syncTree(path) }
    }

    deinit { close(fd) }

    func receiveMachine(_ configuration: VMConfiguration, console: VMConsoleServer) throws -> Machine {
        let bundle = self.bundle
        var options = RestoreOptions()
        options.console = console
        options.diskPaths = configuration.disks.map { bundle.activePath(of: $0) }
        options.expectedCPUCount = configuration.cpus
        options.expectedMemorySize = configuration.memoryBytes
        // Storage copy: the disks the guest writes arrive during the migration; once complete,
        // those that are differencing disks are re-pointed at their copied parents.
        let sentWhole = Set(offer.files.map(\.name))
        let pairs = try StorageCopyPlan.reparentPairs(offer.metadata).filter { !sentWhole.contains($0.child) }
        receiver.disksCopied = { () throws(MigrationError) in try StorageCopyPlan.reparent(pairs, in: bundle) }
        if offer.storage == .copy {
            for path in options.diskPaths.compactMap({ $0 }) where path.hasPrefix(bundle.path + "/") {
                try StoreFiles.makeDirectories(String(path[..<path.lastIndex(of: "/")!]))
            }
        }
        do {
            return try receiver.receiveMachine(offer, options: options)
        } catch {
            receiver.stream.abort("\(error)")
            throw error
        }
    }

    func switchOver(_ machine: Machine) throws {
        let bundle = self.bundle
        let resumed = try receiver.switchOver(machine) { () throws(MigrationError) in
            if let failure = durability.wait() { throw .machine("the received VM's files cannot be made durable: \(failure)") }
            // From here the VM is this store's: a failure after this point leaves it here.
            guard unlink(bundle.incomingPath) == 0 else { throw .io(operation: "unlink \(bundle.incomingPath)", errno: errno) }
            // Durable before `running` tells the source to delete its copy.
            StoreFiles.syncDirectory(of: bundle.incomingPath)
            ParentDeathSignal.clear()
        }
        printError("hvrun: VM \(bundle.name): received by live migration; running here (resumed \(Double(resumed / 1000) / 1000) ms after the last section)")
    }

    /// The store the bundle is in (bundle = ROOT/vms/NAME).
    static func store(of bundle: VMBundle) -> VMStore {
        var parts = bundle.path.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(2)
        return VMStore(root: parts.joined(separator: "/"))
    }

    /// Removes a bundle whose receive failed (only while it is still incoming).
    static func discard(_ bundle: VMBundle) {
        guard StoreFiles.exists(bundle.incomingPath) else { return }
        store(of: bundle).removeBundle(bundle)
    }

    /// The VM moved away (`migrate` completed): its bundle goes, as in Hyper-V. Disks outside the
    /// bundle stay (with shared storage the destination uses them now).
    static func finishMoved(_ bundle: VMBundle, disks: RunDisks) -> Int32 {
        disks.abandonAll()
        store(of: bundle).removeBundle(bundle)
        printError("hvrun: VM \(bundle.name): moved to another host; its bundle is removed here")
        return 0
    }
}

/// Work on a thread of its own whose outcome someone waits for later.
final class BackgroundWork: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var failure: String?   // written before `done` is signalled, read after

    init(_ body: @escaping @Sendable () throws(StoreError) -> Void) {
        startDetachedThread { [self] in
            do throws(StoreError) { try body() } catch { failure = "\(error)" }
            done.signal()
        }
    }

    /// Waits for the work to end: nil when it succeeded, else why not.
    func wait() -> String? {
        done.wait()
        done.signal()
        return failure
    }
}
