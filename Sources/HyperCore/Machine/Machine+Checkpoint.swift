#if canImport(Glibc)
internal import Glibc
#endif

/// What a checkpoint did and how long the guest was paused for it.
public struct CheckpointResult: Sendable {
    public var written: SnapshotDirectory.Written
    /// The guest-visible pause: from the pause to the resume (or to the end, if it stays paused).
    public var pauseNanoseconds: UInt64
    /// Per disk, in configuration order: the differencing child the guest writes to now (nil for
    /// a read-only disk, which never changes and keeps its file).
    public var children: [String?]
}

extension Machine {
    /// The virtio-blk devices' disks as they are now, in configuration order (after a checkpoint,
    /// the differencing children).
    public var blockBackends: [any BlockBackend] {
        blockDevices.map { core, device in core.lock.withLock { device.backend } }
    }

    private var blockDevices: [(VirtioDeviceCore, VirtioBlock)] {
        (virtio?.cores ?? []).compactMap { core in (core.device as? VirtioBlock).map { (core, $0) } }
    }

    /// Puts `backend` behind block device `index` (same size, sectors and read-only flag), between
    /// two requests. The old disk is left open: the caller closes it.
    public func replaceDisk(_ index: Int, with backend: any BlockBackend) throws(MachineError) {
        let devices = blockDevices
        guard devices.indices.contains(index) else {
            throw .invalidConfiguration("there is no disk \(index); this machine has \(devices.count)")
        }
        let (core, device) = devices[index]
        try core.lock.withLock { () throws(MachineError) in try device.replaceBackend(backend) }
    }

    /// Runs `body` on block device `index`'s disk while no request is in flight (the device's
    /// queues wait; the vCPUs run on), and puts the disk `body` returns behind the device. For an
    /// owner that must close, change and reopen the file the guest writes — re-pointing it at a
    /// new parent after a merge — or move the guest onto a new differencing child. When `body`
    /// throws, the device keeps its disk.
    public func exchangeDisk(_ index: Int, _ body: (any BlockBackend) throws(MachineError) -> any BlockBackend) throws(MachineError) {
        let devices = blockDevices
        guard devices.indices.contains(index) else {
            throw .invalidConfiguration("there is no disk \(index); this machine has \(devices.count)")
        }
        let (core, device) = devices[index]
        try core.lock.withLock { () throws(MachineError) in
            try device.replaceBackend(try body(device.backend))
        }
    }

    /// A checkpoint in Hyper-V's sense, in one short pause: the machine's complete state goes to
    /// `directory` (a snapshot whose disks are the files written so far), then every writable disk
    /// continues on a new differencing VHDX at `childPaths[i]` whose parent is that file, so the
    /// snapshot's disks never change again. A machine that was running runs on.
    ///
    /// Raw disks are refused (a raw file cannot have a differencing child): convert them first.
    /// On failure nothing is switched, created children are removed, and a running machine runs on.
    @discardableResult
    ///
    /// `commit` runs while the guest is still paused, after the switch: an owner that keeps a
    /// record of which file is current (the VM store's `vm.json`) writes it there, so the guest
    /// never writes a child the record does not name. If it throws, the checkpoint is undone.
    ///
    /// Guest RAM is written by a forked child from its copy-on-write view of memory
    /// (``SnapshotDirectory/begin(_:memory:to:)``), so the pause holds only the vCPU and device
    /// state, the fork and the disk switch; this returns once the snapshot is complete on disk.
    /// If writing RAM fails after `commit`, the disks stay switched and the error is thrown: the
    /// owner's record must then say the checkpoint is incomplete.
    public func checkpoint(to directory: String, childPaths: [String],
                           commit: (CheckpointResult) throws(SnapshotError) -> Void = { _ in }) throws(SnapshotError) -> CheckpointResult {
        let devices = blockDevices
        let writable = devices.enumerated().filter { !$0.element.1.backend.isReadOnly }.map(\.offset)
        for index in writable where !(devices[index].1.backend is VHDXImage) {
            let path = (devices[index].1.backend as? RawImage)?.path ?? "disk \(index)"
            throw .wrongState("\(path) is a raw disk: checkpoints need VHDX disks (convert it with `hvrun disk convert \(path) NEW.vhdx`)")
        }
        guard childPaths.count == writable.count else {
            throw .wrongState("\(writable.count) writable disks need \(writable.count) child paths, not \(childPaths.count)")
        }
        // The children's files are made before the pause (creating a VHDX costs several fsyncs);
        // each links to its parent's DataWriteGuid as on disk now, which the switch checks below.
        var created: [String] = []
        for (index, childPath) in zip(writable, childPaths) {
            guard let parent = devices[index].1.backend as? VHDXImage else { continue }
            do throws(VHDXError) {
                try VHDXImage.create(path: childPath, options: VHDXCreateOptions(type: .differencing, parentPath: parent.path))
                created.append(childPath)
            } catch {
                for path in created { unlink(path) }
                throw .machine("creating the differencing disk \(childPath): \(error)")
            }
        }
        let wasRunning = runState == .running
        let start = monotonicNanoseconds()
        do throws(MachineError) { try pause() } catch {
            for path in created { unlink(path) }
            throw .machine(error.description)
        }
        var switched: [(index: Int, old: any BlockBackend)] = []
        var pending: SnapshotDirectory.Pending?
        var committed = false
        do throws(SnapshotError) {
            // The state now, RAM from a copy-on-write child: the guest resumes without waiting
            // for guest memory to reach the disk.
            pending = try beginSnapshot(to: directory)
            var children: [String?] = Array(repeating: nil, count: devices.count)
            for (index, childPath) in zip(writable, childPaths) {
                guard let parent = devices[index].1.backend as? VHDXImage else { continue }
                let child: VHDXImage
                do throws(VHDXError) {
                    do throws(VHDXError) { child = try VHDXImage(path: childPath) } catch {
                        // The guest's writes since the child was made renewed the parent's
                        // DataWriteGuid (the snapshot's flush wrote it): link to the parent as
                        // it is now — nothing writes it from here on.
                        guard case .parent = error else { throw error }
                        try VHDXImage.reparent(childPath: childPath, to: parent.path)
                        child = try VHDXImage(path: childPath)
                    }
                } catch {
                    throw .machine("opening the differencing disk \(childPath): \(error)")
                }
                do throws(MachineError) { try replaceDisk(index, with: child) } catch { throw .machine(error.description) }
                switched.append((index, parent))
                children[index] = childPath
            }
            let paused = monotonicNanoseconds() - start
            try commit(CheckpointResult(written: SnapshotDirectory.Written(memoryBytes: 0, stateBytes: 0), pauseNanoseconds: paused, children: children))
            committed = true
            // The parents are read-only from here on (each child holds its own read-only handle).
            for (_, old) in switched { try? old.close() }
            let resumed = monotonicNanoseconds()
            if wasRunning { try? resume() }
            let written = try pending!.finish()
            return CheckpointResult(written: written, pauseNanoseconds: resumed - start, children: children)
        } catch {
            // Before the commit, everything is undone; after it (the memory writer failed), the
            // owner's record says the checkpoint is incomplete and its recovery removes it.
            pending?.abandon()
            if !committed {
                for (index, old) in switched.reversed() { try? replaceDisk(index, with: old) }
                for path in created { unlink(path) }
            }
            SnapshotDirectory.removeSnapshotFiles(SnapshotDirectory.normalized(directory))
            if wasRunning, runState == .paused { try? resume() }
            throw error
        }
    }
}
