import Foundation
import Synchronization
import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// A private network for one test: a namespace `hcnet-<pid>-<n>` holding a bridge with the host
/// side's address and a TAP on it. All traffic stays inside the namespace; `deinit` (and a failed
/// setup) deletes the TAP, the bridge and the namespace.
final class TestNetwork {
    static let ip = "/usr/sbin/ip"
    nonisolated(unsafe) static var counter = 0
    let namespace: String
    let tap = "hctap0"
    let hostAddress = "10.211.0.1"
    let guestAddress = "10.211.0.2"

    /// Why these tests cannot run here, or nil.
    static var unavailableReason: String? {
        if getuid() != 0 { return "not root: network namespace tests skipped" }
        if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is not usable: network tests skipped" }
        if access(ip, X_OK) != 0 { return "no \(ip) (iproute2): network tests skipped" }
        return nil
    }

    init() throws {
        Self.counter += 1
        namespace = "hcnet-\(getpid())-\(Self.counter)"
        do {
            try run(["netns", "add", namespace])
            try run(["-n", namespace, "link", "set", "lo", "up"])
            try run(["-n", namespace, "link", "add", "hcbr0", "type", "bridge"])
            try run(["-n", namespace, "addr", "add", hostAddress + "/24", "dev", "hcbr0"])
            try run(["-n", namespace, "link", "set", "hcbr0", "up"])
            try run(["-n", namespace, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])
            try run(["-n", namespace, "link", "set", tap, "master", "hcbr0"])
            try run(["-n", namespace, "link", "set", tap, "up"])
        } catch {
            cleanUp()
            throw error
        }
    }

    deinit { cleanUp() }

    private func cleanUp() {
        _ = try? Subprocess.run(Self.ip, ["-n", namespace, "link", "del", tap], timeoutSeconds: 10)
        _ = try? Subprocess.run(Self.ip, ["-n", namespace, "link", "del", "hcbr0"], timeoutSeconds: 10)
        _ = try? Subprocess.run(Self.ip, ["netns", "del", namespace], timeoutSeconds: 10)
    }

    @discardableResult
    func run(_ arguments: [String], timeoutSeconds: Double = 20) throws -> Subprocess.Result {
        let result = try Subprocess.run(Self.ip, arguments, timeoutSeconds: timeoutSeconds)
        guard result.status == 0 else {
            throw Subprocess.Failure.spawn("ip \(arguments.joined(separator: " ")): \(result.stderr)", result.status)
        }
        return result
    }

    /// Runs a command inside the namespace.
    func exec(_ command: [String], timeoutSeconds: Double = 20) throws -> Subprocess.Result {
        try Subprocess.run(Self.ip, ["netns", "exec", namespace] + command, timeoutSeconds: timeoutSeconds)
    }

    var prefix: [String] { [Self.ip, "netns", "exec", namespace] }
}

@Suite("virtio-net on a TAP in a private network namespace", .serialized, .tags(.kvm),
       .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason),
       .enabled(if: TestHost.hvrunPath != nil, "the hvrun binary is not built next to the tests"))
struct NetworkIntegrationTests {
    static func guestArguments(_ network: TestNetwork, transport: String, extra: String, nic: String? = nil) throws -> [String] {
        ["run", "--kernel", try GuestImages.path("net.elf"), "--memory", "64M", "--virtio-transport", transport,
         "--nic", nic ?? "tap=\(network.tap),mac=52:54:00:12:34:56", "--timeout", "90",
         "--cmdline", "ip=\(network.guestAddress) peer=\(network.hostAddress)\(transport == "mmio" ? " mmio=1" : "") \(extra)"]
    }

