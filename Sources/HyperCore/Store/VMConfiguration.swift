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
        public init(path: String, readonly: Bool) {
            self.path = path
            self.readonly = readonly
        }
        /// Whether the disk is a file of the bundle (deleted with it).
        public var isInBundle: Bool { !path.hasPrefix("/") }
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

    enum CodingKeys: String, CodingKey {
        case id, name, cpus
        case memoryBytes = "memory_bytes"
        case boot, disks, nics
        case onReset = "on_reset"
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
