#if canImport(Glibc)
internal import Glibc
#endif

/// Why a virtual switch operation did not happen. ``exitStatus`` follows `hvrun vm`: 2 when the
/// switch's use refuses it (a running VM is on it, a MAC is taken), 1 for everything else.
public enum SwitchError: Error, Sendable, Equatable, CustomStringConvertible {
    case invalid(String)
    case notFound(name: String)
    case refused(String)
    /// No CAP_NET_ADMIN: what was being done.
    case notPermitted(String)
    /// A host tool is not installed.
    case toolMissing(String)
    /// A host command (or system call) failed; `message` is what it said.
    case host(command: String, message: String)
    case store(StoreError)

    public var exitStatus: Int32 {
        switch self {
        case .refused: 2
        case let .store(error): error.exitStatus
        default: 1
        }
    }

    public var description: String {
        switch self {
        case let .invalid(message), let .refused(message): message
        case let .notFound(name): "no switch named \(name) (hvrun switch list shows the switches)"
        case let .notPermitted(what):
            "\(what) needs CAP_NET_ADMIN (run hvrun as root, or give it the capability: setcap cap_net_admin+ep hvrun); hvrun check says whether this host allows it"
        case let .toolMissing(tool):
            tool == "dnsmasq" ? "dnsmasq is not installed (Debian/Ubuntu: apt-get install dnsmasq-base); --dhcp needs it"
                : "\(tool) is not installed (Debian/Ubuntu: apt-get install iproute2)"
        case let .host(command, message): "\(command): \(message)"
        case let .store(error): error.description
        }
    }
}

/// An IPv4 address with its prefix length, as `10.0.0.1/24`.
public struct IPv4CIDR: Sendable, Equatable, CustomStringConvertible {
    public let address: UInt32
    public let prefixLength: Int

    public init(parsing text: String) throws(SwitchError) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let length = Int(parts[1]), (1...30).contains(length),
              let address = IPv4CIDR.parseAddress(String(parts[0])) else {
            throw .invalid("--address \(text) is not an IPv4 address with a prefix length of 1–30, as 10.0.0.1/24")
        }
        let mask = IPv4CIDR.mask(length)
        guard address & ~mask != 0, address & ~mask != ~mask else {
            throw .invalid("--address \(text) is the network's own or broadcast address; give the host an address inside it, as 10.0.0.1/24")
        }
        self.address = address
        self.prefixLength = length
    }

    public static func parseAddress(_ text: String) -> UInt32? {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for part in parts {
            guard !part.isEmpty, part.count <= 3, let byte = UInt8(part) else { return nil }
            value = value << 8 | UInt32(byte)
        }
        return value
    }

    public static func format(_ address: UInt32) -> String {
        "\(address >> 24).\(address >> 16 & 0xFF).\(address >> 8 & 0xFF).\(address & 0xFF)"
    }

    static func mask(_ length: Int) -> UInt32 { length == 0 ? 0 : ~UInt32(0) << UInt32(32 - length) }

    public var mask: UInt32 { IPv4CIDR.mask(prefixLength) }
    public var network: UInt32 { address & mask }
    public var broadcast: UInt32 { network | ~mask }
    public var description: String { IPv4CIDR.format(address) + "/\(prefixLength)" }
    public var hostAddress: String { IPv4CIDR.format(address) }
    public func contains(_ other: UInt32) -> Bool { other & mask == network }

    /// The DHCP range used when `--dhcp` gives none: the upper half of the subnet's hosts, or the
    /// lower half when the host's own address is in the upper one.
    public var defaultDHCPRange: VirtualSwitch.DHCPRange {
        let first = network + 1, last = broadcast - 1
        let middle = network + (~mask + 1) / 2
        return address >= middle
            ? .init(start: IPv4CIDR.format(first), end: IPv4CIDR.format(max(first, middle - 1)))
            : .init(start: IPv4CIDR.format(middle), end: IPv4CIDR.format(last))
    }
}

