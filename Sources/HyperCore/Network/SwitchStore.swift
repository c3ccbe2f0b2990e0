#if canImport(Glibc)
internal import Glibc
#endif

/// Where a store's switch files are: `ROOT/switches/NAME.json`, the dnsmasq files next to it,
/// and `NAME.ports/TAP.json` for each adapter connected now.
struct SwitchPaths: Sendable {
    let directory: String
    func configuration(_ name: String) -> String { directory + "/" + name + ".json" }
    func leases(_ name: String) -> String { directory + "/" + name + ".leases" }
    func dnsmasqPID(_ name: String) -> String { directory + "/" + name + ".dnsmasq.pid" }
    func dnsmasqLog(_ name: String) -> String { directory + "/" + name + ".dnsmasq.log" }
    func ports(_ name: String) -> String { directory + "/" + name + ".ports" }
    var lock: String { directory + "/switches.lock" }
}

/// An adapter connected to a switch now: `NAME.ports/TAP.json`, write-locked by the VM process
/// for as long as the adapter is connected (so a crash can never leave it "connected").
public struct SwitchPortRecord: Codable, Sendable, Equatable {
    public var vm: String
    public var mac: String
    public var tap: String
    public var pid: Int32
}

/// What `hvrun switch create` asks for.
public struct SwitchCreateRequest: Sendable {
    public var name: String
    public var kind: VirtualSwitch.Kind
    public var adapter: String?
    public var dedicated = false
    public var address: String?
    /// nil: no DHCP. `.some(nil)`: DHCP on the default range.
    public var dhcp: VirtualSwitch.DHCPRange??

    public init(name: String, kind: VirtualSwitch.Kind) {
        self.name = name
        self.kind = kind
    }
}

/// The privileged part of connecting a VM: a TAP created and attached to the switch's bridge.
/// ``LocalPortOpener`` does it in this process (CAP_NET_ADMIN); a helper running with the
/// capability (as qemu-bridge-helper) could do it instead and pass the TAP's descriptor over a
/// Unix socket, which ``TapDevice/init(adopting:)`` takes.
public protocol SwitchPortOpener: Sendable {
    func openPort(tap: String, bridge: String) throws(SwitchError) -> TapDevice
}

public struct LocalPortOpener: SwitchPortOpener {
    public init() {}
    public func openPort(tap name: String, bridge: String) throws(SwitchError) -> TapDevice {
        try SwitchHost.requireNetAdmin("connecting a VM's adapter to a switch (creating TAP \(name))")
        let tap: TapDevice
        do throws(NetworkError) { tap = try TapDevice(name: name) } catch {
            throw .host(command: "create TAP \(name)", message: "\(error)")
        }
        let attached = ckvmBridgeAttach(bridge, name)
        guard attached == 0 else {
            throw .host(command: "attach TAP \(name) to bridge \(bridge)", message: SystemError.describe(-attached))
        }
        return tap
    }
}

/// A VM adapter connected to a switch. The TAP goes away with the value (it is not persistent:
/// the kernel removes it when its last descriptor closes, also when the VM process is killed).
public final class SwitchPort: Sendable {
    public let tap: TapDevice
    public let record: SwitchPortRecord
    let lock: FileLock
    let recordPath: String

    init(tap: TapDevice, record: SwitchPortRecord, lock: FileLock, recordPath: String) {
        self.tap = tap
        self.record = record
        self.lock = lock
        self.recordPath = recordPath
    }

    deinit { unlink(recordPath) }
}

/// The store's virtual switches (`ROOT/switches/`). Creates, deletes and re-creates (after a host
/// reboot) their Linux objects through ``SwitchHost``, and connects VM adapters to them.
public struct SwitchStore: Sendable {
    public let root: String
    let paths: SwitchPaths

    public init(root: String) {
        self.root = root
        paths = SwitchPaths(directory: root + "/switches")
    }

    public var directory: String { paths.directory }
    public func leasesPath(_ name: String) -> String { paths.leases(name) }

