/// A stored VM's configuration: `vm.json` in its bundle. It says what the VM is, never what state
/// it is in (that is derived from the lock and the files, see ``VMStore/state(of:)``).
public struct VMConfiguration: Codable, Sendable, Equatable {
    public enum OnReset: String, Codable, Sendable, CaseIterable { case restart, stop }

    public struct Boot: Codable, Sendable, Equatable {
        /// The kernel's file name inside the bundle (copied there at create).
        public var kernel: String
        /// The initrd's file name inside the bundle, if any.
        public var initrd: String?
        public var cmdline: String
        public init(kernel: String, initrd: String?, cmdline: String) {
            self.kernel = kernel
            self.initrd = initrd
            self.cmdline = cmdline
        }
    }

    public struct Disk: Codable, Sendable, Equatable {
        /// Absolute, or relative to the bundle (a disk made with `--new-disk` lives in the bundle).
        public var path: String
        public var readonly: Bool
        /// The file the VM reads and writes now when it is not `path`: after a checkpoint, the
        /// newest differencing disk (AVHDX) of the chain, a file of the bundle.
        public var active: String?
        public init(path: String, readonly: Bool, active: String? = nil) {
            self.path = path
            self.readonly = readonly
            self.active = active
        }
        /// Whether the disk is a file of the bundle (deleted with it).
        public var isInBundle: Bool { !path.hasPrefix("/") }
        /// The file the VM uses now (bundle-relative or absolute).
        public var activeFile: String { active ?? path }
    }

    public struct NIC: Codable, Sendable, Equatable {
        public var `switch`: String
        public var mac: String
        /// True when hvrun chose the address (locally administered, unique in the store).
        public var macGenerated: Bool
        enum CodingKeys: String, CodingKey {
            case `switch`, mac
            case macGenerated = "mac_generated"
        }
        public init(switch name: String, mac: String, macGenerated: Bool) {
            self.switch = name
            self.mac = mac
            self.macGenerated = macGenerated
        }
    }

    public var id: String
    public var name: String
    public var cpus: Int
    public var memoryBytes: UInt64
    public var boot: Boot
    public var disks: [Disk]
    public var nics: [NIC]
    public var onReset: OnReset
    /// The checkpoint tree, oldest first (see ``VMCheckpoint``).
    public var checkpoints: [VMCheckpoint] = []
    /// The checkpoint the VM's current state descends from (the parent of the next one).
    public var currentCheckpoint: String?
    /// Disk and state-file work decided but not yet finished, in order; whoever next holds the VM
    /// (a command with its lock, or its process) finishes it before anything else
    /// (``VMCheckpointStore/recover()``). This is what makes checkpoint operations crash-safe.
    public var pending: [PendingStoreOperation] = []
    /// What the saved state's disks must be now when a merge changed their files since the save
    /// (see ``RestoreOptions/diskIdentities``); empty when nothing changed.
    public var savedDiskIdentities: [DiskIdentity?] = []

    enum CodingKeys: String, CodingKey {
        case id, name, cpus
        case memoryBytes = "memory_bytes"
        case boot, disks, nics
        case onReset = "on_reset"
        case checkpoints
        case currentCheckpoint = "current_checkpoint"
        case pending
        case savedDiskIdentities = "saved_disk_identities"
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        id = try container.decode(String.self, forKey: .id)
        name = try container.decode(String.self, forKey: .name)
        cpus = try container.decode(Int.self, forKey: .cpus)
        memoryBytes = try container.decode(UInt64.self, forKey: .memoryBytes)
        boot = try container.decode(Boot.self, forKey: .boot)
        disks = try container.decode([Disk].self, forKey: .disks)
        nics = try container.decode([NIC].self, forKey: .nics)
        onReset = try container.decode(OnReset.self, forKey: .onReset)
        // Written by hvrun 0.2 and later; a VM made before checkpoints existed has none of them.
        checkpoints = try container.decodeIfPresent([VMCheckpoint].self, forKey: .checkpoints) ?? []
        currentCheckpoint = try container.decodeIfPresent(String.self, forKey: .currentCheckpoint)
        pending = try container.decodeIfPresent([PendingStoreOperation].self, forKey: .pending) ?? []
        savedDiskIdentities = try container.decodeIfPresent([DiskIdentity?].self, forKey: .savedDiskIdentities) ?? []
    }

    public init(id: String, name: String, cpus: Int, memoryBytes: UInt64, boot: Boot, disks: [Disk], nics: [NIC], onReset: OnReset) {
        self.id = id
        self.name = name
        self.cpus = cpus
        self.memoryBytes = memoryBytes
        self.boot = boot
        self.disks = disks
        self.nics = nics
        self.onReset = onReset
    }

    /// The JSON text of `vm.json`.
    public func encoded() throws(StoreError) -> String {
        do throws(StateCodingError) { return try StateCoder.encode(self).rendered() + "\n" } catch {
            throw .failed("cannot encode the VM configuration: \(error)")
        }
    }

    public static func decode(_ bytes: [UInt8], path: String) throws(StoreError) -> VMConfiguration {
        let value: JSONValue
        do throws(JSONParseError) { value = try JSONValue.parse(bytes) } catch { throw .failed("\(path): \(error)") }
        do throws(StateCodingError) { return try StateCoder.decode(VMConfiguration.self, from: value) } catch {
            throw .failed("\(path): \(error)")
        }
    }
}
