internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// Builds and removes a switch's Linux objects: a bridge, its address and dnsmasq (internal),
/// the adapter enslaved with the host's addresses and routes moved (external), and the host kept
/// off the bridge (private, dedicated). Every step that changed the host pushes its undo, so a
/// failure half-way leaves the host as it was.
struct SwitchHost {
    let paths: SwitchPaths

    /// Undo steps run in reverse order on failure.
    final class Rollback {
        var steps: [() -> Void] = []
        func push(_ step: @escaping () -> Void) { steps.append(step) }
        func run() { for step in steps.reversed() { step() } }
    }

    static func interfaceExists(_ name: String) -> Bool { if_nametoindex(name) != 0 }

    static func requireNetAdmin(_ what: String) throws(SwitchError) {
        if ckvm_has_net_admin() == 0 { throw .notPermitted(what) }
    }

    /// Writes `value` to `/proc/sys/net/…` (the calling process's network namespace).
    static func sysctl(_ path: String, _ value: String) throws(SwitchError) {
        let full = "/proc/sys/net/" + path
        let fd = open(full, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .host(command: "write \(full)", message: SystemError.describe(errno)) }
        defer { close(fd) }
        let bytes = Array(value.utf8)
        guard bytes.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == bytes.count else {
            throw .host(command: "write \(full)", message: SystemError.describe(errno))
        }
    }

    /// The adapter's addresses and the routes the kernel would not remake by itself.
    static func adapterState(_ adapter: String) throws(SwitchError) -> VirtualSwitch.AdapterState {
        var addresses: [VirtualSwitch.SavedAddress] = []
        let links = try HostCommand.ipJSON(["addr", "show", "dev", adapter])
        for info in links.element(0)?["addr_info"]?.arrayValue ?? [] {
            guard let family = info["family"]?.stringValue, let local = info["local"]?.stringValue,
                  let length = info["prefixlen"]?.int64Value else { continue }
            let scope = info["scope"]?.stringValue
            // IPv6 link-local addresses belong to the interface (the kernel makes them): they stay.
            if family == "inet6" && scope != "global" { continue }
            guard family == "inet" || family == "inet6" else { continue }
            func lifetime(_ key: String) -> Int64? {
                guard let value = info[key]?.int64Value, value < 0xFFFF_FFFF else { return nil }
                return value
            }
            addresses.append(.init(family: family, local: local, prefixLength: Int(length), broadcast: info["broadcast"]?.stringValue,
                                   scope: scope, noPrefixRoute: info["noprefixroute"]?.boolValue ?? false,
                                   noDAD: info["nodad"]?.boolValue ?? false,
                                   validLifetime: lifetime("valid_life_time"), preferredLifetime: lifetime("preferred_life_time")))
        }
        var routes: [VirtualSwitch.SavedRoute] = []
        for family in ["-4", "-6"] {
            for route in try HostCommand.ipJSON([family, "route", "show", "table", "all", "dev", adapter]).arrayValue ?? [] {
                let proto = route["protocol"]?.stringValue
                let table = route["table"]?.stringValue
                let type = route["type"]?.stringValue
                guard let dst = route["dst"]?.stringValue else { continue }
                // Made by the kernel from an address or the link (and remade when they come back).
                if proto == "kernel" || table == "local" || dst.hasPrefix("fe80::") || dst.hasPrefix("ff00::") { continue }
                if let type, type != "unicast" { continue }
                var arguments = [dst]
                if let gateway = route["gateway"]?.stringValue { arguments += ["via", gateway] }
                if let proto { arguments += ["proto", proto] }
                if let metric = route["metric"]?.int64Value { arguments += ["metric", "\(metric)"] }
                if let scope = route["scope"]?.stringValue { arguments += ["scope", scope] }
                if let source = route["prefsrc"]?.stringValue { arguments += ["src", source] }
                if let table, table != "main" { arguments += ["table", table] }
                if route["flags"]?.arrayValue?.contains(.string("onlink")) == true { arguments.append("onlink") }
                routes.append(.init(family: family, arguments: arguments))
            }
        }
        return .init(addresses: addresses, routes: routes)
    }

    static func addAddress(_ address: VirtualSwitch.SavedAddress, to device: String) throws(SwitchError) {
        var arguments = [address.family == "inet6" ? "-6" : "-4", "addr", "add", "\(address.local)/\(address.prefixLength)"]
        if let broadcast = address.broadcast { arguments += ["broadcast", broadcast] }
        if let scope = address.scope, scope != "global" { arguments += ["scope", scope] }
        if address.noPrefixRoute { arguments.append("noprefixroute") }
        if address.noDAD { arguments.append("nodad") }
        if let valid = address.validLifetime {
            arguments += ["valid_lft", "\(valid)", "preferred_lft", "\(min(valid, address.preferredLifetime ?? valid))"]
        }
        try HostCommand.ip(arguments + ["dev", device])
    }

