internal import CKVM

/// Why a virtqueue stopped. Every case is the driver's fault (or an attacker's): the device sets
/// NEEDS_RESET and processes nothing more on that device until the driver resets it.
public enum VirtqueueError: Error, Equatable, Sendable, Codable, CustomStringConvertible {
    case notReady
    case invalidSize(UInt16, maximum: UInt16)
    case misalignedRing(String, address: UInt64)
    case ringOutsideMemory(String, address: UInt64, length: UInt64)
    case availableIndexJump(available: UInt16, lastSeen: UInt16, size: UInt16)
    case headOutOfRange(UInt16, size: UInt16)
    case nextOutOfRange(UInt16, tableSize: Int)
    case chainTooLong(limit: Int)
    case indirectNotNegotiated
    case nestedIndirect
    case indirectWithNext
    case badIndirectLength(UInt32)
    case descriptorOutsideMemory(address: UInt64, length: UInt32)
    case readableAfterWritable

    public var description: String {
        switch self {
        case .notReady: "the queue is not enabled"
        case let .invalidSize(size, maximum): "queue size \(size) is not between 1 and \(maximum)"
        case let .misalignedRing(name, address): "\(name) at 0x\(String(address, radix: 16)) is misaligned"
        case let .ringOutsideMemory(name, address, length):
            "\(name) at 0x\(String(address, radix: 16)) (+\(length)) is not guest RAM"
        case let .availableIndexJump(available, lastSeen, size):
            "avail.idx jumped from \(lastSeen) to \(available), more than the queue size \(size)"
        case let .headOutOfRange(head, size): "chain head \(head) is outside a queue of \(size)"
        case let .nextOutOfRange(next, tableSize): "descriptor next \(next) is outside a table of \(tableSize)"
        case let .chainTooLong(limit): "descriptor chain longer than \(limit) (a loop?)"
        case .indirectNotNegotiated: "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
        case .nestedIndirect: "indirect descriptor inside an indirect table"
        case .indirectWithNext: "descriptor has both INDIRECT and NEXT"
        case let .badIndirectLength(length): "indirect table length \(length) is not a non-zero multiple of 16 within the queue size"
        case let .descriptorOutsideMemory(address, length):
            "buffer 0x\(String(address, radix: 16)) (+\(length)) is not guest RAM"
        case .readableAfterWritable: "device-readable descriptor after a device-writable one"
        }
    }
}

/// One buffer of a descriptor chain, already checked: `pointer` covers exactly `length` bytes of
/// guest RAM. A zero-length descriptor produces no segment.
public struct DescriptorSegment {
    public let address: UInt64
    public let length: UInt32
    public let writable: Bool
    public let pointer: UnsafeMutableRawPointer
}

/// A popped chain: readable segments first, then writable ones (the walker enforces the order).
public struct DescriptorChain {
    public internal(set) var head: UInt16 = 0
    public internal(set) var segments: [DescriptorSegment] = []
    public internal(set) var readableBytes: UInt64 = 0
    public internal(set) var writableBytes: UInt64 = 0
    /// Index in `segments` of the first writable segment (== segments.count when none).
    public internal(set) var firstWritable: Int = 0

    public init() { segments.reserveCapacity(64) }

    mutating func clear(head: UInt16) {
        self.head = head
        segments.removeAll(keepingCapacity: true)
        readableBytes = 0
        writableBytes = 0
        firstWritable = 0
    }

    public var readable: ArraySlice<DescriptorSegment> { segments[0..<firstWritable] }
    public var writable: ArraySlice<DescriptorSegment> { segments[firstWritable...] }
}

/// A split virtqueue (virtio 1.2 §2.7) as the device sees it.
///
/// Hardening: the three rings are translated once, at activation, through ``GuestMemory``'s checked
/// accessor and must lie wholly inside guest RAM with the alignment the spec requires. Every
/// descriptor is copied out of guest memory exactly once and its buffer range checked before a
/// pointer to it exists, so a guest rewriting a descriptor while the device reads it gains nothing
/// (no time-of-check/time-of-use window). Chains are bounded by the queue size (loops end there),
/// indirect tables may not nest and must be a whole number of descriptors no longer than the queue,
/// and `avail.idx` may not run ahead of the device by more than the queue size.
///
/// Not thread-safe: its owner (``VirtioDeviceCore``) serialises access.
public final class Virtqueue: @unchecked Sendable {
    public static let descriptorNext: UInt16 = 1
    public static let descriptorWrite: UInt16 = 2
    public static let descriptorIndirect: UInt16 = 4
    public static let availNoInterrupt: UInt16 = 1
    public static let noVector: UInt16 = 0xFFFF

