internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// A KVM virtual machine: the file descriptor `KVM_CREATE_VM` returned.
///
/// Methods map one-to-one to VM ioctls. They are safe to call from any thread; KVM serialises them.
public final class VirtualMachine: Sendable {
    public let fileDescriptor: Int32
    let vcpuMapSize: Int

    init(fileDescriptor: Int32, vcpuMapSize: Int) {
        self.fileDescriptor = fileDescriptor
        self.vcpuMapSize = vcpuMapSize
    }

    deinit { close(fileDescriptor) }

    private func call(_ name: String, _ request: UInt, _ pointer: UnsafeMutableRawPointer?, detail: String? = nil) throws(KVMError) {
        var result: Int32
        repeat { result = ckvm_ioctl_ptr(fileDescriptor, request, pointer) } while result < 0 && ckvm_errno() == EINTR
        guard result >= 0 else { throw KVMError(operation: name, errno: ckvm_errno(), detail: detail) }
    }

    private func call(_ name: String, _ request: UInt, argument: UInt, detail: String? = nil) throws(KVMError) -> Int32 {
        var result: Int32
        repeat { result = ckvm_ioctl_arg(fileDescriptor, request, argument) } while result < 0 && ckvm_errno() == EINTR
        guard result >= 0 else { throw KVMError(operation: name, errno: ckvm_errno(), detail: detail) }
        return result
    }

    // MARK: Memory