    static func deleteAddress(_ address: VirtualSwitch.SavedAddress, from device: String) throws(SwitchError) {
        try HostCommand.ip([address.family == "inet6" ? "-6" : "-4", "addr", "del", "\(address.local)/\(address.prefixLength)", "dev", device])
    }

    static func addRoute(_ route: VirtualSwitch.SavedRoute, via device: String) throws(SwitchError) {
        try HostCommand.ip([route.family, "route", "replace"] + route.arguments + ["dev", device])
    }

    /// Creates the switch's Linux objects. Throws with nothing changed when a step fails.
    /// Returns the switch with, for an external one, the adapter state it saved.
    func realise(_ switchObject: VirtualSwitch) throws(SwitchError) -> VirtualSwitch {
        var result = switchObject
        let rollback = Rollback()
        do throws(SwitchError) {
            let bridge = switchObject.bridge
            var create = ["link", "add", bridge]
            var adapterState: VirtualSwitch.AdapterState?
            if let adapter = switchObject.adapter {
                guard Self.interfaceExists(adapter) else { throw .invalid("there is no interface named \(adapter) (ip link shows them)") }
                let link = try HostCommand.ipJSON(["-d", "link", "show", "dev", adapter]).element(0)
                if let master = link?["master"]?.stringValue { throw .refused("\(adapter) is already a port of \(master)") }
                if link?["linkinfo"]?["info_kind"]?.stringValue == "bridge" { throw .invalid("\(adapter) is a bridge, not an adapter") }
                if link?["link_type"]?.stringValue != "ether" { throw .invalid("\(adapter) is not an Ethernet adapter") }
                // The bridge takes the adapter's MAC: the physical network's ARP caches, DHCP
                // leases and switch port security keep seeing the same host.
                if let mac = link?["address"]?.stringValue { create += ["address", mac] }
                adapterState = try Self.adapterState(adapter)
                result.adapterState = adapterState
            } else {
                // A fixed MAC: a bridge without one takes the lowest of its ports' MACs, so it
                // would change whenever a VM's TAP comes or goes (or after a reboot), and the
                // VMs' ARP caches would point at an address nobody answers to.
                create += ["address", VirtualSwitch.bridgeMAC(for: switchObject.name).description]
            }
            // No multicast snooping: the bridge would join 224.0.0.106 and send IGMP reports itself.
            create += ["type", "bridge", "mcast_snooping", "0", "stp_state", "0", "forward_delay", "0"]
            try HostCommand.ip(create)
            rollback.push { _ = try? HostCommand.ip(["link", "del", bridge]) }
            CrashPoint.reach("switch-bridge-created")
            if switchObject.isolatesHost {
                // No IPv6 on the bridge's own interface (no link-local address, no MLD, no RS),
                // and an XDP program that drops every frame the bridge passes up to the host.
                try Self.sysctl("ipv6/conf/\(bridge)/disable_ipv6", "1")
                let index = Int32(bitPattern: if_nametoindex(bridge))
                let attached = ckvm_xdp_drop_all(index)
                guard attached == 0 else {
                    throw .host(command: "attach the host-isolating XDP program to \(bridge)", message: SystemError.describe(-attached))
                }
            }
            if let address = switchObject.address {
                try HostCommand.ip(["addr", "add", address, "dev", bridge])
            }
            try HostCommand.ip(["link", "set", bridge, "up"])
            if let adapter = switchObject.adapter, let state = adapterState {
                // The adapter's addresses go (their routes with them), it joins the bridge, and the
                // addresses and routes come back on the bridge (unless the switch is dedicated).
                for address in state.addresses {
                    try Self.deleteAddress(address, from: adapter)
                    rollback.push { _ = try? Self.addAddress(address, to: adapter) }
                    CrashPoint.reach("switch-address-removed")
                }
                rollback.push { for route in state.routes { _ = try? Self.addRoute(route, via: adapter) } }
                try HostCommand.ip(["link", "set", adapter, "master", bridge])
                rollback.push { _ = try? HostCommand.ip(["link", "set", adapter, "nomaster"]) }
                CrashPoint.reach("switch-adapter-enslaved")
                try HostCommand.ip(["link", "set", adapter, "up"])
                if !switchObject.dedicated {
                    for address in state.addresses { try Self.addAddress(address, to: bridge) }
                    CrashPoint.reach("switch-addresses-moved")
                    for route in state.routes { try Self.addRoute(route, via: bridge) }
                }
            }
            if switchObject.dhcp != nil { try startDHCP(result) }
        } catch {
            rollback.run()
            throw error
        }
        return result
    }