    public let maximumSize: UInt16
    let memory: GuestMemory

    // Driver-programmed configuration (common configuration / MMIO registers).
    public var size: UInt16
    public var descriptorTableAddress: UInt64 = 0
    public var availableRingAddress: UInt64 = 0
    public var usedRingAddress: UInt64 = 0
    public var enabled = false
    public var vector: UInt16 = Virtqueue.noVector

    // Run-time state, valid after ``activate(eventIndex:indirect:)``.
    public private(set) var isActive = false
    public private(set) var lastAvailableIndex: UInt16 = 0
    public private(set) var usedIndex: UInt16 = 0
    private var lastSignalledUsed: UInt16 = 0
    /// The driver's available index when the device last processed this queue.
    private var availableIndexAtLastLook: UInt16 = 0
    private var eventIndex = false
    private var indirect = false
    private var descriptors: UnsafeMutableRawPointer?
    private var available: UnsafeMutableRawPointer?
    private var used: UnsafeMutableRawPointer?
    /// Reused by ``drain(_:)`` so steady-state processing allocates nothing.
    private var scratch: DescriptorChain? = DescriptorChain()

    public init(maximumSize: UInt16, memory: GuestMemory) {
        self.maximumSize = maximumSize
        self.size = maximumSize
        self.memory = memory
    }

    /// Back to the reset state (driver configuration included).
    public func reset() {
        size = maximumSize
        descriptorTableAddress = 0
        availableRingAddress = 0
        usedRingAddress = 0
        enabled = false
        vector = Self.noVector
        deactivate()
    }

    public func deactivate() {
        isActive = false
        lastAvailableIndex = 0
        usedIndex = 0
        lastSignalledUsed = 0
        availableIndexAtLastLook = 0
        descriptors = nil
        available = nil
        used = nil
    }

    /// Validates and translates the rings (DRIVER_OK time).
    public func activate(eventIndex: Bool, indirect: Bool) throws(VirtqueueError) {
        guard enabled else { throw .notReady }
        guard size > 0, size <= maximumSize else {
            throw .invalidSize(size, maximum: maximumSize)
        }
        let n = Int(size)
        descriptors = try translate("descriptor table", descriptorTableAddress, 16 * n, alignment: 16)
        available = try translate("available ring", availableRingAddress, 6 + 2 * n, alignment: 2)
        used = try translate("used ring", usedRingAddress, 6 + 8 * n, alignment: 4)
        self.eventIndex = eventIndex
        self.indirect = indirect
        // The driver may have used the ring before (after a device reset it starts at zero); the
        // device's view starts from what the used ring says, as a fresh device would.
        lastAvailableIndex = 0
        usedIndex = 0
        lastSignalledUsed = 0
        availableIndexAtLastLook = 0
        isActive = true
    }

    private func translate(_ name: String, _ address: UInt64, _ length: Int, alignment: UInt64) throws(VirtqueueError) -> UnsafeMutableRawPointer {
        guard address % alignment == 0 else { throw .misalignedRing(name, address: address) }
        guard let pointer = memory.pointer(at: address, count: length) else {
            throw .ringOutsideMemory(name, address: address, length: UInt64(length))
        }
        return pointer
    }

    // MARK: Snapshot

    /// Everything the driver programmed and the device's position in the rings. The ring
    /// pointers are not state: they are translated again from the addresses on restore.
    struct State: Codable, Equatable {
        var size: UInt16
        var descriptorTableAddress: UInt64
        var availableRingAddress: UInt64
        var usedRingAddress: UInt64
        var enabled: Bool
        var vector: UInt16
        var isActive: Bool
        var lastAvailableIndex: UInt16
        var usedIndex: UInt16
        var lastSignalledUsed: UInt16
        var availableIndexAtLastLook: UInt16
        var eventIndex: Bool
        var indirect: Bool
    }

    var state: State {
        State(size: size, descriptorTableAddress: descriptorTableAddress, availableRingAddress: availableRingAddress,
              usedRingAddress: usedRingAddress, enabled: enabled, vector: vector, isActive: isActive,
              lastAvailableIndex: lastAvailableIndex, usedIndex: usedIndex, lastSignalledUsed: lastSignalledUsed,
              availableIndexAtLastLook: availableIndexAtLastLook, eventIndex: eventIndex, indirect: indirect)
    }

