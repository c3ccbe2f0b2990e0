import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// A host of its own for one switch test: a network namespace `hcsw-<pid>-<n>` in which every
/// `hvrun` runs (`ip netns exec`), with a store in a temporary directory. Bridges, TAPs, veths and
/// dnsmasq all live inside it (and a second namespace playing the physical network for the
/// external tests); `deinit` ends the dnsmasq processes the test's switches started and deletes
/// the namespaces, so nothing touches the real host's network.
final class SwitchHostNamespace {
    static let ip = "/usr/sbin/ip"
    nonisolated(unsafe) static var counter = 0
    let namespace: String
    /// The namespace playing the physical network (external tests), if made.
    private(set) var physical: String?
    let directory: TemporaryDirectory
    var home: String { directory.path + "/home" }
    var prefix: [String] { [Self.ip, "netns", "exec", namespace] }
    private var extraPIDFiles: [String] = []

    static var unavailableReason: String? {
        if let reason = TestNetwork.unavailableReason { return reason }
        if !TestHost.kvmUsable { return "no usable /dev/kvm: switch tests skipped" }
        if TestHost.hvrunPath == nil { return "hvrun is not built next to the tests: switch tests skipped" }
        return nil
    }

    init() throws {
        Self.counter += 1
        namespace = "hcsw-\(getpid())-\(Self.counter)"
        directory = try TemporaryDirectory()
        do {
            try ip(["netns", "add", namespace])
            try ip(["-n", namespace, "link", "set", "lo", "up"])
        } catch {
            cleanUp()
            throw error
        }
    }

    deinit { cleanUp() }

    private func cleanUp() {
        // dnsmasq outlives a deleted namespace: end the ones the test's switches (or the test) started.
        let pidFiles = StoreFiles.list(home + "/switches").filter { $0.hasSuffix(".dnsmasq.pid") }.map { home + "/switches/" + $0 } + extraPIDFiles
        for file in pidFiles {
            guard let bytes = try? StoreFiles.read(file), let pid = Int32(String(decoding: bytes, as: UTF8.self).split(separator: "\n").first ?? ""),
                  pid > 1, commandLine(of: pid).contains(file) else { continue }
            // SIGKILL: a dnsmasq spawned from this process inherits its blocked signals (the
            // test runner blocks SIGTERM), so it would never see a SIGTERM.
            kill(pid, SIGKILL)
        }
        if let physical { _ = try? Subprocess.run(Self.ip, ["netns", "del", physical], timeoutSeconds: 10) }
        _ = try? Subprocess.run(Self.ip, ["netns", "del", namespace], timeoutSeconds: 10)
    }

    @discardableResult
    func ip(_ arguments: [String]) throws -> String {
        let result = try Subprocess.run(Self.ip, arguments, timeoutSeconds: 20)
        guard result.status == 0 else { throw Subprocess.Failure.spawn("ip \(arguments.joined(separator: " ")): \(result.stderr)", result.status) }
        return result.stdout
    }

    /// A command inside the namespace, to its end.
    func exec(_ command: [String], timeoutSeconds: Double = 30) throws -> Subprocess.Result {
        try Subprocess.run(Self.ip, ["netns", "exec", namespace] + command, timeoutSeconds: timeoutSeconds)
    }

    /// `hvrun ARGUMENTS` inside the namespace with this store, to its end.
    func hvrun(_ arguments: [String], timeoutSeconds: Double = 60) throws -> (status: Int32, stdout: String, stderr: String) {
        let process = try spawn(arguments)
        let status = process.wait(timeoutSeconds: timeoutSeconds)
        return (status, process.output, process.errors)
    }

    /// `hvrun ARGUMENTS` inside the namespace with this store, in the background.
    func spawn(_ arguments: [String]) throws -> VMProcess {
        try VMProcess(arguments, environment: ["HVRUN_HOME=" + home], prefix: prefix)
    }

    func switchInfo(_ name: String) throws -> JSONValue {
        try JSONValue.parse(try hvrun(["switch", "info", name, "--json"]).stdout)
    }

