/// One checkpoint of a stored VM — Hyper-V's "standard" checkpoint: the disks as they were (each
/// frozen file stays unchanged from then on, the VM writing to a new differencing child of it)
/// and, when the VM was running or saved, its complete machine state and memory.
public struct VMCheckpoint: Codable, Sendable, Equatable {
    public var id: String
    public var name: String
    /// The checkpoint this one was taken after (nil for a root). Applying a checkpoint and taking
    /// another one branches the tree.
    public var parent: String?
    /// UTC, `YYYY-MM-DDThh:mm:ssZ`.
    public var created: String
    /// Whether `checkpoints/ID/` holds a snapshot (state and memory) that applying it resumes.
    public var hasMemory: Bool
    /// Per configuration disk, the file frozen at this checkpoint: bundle-relative or absolute.
    public var disks: [String]
    /// Per disk, what that file is now when a merge replaced the frozen file by its parent since
    /// (the snapshot's own record names the old file's identity); nil: as the snapshot says.
    public var diskIdentities: [DiskIdentity?]
    /// How long the guest was paused to take it (a running VM's checkpoint only).
    public var pauseMilliseconds: Double?
    /// True while the VM's process is still writing its memory (after the guest resumed); a
    /// record still saying so after that process is gone is incomplete, and recovery removes it.
    public var saving: Bool?

    enum CodingKeys: String, CodingKey {
        case id, name, parent, created, disks
        case hasMemory = "has_memory"
        case diskIdentities = "disk_identities"
        case pauseMilliseconds = "pause_ms"
        case saving
    }

    public init(id: String, name: String, parent: String?, created: String, hasMemory: Bool, disks: [String],
                diskIdentities: [DiskIdentity?] = [], pauseMilliseconds: Double? = nil) {
        self.id = id
        self.name = name
        self.parent = parent
        self.created = created
        self.hasMemory = hasMemory
        self.disks = disks
        self.diskIdentities = diskIdentities
        self.pauseMilliseconds = pauseMilliseconds
    }
}

/// Work on a VM's files that `vm.json` records *before* it is done, so a crash at any point
/// leaves something the next holder of the VM finishes (``VMCheckpointStore/recover()``): every
/// step is idempotent.
public struct PendingStoreOperation: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        /// Merge the differencing disk `path` into its parent `into` (resumable); then every
        /// reference to `path` becomes `into`, `path`'s children are re-pointed at `into`, and
        /// `path` is deleted.
        case merge
        /// Delete the file `path` (a differencing disk nothing uses any more).
        case unlink
        /// Delete the directory `path` (a deleted checkpoint's memory).
        case removeDirectory = "remove_directory"
        /// Replace `saved/` with the memory of checkpoint `checkpoint` (nil: no saved state).
        case replaceSaved = "replace_saved"
    }

    public var kind: Kind
    public var path: String?
    public var into: String?
    public var checkpoint: String?
    /// merge: the data is in `into` and the references have moved (only the clean-up remains).
    public var merged: Bool?

    public init(kind: Kind, path: String? = nil, into: String? = nil, checkpoint: String? = nil, merged: Bool? = nil) {
        self.kind = kind
        self.path = path
        self.into = into
        self.checkpoint = checkpoint
        self.merged = merged
    }
}

/// A running VM's disks, as its process sees them: what checkpoint work needs when the guest is
/// writing one of the files it changes.
public protocol ActiveDisks: AnyObject, Sendable {
    /// Moves disk `index` onto a new differencing child at `childPath` of the file it writes now;
    /// `commit` runs with no request in flight, after the child exists and before the guest's
    /// first write to it. If `commit` throws, the disk stays on its file and the child is removed.
    func moveToChild(_ index: Int, childPath: String, commit: () throws(StoreError) -> Void) throws(StoreError)
    /// Closes disk `index`'s file (no request in flight), runs `change` on it, then opens the
    /// file at `path` (nil: the same file again) and puts it behind the guest's device. If
    /// `change` throws, the same file is reopened.
    func reopen(_ index: Int, as path: String?, around change: () throws(StoreError) -> Void) throws(StoreError)
}

extension ActiveDisks {
    public func reopen(_ index: Int, around change: () throws(StoreError) -> Void) throws(StoreError) {
        try reopen(index, as: nil, around: change)
    }
}