    /// Puts the queue back where it was; an active queue's rings must still be valid guest RAM.
    func restore(_ state: State) throws(VirtqueueError) {
        deactivate()
        guard state.size <= maximumSize else { throw .invalidSize(state.size, maximum: maximumSize) }
        size = state.size
        descriptorTableAddress = state.descriptorTableAddress
        availableRingAddress = state.availableRingAddress
        usedRingAddress = state.usedRingAddress
        enabled = state.enabled
        vector = state.vector
        guard state.isActive else { return }
        try activate(eventIndex: state.eventIndex, indirect: state.indirect)
        lastAvailableIndex = state.lastAvailableIndex
        usedIndex = state.usedIndex
        lastSignalledUsed = state.lastSignalledUsed
        availableIndexAtLastLook = state.availableIndexAtLastLook
    }

    // MARK: Available ring

    /// Records the driver's available index as the device's last look at the queue.
    public func noteProcessed() {
        guard isActive, let available else { return }
        availableIndexAtLastLook = ckvm_load_acquire_u16(available + 2)
    }

    /// Whether the driver published buffers since the device last processed the queue. Buffers
    /// the device chose to leave in the ring (a receive queue waiting for host input) do not count:
    /// polling on them would spin forever and starve the device's other event sources.
    public func hasNewAvailable() -> Bool {
        guard isActive, let available else { return false }
        return ckvm_load_acquire_u16(available + 2) != availableIndexAtLastLook
    }

    /// Number of chains the driver has made available and the device has not taken.
    public func pendingCount() throws(VirtqueueError) -> Int {
        guard isActive, let available else { throw .notReady }
        let index = ckvm_load_acquire_u16(available + 2)
        let pending = index &- lastAvailableIndex
        guard pending <= size else {
            throw .availableIndexJump(available: index, lastSeen: lastAvailableIndex, size: size)
        }
        return Int(pending)
    }

    /// Takes the next available chain into `chain`. Returns false when none is pending.
    public func pop(into chain: inout DescriptorChain) throws(VirtqueueError) -> Bool {
        guard try pendingCount() > 0, let available, let descriptors else { return false }
        let slot = Int(lastAvailableIndex % size)
        let head = UInt16(littleEndian: (available + 4 + 2 * slot).loadUnaligned(as: UInt16.self))
        try walk(head: head, table: descriptors, into: &chain)
        lastAvailableIndex &+= 1
        return true
    }

    /// Puts the last `count` popped chains back: the next ``pop(into:)`` takes them again (walked
    /// and checked afresh). For a receive queue that popped buffers for a frame they turned out too
    /// small for; nothing may have been pushed to the used ring since those pops.
    public func unpop(_ count: Int) {
        guard isActive, count > 0, count <= Int(size) else { return }
        lastAvailableIndex &-= UInt16(count)
    }

    /// Follows a chain from `head`, checking every step (see the type's documentation).
    private func walk(head: UInt16, table directTable: UnsafeMutableRawPointer, into chain: inout DescriptorChain) throws(VirtqueueError) {
        chain.clear(head: head)
        guard head < size else { throw .headOutOfRange(head, size: size) }
        var table = directTable
        var tableSize = Int(size)
        var index = Int(head)
        // Each descriptor visited costs one; a loop exhausts the budget. The spec bounds a chain,
        // indirect part included, by the queue size.
        var budget = Int(size)
        var inIndirect = false
        var seenWritable = false
        while true {
            guard budget > 0 else { throw .chainTooLong(limit: Int(size)) }
            budget -= 1
            // Copy the descriptor out once; only the copy is checked and used.
            let entry = table + 16 * index
            let address = UInt64(littleEndian: entry.loadUnaligned(as: UInt64.self))
            let length = UInt32(littleEndian: (entry + 8).loadUnaligned(as: UInt32.self))
            let flags = UInt16(littleEndian: (entry + 12).loadUnaligned(as: UInt16.self))
            let next = UInt16(littleEndian: (entry + 14).loadUnaligned(as: UInt16.self))

            if flags & Self.descriptorIndirect != 0 {
                guard indirect else { throw .indirectNotNegotiated }
                guard !inIndirect else { throw .nestedIndirect }
                guard flags & Self.descriptorNext == 0 else { throw .indirectWithNext }
                let count = Int(length / 16)
                guard length % 16 == 0, count > 0, count <= Int(size) else { throw .badIndirectLength(length) }
                guard let pointer = memory.pointer(at: address, count: Int(length)) else {
                    throw .descriptorOutsideMemory(address: address, length: length)
                }
                table = pointer
                tableSize = count
                index = 0
                inIndirect = true
                budget = count
                continue
            }

            if length > 0 {
                guard let pointer = memory.pointer(at: address, count: Int(length)) else {
                    throw .descriptorOutsideMemory(address: address, length: length)
                }
                let writable = flags & Self.descriptorWrite != 0
                if writable {
                    if !seenWritable { chain.firstWritable = chain.segments.count }
                    seenWritable = true
                    chain.writableBytes += UInt64(length)
                } else {
                    guard !seenWritable else { throw .readableAfterWritable }
                    chain.readableBytes += UInt64(length)
                }
                chain.segments.append(DescriptorSegment(address: address, length: length, writable: writable, pointer: pointer))
            }
            if flags & Self.descriptorNext == 0 { break }
            guard Int(next) < tableSize else { throw .nextOutOfRange(next, tableSize: tableSize) }
            index = Int(next)
        }
        if !seenWritable { chain.firstWritable = chain.segments.count }
    }

