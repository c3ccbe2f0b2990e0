#if canImport(Glibc)
internal import Glibc
#endif

/// The complete state of a paused machine, apart from guest RAM (which goes to its own file):
/// what it was built from, the in-kernel VM state, every vCPU and every device.
///
/// The same value is what a save writes and what a migration streams.
public struct MachineSnapshot: Codable, Sendable {
    /// The version of the library that wrote it.
    public var writer: String
    public var createdUnixSeconds: Int64
    public var configuration: SnapshotConfiguration
    public var vm: VMState
    public var vcpus: [VCPUState]
    /// Every device on the port and MMIO buses, in address order (PCI functions inside the
    /// configuration ports' state).
    public var devices: [SavedDevice]
    /// Bytes of guest RAM the memory file holds (the rest are holes).
    public var memoryBytesWritten: UInt64
}

/// What the restore must build again: the parts of ``MachineConfiguration`` that shape the machine.
/// (The kernel is not needed: it is in guest RAM.)
public struct SnapshotConfiguration: Codable, Sendable, Equatable {
    public var memorySize: UInt64
    public var cpuCount: Int
    public var inKernelIRQChip: Bool
    public var acpi: Bool
    public var bootTimer: Bool
    /// What was booted, for people: "pvh guest.elf", "linux bzImage".
    public var boot: String
    public var commandLine: String
    public var virtio: [SnapshotVirtioDevice]
}

public struct SnapshotVirtioDevice: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable { case block, console, entropy, network }
    public enum Transport: String, Codable, Sendable { case pci, mmio }
    public var kind: Kind
    public var transport: Transport
    public var disk: SnapshotDisk?
    /// For a network device: its MAC and what it was connected to.
    public var nic: SnapshotNIC? = nil
}

/// A NIC as the snapshot knows it. A restored machine reopens the same TAP by name (or gets the
/// backend ``RestoreOptions/networkBackends`` gives).
public struct SnapshotNIC: Codable, Sendable, Equatable {
    public var mac: MACAddress
    /// The TAP interface's name; nil: not connected.
    public var tap: String?
}

/// A disk as the snapshot knows it: where it was and how to tell it has not changed since.
public struct SnapshotDisk: Codable, Sendable, Equatable {
    public var path: String
    public var readOnly: Bool
    public var identifier: String
    public var identity: DiskIdentity
}

/// What identifies a disk's contents: VHDX's DataWriteGuid (the format's own "the data changed"
/// marker, which every write session renews), or a raw file's size and modification time.
public struct DiskIdentity: Codable, Sendable, Equatable, CustomStringConvertible {
    public var format: String
    public var virtualSize: UInt64
    public var dataWriteGuid: String?
    public var modificationTimeNanoseconds: Int64?

    public var description: String {
        if let dataWriteGuid { return "VHDX with DataWriteGuid \(dataWriteGuid), \(virtualSize) bytes" }
        return "raw file of \(virtualSize) bytes modified at \(modificationTimeNanoseconds ?? 0) ns"
    }

    /// The identity of an open disk, after flushing it. For VHDX, the next write after this
    /// renews the DataWriteGuid, so a disk written after the snapshot no longer matches it.
    public static func of(_ backend: any BlockBackend) throws(SnapshotError) -> (path: String, identity: DiskIdentity) {
        do throws(BlockError) { try backend.flush() } catch {
            throw .machine("flushing a disk before the snapshot: \(error)")
        }
        switch backend {
        case let image as VHDXImage:
            let guid = image.markSnapshotTaken()
            return (image.path, DiskIdentity(format: "vhdx", virtualSize: image.virtualSize, dataWriteGuid: guid.braced))
        case let raw as RawImage:
            return (raw.path, DiskIdentity(format: "raw", virtualSize: raw.virtualSize,
                                           modificationTimeNanoseconds: try modificationTime(raw.path)))
        default:
            throw .machine("a disk of type \(type(of: backend)) cannot be snapshotted: only raw and VHDX disks carry an identity")
        }
    }

    /// The identity of the disk at `path` now, read without changing the file.
    public static func current(path: String) throws(SnapshotError) -> DiskIdentity {
        let format: DiskFormat
        do throws(VHDXError) { format = try detectDiskFormat(path: path) } catch {
            throw .diskChanged(path: path, detail: "cannot be opened (\(error))")
        }
        switch format {
        case .vhdx:
            do throws(VHDXError) {
                let image = try VHDXImage(path: path, options: .init(readOnly: true))
                return DiskIdentity(format: "vhdx", virtualSize: image.virtualSize, dataWriteGuid: image.dataWriteGuid.braced)
            } catch {
                throw .diskChanged(path: path, detail: "cannot be opened (\(error))")
            }
        case .raw:
            let image: RawImage
            do throws(VHDXError) { image = try RawImage(path: path, readOnly: true) } catch {
                throw .diskChanged(path: path, detail: "cannot be opened (\(error))")
            }
            return DiskIdentity(format: "raw", virtualSize: image.virtualSize, modificationTimeNanoseconds: try modificationTime(path))
        }
    }

    /// Checks that the disk at `path` reads exactly as the disk `expected` identifies: it is that
    /// disk, or a differencing child holding no data yet (at any depth) whose chain reaches it —
    /// what a checkpoint applied to a VM puts in place. Throws ``SnapshotError/diskChanged(path:detail:)``
    /// naming both identities otherwise.
    public static func verify(path: String, readsAs expected: DiskIdentity) throws(SnapshotError) {
        let current = try current(path: path)
        if current == expected { return }
        if current.format == "vhdx", let image = try? VHDXImage(path: path, options: .init(readOnly: true)) {
            var link: VHDXImage? = image
            while let disk = link, disk.isDifferencing, disk.allocatedBytes == 0, let parent = disk.parent {
                if DiskIdentity(format: "vhdx", virtualSize: parent.virtualSize, dataWriteGuid: parent.dataWriteGuid.braced) == expected,
                   parent.virtualSize == image.virtualSize {
                    return
                }
                link = parent
            }
        }
        throw .diskChanged(path: path, detail: "has changed since the snapshot was taken (now: \(current); the snapshot expects: \(expected))")
    }

    static func modificationTime(_ path: String) throws(SnapshotError) -> Int64 {
        var info = stat()
        guard stat(path, &info) == 0 else { throw .io(path: path, operation: "stat", errno: errno) }
        return Int64(info.st_mtim.tv_sec) * 1_000_000_000 + Int64(info.st_mtim.tv_nsec)
    }
}

/// One bus device's state, keyed by where it sits.
public struct SavedDevice: Codable, Sendable, Equatable {
    public var bus: String
    public var base: UInt64
    public var size: UInt64
    public var state: DeviceState

    public var name: String { "\(bus) device at 0x\(String(base, radix: 16))" }
}

extension VHDXImage {
    /// Returns the DataWriteGuid a snapshot records and makes the next guest write renew it, even
    /// within this open session: a disk written after the snapshot must not match it.
    func markSnapshotTaken() -> GUID {
        lock.withLock {
            dataWriteGuidChanged = false
            return headers.current.dataWriteGuid
        }
    }
}
