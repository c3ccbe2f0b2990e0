import ArgumentParser
import HyperCore

/// `--nic tap=NAME[,mac=MAC]` or `--nic none[,mac=MAC]`: one virtio-net device.
///
/// The first element says where the NIC is connected (`KEY=VALUE` for a backend with a
/// parameter, a bare word otherwise), the rest are `key=value` options. Today the backends are
/// `tap=NAME` and `none` (link down, nothing leaves); a bare word other than `none` is reserved
/// for the virtual switches that come next (`--nic SWITCH`).
struct NICOption: Sendable, Equatable {
    enum Attachment: Sendable, Equatable {
        case tap(String)
        case none
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
            throw ValidationError("--nic needs a backend first: tap=NAME or none (as in --nic tap=tap0,mac=52:54:00:12:34:56)")
        } else {
            throw ValidationError("unknown --nic backend '\(first)' (valid: tap=NAME, none; virtual switches are not there yet)")
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

    /// The device configuration: opens the TAP (needs CAP_NET_ADMIN or a TAP owned by this user).
    func deviceKind() throws -> VirtioDeviceConfiguration.Kind {
        let backend: NetworkBackend
        switch attachment {
        case let .tap(name): backend = .tap(try TapDevice(name: name))
        case .none: backend = .disconnected
        }
        return .network(backend, mac: mac ?? MACAddress.random())
    }
}