    // MARK: Used ring

    /// Records the chain's writable buffers as written by the device (for a migration's dirty
    /// tracking); call it after writing them, before ``pushUsed(head:length:)``.
    public func noteWritten(_ chain: DescriptorChain) {
        guard chain.writableBytes > 0 else { return }
        for segment in chain.segments where segment.writable { memory.vmmWrites.mark(segment.address, count: Int(segment.length)) }
    }

    /// Returns a chain to the driver with `length` bytes written into its writable buffers.
    public func pushUsed(head: UInt16, length: UInt32) {
        guard isActive, let used else { return }
        let slot = Int(usedIndex % size)
        let element = used + 4 + 8 * slot
        element.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
        (element + 4).storeBytes(of: length.littleEndian, as: UInt32.self)
        usedIndex &+= 1
        // Release: the element is visible before the index that publishes it.
        ckvm_store_release_u16(used + 2, usedIndex.littleEndian)
        memory.vmmWrites.mark(usedRingAddress, count: 6 + 8 * Int(size))
    }

    /// Whether the driver wants an interrupt for the used entries added since the last call
    /// (VIRTIO_F_EVENT_IDX's `used_event`, else the avail ring's NO_INTERRUPT flag).
    public func shouldSignal() -> Bool {
        guard isActive, let available else { return false }
        let new = usedIndex
        let old = lastSignalledUsed
        guard new != old else { return false }
        lastSignalledUsed = new
        // The used index store must be visible before the driver's suppression state is read.
        ckvm_fence_seq_cst()
        if eventIndex {
            let usedEvent = UInt16(littleEndian: (available + 4 + 2 * Int(size)).loadUnaligned(as: UInt16.self))
            return new &- usedEvent &- 1 < new &- old
        }
        return UInt16(littleEndian: available.loadUnaligned(as: UInt16.self)) & Self.availNoInterrupt == 0
    }

    /// Asks for a notification at the next available chain (`avail_event`), then re-checks:
    /// returns true when chains arrived meanwhile and the caller must process again.
    public func rearm() -> Bool {
        guard isActive, let available, let used else { return false }
        if eventIndex {
            (used + 4 + 8 * Int(size)).storeBytes(of: lastAvailableIndex.littleEndian, as: UInt16.self)
            memory.vmmWrites.mark(usedRingAddress + 4 + 8 * UInt64(size), count: 2)
        }
        ckvm_fence_seq_cst()
        return ckvm_load_acquire_u16(available + 2) != lastAvailableIndex
    }

    /// Processes every available chain with `body` (which returns the bytes it wrote into the
    /// chain's writable buffers), re-arming notifications until the ring is empty. Returns whether
    /// the driver should get an interrupt.
    public func drain(_ body: (inout DescriptorChain) -> UInt32) throws(VirtqueueError) -> Bool {
        // Take the scratch chain out so its buffer stays uniquely referenced (no copy-on-write).
        var chain = scratch ?? DescriptorChain()
        scratch = nil
        defer { scratch = chain }
        repeat {
            while try pop(into: &chain) {
                let written = body(&chain)
                noteWritten(chain)
                // Never report more than the driver offered, whatever a device model says.
                pushUsed(head: chain.head, length: UInt32(min(UInt64(written), chain.writableBytes)))
            }
        } while rearm()
        return shouldSignal()
    }
}