    /// Removes what ``realise(_:)`` made and gives the adapter back its addresses and routes.
    /// Goes on past failures (so as much as possible is undone) and reports the first.
    func unrealise(_ switchObject: VirtualSwitch) throws(SwitchError) {
        var first: SwitchError?
        stopDHCP(switchObject)
        if let adapter = switchObject.adapter, Self.interfaceExists(adapter) {
            do throws(SwitchError) { try HostCommand.ip(["link", "set", adapter, "nomaster"]) } catch { first = first ?? error }
        }
        if Self.interfaceExists(switchObject.bridge) {
            do throws(SwitchError) { try HostCommand.ip(["link", "del", switchObject.bridge]) } catch { first = first ?? error }
        }
        if let adapter = switchObject.adapter, let state = switchObject.adapterState, Self.interfaceExists(adapter) {
            let present = (try? Self.adapterState(adapter))?.addresses ?? []
            for address in state.addresses where !present.contains(where: { $0.local == address.local }) {
                do throws(SwitchError) { try Self.addAddress(address, to: adapter) } catch { first = first ?? error }
            }
            for route in state.routes {
                do throws(SwitchError) { try Self.addRoute(route, via: adapter) } catch { first = first ?? error }
            }
        }
        if let adapter = switchObject.adapter, switchObject.adapterState?.addresses.contains(where: { $0.family == "inet6" }) == true {
            Self.waitForDuplicateAddressDetection(adapter)
        }
        if let first { throw first }
    }

    /// Waits (up to 5 s) until no IPv6 address of `device` is tentative: a restored address gets
    /// its local route only when duplicate address detection has finished.
    static func waitForDuplicateAddressDetection(_ device: String) {
        for _ in 0..<100 {
            guard let links = try? HostCommand.ipJSON(["-6", "addr", "show", "dev", device]),
                  let infos = links.element(0)?["addr_info"]?.arrayValue else { return }
            if !infos.contains(where: { $0["tentative"]?.boolValue == true }) { return }
            usleep(50_000)
        }
    }

    // MARK: dnsmasq

    func startDHCP(_ switchObject: VirtualSwitch) throws(SwitchError) {
        guard let range = switchObject.dhcp, let address = switchObject.address else { return }
        let cidr = try IPv4CIDR(parsing: address)
        let name = switchObject.name
        stopDHCP(switchObject)
        let arguments = [
            "--conf-file=/dev/null", "--pid-file=" + paths.dnsmasqPID(name), "--dhcp-leasefile=" + paths.leases(name),
            "--interface=" + switchObject.bridge, "--except-interface=lo", "--bind-interfaces",
            "--listen-address=" + cidr.hostAddress, "--dhcp-range=\(range.start),\(range.end),\(IPv4CIDR.format(cidr.mask)),1h",
            "--dhcp-authoritative", "--strict-order", "--no-hosts", "--no-resolv", "--user=root", "--group=root",
        ]
        let log = paths.dnsmasqLog(name)
        unlink(log)
        let result = try HostCommand.run("dnsmasq", arguments, outputFile: log)
        guard result.status == 0 else {
            let said = (try? StoreFiles.read(log)).map { String(decoding: $0, as: UTF8.self).split(separator: "\n").joined(separator: "; ") } ?? ""
            throw .host(command: "dnsmasq for switch \(name)", message: "exit status \(result.status): \(said)")
        }
    }

    /// The running dnsmasq of the switch (its pid file names a live dnsmasq with our pid file).
    func dhcpProcess(_ switchObject: VirtualSwitch) -> pid_t? {
        guard let bytes = try? StoreFiles.read(paths.dnsmasqPID(switchObject.name)),
              let pid = pid_t(String(decoding: bytes, as: UTF8.self).trimmingTrailingNewlines), pid > 0,
              let command = try? StoreFiles.read("/proc/\(pid)/cmdline") else { return nil }
        let text = String(decoding: command, as: UTF8.self)
        return text.contains("dnsmasq") && text.contains(paths.dnsmasqPID(switchObject.name)) ? pid : nil
    }

    func stopDHCP(_ switchObject: VirtualSwitch) {
        if let pid = dhcpProcess(switchObject) {
            kill(pid, SIGTERM)
            for _ in 0..<100 where kill(pid, 0) == 0 { usleep(20_000) }
            if kill(pid, 0) == 0 { kill(pid, SIGKILL) }
        }
        unlink(paths.dnsmasqPID(switchObject.name))
    }
}

extension JSONValue {
    func element(_ index: Int) -> JSONValue? {
        if case let .array(values) = self, values.indices.contains(index) { return values[index] }
        return nil
    }
}

func ckvmBridgeAttach(_ bridge: String, _ port: String) -> Int32 { ckvm_bridge_attach(bridge, port) }
func ckvmHasNetAdmin() -> Int32 { ckvm_has_net_admin() }