    @Test("the guest pings the host's bridge address and the host pings the guest", .timeLimit(.minutes(2)),
          arguments: ["pci", "mmio"])
    func pingBothWays(_ transport: String) throws {
        if let reason = TestNetwork.unavailableReason { print(reason); return }
        let network = try TestNetwork()
        let guest = try VMProcess(try Self.guestArguments(network, transport: transport, extra: "count=3 udp=20 answer=3"), prefix: network.prefix)
        #expect(guest.waitForLine("pings_ok=3", timeoutSeconds: 60), "\(guest.output)\(guest.errors)")
        #expect(guest.waitForLine("udp_sent=20", timeoutSeconds: 30), "\(guest.output)\(guest.errors)")
        #expect(guest.outputLines.contains("link=up") && guest.outputLines.contains("mac=52:54:0:12:34:56"))
        for seq in 1...3 { #expect(guest.outputLines.contains("reply seq=\(seq)")) }
        if TestHost.hasTool("ping") {
            let ping = try network.exec(["ping", "-c", "3", "-i", "0.3", "-W", "5", network.guestAddress], timeoutSeconds: 30)
            #expect(ping.status == 0, "\(ping.stdout)\(ping.stderr)")
            #expect(ping.stdout.contains("3 received"), "\(ping.stdout)")
            #expect(guest.wait(timeoutSeconds: 30) == 0x42, "\(guest.output)\(guest.errors)")
            #expect(guest.outputLines.contains("answered=3"))
        } else {
            print("no ping on PATH: the host → guest direction is not checked")
        }
    }

    @Test("the guest's batched driver (one notification per 16 frames, frames read in place): 500 full-size datagrams reach a host socket, 200 from the host reach the guest",
          .timeLimit(.minutes(2)))
    func batchedBursts() throws {
        if let reason = TestNetwork.unavailableReason { print(reason); return }
        guard TestHost.hasTool("python3") else { print("no python3 on PATH: the host's UDP ends cannot run"); return }
        let network = try TestNetwork()
        // The host's end of the guest → host burst: counts datagrams of 1472 bytes on port 9.
        let receiver = """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind(("\(network.hostAddress)", 9)); s.settimeout(40)
            n = 0
            try:
                while n < 500:
                    if len(s.recv(2048)) == 1472: n += 1
                    s.settimeout(5)
            except socket.timeout: pass
            print(n)
            """
        let received = Mutex<String?>(nil)
        let prefix = network.prefix
        let receiving = Thread {
            let result = try? Subprocess.run(prefix[0], Array(prefix.dropFirst()) + ["python3", "-c", receiver], timeoutSeconds: 60)
            received.withLock { $0 = result?.stdout ?? "receiver failed" }
        }
        receiving.start()
        Thread.sleep(forTimeInterval: 1)  // the receiver is bound
        let guest = try VMProcess(try Self.guestArguments(network, transport: "pci", extra: "count=1 udp=500 size=1472 batch=16 sink=200"),
                                  prefix: network.prefix)
        #expect(guest.waitForLine("udp_sent=500", timeoutSeconds: 60), "\(guest.output)\(guest.errors)")
        #expect(guest.waitForLine("sink_ready", timeoutSeconds: 30), "\(guest.output)\(guest.errors)")
        let sender = try network.exec(["python3", "-c", """
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(200): s.sendto(bytes(1472), ("\(network.guestAddress)", 9))
            """], timeoutSeconds: 30)
        #expect(sender.status == 0, "\(sender.stderr)")
        #expect(guest.wait(timeoutSeconds: 60) == 0x42, "\(guest.output)\(guest.errors)")
        for _ in 0..<600 where received.withLock({ $0 }) == nil { Thread.sleep(forTimeInterval: 0.1) }
        #expect(received.withLock { $0 }?.trimmingCharacters(in: .whitespacesAndNewlines) == "500")
        // 200 frames fit the TAP's 1,000-frame queue: none is dropped while the guest drains it.
        #expect(guest.outputLines.contains("udp_received=200"), "\(guest.output)")
    }

    @Test("a NIC that is not connected: the guest sees the link down", .timeLimit(.minutes(1)))
    func notConnected() throws {
        // Needs neither root nor a TAP.
        let result = try TestHost.hvrun(["run", "--kernel", try GuestImages.path("net.elf"), "--memory", "64M", "--nic", "none",
                                         "--timeout", "30", "--cmdline", "ip=10.211.0.2 peer=10.211.0.1"], timeoutSeconds: 40)
        #expect(result.status == 0x42, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("link=down"))
        let mac = result.stdout.split(separator: "\n").first { $0.hasPrefix("mac=") }
        #expect(mac != nil)
    }

    @Test("a guest saved while pinging continues its pings after --restore in a new process", .timeLimit(.minutes(3)))
    func saveRestore() throws {
        if let reason = TestNetwork.unavailableReason { print(reason); return }
        let network = try TestNetwork()
        let directory = try TemporaryDirectory()
        let socket = directory.file("control.sock")
        let snapshot = directory.file("snapshot")
        let first = try VMProcess(try Self.guestArguments(network, transport: "pci", extra: "count=12 interval=100") + ["--control", socket],
                                  prefix: network.prefix)
        #expect(first.waitForLine("reply seq=3", timeoutSeconds: 60), "\(first.output)\(first.errors)")
        #expect(first.waitForSocket(socket))
        let reply = try ControlClient(path: socket).execute("save", arguments: [("path", .string(snapshot))])
        #expect(reply["return"] != nil, "\(reply.rendered())")
        #expect(first.wait(timeoutSeconds: 10) == 0, "\(first.errors)")
        let before = first.outputLines.compactMap { $0.hasPrefix("reply seq=") ? Int($0.dropFirst(10)) : nil }

        let second = try VMProcess(["run", "--restore", snapshot, "--timeout", "90"], prefix: network.prefix)
        #expect(second.wait(timeoutSeconds: 90) == 0x42, "\(second.output)\(second.errors)")
        let after = second.outputLines.compactMap { $0.hasPrefix("reply seq=") ? Int($0.dropFirst(10)) : nil }
        #expect(!after.isEmpty && after.first! > (before.last ?? 0), "before \(before) after \(after)\n\(second.errors)")
        #expect(after.last == 12, "after \(after)")
        // At most the ping in flight at the save is lost.
        let ok = second.outputLines.first { $0.hasPrefix("pings_ok=") }.flatMap { Int($0.dropFirst(9)) } ?? 0
        #expect(ok >= 11, "\(second.output)")
    }
}