    public static func validate(name: String) throws(SwitchError) {
        guard VMName.isValid(name), name != "none", !name.hasPrefix("tap=") else {
            throw .invalid("bad switch name '\(name)': use 1-64 of A-Z a-z 0-9 . _ -, not starting with . or - (and not 'none')")
        }
    }

    func withLock<T>(_ body: () throws(SwitchError) -> T) throws(SwitchError) -> T {
        do throws(StoreError) { try StoreFiles.makeDirectories(paths.directory) } catch { throw .store(error) }
        let lock: FileLock?
        do throws(StoreError) { lock = try FileLock.acquire(paths.lock, wait: true) } catch { throw .store(error) }
        guard let lock else { throw .store(.failed("\(paths.lock): cannot lock")) }
        defer { withExtendedLifetime(lock) {} }
        return try body()
    }

    public func names() -> [String] {
        StoreFiles.list(paths.directory).compactMap { file in
            guard file.hasSuffix(".json") else { return nil }
            let name = String(file.dropLast(5))
            return VMName.isValid(name) ? name : nil
        }
    }

    public func load(_ name: String) throws(SwitchError) -> VirtualSwitch {
        try Self.validate(name: name)
        let path = paths.configuration(name)
        guard StoreFiles.exists(path) else { throw .notFound(name: name) }
        let bytes: [UInt8]
        do throws(StoreError) { bytes = try StoreFiles.read(path) } catch { throw .store(error) }
        return try VirtualSwitch.decode(bytes, path: path)
    }

    func save(_ switchObject: VirtualSwitch) throws(SwitchError) {
        let text = try switchObject.encoded()
        do throws(StoreError) {
            try StoreFiles.writeAtomically(paths.configuration(switchObject.name), Array(text.utf8))
        } catch { throw .store(error) }
    }

    /// Whether the switch's bridge exists now (false after a host reboot until a VM starts on it).
    public func isPresent(_ switchObject: VirtualSwitch) -> Bool { SwitchHost.interfaceExists(switchObject.bridge) }

    /// The adapters connected now (records whose VM process holds their lock); stale records
    /// (the process ended) are removed.
    public func ports(of name: String) -> [SwitchPortRecord] {
        let directory = paths.ports(name)
        var records: [SwitchPortRecord] = []
        for file in StoreFiles.list(directory) where file.hasSuffix(".json") {
            let path = directory + "/" + file
            guard FileLock.isHeld(path) else { unlink(path); continue }
            guard let bytes = try? StoreFiles.read(path), let value = try? JSONValue.parse(bytes),
                  let record = try? StateCoder.decode(SwitchPortRecord.self, from: value) else { continue }
            records.append(record)
        }
        return records
    }

