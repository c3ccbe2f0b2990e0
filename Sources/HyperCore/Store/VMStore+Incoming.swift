#if canImport(Glibc)
internal import Glibc
#endif

extension VMStore {
    /// Removes the bundles of live-migration receives that ended without the VM running here: an
    /// `incoming` marker, no process holding the VM's lock, and the receiving process (whose pid
    /// the marker's first line holds) gone.
    public func removeFailedIncoming() {
        for name in StoreFiles.list(vmsPath) where VMName.isValid(name) {
            let bundle = VMBundle(name: name, path: vmsPath + "/" + name)
            guard StoreFiles.exists(bundle.incomingPath), !FileLock.isHeld(bundle.lockPath) else { continue }
            if let bytes = try? StoreFiles.read(bundle.incomingPath),
               let pid = Int32(String(decoding: bytes.prefix { $0 != UInt8(ascii: "\n") }, as: UTF8.self)),
               pid > 1, kill(pid, 0) == 0 || errno == EPERM { continue }
            removeBundle(bundle)
        }
    }

    /// Removes a bundle's directory: renamed aside first, so a crash midway leaves no half VM.
    public func removeBundle(_ bundle: VMBundle) {
        let doomed = vmsPath + "/.\(bundle.name).deleting-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard rename(bundle.path, doomed) == 0 else { try? StoreFiles.removeTree(bundle.path); return }
        try? StoreFiles.removeTree(doomed)
        StoreFiles.syncDirectory(of: bundle.path)
    }
}
