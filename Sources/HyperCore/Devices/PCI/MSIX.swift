internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// Owns the VM's whole GSI routing table. `KVM_SET_GSI_ROUTING` replaces the table, so every
/// update re-sends the default irqchip routes (PIC pins for GSIs 0–15 except the cascade, IOAPIC
/// pins 0–23) together with all MSI routes. MSI routes use GSIs from 24 up.
public final class GSIRouter: @unchecked Sendable {
    public static let firstMSIGSI: UInt32 = 24
    public static let maximumGSI: UInt32 = 1024
    private let vm: VirtualMachine?
    private let lock = PthreadLock()
    private var msiRoutes: [UInt32: (address: UInt64, data: UInt32)] = [:]
    private var nextGSI = GSIRouter.firstMSIGSI

    /// `vm` nil: routes are remembered but go nowhere (unit tests).
    public init(vm: VirtualMachine?) { self.vm = vm }

    public func allocateGSI() -> UInt32? {
        lock.withLock {
            guard nextGSI < Self.maximumGSI else { return nil }
            defer { nextGSI += 1 }
            return nextGSI
        }
    }

    public static var defaultRoutes: [VirtualMachine.Route] {
        var routes: [VirtualMachine.Route] = []
        for gsi: UInt32 in 0..<16 where gsi != 2 {
            routes.append(.irqchip(gsi: gsi, chip: gsi < 8 ? 0 : 1, pin: gsi % 8))
        }
        for pin: UInt32 in 0..<24 { routes.append(.irqchip(gsi: pin, chip: 2, pin: pin)) }
        return routes
    }

    public func setMSIRoute(gsi: UInt32, address: UInt64, data: UInt32) throws(KVMError) {
        try lock.withLock { () throws(KVMError) in
            if let old = msiRoutes[gsi], old.address == address, old.data == data { return }
            msiRoutes[gsi] = (address, data)
            guard let vm else { return }
            var routes = Self.defaultRoutes
            for (gsi, route) in msiRoutes.sorted(by: { $0.key < $1.key }) {
                routes.append(.msi(gsi: gsi, address: route.address, data: route.data))
            }
            try vm.setGSIRouting(routes)
        }
    }

    public func msiRoute(gsi: UInt32) -> (address: UInt64, data: UInt32)? { lock.withLock { msiRoutes[gsi] } }
}

/// Where MSI-X messages go.
public protocol MSIDelivery: AnyObject, Sendable {
    /// Vector `vector` now sends `data` to `address` (called before the first ``fire(vector:)`` after a change).
    func program(vector: Int, address: UInt64, data: UInt32)
    func fire(vector: Int)
}

/// MSI-X through KVM: one GSI with an MSI route and one irqfd per vector, so firing a vector is
/// one eventfd write from the I/O thread and no ioctl.
public final class KVMMSIDelivery: MSIDelivery, @unchecked Sendable {
    private let router: GSIRouter
    public let gsis: [UInt32]
    private let eventFDs: [Int32]
    private let vm: VirtualMachine

    public init(vm: VirtualMachine, router: GSIRouter, vectors: Int) throws(VirtioSetupError) {
        self.vm = vm
        self.router = router
        var gsis: [UInt32] = []
        var fds: [Int32] = []
        do {
            for _ in 0..<vectors {
                guard let gsi = router.allocateGSI() else { throw VirtioSetupError.noSpace("MSI GSIs") }
                let fd = ckvm_eventfd_create()
                guard fd >= 0 else { throw VirtioSetupError.eventFD(errno: -fd) }
                gsis.append(gsi)
                fds.append(fd)
                // An irqfd may name a GSI with no route yet: it fires nothing until one exists.
                do { try vm.attachIRQFD(fd, gsi: gsi) } catch { throw VirtioSetupError.kvm(error) }
            }
        } catch let error as VirtioSetupError {
            fds.forEach { close($0) }
            throw error
        } catch {
            fds.forEach { close($0) }
            throw .noSpace("\(error)")
        }
        self.gsis = gsis
        eventFDs = fds
    }

    deinit {
        for (fd, gsi) in zip(eventFDs, gsis) {
            try? vm.detachIRQFD(fd, gsi: gsi)
            close(fd)
        }
    }

    public func program(vector: Int, address: UInt64, data: UInt32) {
        // A failure here means KVM refused a route built from guest values; the vector then
        // stays silent, which is what a bogus MSI address gets on hardware too.
        try? router.setMSIRoute(gsi: gsis[vector], address: address, data: data)
    }

    public func fire(vector: Int) { _ = ckvm_eventfd_signal(eventFDs[vector]) }
}

/// An MSI-X capability's state: the vector table, the pending-bit array, and the enable and
/// function-mask bits (PCI Local Bus 3.0 §6.8.2).
///
/// Routes are sent to KVM only when a vector can actually fire (enabled, unmasked) and its
/// message changed, so a driver writing address, upper address and data one dword at a time
/// costs one routing update, not three. A vector fired while masked sets its pending bit and is
/// delivered on unmask.
public final class MSIXVectors: @unchecked Sendable {
    public let count: Int
    private let delivery: any MSIDelivery
    private let lock = PthreadLock()
    private var table: [UInt32]
    private var pending: [Bool]
    private var dirty: [Bool]
    public private(set) var enabled = false
    public private(set) var functionMasked = false