    /// Creates the switch: checks, records it, builds it on the host; nothing is left when it fails.
    @discardableResult
    public func create(_ request: SwitchCreateRequest) throws(SwitchError) -> VirtualSwitch {
        try Self.validate(name: request.name)
        var address: IPv4CIDR?
        switch request.kind {
        case .private:
            if request.address != nil || request.dhcp != nil { throw .invalid("a private switch has no host address and no DHCP (use --type internal)") }
            if request.adapter != nil || request.dedicated { throw .invalid("--adapter and --dedicated are for --type external") }
        case .internal:
            if request.adapter != nil || request.dedicated { throw .invalid("--adapter and --dedicated are for --type external") }
            guard let text = request.address else {
                if request.dhcp != nil { throw .invalid("--dhcp needs --address (the host's address on the switch, which serves DHCP)") }
                throw .invalid("an internal switch needs --address CIDR: the host's address on it, as 10.0.0.1/24")
            }
            address = try IPv4CIDR(parsing: text)
        case .external:
            guard let adapter = request.adapter, !adapter.isEmpty else { throw .invalid("an external switch needs --adapter IFACE: the host interface it is bridged onto") }
            guard adapter.utf8.count < 16, !adapter.contains("/") else { throw .invalid("--adapter \(adapter) is not an interface name") }
            if request.address != nil || request.dhcp != nil {
                throw .invalid("an external switch takes its addresses from the adapter (--address and --dhcp are for --type internal)")
            }
        }
        var range: VirtualSwitch.DHCPRange?
        if let dhcp = request.dhcp, let address {
            range = dhcp ?? address.defaultDHCPRange
            guard let start = IPv4CIDR.parseAddress(range!.start), let end = IPv4CIDR.parseAddress(range!.end), start <= end,
                  address.contains(start), address.contains(end), start > address.network, end < address.broadcast,
                  !(start...end).contains(address.address) || start != end else {
                throw .invalid("--dhcp \(range!) is not a range inside \(address) (give START-END, as 10.0.0.100-10.0.0.200)")
            }
            guard HostCommand.find("dnsmasq") != nil else { throw .toolMissing("dnsmasq") }
        }
        guard HostCommand.find("ip") != nil else { throw .toolMissing("ip") }
        try SwitchHost.requireNetAdmin("creating switch \(request.name) (a bridge)")
        return try withLock { () throws(SwitchError) -> VirtualSwitch in
            guard !StoreFiles.exists(paths.configuration(request.name)) else { throw .refused("a switch named \(request.name) already exists") }
            var others: [VirtualSwitch] = []
            for name in names() { if let other = try? load(name) { others.append(other) } }
            if let adapter = request.adapter, let user = others.first(where: { $0.adapter == adapter }) {
                throw .refused("adapter \(adapter) already backs switch \(user.name)")
            }
            var salt = 0
            var bridge = VirtualSwitch.bridgeName(for: request.name)
            while others.contains(where: { $0.bridge == bridge }) || SwitchHost.interfaceExists(bridge) {
                salt += 1
                bridge = VirtualSwitch.bridgeName(for: request.name, salt: salt)
            }
            var switchObject = VirtualSwitch(name: request.name, kind: request.kind, bridge: bridge, adapter: request.adapter,
                                             dedicated: request.dedicated, address: address?.description, dhcp: range)
            if let adapter = request.adapter {
                guard SwitchHost.interfaceExists(adapter) else { throw .invalid("there is no interface named \(adapter) (ip link shows them)") }
                // Recorded before the host changes, so a crash half-way leaves a file that
                // delete can act on (the adapter's state is saved before it is touched).
                switchObject.adapterState = try SwitchHost.adapterState(adapter)
            }
            try save(switchObject)
            do throws(SwitchError) {
                switchObject = try SwitchHost(paths: paths).realise(switchObject)
                CrashPoint.reach("switch-realised")
                try save(switchObject)
            } catch {
                unlink(paths.configuration(request.name))
                unlink(paths.leases(request.name))
                unlink(paths.dnsmasqLog(request.name))
                throw error
            }
            return switchObject
        }
    }

    /// Deletes the switch: refused while an adapter is connected; undoes everything on the host.
    public func delete(_ name: String) throws(SwitchError) {
        try withLock { () throws(SwitchError) in
            let switchObject = try load(name)
            let connected = ports(of: name)
            if !connected.isEmpty {
                let vms = connected.map(\.vm).joined(separator: ", ")
                throw .refused("switch \(name) is in use by running VM \(vms); stop \(connected.count == 1 ? "it" : "them") first")
            }
            if isPresent(switchObject) || switchObject.adapterState != nil {
                try SwitchHost.requireNetAdmin("deleting switch \(name)")
            }
            try SwitchHost(paths: paths).unrealise(switchObject)
            try? StoreFiles.removeTree(paths.ports(name))
            for path in [paths.leases(name), paths.dnsmasqLog(name), paths.dnsmasqPID(name), paths.configuration(name)] { unlink(path) }
        }
    }

