import ArgumentParser
import HyperCore

/// `hvrun switch …`: virtual switches kept in the store (see Docs/network.md). The work is the
/// library's (`SwitchStore`); these commands parse, call it, and print.
/// Exit status: 0 success, 1 usage or host error, 2 refused by the switch's use (a running VM).
struct SwitchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "switch",
        abstract: "Create, list, show and delete virtual switches (Linux bridges) for VM network adapters.",
        discussion: """
            Kinds: private (VMs only, the host sees none of their frames), internal (VMs and the host, \
            which has --address on it and can serve --dhcp with dnsmasq), external (bridged onto host \
            adapter --adapter; the host keeps its addresses on the bridge, or loses the adapter with \
            --dedicated). Needs CAP_NET_ADMIN. Switches live in $HVRUN_HOME/switches. \
            Exit status: 0 success; 1 usage or host error; 2 refused (e.g. a running VM uses the switch).
            """,
        subcommands: [SwitchCreateCommand.self, SwitchListCommand.self, SwitchInfoCommand.self, SwitchDeleteCommand.self]
    )
}

/// Runs a switch command: a ``SwitchError`` or ``StoreError`` becomes one line on stderr and its status.
func switchCommand(_ body: (SwitchStore) throws -> Void) throws {
    do {
        try body(SwitchStore(root: try VMStore.defaultRoot()))
    } catch let error as SwitchError {
        printError("hvrun: \(error)")
        throw ExitCode(error.exitStatus)
    } catch let error as StoreError {
        printError("hvrun: \(error)")
        throw ExitCode(error.exitStatus)
    }
}

func switchJSON(_ store: SwitchStore, _ switchObject: VirtualSwitch, ports: [SwitchPortRecord]) -> JSONValue {
    switchObject.json(ports: ports, realised: store.isPresent(switchObject),
                      leasesPath: switchObject.dhcp == nil ? nil : store.leasesPath(switchObject.name))
}

struct SwitchCreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create", abstract: "Create a virtual switch.",
        usage: "hvrun switch create <name> --type private|internal|external [--adapter IFACE] [--dedicated] [--address CIDR] [--dhcp [START-END]]")

    @Argument(help: ArgumentHelp("The switch's name: 1-64 of A-Z a-z 0-9 . _ -, not starting with . or - (not 'none').", valueName: "name"))
    var name: String
    @Argument(help: ArgumentHelp("With --dhcp: the addresses to lease, START-END (default: half of the subnet).", valueName: "range"))
    var dhcpRange: String?
    @Option(name: .customLong("type"), help: ArgumentHelp("private, internal or external.", valueName: "kind"))
    var kind: String
    @Option(help: ArgumentHelp("External: the host interface the switch is bridged onto.", valueName: "iface"))
    var adapter: String?
    @Flag(help: "External: give the adapter to the VMs alone (the host loses it).")
    var dedicated = false
    @Option(help: ArgumentHelp("Internal: the host's address on the switch, as 10.0.0.1/24.", valueName: "cidr"))
    var address: String?
    @Flag(help: "Internal: serve DHCP (and DNS) to the VMs with dnsmasq; an optional START-END range may follow.")
    var dhcp = false

    func run() throws {
        try switchCommand { store in
            guard let kind = VirtualSwitch.Kind(rawValue: kind) else {
                throw SwitchError.invalid("--type must be private, internal or external (not \(kind))")
            }
            if dedicated && kind != .external { throw SwitchError.invalid("--dedicated is for --type external") }
            var request = SwitchCreateRequest(name: name, kind: kind)
            request.adapter = adapter
            request.dedicated = dedicated
            request.address = address
            if let dhcpRange {
                guard dhcp else { throw SwitchError.invalid("unexpected argument '\(dhcpRange)' (a DHCP range follows --dhcp)") }
                let bounds = dhcpRange.split(separator: dhcpRange.contains(",") ? "," : "-").map(String.init)
                guard bounds.count == 2 else { throw SwitchError.invalid("--dhcp \(dhcpRange): give START-END, as 10.0.0.100-10.0.0.200") }
                request.dhcp = .some(VirtualSwitch.DHCPRange(start: bounds[0], end: bounds[1]))
            } else if dhcp {
                request.dhcp = .some(nil)
            }
            let created = try store.create(request)
            var line = "created \(created.kind.rawValue) switch \(created.name) (bridge \(created.bridge)"
            if let address = created.address { line += ", host address \(address)" }
            if let range = created.dhcp { line += ", DHCP \(range)" }
            if let adapter = created.adapter { line += ", adapter \(adapter)\(created.dedicated ? " dedicated" : "")" }
            printOut(line + ")\n")
        }
    }
}

struct SwitchListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List the virtual switches.")
    @Flag(help: "Print a JSON array of the objects `hvrun switch info --json` prints.")
    var json = false

    func run() throws {
        try switchCommand { store in
            let all = store.all()
            if json {
                printOut(JSONValue.array(all.map { switchJSON(store, $0.0, ports: $0.1) }).rendered() + "\n")
                return
            }
            var lines = [["NAME", "TYPE", "BRIDGE", "ADAPTER", "ADDRESS", "DHCP", "VMS"]]
            for (switchObject, ports) in all {
                lines.append([switchObject.name, switchObject.kind.rawValue + (switchObject.dedicated ? " (dedicated)" : ""),
                              switchObject.bridge + (store.isPresent(switchObject) ? "" : " (absent)"),
                              switchObject.adapter ?? "-", switchObject.address ?? "-",
                              switchObject.dhcp?.description ?? "-", ports.isEmpty ? "-" : ports.map(\.vm).joined(separator: ",")])
            }
            let widths = (0..<7).map { column in lines.map { $0[column].count }.max()! }
            for line in lines {
                let padded = line.enumerated().map { index, cell in index == 6 ? cell : cell + String(repeating: " ", count: widths[index] - cell.count + 2) }
                printOut(padded.joined() + "\n")
            }
        }
    }
}

struct SwitchInfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show a virtual switch.")
    @Argument(help: ArgumentHelp("The switch's name.", valueName: "name")) var name: String
    @Flag(help: "Print JSON: name, type, bridge, adapter, dedicated, address, dhcp, leases, present, ports.")
    var json = false

    func run() throws {
        try switchCommand { store in
            let switchObject = try store.load(name)
            let ports = store.ports(of: name)
            if json {
                printOut(switchJSON(store, switchObject, ports: ports).rendered() + "\n")
                return
            }
            var text = "name:      \(switchObject.name)\ntype:      \(switchObject.kind.rawValue)\n"
            text += "bridge:    \(switchObject.bridge)\(store.isPresent(switchObject) ? "" : " (absent: made again when a VM on it starts)")\n"
            if let adapter = switchObject.adapter { text += "adapter:   \(adapter)\(switchObject.dedicated ? " (dedicated)" : "")\n" }
            if let address = switchObject.address { text += "address:   \(address)\n" }
            if let range = switchObject.dhcp { text += "dhcp:      \(range) (leases: \(store.leasesPath(name)))\n" }
            for port in ports { text += "vm:        \(port.vm) \(port.mac) (\(port.tap))\n" }
            printOut(text)
        }
    }
}

struct SwitchDeleteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete", abstract: "Delete a virtual switch (refused while a running VM uses it); the host is left as it was before the switch.")
    @Argument(help: ArgumentHelp("The switch's name.", valueName: "name")) var name: String

    func run() throws {
        try switchCommand { store in
            try store.delete(name)
            printOut("deleted switch \(name)\n")
        }
    }
}
