#if canImport(Glibc)
internal import Glibc
#endif

/// ``ActiveDisks`` on a running ``Machine``: each change happens under the block device's lock,
/// so the guest's requests wait for it (a few milliseconds) while its vCPUs run on.
public final class MachineActiveDisks: ActiveDisks, @unchecked Sendable {
    private let machine: Machine

    public init(machine: Machine) { self.machine = machine }

    public func moveToChild(_ index: Int, childPath: String, commit: () throws(StoreError) -> Void) throws(StoreError) {
        var previous: (any BlockBackend)?
        var failure: StoreError?
        do throws(MachineError) {
            try machine.exchangeDisk(index) { (current: any BlockBackend) throws(MachineError) -> any BlockBackend in
                guard let parent = current as? VHDXImage else {
                    throw .invalidConfiguration("disk \(index) is not a VHDX disk: it cannot have a differencing child")
                }
                // The child links to the parent's DataWriteGuid on disk: flush first, so the
                // parent's headers say what its data is.
                do throws(BlockError) { try parent.flush() } catch {
                    throw .invalidConfiguration("flushing \(parent.path): \(error)")
                }
                let child: VHDXImage
                do throws(VHDXError) {
                    try VHDXImage.create(path: childPath, options: VHDXCreateOptions(type: .differencing, parentPath: parent.path))
                    child = try VHDXImage(path: childPath)
                } catch {
                    unlink(childPath)
                    throw .invalidConfiguration("creating the differencing disk \(childPath): \(error)")
                }
                do throws(StoreError) { try commit() } catch {
                    try? child.close()
                    unlink(childPath)
                    failure = error
                    return current
                }
                previous = current
                return child
            }
        } catch {
            throw .failed("\(error)")
        }
        if let failure { throw failure }
        try? previous?.close()
    }

    public func reopen(_ index: Int, as replacement: String?, around change: () throws(StoreError) -> Void) throws(StoreError) {
        var failure: StoreError?
        do throws(MachineError) {
            try machine.exchangeDisk(index) { (current: any BlockBackend) throws(MachineError) -> any BlockBackend in
                guard let image = current as? VHDXImage else {
                    throw .invalidConfiguration("disk \(index) is not a VHDX disk")
                }
                let path = image.path
                do throws(VHDXError) { try image.close() } catch {
                    throw .invalidConfiguration("closing \(path): \(error)")
                }
                var next = replacement ?? path
                do throws(StoreError) { try change() } catch {
                    failure = error
                    next = path
                }
                // Reopened whatever `change` did: the guest's disk must come back either way.
                do throws(VHDXError) { return try VHDXImage(path: next) } catch {
                    throw .invalidConfiguration("reopening \(next): \(error)")
                }
            }
        } catch {
            throw .failed("\(error)")
        }
        if let failure { throw failure }
    }
}