    /// Makes sure the switch's bridge (and dnsmasq) exist: after a host reboot they do not, and
    /// the first VM to start on the switch builds them again from `NAME.json`.
    func ensurePresent(_ switchObject: VirtualSwitch) throws(SwitchError) -> VirtualSwitch {
        let host = SwitchHost(paths: paths)
        if isPresent(switchObject) {
            if switchObject.dhcp != nil, host.dhcpProcess(switchObject) == nil { try host.startDHCP(switchObject) }
            return switchObject
        }
        try SwitchHost.requireNetAdmin("re-creating switch \(switchObject.name)")
        var fresh = switchObject
        if let adapter = switchObject.adapter {
            guard SwitchHost.interfaceExists(adapter) else {
                throw .invalid("switch \(switchObject.name)'s adapter \(adapter) is not there (ip link shows the interfaces)")
            }
            fresh.adapterState = try SwitchHost.adapterState(adapter)
            try save(fresh)
        }
        fresh = try host.realise(fresh)
        try save(fresh)
        return fresh
    }

    /// Connects an adapter of VM `vm` with `mac` to switch `name`: re-creates the switch if it is
    /// not there, refuses a MAC another connected adapter on the switch has, and opens the TAP
    /// `tap` on the bridge through `opener`. The returned port holds the connection.
    public func connect(switch name: String, vm: String, mac: MACAddress, tap: String,
                        opener: any SwitchPortOpener = LocalPortOpener()) throws(SwitchError) -> SwitchPort {
        _ = try load(name)   // a missing switch is an error before anything is created
        return try withLock { () throws(SwitchError) -> SwitchPort in
            let switchObject = try ensurePresent(try load(name))
            if let other = ports(of: name).first(where: { MACAddress($0.mac) == mac }) {
                throw .refused("MAC \(mac) is already on switch \(name), used by VM \(other.vm); VM \(vm) cannot use it too (give one of them another MAC)")
            }
            let device = try opener.openPort(tap: tap, bridge: switchObject.bridge)
            let directory = paths.ports(name)
            let path = directory + "/" + tap + ".json"
            let record = SwitchPortRecord(vm: vm, mac: mac.description, tap: device.name, pid: getpid())
            let text: String
            do throws(StateCodingError) { text = try StateCoder.encode(record).rendered() } catch {
                throw .store(.failed("\(path): \(error)"))
            }
            do throws(StoreError) {
                try StoreFiles.makeDirectories(directory)
                guard let lock = try FileLock.acquire(path, wait: false) else {
                    throw .failed("\(path) is held by another process: TAP \(tap) is in use")
                }
                lock.write(text + "\n")
                return SwitchPort(tap: device, record: record, lock: lock, recordPath: path)
            } catch { throw .store(error) }
        }
    }

    /// Every switch with its ports, for `hvrun switch list`.
    public func all() -> [(VirtualSwitch, [SwitchPortRecord])] {
        names().compactMap { name in (try? load(name)).map { ($0, ports(of: name)) } }
    }

    /// A TAP name for adapter `index` of a VM: `hvt-` + 8 hex digits of its ID (+ `-index`).
    public static func tapName(vmID: String, index: Int) -> String {
        let hex = vmID.filter { $0.isHexDigit }.prefix(8)
        return "hvt-\(hex)-\(index)"
    }

    /// A TAP name for an adapter of `hvrun run` (no VM ID): `hvp-` + the pid in hex (+ `-index`).
    public static func tapName(pid: Int32, index: Int) -> String {
        "hvp-\(String(UInt32(bitPattern: pid), radix: 16))-\(index)"
    }

    /// Whether this process can create TAPs and bridges (CAP_NET_ADMIN and /dev/net/tun).
    public static func hostCanCreateSwitches() -> (Bool, String) {
        let admin = ckvmHasNetAdmin()
        let tun = access("/dev/net/tun", R_OK | W_OK) == 0
        switch (admin == 1, tun) {
        case (true, true): return (true, "can create TAPs and bridges (CAP_NET_ADMIN, /dev/net/tun)")
        case (false, _): return (false, "cannot create TAPs or bridges: no CAP_NET_ADMIN (virtual switches need root or setcap cap_net_admin+ep hvrun)")
        case (true, false): return (false, "cannot create TAPs: /dev/net/tun is missing or not usable (modprobe tun)")
        }
    }
}