    public init(count: Int, delivery: any MSIDelivery) {
        precondition(count >= 1 && count <= 2048)
        self.count = count
        self.delivery = delivery
        table = Array(repeating: 0, count: 4 * count)
        for vector in 0..<count { table[4 * vector + 3] = 1 }  // masked at reset
        pending = Array(repeating: false, count: count)
        dirty = Array(repeating: true, count: count)
    }

    /// The capability's bytes (ID 0x11) and write mask: message control, table and PBA offsets.
    public static func capability(vectors: Int, tableBar: Int, tableOffset: UInt32, pbaBar: Int, pbaOffset: UInt32) -> (bytes: [UInt8], mask: [UInt8]) {
        let control = UInt16(vectors - 1)
        let table = tableOffset | UInt32(tableBar)
        let pba = pbaOffset | UInt32(pbaBar)
        var bytes: [UInt8] = [0x11, 0, UInt8(control & 0xFF), UInt8(control >> 8)]
        for word in [table, pba] { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: word >> (8 * UInt32(i)))) } }
        var mask = [UInt8](repeating: 0, count: 12)
        mask[3] = 0xC0  // enable (bit 15), function mask (bit 14)
        return (bytes, mask)
    }

    public func reset() {
        lock.withLock {
            for vector in 0..<count {
                table[4 * vector] = 0
                table[4 * vector + 1] = 0
                table[4 * vector + 2] = 0
                table[4 * vector + 3] = 1
                pending[vector] = false
                dirty[vector] = true
            }
            enabled = false
            functionMasked = false
        }
    }

    /// The message control word changed (config space write).
    public func controlWritten(_ control: UInt16) {
        lock.withLock {
            enabled = control & 0x8000 != 0
            functionMasked = control & 0x4000 != 0
            deliverUnmasked()
        }
    }

    public func tableRead(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard data.count == 4 || data.count == 8, offset % 4 == 0 else { return }
        lock.withLock {
            var value: UInt64 = 0
            for i in 0..<(data.count / 4) {
                let word = Int(offset / 4) + i
                guard word < table.count else { return }
                value |= UInt64(table[word]) << (32 * UInt64(i))
            }
            data.storeLittleEndian(value)
        }
    }

    public func tableWrite(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard data.count == 4 || data.count == 8, offset % 4 == 0 else { return }
        let value = data.littleEndianValue
        lock.withLock {
            for i in 0..<(data.count / 4) {
                let word = Int(offset / 4) + i
                guard word < table.count else { return }
                let new = UInt32(truncatingIfNeeded: value >> (32 * UInt64(i)))
                if word % 4 == 3 {
                    table[word] = (table[word] & ~1) | (new & 1)
                } else if table[word] != new {
                    table[word] = new
                    dirty[word / 4] = true
                }
            }
            deliverUnmasked()
        }
    }

    public func pbaRead(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        lock.withLock {
            var value: UInt64 = 0
            for bit in 0..<(8 * data.count) {
                let vector = Int(offset) * 8 + bit
                if vector < count, pending[vector] { value |= 1 << UInt64(bit) }
            }
            data.storeLittleEndian(value)
        }
    }

    /// Fires `vector`, or marks it pending while masked. Returns false when MSI-X is disabled
    /// (the caller falls back to INTx).
    @discardableResult
    public func signal(_ vector: UInt16) -> Bool {
        lock.withLock {
            guard enabled else { return false }
            let v = Int(vector)
            guard v < count else { return true }  // NO_VECTOR or out of range: no interrupt
            if functionMasked || table[4 * v + 3] & 1 != 0 {
                pending[v] = true
            } else {
                commit(v)
                delivery.fire(vector: v)
            }
            return true
        }
    }

    // MARK: Snapshot

    struct State: Codable, Equatable {
        var table: [UInt32]
        var pending: [Bool]
        var enabled: Bool
        var functionMasked: Bool
    }

    var state: State { lock.withLock { State(table: table, pending: pending, enabled: enabled, functionMasked: functionMasked) } }

    /// Takes the saved vectors and re-programs the routes of those that can fire (a new process
    /// has an empty GSI routing table); pending vectors stay pending, nothing fires.
    func restore(_ state: State) throws(SnapshotError) {
        guard state.table.count == 4 * count, state.pending.count == count else {
            throw .invalidState("MSI-X: \(state.pending.count) vectors in the snapshot, \(count) here")
        }
        lock.withLock {
            table = state.table
            pending = state.pending
            enabled = state.enabled
            functionMasked = state.functionMasked
            dirty = Array(repeating: true, count: count)
            guard enabled else { return }
            for vector in 0..<count where table[4 * vector + 3] & 1 == 0 { commit(vector) }
        }
    }

    public func isMasked(_ vector: Int) -> Bool { lock.withLock { table[4 * vector + 3] & 1 != 0 } }

    private func commit(_ vector: Int) {
        guard dirty[vector] else { return }
        dirty[vector] = false
        let address = UInt64(table[4 * vector]) | UInt64(table[4 * vector + 1]) << 32
        delivery.program(vector: vector, address: address, data: table[4 * vector + 2])
    }

    /// Programs routes for deliverable vectors and fires those left pending while masked.
    private func deliverUnmasked() {
        guard enabled, !functionMasked else { return }
        for vector in 0..<count where table[4 * vector + 3] & 1 == 0 {
            commit(vector)
            if pending[vector] {
                pending[vector] = false
                delivery.fire(vector: vector)
            }
        }
    }
}