/// A virtual switch: `switches/NAME.json` in the store. It says what the switch is and, for an
/// external one, what the host's adapter had before the switch took it (what delete restores).
public struct VirtualSwitch: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// VMs talk to each other only; the host has no address and its stack gets no frame.
        case `private`
        /// VMs and the host (an address on the bridge, optionally DHCP/DNS from dnsmasq).
        case `internal`
        /// Bridged onto a host adapter (which the host keeps using unless dedicated).
        case external
    }

    public struct DHCPRange: Codable, Sendable, Equatable, CustomStringConvertible {
        public var start: String
        public var end: String
        public init(start: String, end: String) {
            self.start = start
            self.end = end
        }
        public var description: String { start + "-" + end }
    }

    /// An address the adapter had (moved to the bridge, or removed when dedicated).
    public struct SavedAddress: Codable, Sendable, Equatable {
        public var family: String
        public var local: String
        public var prefixLength: Int
        public var broadcast: String?
        public var scope: String?
        public var noPrefixRoute: Bool
        public var noDAD: Bool
        /// Seconds left when saved (nil: forever), as a DHCP or SLAAC address has.
        public var validLifetime: Int64?
        public var preferredLifetime: Int64?
        enum CodingKeys: String, CodingKey {
            case family, local, broadcast, scope
            case prefixLength = "prefix_length"
            case noPrefixRoute = "noprefixroute"
            case noDAD = "nodad"
            case validLifetime = "valid_lft"
            case preferredLifetime = "preferred_lft"
        }
    }

    /// A route through the adapter that the kernel does not make by itself (a default route, a
    /// static route): `ip route add` arguments without the device.
    public struct SavedRoute: Codable, Sendable, Equatable {
        public var family: String
        public var arguments: [String]
    }

    /// What the host adapter had before an external switch took it.
    public struct AdapterState: Codable, Sendable, Equatable {
        public var addresses: [SavedAddress]
        public var routes: [SavedRoute]
    }

    public var name: String
    public var kind: Kind
    /// The Linux bridge: `hvsw-` and 8 hex digits of a hash of the name (within IFNAMSIZ).
    public var bridge: String
    public var adapter: String?
    public var dedicated: Bool
    /// The host's address on an internal switch.
    public var address: String?
    public var dhcp: DHCPRange?
    /// External only: the adapter's addresses and routes as they were (restored on delete).
    public var adapterState: AdapterState?

    enum CodingKeys: String, CodingKey {
        case name, bridge, adapter, dedicated, address, dhcp
        case kind = "type"
        case adapterState = "adapter_state"
    }

    public init(name: String, kind: Kind, bridge: String, adapter: String? = nil, dedicated: Bool = false,
                address: String? = nil, dhcp: DHCPRange? = nil) {
        self.name = name
        self.kind = kind
        self.bridge = bridge
        self.adapter = adapter
        self.dedicated = dedicated
        self.address = address
        self.dhcp = dhcp
    }

    /// Whether the host's stack is kept off the bridge (private, dedicated).
    public var isolatesHost: Bool { kind == .private || (kind == .external && dedicated) }

    /// The bridge name for a switch: `hvsw-` + 8 hex digits of FNV-1a(name) (+ `salt`).
    public static func bridgeName(for name: String, salt: Int = 0) -> String {
        var hash: UInt32 = 0x811C9DC5
        for byte in Array((salt == 0 ? name : "\(name)#\(salt)").utf8) {
            hash = (hash ^ UInt32(byte)) &* 0x0100_0193
        }
        let hex = String(hash, radix: 16)
        return "hvsw-" + String(repeating: "0", count: 8 - hex.count) + hex
    }

    /// The bridge's own MAC on a private or internal switch: locally administered, `02:68:` and
    /// 4 bytes of FNV-1a(name), the same every time the switch is made.
    public static func bridgeMAC(for name: String) -> MACAddress {
        var hash: UInt32 = 0x811C9DC5
        for byte in Array(name.utf8) { hash = (hash ^ UInt32(byte)) &* 0x0100_0193 }
        return MACAddress(bytes: [0x02, 0x68, UInt8(hash >> 24), UInt8(hash >> 16 & 0xFF), UInt8(hash >> 8 & 0xFF), UInt8(hash & 0xFF)])!
    }

    public func encoded() throws(SwitchError) -> String {
        do throws(StateCodingError) { return try StateCoder.encode(self).rendered() + "\n" } catch {
            throw .invalid("cannot encode the switch: \(error)")
        }
    }

    public static func decode(_ bytes: [UInt8], path: String) throws(SwitchError) -> VirtualSwitch {
        let value: JSONValue
        do throws(JSONParseError) { value = try JSONValue.parse(bytes) } catch { throw .store(.failed("\(path): \(error)")) }
        do throws(StateCodingError) { return try StateCoder.decode(VirtualSwitch.self, from: value) } catch {
            throw .store(.failed("\(path): \(error)"))
        }
    }

    /// What `hvrun switch info --json` prints (ports: the VMs connected now).
    public func json(ports: [SwitchPortRecord], realised: Bool, leasesPath: String?) -> JSONValue {
        .object([
            ("name", .string(name)), ("type", .string(kind.rawValue)), ("bridge", .string(bridge)),
            ("adapter", adapter.map { .string($0) } ?? .null), ("dedicated", .bool(dedicated)),
            ("address", address.map { .string($0) } ?? .null),
            ("dhcp", dhcp.map { .string($0.description) } ?? .null),
            ("leases", leasesPath.map { .string($0) } ?? .null),
            ("present", .bool(realised)),
            ("ports", .array(ports.map { .object([("vm", .string($0.vm)), ("mac", .string($0.mac)), ("tap", .string($0.tap))]) })),
        ])
    }
}
