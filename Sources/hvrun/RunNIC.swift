import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `--nic SWITCH[,mac=MAC]`, `--nic tap=NAME[,mac=MAC]` or `--nic none[,mac=MAC]`: one virtio-net device.
///
/// The first element says where the NIC is connected (`KEY=VALUE` for a backend with a
/// parameter, a bare word otherwise), the rest are `key=value` options: a virtual switch of the
/// store (a TAP is created on its bridge), an existing host TAP, or `none` (link down, nothing leaves).
struct NICOption: Sendable, Equatable {
    enum Attachment: Sendable, Equatable {
        case tap(String)
        case none
        case `switch`(String)
    }

    let attachment: Attachment
    /// nil: a random locally administered address at start.
    let mac: MACAddress?

    static let validOptions = ["mac"]

    static func parse(_ argument: String) throws -> NICOption {
        var parts = argument.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let first = parts.removeFirst()
        let attachment: Attachment
        if first == "none" {
            attachment = .none
        } else if first.hasPrefix("tap=") {
            let name = String(first.dropFirst(4))
            guard !name.isEmpty, name.utf8.count < 16, !name.contains("/") else {
                throw ValidationError("--nic tap=NAME needs an interface name of 1–15 characters, as in --nic tap=tap0")
            }
            attachment = .tap(name)
        } else if first.isEmpty {
            throw ValidationError("--nic needs a switch or backend first: SWITCH, tap=NAME or none (as in --nic lan,mac=52:54:00:12:34:56)")
        } else if VMName.isValid(first), !first.contains("=") {
            attachment = .switch(first)
        } else {
            throw ValidationError("unknown --nic backend '\(first)' (valid: a switch name, tap=NAME, none)")
        }
        var mac: MACAddress?
        for option in parts {
            let pair = option.split(separator: "=", maxSplits: 1).map(String.init)
            switch (pair.first, pair.count) {
            case ("mac", 2):
                do { mac = try MACAddress(parsing: pair[1]) } catch { throw ValidationError("--nic \(argument): \(error)") }
            default:
                throw ValidationError("unknown NIC option '\(option)' in --nic \(argument) (valid options: mac=MAC)")
            }
        }
        return NICOption(attachment: attachment, mac: mac)
    }

    /// The device configuration: opens the TAP (needs CAP_NET_ADMIN or a TAP owned by this user),
    /// or connects NIC `index` to the switch (a TAP `hvp-PID-INDEX` on its bridge, held until exit).
    func deviceKind(index: Int) throws -> VirtioDeviceConfiguration.Kind {
        let backend: NetworkBackend
        let mac = self.mac ?? MACAddress.random()
        switch attachment {
        case let .tap(name): backend = .tap(try TapDevice(name: name))
        case .none: backend = .disconnected
        case let .switch(name):
            do {
                let port = try SwitchStore(root: try VMStore.defaultRoot()).connect(
                    switch: name, vm: "hvrun run (pid \(getpid()))", mac: mac, tap: SwitchStore.tapName(pid: getpid(), index: index))
                RunSwitchPorts.shared.keep(port)
                backend = .tap(port.tap)
            } catch let error as SwitchError {
                throw RunNICError(message: "--nic \(name): \(error)")
            }
        }
        return .network(backend, mac: mac)
    }
}

struct RunNICError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// The switch ports of this `hvrun run`: held (TAPs open, port records locked) until the process ends.
final class RunSwitchPorts: @unchecked Sendable {
    static let shared = RunSwitchPorts()
    private var ports: [SwitchPort] = []
    private let lock = NSLockLike()
    func keep(_ port: SwitchPort) { lock.withLock { ports.append(port) } }
}

/// A pthread mutex (Foundation is not linked into hvrun).
final class NSLockLike: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}
