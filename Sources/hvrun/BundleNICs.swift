import HyperCore

/// A stored VM's network adapters connected for one VM process: each NIC of `vm.json` on its
/// switch (a TAP `hvt-ID-INDEX` on the switch's bridge, the switch re-created if a host reboot
/// removed it), or not connected (`none`). The ports stay connected while the value lives —
/// across guest reboots — and their TAPs vanish with the process.
struct BundleNICs {
    let ports: [SwitchPort]
    /// The backend and MAC of each NIC, in `vm.json` order.
    let devices: [(backend: NetworkBackend, mac: MACAddress)]

    init(_ configuration: VMConfiguration, store: SwitchStore) throws {
        var ports: [SwitchPort] = []
        var devices: [(NetworkBackend, MACAddress)] = []
        for (index, nic) in configuration.nics.enumerated() {
            guard let mac = MACAddress(nic.mac) else { throw StoreError.failed("vm.json: NIC \(index) has an invalid MAC '\(nic.mac)'") }
            if nic.switch == "none" {
                devices.append((.disconnected, mac))
                continue
            }
            do throws(SwitchError) {
                let port = try store.connect(switch: nic.switch, vm: configuration.name, mac: mac,
                                             tap: SwitchStore.tapName(vmID: configuration.id, index: index))
                ports.append(port)
                devices.append((.tap(port.tap), mac))
            } catch {
                throw StoreError.failed("NIC \(index) (switch \(nic.switch)): \(error)")
            }
        }
        self.ports = ports
        self.devices = devices
    }
}

extension VMBundle {
    /// The store's root: the bundle is `ROOT/vms/NAME`.
    var storeRoot: String {
        var parts = path.split(separator: "/", omittingEmptySubsequences: false)
        if parts.count >= 2 { parts.removeLast(2) }
        let root = parts.joined(separator: "/")
        return root.isEmpty ? "/" : root
    }
}