    /// `net.elf` on switch `nic` through `hvrun run`.
    func guest(nic: String, _ cmdline: String, timeout: Int = 90) throws -> VMProcess {
        try spawn(["run", "--kernel", try GuestImages.path("net.elf"), "--memory", "64M", "--nic", nic,
                   "--timeout", "\(timeout)", "--cmdline", cmdline])
    }

    /// `ip -j` output of this namespace (addresses or routes), for before/after comparisons.
    func snapshot() throws -> String {
        // Duplicate address detection still running (a tentative address, its local route not
        // there yet) would make two snapshots of the same state differ.
        for _ in 0..<100 where try ip(["-n", namespace, "-j", "addr"]).contains("\"tentative\"") { usleep(50_000) }
        let addresses = try ip(["-n", namespace, "-j", "addr"])
        let routes4 = try ip(["-n", namespace, "-j", "-4", "route", "show", "table", "all"])
        let routes6 = try ip(["-n", namespace, "-j", "-6", "route", "show", "table", "all"])
        return addresses + routes4 + routes6
    }

    func interfaces() throws -> [String] {
        guard case let .array(links) = try JSONValue.parse(try ip(["-n", namespace, "-j", "link"])) else { return [] }
        return links.compactMap { $0["ifname"]?.stringValue }
    }

    /// A veth pair standing in for a physical adapter: `adapter` here, its far end in a second
    /// namespace with 192.168.77.1/24 and its own dnsmasq (DHCP 192.168.77.100–150). This side
    /// gets 192.168.77.10/24, fd00:77::10/64, a default route and a static route through .1.
    func makePhysicalNetwork(adapter: String) throws {
        let far = namespace + "-phys"
        try ip(["netns", "add", far])
        physical = far
        try ip(["-n", far, "link", "set", "lo", "up"])
        try ip(["-n", namespace, "link", "add", adapter, "type", "veth", "peer", "name", "phys0", "netns", far])
        try ip(["-n", namespace, "addr", "add", "192.168.77.10/24", "dev", adapter])
        try ip(["-n", namespace, "-6", "addr", "add", "fd00:77::10/64", "nodad", "dev", adapter])
        try ip(["-n", namespace, "link", "set", adapter, "up"])
        try ip(["-n", far, "addr", "add", "192.168.77.1/24", "dev", "phys0"])
        try ip(["-n", far, "link", "set", "phys0", "up"])
        try ip(["-n", namespace, "route", "add", "default", "via", "192.168.77.1"])
        try ip(["-n", namespace, "route", "add", "10.77.0.0/16", "via", "192.168.77.1", "metric", "50"])
        let pidFile = directory.file("phys-dnsmasq.pid")
        extraPIDFiles.append(pidFile)
        let dnsmasq = try Subprocess.run(Self.ip, ["netns", "exec", far, "dnsmasq", "--conf-file=/dev/null", "--pid-file=" + pidFile,
                                                   "--dhcp-leasefile=" + directory.file("phys.leases"), "--interface=phys0",
                                                   "--bind-interfaces", "--except-interface=lo", "--port=0", "--user=root", "--group=root",
                                                   "--dhcp-range=192.168.77.100,192.168.77.150,1h"], timeoutSeconds: 20)
        guard dnsmasq.status == 0 else { throw Subprocess.Failure.spawn("dnsmasq in \(far): \(dnsmasq.stderr)", dnsmasq.status) }
    }

    /// A command in the physical network's namespace.
    func execPhysical(_ command: [String], timeoutSeconds: Double = 30) throws -> Subprocess.Result {
        try Subprocess.run(Self.ip, ["netns", "exec", physical!] + command, timeoutSeconds: timeoutSeconds)
    }

    /// `tcpdump` on `interface` in the background: `stop()` returns the frames it printed.
    func capture(_ interface: String) throws -> Capture { try Capture(prefix: prefix, interface: interface) }
}

/// A packet capture in the background (tcpdump, one line per frame).
final class Capture {
    let pid: pid_t
    let outputPath: String
    private var stopped = false