    /// Flags for ``setMemoryRegion(slot:guestAddress:size:hostAddress:flags:)``.
    public struct MemoryRegionFlags: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let logDirtyPages = MemoryRegionFlags(rawValue: UInt32(KVM_MEM_LOG_DIRTY_PAGES))
        public static let readOnly = MemoryRegionFlags(rawValue: UInt32(KVM_MEM_READONLY))
    }

    /// `KVM_SET_USER_MEMORY_REGION`. A size of 0 deletes the slot.
    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UInt,
                                flags: MemoryRegionFlags = []) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: flags.rawValue, guest_phys_addr: guestAddress,
                                                 memory_size: size, userspace_addr: UInt64(hostAddress))
        try call("KVM_SET_USER_MEMORY_REGION", CKVM_SET_USER_MEMORY_REGION, &region,
                 detail: "slot \(slot) at guest 0x\(String(guestAddress, radix: 16)) size \(size)")
    }

    /// Registers every region of `memory` as a slot.
    public func map(_ memory: GuestMemory) throws(KVMError) {
        for region in memory.regions {
            try setMemoryRegion(slot: region.slot, guestAddress: region.guestAddress, size: region.size,
                                hostAddress: region.hostAddress)
        }
    }

    /// `KVM_GET_DIRTY_LOG`: one bit per 4 KiB page of the slot, set when the guest wrote it since
    /// the last call. The slot must have been created with ``MemoryRegionFlags/logDirtyPages``.
    public func dirtyLog(slot: UInt32, pages: Int) throws(KVMError) -> [UInt64] {
        var bitmap = [UInt64](repeating: 0, count: (pages + 63) / 64)
        let result = bitmap.withUnsafeMutableBytes { buffer in
            var log = kvm_dirty_log()
            log.slot = slot
            log.dirty_bitmap = buffer.baseAddress
            return ckvm_ioctl_ptr(fileDescriptor, CKVM_GET_DIRTY_LOG, &log)
        }
        guard result == 0 else { throw KVMError(operation: "KVM_GET_DIRTY_LOG", errno: ckvm_errno(), detail: "slot \(slot)") }
        return bitmap
    }

    /// `KVM_CHECK_EXTENSION` asked of this VM: some capabilities answer per VM.
    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, ckvm_ioctl_arg(fileDescriptor, CKVM_CHECK_EXTENSION, UInt(capability)))
    }

    /// How `KVM_GET_DIRTY_LOG` treats what it reports (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`).
    public struct DirtyLogProtection: OptionSet, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// Reading the log neither clears it nor write-protects the pages it reports; the VMM
        /// re-arms the pages it is about to copy with ``VirtualMachine/clearDirtyLog(slot:firstPage:pages:bitmap:)``.
        public static let manual = DirtyLogProtection(rawValue: UInt64(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE))
        /// Turning logging on reports every page dirty instead of write-protecting the whole
        /// slot at once: the protection then comes a chunk at a time, with each clear.
        public static let initiallySet = DirtyLogProtection(rawValue: UInt64(KVM_DIRTY_LOG_INITIALLY_SET))
    }

    /// What this KVM offers of ``DirtyLogProtection`` (empty: only the classic read-and-clear log).
    public var supportedDirtyLogProtection: DirtyLogProtection {
        DirtyLogProtection(rawValue: UInt64(checkExtension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)))
            .intersection([.manual, .initiallySet])
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)`. Change it only while no slot logs
    /// dirty pages: a slot's log is set up (all clear, or all set) when logging turns on.
    public func setDirtyLogProtection(_ protection: DirtyLogProtection) throws(KVMError) {
        var capability = kvm_enable_cap()
        capability.cap = UInt32(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        capability.args.0 = protection.rawValue
        try call("KVM_ENABLE_CAP", CKVM_ENABLE_CAP, &capability, detail: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = \(protection.rawValue)")
    }

    /// `KVM_CLEAR_DIRTY_LOG` (manual protection): clears the bits of `bitmap` (one per page from
    /// `firstPage`) in the slot's log and write-protects those pages, so that a guest write from
    /// now on is logged again. Clear a page before copying it, never after. `firstPage` is a
    /// multiple of 64, and `pages` too unless the range ends at the end of the slot.
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, pages: UInt32, bitmap: UnsafeRawPointer) throws(KVMError) {
        var clear = kvm_clear_dirty_log()
        clear.slot = slot
        clear.num_pages = pages
        clear.first_page = firstPage
        clear.dirty_bitmap = UnsafeMutableRawPointer(mutating: bitmap)
        try call("KVM_CLEAR_DIRTY_LOG", CKVM_CLEAR_DIRTY_LOG, &clear, detail: "slot \(slot), pages \(firstPage)..<\(firstPage + UInt64(pages))")
    }

    // MARK: Platform

    /// `KVM_SET_TSS_ADDR`: three pages KVM needs on Intel for real-mode emulation.
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try call("KVM_SET_TSS_ADDR", CKVM_SET_TSS_ADDR, argument: UInt(address))
    }

    /// `KVM_SET_IDENTITY_MAP_ADDR`: one page KVM needs on Intel for unrestricted-guest-less hosts.
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var value = address
        try call("KVM_SET_IDENTITY_MAP_ADDR", CKVM_SET_IDENTITY_MAP_ADDR, &value)
    }

    /// `KVM_CREATE_IRQCHIP`: the in-kernel PIC pair, IOAPIC and per-vCPU LAPICs.
    public func createInterruptController() throws(KVMError) {
        _ = try call("KVM_CREATE_IRQCHIP", CKVM_CREATE_IRQCHIP, argument: 0)
    }

    /// `KVM_CREATE_PIT2`: the in-kernel i8254 timer.
    public func createPIT() throws(KVMError) {
        var config = kvm_pit_config()
        try call("KVM_CREATE_PIT2", CKVM_CREATE_PIT2, &config)
    }

    // MARK: Interrupts

    /// `KVM_IRQ_LINE`: sets the level of an interrupt line (GSI) of the in-kernel irqchip.
    public func setInterruptLine(_ gsi: UInt32, high: Bool) throws(KVMError) {
        var level = kvm_irq_level()
        level.irq = gsi
        level.level = high ? 1 : 0
        try call("KVM_IRQ_LINE", CKVM_IRQ_LINE, &level, detail: "gsi \(gsi)")
    }

    /// `KVM_SIGNAL_MSI`: injects one message-signalled interrupt.
    public func signalMSI(address: UInt64, data: UInt32) throws(KVMError) {
        var msi = kvm_msi()
        msi.address_lo = UInt32(truncatingIfNeeded: address)
        msi.address_hi = UInt32(truncatingIfNeeded: address >> 32)
        msi.data = data
        try call("KVM_SIGNAL_MSI", CKVM_SIGNAL_MSI, &msi)
    }

    /// One entry of the GSI routing table.
    public enum Route: Sendable, Equatable {
        /// GSI → pin of the PIC (chip 0/1) or IOAPIC (chip 2).
        case irqchip(gsi: UInt32, chip: UInt32, pin: UInt32)
        case msi(gsi: UInt32, address: UInt64, data: UInt32)
    }

    /// `KVM_SET_GSI_ROUTING`: replaces the whole routing table.
    public func setGSIRouting(_ routes: [Route]) throws(KVMError) {
        guard let table = ckvm_irq_routing_alloc(UInt32(routes.count)) else {
            throw KVMError(operation: "KVM_SET_GSI_ROUTING", errno: ENOMEM)
        }
        defer { ckvm_free(table) }
        for (i, route) in routes.enumerated() {
            let entry = ckvm_irq_routing_entry(table, UInt32(i))
            switch route {
            case let .irqchip(gsi, chip, pin):
                entry.pointee.gsi = gsi
                entry.pointee.type = UInt32(KVM_IRQ_ROUTING_IRQCHIP)
                entry.pointee.u.irqchip.irqchip = chip
                entry.pointee.u.irqchip.pin = pin
            case let .msi(gsi, address, data):
                entry.pointee.gsi = gsi
                entry.pointee.type = UInt32(KVM_IRQ_ROUTING_MSI)
                entry.pointee.u.msi.address_lo = UInt32(truncatingIfNeeded: address)
                entry.pointee.u.msi.address_hi = UInt32(truncatingIfNeeded: address >> 32)
                entry.pointee.u.msi.data = data
            }
        }
        try call("KVM_SET_GSI_ROUTING", CKVM_SET_GSI_ROUTING, table, detail: "\(routes.count) routes")
    }

    /// `KVM_IRQFD`: a write to `eventFD` raises `gsi` without exiting to userspace.
    public func attachIRQFD(_ eventFD: Int32, gsi: UInt32) throws(KVMError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(bitPattern: eventFD)
        irqfd.gsi = gsi
        try call("KVM_IRQFD", CKVM_IRQFD, &irqfd, detail: "gsi \(gsi)")
    }

    public func detachIRQFD(_ eventFD: Int32, gsi: UInt32) throws(KVMError) {
        var irqfd = kvm_irqfd()
        irqfd.fd = UInt32(bitPattern: eventFD)
        irqfd.gsi = gsi
        irqfd.flags = UInt32(KVM_IRQFD_FLAG_DEASSIGN)
        try call("KVM_IRQFD", CKVM_IRQFD, &irqfd, detail: "deassign gsi \(gsi)")
    }

    /// Where an ioeventfd listens.
    public enum IOEventSpace: Sendable { case port, mmio }

    /// `KVM_IOEVENTFD`: a guest write of `length` bytes at `address` (optionally only of value
    /// `match`) signals `eventFD` in the kernel, without an exit to userspace.
    public func attachIOEventFD(_ eventFD: Int32, space: IOEventSpace, address: UInt64, length: UInt32,
                                match: UInt64? = nil, detach: Bool = false) throws(KVMError) {
        var event = kvm_ioeventfd()
        event.addr = address
        event.len = length
        event.fd = eventFD
        var flags: UInt32 = 0
        if space == .port { flags |= UInt32(1 << kvm_ioeventfd_flag_nr_pio) }
        if let match {
            flags |= UInt32(1 << kvm_ioeventfd_flag_nr_datamatch)
            event.datamatch = match
        }
        if detach { flags |= UInt32(1 << kvm_ioeventfd_flag_nr_deassign) }
        event.flags = flags
        try call("KVM_IOEVENTFD", CKVM_IOEVENTFD, &event, detail: "\(space) 0x\(String(address, radix: 16))")
    }

    // MARK: State

    /// `KVM_GET_CLOCK`: the kvmclock base, in nanoseconds.
    public func clock() throws(KVMError) -> UInt64 {
        var data = kvm_clock_data()
        try call("KVM_GET_CLOCK", CKVM_GET_CLOCK, &data)
        return data.clock
    }

    /// `KVM_SET_CLOCK`.
    public func setClock(_ nanoseconds: UInt64) throws(KVMError) {
        var data = kvm_clock_data()
        data.clock = nanoseconds
        try call("KVM_SET_CLOCK", CKVM_SET_CLOCK, &data)
    }

    /// The in-kernel interrupt controllers' state, as opaque bytes (`KVM_GET_IRQCHIP` for chips 0–2).
    public func interruptControllerState() throws(KVMError) -> [[UInt8]] {
        var states: [[UInt8]] = []
        for chip: UInt32 in 0...2 {
            var state = kvm_irqchip()
            state.chip_id = chip
            try call("KVM_GET_IRQCHIP", CKVM_GET_IRQCHIP, &state, detail: "chip \(chip)")
            states.append(withUnsafeBytes(of: state) { Array($0) })
        }
        return states
    }

    /// `KVM_SET_IRQCHIP` from bytes produced by ``interruptControllerState()``.
    public func setInterruptControllerState(_ states: [[UInt8]]) throws(KVMError) {
        for bytes in states {
            var state = kvm_irqchip()
            guard bytes.count == MemoryLayout<kvm_irqchip>.size else {
                throw KVMError(operation: "KVM_SET_IRQCHIP", errno: EINVAL, detail: "state has \(bytes.count) bytes")
            }
            withUnsafeMutableBytes(of: &state) { $0.copyBytes(from: bytes) }
            try call("KVM_SET_IRQCHIP", CKVM_SET_IRQCHIP, &state, detail: "chip \(state.chip_id)")
        }
    }

    /// `KVM_GET_PIT2` as opaque bytes.
    public func pitState() throws(KVMError) -> [UInt8] {
        var state = kvm_pit_state2()
        try call("KVM_GET_PIT2", CKVM_GET_PIT2, &state)
        return withUnsafeBytes(of: state) { Array($0) }
    }

    /// `KVM_SET_PIT2` from bytes produced by ``pitState()``.
    public func setPITState(_ bytes: [UInt8]) throws(KVMError) {
        var state = kvm_pit_state2()
        guard bytes.count == MemoryLayout<kvm_pit_state2>.size else {
            throw KVMError(operation: "KVM_SET_PIT2", errno: EINVAL, detail: "state has \(bytes.count) bytes")
        }
        withUnsafeMutableBytes(of: &state) { $0.copyBytes(from: bytes) }
        try call("KVM_SET_PIT2", CKVM_SET_PIT2, &state)
    }

    // MARK: vCPUs

    /// `KVM_CREATE_VCPU`. Call it on the thread that will run the vCPU: KVM expects every vCPU
    /// ioctl to come from the thread that created it.
    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let fd = try call("KVM_CREATE_VCPU", CKVM_CREATE_VCPU, argument: UInt(id), detail: "vCPU \(id)")
        guard let mapping = mmap(nil, vcpuMapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0),
              mapping != MAP_FAILED else {
            let code = errno
            close(fd)
            throw KVMError(operation: "mmap(kvm_run)", errno: code, detail: "vCPU \(id)")
        }
        return VCPU(id: id, fileDescriptor: fd, run: mapping.assumingMemoryBound(to: kvm_run.self), mapSize: vcpuMapSize)
    }
}
