/// One virtio device a machine gets (``MachineConfiguration/virtioDevices``).
public struct VirtioDeviceConfiguration: Sendable {
    public enum Kind: Sendable {
        case block(any BlockBackend, identifier: String)
        /// Port 0 = hvc0; `input` is a host descriptor read for guest input (nil: none).
        case console(output: any ConsoleOutput, input: Int32?)
        case entropy
        /// virtio-net with this MAC on a TAP, or not connected (link down).
        case network(NetworkBackend, mac: MACAddress)
    }

    public enum Transport: Sendable { case pci, mmio }

    public var kind: Kind
    public var transport: Transport

    public init(_ kind: Kind, transport: Transport = .pci) {
        self.kind = kind
        self.transport = transport
    }

    func makeDevice() -> any VirtioDevice {
        switch kind {
        case let .block(backend, identifier): VirtioBlock(backend: backend, identifier: identifier)
        case let .console(output, input): VirtioConsole(output: output, input: input)
        case .entropy: VirtioEntropy()
        case let .network(backend, mac): VirtioNet(backend: backend, mac: mac)
        }
    }
}

/// The machine's virtio devices and what connects them: the PCI root (config ports 0xCF8 and the
/// BAR window), virtio-mmio register blocks, GSI routes, irqfds, ioeventfds and I/O threads.
///
/// Interrupts: PCI devices use MSI-X (GSIs from 24, one irqfd per vector) with INTx on IOAPIC
/// pins 16–23 as fallback; virtio-mmio devices use IOAPIC pins 5, 6, 7, 9, 10, 11, 12, 13, 14, 15.
final class VirtioAssembly: Sendable {
    static let mmioPins: [UInt32] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15]

    let cores: [VirtioDeviceCore]
    let pciTransports: [VirtioPCITransport]
    let mmioTransports: [VirtioMMIOTransport]
    let router: GSIRouter

    /// `vm` nil builds devices without KVM plumbing (interrupts recorded, notifies on the bus).
    init(vm: VirtualMachine?, memory: GuestMemory, devices: [VirtioDeviceConfiguration],
         ports: inout BusBuilder, mmio: inout BusBuilder) throws(MachineError) {
        let router = GSIRouter(vm: vm)
        self.router = router
        var cores: [VirtioDeviceCore] = []
        var pci: [VirtioPCITransport] = []
        var mmioDevices: [VirtioMMIOTransport] = []
        var bars = PCIBarAllocator()
        func fail(_ error: MachineError) -> MachineError {
            cores.forEach { $0.stopIOThread() }
            return error
        }
        for configuration in devices {
            let core: VirtioDeviceCore
            do { core = try VirtioDeviceCore(device: configuration.makeDevice(), memory: memory) } catch {
                throw fail(.invalidConfiguration(error.description))
            }
            cores.append(core)
            let registrar = vm.map { Self.registrar(vm: $0, events: core.queueEvents, transport: configuration.transport) }
            switch configuration.transport {
            case .pci:
                guard pci.count < 31 else { throw fail(.invalidConfiguration("at most 31 virtio-pci devices")) }
                let slot = pci.count
                let delivery: any MSIDelivery
                if let vm {
                    do { delivery = try KVMMSIDelivery(vm: vm, router: router, vectors: core.queues.count + 1) } catch {
                        throw fail(.invalidConfiguration(error.description))
                    }
                } else {
                    delivery = RecordingMSIDelivery()
                }
                let pin: UInt32? = slot < 8 ? 16 + UInt32(slot) : nil
                let line: any InterruptLine
                if let vm, let pin { line = IRQChipLine(vm: vm, gsi: pin) } else { line = RecordingLine() }
                guard let msixBar = bars.allocate(PCIBar(kind: .memory32, size: VirtioPCITransport.msixBarSize)),
                      let virtioBar = bars.allocate(PCIBar(kind: .memory64, size: VirtioPCITransport.virtioBarSize)) else {
                    throw fail(.invalidConfiguration("the PCI window is full"))
                }
                pci.append(VirtioPCITransport(core: core, msixDelivery: delivery, intx: line, interruptLine: UInt8(pin ?? 0xFF),
                                              msixBarAddress: msixBar, virtioBarAddress: virtioBar, registrar: registrar))
            case .mmio:
                let index = mmioDevices.count
                guard index < Self.mmioPins.count else {
                    throw fail(.invalidConfiguration("at most \(Self.mmioPins.count) virtio-mmio devices"))
                }
                let pin = Self.mmioPins[index]
                let line: any InterruptLine
                if let vm { line = IRQChipLine(vm: vm, gsi: pin) } else { line = RecordingLine() }
                let base = GuestLayout.virtioMMIOStart + UInt64(index) * GuestLayout.virtioMMIOStride
                let transport = VirtioMMIOTransport(core: core, base: base, gsi: pin, line: line, registrar: registrar)
                do { try mmio.register(transport, at: base, size: VirtioMMIOTransport.size) } catch { throw fail(.bus(error)) }
                mmioDevices.append(transport)
            }
        }
        if !pci.isEmpty {
            let root = PCIRoot(devices: pci)
            do {
                try ports.register(PCIConfigPorts(root: root), at: PCIConfigPorts.base, size: PCIConfigPorts.size)
                try mmio.register(PCIMMIOWindow(root: root), at: PCIMMIOWindow.base, size: PCIMMIOWindow.size)
            } catch {
                throw fail(.bus(error))
            }
        }
        for (index, core) in cores.enumerated() {
            do { try core.startIOThread(name: "virtio\(index)") } catch { throw fail(.invalidConfiguration(error.description)) }
        }
        self.cores = cores
        pciTransports = pci
        mmioTransports = mmioDevices
    }

    /// Attaches a queue's eventfd as an ioeventfd: any-length match at the queue's own notify
    /// address (PCI); MMIO has one QueueNotify register, so there it matches the queue index written.
    private static func registrar(vm: VirtualMachine, events: [Int32], transport: VirtioDeviceConfiguration.Transport) -> VirtioNotifyRegistrar {
        { queue, address, attach in
            let match: UInt64? = transport == .mmio ? UInt64(queue) : nil
            // A failure leaves the notify on the bus fallback path: slower, still correct.
            try? vm.attachIOEventFD(events[queue], space: .mmio, address: address,
                                    length: match == nil ? 0 : 4, match: match, detach: !attach)
        }
    }

    /// `virtio_mmio.device=` options for the kernel command line, one per MMIO device.
    var commandLineSuffix: String {
        mmioTransports.map { " " + $0.commandLineFragment }.joined()
    }

    /// Stops every I/O thread (idempotent).
    func shutdown() { cores.forEach { $0.stopIOThread() } }
}

/// MSI-X delivery that only counts (machines without KVM, unit tests).
public final class RecordingMSIDelivery: MSIDelivery, @unchecked Sendable {
    private let state = SpinLockedState<(programmed: [Int: (UInt64, UInt32)], fired: [Int])>(([:], []))
    public init() {}
    public func program(vector: Int, address: UInt64, data: UInt32) { state.update { $0.programmed[vector] = (address, data) } }
    public func fire(vector: Int) { state.update { $0.fired.append(vector) } }
    public var fired: [Int] { state.value.fired }
    public func message(vector: Int) -> (UInt64, UInt32)? { state.value.programmed[vector] }
}