    init(prefix: [String], interface: String) throws {
        outputPath = "/tmp/hypercore-capture-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, outputPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        let argv = (prefix + ["tcpdump", "-n", "-l", "-e", "-i", interface]).map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, prefix[0], &actions, nil, argv, environ)
        guard spawned == 0 else { throw Subprocess.Failure.spawn("tcpdump", spawned) }
        self.pid = pid
        usleep(700_000)   // tcpdump attaches its socket
    }

    /// Ends the capture; the frames seen, one line each.
    func stop() -> [String] {
        if !stopped {
            stopped = true
            // tcpdump on an idle interface may not notice SIGINT (libpcap blocks in poll until a
            // frame comes); its output is line-buffered (-l), so SIGKILL after a moment loses nothing.
            kill(pid, SIGINT)
            var status: Int32 = 0
            for _ in 0..<20 where waitpid(pid, &status, WNOHANG) == 0 { usleep(50_000) }
            if waitpid(pid, &status, WNOHANG) == 0 {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
            }
        }
        let text = (try? StoreFiles.read(outputPath)).map { String(decoding: $0, as: UTF8.self) } ?? ""
        return text.split(separator: "\n").map(String.init)
    }

    deinit {
        _ = stop()
        unlink(outputPath)
    }
}

@Suite("virtual switches through hvrun, in a network namespace per test", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct SwitchTests {
    static func missingTools() -> String? {
        for tool in ["tcpdump", "dnsmasq", "ping"] where !TestHost.hasTool(tool) && access("/usr/sbin/" + tool, X_OK) != 0 {
            return "\(tool) is not installed: switch tests skipped (CI installs it)"
        }
        return nil
    }

    static func skipReason() -> String? { SwitchHostNamespace.unavailableReason ?? missingTools() }

    static func lines(_ process: VMProcess, prefix: String) -> [String] {
        process.outputLines.filter { $0.hasPrefix(prefix) }.map { String($0.dropFirst(prefix.count)) }
    }

    @Test("private: two VMs ping each other; the host has no address on the switch, cannot reach them, and its side of the bridge sees none of their frames",
          .timeLimit(.minutes(3)))
    func privateSwitch() throws {
        if let reason = Self.skipReason() { print(reason); return }
        let host = try SwitchHostNamespace()
        let created = try host.hvrun(["switch", "create", "lab", "--type", "private"])
        #expect(created.status == 0, "\(created.stderr)")
        let info = try host.switchInfo("lab")
        let bridge = try #require(info["bridge"]?.stringValue)
        #expect(bridge.hasPrefix("hvsw-") && bridge.utf8.count <= 15)
        #expect(info["type"]?.stringValue == "private" && info["address"] == .null && info["dhcp"] == .null)
        // The bridge's own interface: no IPv4 or IPv6 address at all.
        let addresses = try JSONValue.parse(try host.ip(["-n", host.namespace, "-j", "addr", "show", "dev", bridge]))
        #expect(addresses[0]?["addr_info"] == .array([]), "\(addresses.rendered())")

        let capture = try host.capture(bridge)
        let a = try host.guest(nic: "lab,mac=52:54:00:00:0a:01", "ip=10.5.0.1 peer=10.5.0.2 count=20 interval=200 answer=20")
        let b = try host.guest(nic: "lab,mac=52:54:00:00:0a:02", "ip=10.5.0.2 peer=10.5.0.1 count=20 interval=200 answer=20")
        // The TAP side of VM a does carry the frames (the capture works where frames are).
        let tapA = SwitchStore.tapName(pid: a.pid, index: 0)
        var tapCapture: Capture?
        for _ in 0..<100 where tapCapture == nil {
            if (try? host.interfaces())?.contains(tapA) == true { tapCapture = try host.capture(tapA) } else { usleep(50_000) }
        }
        #expect(tapCapture != nil, "VM a's TAP \(tapA) never appeared")
        #expect(a.waitForLine("answered=20", timeoutSeconds: 90), "\(a.output)\(a.errors)")
        #expect(b.waitForLine("answered=20", timeoutSeconds: 90), "\(b.output)\(b.errors)")
        #expect(Self.lines(a, prefix: "pings_ok=").first.flatMap { Int($0) } ?? 0 >= 19, "\(a.output)")
        #expect(Self.lines(b, prefix: "pings_ok=").first.flatMap { Int($0) } ?? 0 >= 19, "\(b.output)")
        let ping = try host.exec(["ping", "-c", "2", "-i", "0.3", "-W", "1", "10.5.0.1"])
        #expect(ping.status != 0, "the host reached a VM on a private switch: \(ping.stdout)")
        let onBridge = capture.stop()
        let onTap = tapCapture?.stop() ?? []
        #expect(onBridge.isEmpty, "the host's side of the private bridge saw frames:\n\(onBridge.joined(separator: "\n"))")
        #expect(onTap.contains { $0.contains("ICMP echo") }, "VM a's TAP carried no ping: \(onTap)")
        #expect(a.wait(timeoutSeconds: 30) == 0x42 && b.wait(timeoutSeconds: 30) == 0x42)
        #expect(try host.hvrun(["switch", "delete", "lab"]).status == 0)
        let left = try host.interfaces()
        #expect(left == ["lo"], "left behind: \(left)")
    }

    @Test("internal: the host pings a VM at the address it chose; a VM gets its address from --dhcp (dnsmasq, leases in the store)",
          .timeLimit(.minutes(3)))
    func internalSwitch() throws {
        if let reason = Self.skipReason() { print(reason); return }
        let host = try SwitchHostNamespace()
        let created = try host.hvrun(["switch", "create", "office", "--type", "internal", "--address", "10.9.0.1/24", "--dhcp", "10.9.0.50-10.9.0.60"])
        #expect(created.status == 0, "\(created.stderr)")
        let info = try host.switchInfo("office")
        #expect(info["address"]?.stringValue == "10.9.0.1/24" && info["dhcp"]?.stringValue == "10.9.0.50-10.9.0.60")
        let bridge = try #require(info["bridge"]?.stringValue)
        let capture = try host.capture(bridge)
        let fixed = try host.guest(nic: "office", "ip=10.9.0.20 peer=10.9.0.1 count=2 answer=3")
        #expect(fixed.waitForLine("pings_ok=2", timeoutSeconds: 60), "\(fixed.output)\(fixed.errors)")
        let ping = try host.exec(["ping", "-c", "5", "-i", "0.3", "-W", "3", "10.9.0.20"])
        #expect(ping.status == 0, "\(ping.stdout)\(ping.stderr)")
        #expect(fixed.wait(timeoutSeconds: 60) == 0x42, "\(fixed.output)")

        let dhcp = try host.guest(nic: "office,mac=52:54:00:00:0b:01", "ip=dhcp count=2")
        #expect(dhcp.wait(timeoutSeconds: 90) == 0x42, "\(dhcp.output)\(dhcp.errors)")
        let leased = try #require(Self.lines(dhcp, prefix: "dhcp_ip=").first, "\(dhcp.output)")
        let address = try #require(IPv4CIDR.parseAddress(leased))
        #expect((IPv4CIDR.parseAddress("10.9.0.50")!...IPv4CIDR.parseAddress("10.9.0.60")!).contains(address), "\(leased)")
        #expect(Self.lines(dhcp, prefix: "dhcp_server=") == ["10.9.0.1"])
        #expect(dhcp.outputLines.contains("pings_ok=2"), "\(dhcp.output)")
        let leases = String(decoding: try StoreFiles.read(try #require(info["leases"]?.stringValue)), as: UTF8.self)
        #expect(leases.contains("52:54:00:00:0b:01 \(leased)"), "\(leases)")
        // Unlike a private switch, the host's side of the bridge does see the VMs' frames.
        #expect(!capture.stop().isEmpty)

        #expect(try host.hvrun(["switch", "delete", "office"]).status == 0)
        let left = try host.interfaces()
        #expect(left == ["lo"], "left behind: \(left)")
        #expect(!StoreFiles.list(host.home + "/switches").contains { $0.hasPrefix("office") }, "\(StoreFiles.list(host.home + "/switches"))")
        #expect(try host.exec(["pgrep", "-f", host.home + "/switches/office"]).status != 0, "dnsmasq still runs")
    }

    @Test("external: a VM gets the physical network's DHCP address and is pinged from it, the host keeps its connectivity; dedicated: the host loses it; delete restores addresses and routes exactly",
          .timeLimit(.minutes(4)), arguments: [false, true])
    func externalSwitch(dedicated: Bool) throws {
        if let reason = Self.skipReason() { print(reason); return }
        let host = try SwitchHostNamespace()
        try host.makePhysicalNetwork(adapter: "uplink0")
        #expect(try host.exec(["ping", "-c", "1", "-W", "3", "192.168.77.1"]).status == 0, "the stand-in network does not work")
        let before = try host.snapshot()
        let created = try host.hvrun(["switch", "create", "wan", "--type", "external", "--adapter", "uplink0"] + (dedicated ? ["--dedicated"] : []))
        #expect(created.status == 0, "\(created.stderr)")
        let info = try host.switchInfo("wan")
        #expect(info["adapter"]?.stringValue == "uplink0" && info["dedicated"] == .bool(dedicated))
        let bridge = try #require(info["bridge"]?.stringValue)
        let hostPing = try host.exec(["ping", "-c", "2", "-i", "0.3", "-W", "2", "192.168.77.1"])
        if dedicated {
            #expect(hostPing.status != 0, "the host still reaches the network through a dedicated adapter: \(hostPing.stdout)")
            let addresses = try JSONValue.parse(try host.ip(["-n", host.namespace, "-j", "addr", "show", "dev", bridge]))
            #expect(addresses[0]?["addr_info"] == .array([]))
        } else {
            #expect(hostPing.status == 0, "the host lost the network: \(hostPing.stdout)\(hostPing.stderr)")
            let routes = try host.ip(["-n", host.namespace, "route"])
            #expect(routes.contains("default via 192.168.77.1 dev \(bridge)") && routes.contains("10.77.0.0/16 via 192.168.77.1 dev \(bridge)"), "\(routes)")
        }
        let guest = try host.guest(nic: "wan", "ip=dhcp count=2 answer=2")
        var leased: String?
        for _ in 0..<1200 where leased == nil && !guest.hasExited {
            leased = Self.lines(guest, prefix: "dhcp_ip=").first
            usleep(50_000)
        }
        let address = try #require(leased, "\(guest.output)\(guest.errors)")
        #expect(address.hasPrefix("192.168.77."), "\(address)")
        #expect(Self.lines(guest, prefix: "dhcp_server=").first == "192.168.77.1")
        #expect(guest.waitForLine("pings_ok=2", timeoutSeconds: 60), "\(guest.output)")
        let fromNetwork = try host.execPhysical(["ping", "-c", "4", "-i", "0.3", "-W", "3", address])
        #expect(fromNetwork.status == 0, "\(fromNetwork.stdout)\(fromNetwork.stderr)")
        #expect(guest.wait(timeoutSeconds: 60) == 0x42, "\(guest.output)")

        let deleted = try host.hvrun(["switch", "delete", "wan"])
        #expect(deleted.status == 0, "\(deleted.stderr)")
        #expect(try host.snapshot() == before, "delete did not restore the addresses and routes exactly")
        #expect(try host.exec(["ping", "-c", "1", "-W", "3", "192.168.77.1"]).status == 0)
        #expect(!(try host.interfaces()).contains(bridge))
    }

    @Test("a switch create that fails half-way (dnsmasq cannot start) leaves nothing on the host or in the store", .timeLimit(.minutes(1)))
    func failureHalfWay() throws {
        if let reason = Self.skipReason() { print(reason); return }
        let host = try SwitchHostNamespace()
        // dnsmasq refuses to start when its pid file's path is a directory: after the bridge and
        // its address were made.
        try StoreFiles.makeDirectories(host.home + "/switches/broken.dnsmasq.pid")
        let created = try host.hvrun(["switch", "create", "broken", "--type", "internal", "--address", "10.19.0.1/24", "--dhcp"])
        #expect(created.status == 1)
        #expect(created.stderr.contains("dnsmasq"), "\(created.stderr)")
        let left = try host.interfaces()
        #expect(left == ["lo"], "left behind: \(left)")
        #expect(!StoreFiles.exists(host.home + "/switches/broken.json"))
        #expect(try host.hvrun(["switch", "list", "--json"]).stdout == "[]\n")
    }

    @Test("SIGKILL of switch create at every step of building an external switch: delete then restores the host's addresses and routes exactly, and the switch can be made again",
          .timeLimit(.minutes(3)))
    func killedCreate() throws {
        if let reason = Self.skipReason() { print(reason); return }
        let host = try SwitchHostNamespace()
        try host.makePhysicalNetwork(adapter: "uplink0")
        let before = try host.snapshot()
        for point in ["switch-bridge-created", "switch-address-removed", "switch-adapter-enslaved", "switch-addresses-moved", "switch-realised"] {
            let process = try VMProcess(["switch", "create", "wan", "--type", "external", "--adapter", "uplink0"],
                                        environment: ["HVRUN_HOME=" + host.home, "HVRUN_CRASH_AT=" + point], prefix: host.prefix)
            #expect(process.wait(timeoutSeconds: 60) == 128 + SIGKILL, "\(point): \(process.errors)")
            #expect(try host.snapshot() != before, "\(point): the kill came after the host changed")
            // What the killed create left is a switch that delete can undo.
            let deleted = try host.hvrun(["switch", "delete", "wan"])
            #expect(deleted.status == 0, "\(point): \(deleted.stderr)")
            #expect(try host.snapshot() == before, "\(point): delete did not restore the addresses and routes exactly")
            let left = try host.interfaces().sorted()
            #expect(left == ["lo", "uplink0"], "\(point): left \(left)")
            #expect(try host.hvrun(["switch", "list", "--json"]).stdout == "[]\n", "\(point)")
        }
        #expect(try host.hvrun(["switch", "create", "wan", "--type", "external", "--adapter", "uplink0"]).status == 0)
        #expect(try host.exec(["ping", "-c", "1", "-W", "3", "192.168.77.1"]).status == 0, "the host reaches the network through the bridge")
        #expect(try host.hvrun(["switch", "delete", "wan"]).status == 0)
        #expect(try host.snapshot() == before)
    }

    @Test("a stored VM on a switch: duplicate static MACs refused with both names, a switch in use not deleted, re-made after a reboot, the NIC survives save/restore",
          .timeLimit(.minutes(4)))
    func storedVMs() throws {
        if let reason = Self.skipReason() { print(reason); return }
        let host = try SwitchHostNamespace()
        let kernel = try GuestImages.path("net.elf")
        #expect(try host.hvrun(["switch", "create", "lan", "--type", "internal", "--address", "10.8.0.1/24", "--dhcp"]).status == 0)
        let first = try host.hvrun(["vm", "create", "alpha", "--kernel", kernel, "--memory", "64M", "--nic", "lan,mac=52:54:00:00:0c:01",
                                    "--cmdline", "ip=10.8.0.20 peer=10.8.0.1 count=40 interval=150"])
        #expect(first.status == 0, "\(first.stderr)")
        let twin = try host.hvrun(["vm", "create", "beta", "--kernel", kernel, "--nic", "lan,mac=52:54:00:00:0c:01"])
        #expect(twin.status == 2 && twin.stderr.contains("alpha") && twin.stderr.contains("beta"), "\(twin.stderr)")
        // The same MAC on another switch is fine.
        #expect(try host.hvrun(["vm", "create", "gamma", "--kernel", kernel, "--nic", "other,mac=52:54:00:00:0c:01"]).status == 0)

        // As after a host reboot: the bridge and dnsmasq are gone; starting a VM brings them back.
        let bridge = try #require(try host.switchInfo("lan")["bridge"]?.stringValue)
        try host.ip(["-n", host.namespace, "link", "del", bridge])
        let pid = try #require(Int32(String(decoding: try StoreFiles.read(host.home + "/switches/lan.dnsmasq.pid"), as: UTF8.self).split(separator: "\n").first ?? ""))
        kill(pid, SIGTERM)
        #expect(try host.switchInfo("lan")["present"] == .bool(false))

        let started = try host.hvrun(["vm", "start", "alpha"])
        #expect(started.status == 0, "\(started.stdout)\(started.stderr)")
        #expect(try host.switchInfo("lan")["present"] == .bool(true))
        let log = host.home + "/vms/alpha/console.log"
        func console() -> String { (try? StoreFiles.read(log)).map { String(decoding: $0, as: UTF8.self) } ?? "" }
        func replies() -> [Int] { console().split(separator: "\n").compactMap { $0.hasPrefix("reply seq=") ? Int($0.dropFirst(10)) : nil } }
        let deadline = Clock.now + 60
        while Clock.now < deadline && !replies().contains(3) { usleep(50_000) }
        #expect(replies().contains(3), "\(console())")
        let ports = try host.switchInfo("lan")["ports"]
        #expect(ports?[0]?["vm"]?.stringValue == "alpha" && ports?[0]?["mac"]?.stringValue == "52:54:00:00:0c:01", "\(ports?.rendered() ?? "")")
        // A second adapter with alpha's MAC, connected now: refused, naming both.
        let clash = try host.hvrun(["run", "--kernel", kernel, "--memory", "64M", "--nic", "lan,mac=52:54:00:00:0c:01", "--timeout", "20",
                                    "--cmdline", "ip=10.8.0.30 peer=10.8.0.1"])
        #expect(clash.status == 1 && clash.stderr.contains("alpha") && clash.stderr.contains("hvrun run"), "\(clash.stderr)")
        let refused = try host.hvrun(["switch", "delete", "lan"])
        #expect(refused.status == 2 && refused.stderr.contains("alpha"), "\(refused.stderr)")

        let saved = try host.hvrun(["vm", "save", "alpha"], timeoutSeconds: 90)
        #expect(saved.status == 0, "\(saved.stderr)")
        let beforeSave = replies()
        #expect(try host.switchInfo("lan")["ports"] == .array([]), "the port outlived the VM process")
        #expect(try host.hvrun(["vm", "start", "alpha"]).status == 0)
        let end = Clock.now + 90
        while Clock.now < end && !console().contains("pings_ok=") { usleep(100_000) }
        let after = replies().dropFirst(beforeSave.count)
        #expect(!after.isEmpty && after.first! > (beforeSave.last ?? 0), "before \(beforeSave) after \(Array(after))")
        let ok = console().split(separator: "\n").first { $0.hasPrefix("pings_ok=") }.flatMap { Int($0.dropFirst(9)) } ?? 0
        #expect(ok >= 39, "\(console())\n\((try? StoreFiles.read(host.home + "/vms/alpha/hvrun.log")).map { String(decoding: $0, as: UTF8.self) } ?? "")")
        let stopDeadline = Clock.now + 30
        while Clock.now < stopDeadline && FileLock.isHeld(host.home + "/vms/alpha/lock") { usleep(50_000) }

        // Not connected: the adapter is there, the link is down.
        #expect(try host.hvrun(["vm", "create", "loner", "--kernel", kernel, "--memory", "64M", "--nic", "none",
                                "--cmdline", "ip=10.8.0.40 peer=10.8.0.1"]).status == 0)
        #expect(try host.hvrun(["vm", "start", "loner"]).status == 0)
        let lonerLog = host.home + "/vms/loner/console.log"
        let lonerDeadline = Clock.now + 60
        while Clock.now < lonerDeadline && !((try? StoreFiles.read(lonerLog)).map { String(decoding: $0, as: UTF8.self) } ?? "").contains("link=") { usleep(50_000) }
        #expect(String(decoding: (try? StoreFiles.read(lonerLog)) ?? [], as: UTF8.self).contains("link=down"))

        #expect(try host.hvrun(["switch", "delete", "lan"]).status == 0)
        let left = try host.interfaces()
        #expect(left == ["lo"], "left behind: \(left)")
    }

    @Test("without CAP_NET_ADMIN: switch create and a VM on a switch fail and say so", .timeLimit(.minutes(1)))
    func withoutNetAdmin() throws {
        if let reason = Self.skipReason() { print(reason); return }
        guard access("/usr/bin/setpriv", X_OK) == 0 else { print("no setpriv: the CAP_NET_ADMIN test is skipped"); return }
        let host = try SwitchHostNamespace()
        #expect(try host.hvrun(["switch", "create", "lab", "--type", "private"]).status == 0)
        let dropped = ["/usr/bin/setpriv", "--bounding-set", "-net_admin", TestHost.hvrunPath!]
        let environment = "HVRUN_HOME=" + host.home
        let create = try host.exec(["env", environment] + dropped + ["switch", "create", "lab2", "--type", "private"])
        #expect(create.status == 1 && create.stderr.contains("CAP_NET_ADMIN"), "\(create.stderr)")
        let run = try host.exec(["env", environment] + dropped + ["run", "--kernel", try GuestImages.path("net.elf"), "--nic", "lab",
                                                                   "--timeout", "20", "--cmdline", "ip=10.5.0.1 peer=10.5.0.2"])
        #expect(run.status == 1 && run.stderr.contains("CAP_NET_ADMIN"), "\(run.stderr)")
        // hvrun check says whether this host (this process) can make taps and bridges.
        let check = try host.exec(dropped + ["check"])
        #expect(check.stdout.contains("WARN  net.switches") && check.stdout.contains("CAP_NET_ADMIN"), "\(check.stdout)")
        #expect(try host.exec([TestHost.hvrunPath!, "check"]).stdout.contains("PASS  net.switches"))
        #expect(try host.hvrun(["switch", "delete", "lab"]).status == 0)
    }

    @Test("switch usage errors: bad type, missing address, bad range, unknown switch (no root needed)")
    func usage() throws {
        let directory = try TemporaryDirectory()
        func hvrun(_ arguments: [String]) throws -> Subprocess.Result {
            try Subprocess.run("/usr/bin/env", ["HVRUN_HOME=" + directory.path, TestHost.hvrunPath!] + arguments, timeoutSeconds: 30)
        }
        let cases: [([String], String)] = [
            (["switch", "create", "x", "--type", "public"], "--type must be"),
            (["switch", "create", "x", "--type", "internal"], "--address"),
            (["switch", "create", "x", "--type", "internal", "--address", "10.0.0.0/24"], "network's own"),
            (["switch", "create", "x", "--type", "internal", "--address", "10.0.0.1/24", "--dhcp", "10.0.1.5-10.0.1.9"], "not a range inside"),
            (["switch", "create", "x", "--type", "private", "--address", "10.0.0.1/24"], "private switch"),
            (["switch", "create", "x", "--type", "external"], "--adapter"),
            (["switch", "create", "none", "--type", "private"], "bad switch name"),
            (["switch", "info", "nope"], "no switch named nope"),
            (["switch", "delete", "nope"], "no switch named nope"),
        ]
        for (arguments, message) in cases {
            let result = try hvrun(arguments)
            #expect(result.status == 1 && result.stderr.contains(message), "\(arguments): \(result.status) \(result.stderr)")
        }
        #expect(try hvrun(["switch", "list", "--json"]).stdout == "[]\n")
    }

    @Test("bridge names fit IFNAMSIZ and say they are ours; default DHCP ranges avoid the host")
    func naming() throws {
        for name in ["a", "lan", String(repeating: "x", count: 64)] {
            let bridge = VirtualSwitch.bridgeName(for: name)
            #expect(bridge.hasPrefix("hvsw-") && bridge.utf8.count == 13)
            #expect(VirtualSwitch.bridgeName(for: name, salt: 1) != bridge)
        }
        #expect(SwitchStore.tapName(vmID: "0123abcd-ef01-4000-8000-000000000000", index: 3) == "hvt-0123abcd-3")
        #expect(SwitchStore.tapName(pid: 4_194_304, index: 0).utf8.count <= 15)
        #expect(try IPv4CIDR(parsing: "10.0.0.1/24").defaultDHCPRange == .init(start: "10.0.0.128", end: "10.0.0.254"))
        #expect(try IPv4CIDR(parsing: "10.0.0.200/24").defaultDHCPRange == .init(start: "10.0.0.1", end: "10.0.0.127"))
    }
}
