internal import CKVM
internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// Guest pages the VMM itself wrote while a migration tracks dirty pages.
///
/// KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`) sees only what vCPUs write. Device models write
/// guest RAM too — virtio used rings and the buffers of requests they complete, page-table bits
/// the emulation-completion layer sets — and a page they write after the migration has copied it
/// must be copied again. Each such write calls ``mark(_:count:)`` after the bytes are in place;
/// the sender takes the set with each KVM dirty-log round, so a write is either in the pass that
/// follows it or in the final one (taken after the devices are quiesced).
///
/// When no migration runs, ``mark(_:count:)`` costs one relaxed atomic load.
public final class VMMWriteLog: @unchecked Sendable {
    private let active = Atomic<Bool>(false)
    private let lock = PthreadLock()
    private var bits: [UInt64] = []
    /// Guest-physical pages covered (up to the end of the highest region).
    let pageCount: Int

    init(pageCount: Int) { self.pageCount = pageCount }

    /// Records that the VMM wrote `count` bytes at guest-physical `address`.
    @inline(__always)
    public func mark(_ address: UInt64, count: Int) {
        guard active.load(ordering: .relaxed), count > 0 else { return }
        markSlow(address, count: count)
    }

    private func markSlow(_ address: UInt64, count: Int) {
        let first = Int(address >> 12)
        let last = Int((address &+ UInt64(count) &- 1) >> 12)
        lock.withLock {
            guard !bits.isEmpty else { return }
            for page in first...max(first, last) where page < pageCount {
                bits[page >> 6] |= 1 << UInt64(page & 63)
            }
        }
    }

    func start() {
        lock.withLock { bits = [UInt64](repeating: 0, count: (pageCount + 63) / 64) }
        active.store(true, ordering: .sequentiallyConsistent)
    }

    func stop() {
        active.store(false, ordering: .sequentiallyConsistent)
        lock.withLock { bits = [] }
    }

    /// The pages marked since the last call (one bit per guest-physical page), cleared.
    func take() -> [UInt64] {
        lock.withLock {
            let taken = bits
            if !bits.isEmpty { bits = [UInt64](repeating: 0, count: bits.count) }
            return taken
        }
    }
}

/// Auto-converge: while set, every vCPU sleeps `percent`% of each 10 ms period, so a guest that
/// dirties memory faster than the link carries it slows down until the dirty set fits the
/// downtime budget. A kicker thread takes each vCPU out of `KVM_RUN` once a period; the vCPU
/// thread sleeps before entering again.
final class VCPUThrottle: @unchecked Sendable {
    static let periodNanoseconds: UInt64 = 10_000_000
    private let percentValue = Atomic<Int>(0)
    private let running = Atomic<Bool>(false)
    private let done = PthreadCondition()
    private var threadRunning = false

    var percent: Int { percentValue.load(ordering: .relaxed) }

    /// The sleep a vCPU takes when kicked while throttled (0: none).
    @inline(__always)
    var sleepNanoseconds: UInt64 {
        let value = percentValue.load(ordering: .relaxed)
        return value == 0 ? 0 : Self.periodNanoseconds * UInt64(value) / 100
    }

    /// Sets the throttle; starts the kicker with the first non-zero value.
    func set(_ percent: Int, lifecycle: Lifecycle) {
        percentValue.store(max(0, min(99, percent)), ordering: .relaxed)
        guard percent > 0, !running.exchange(true, ordering: .acquiringAndReleasing) else { return }
        done.lock.withLock { threadRunning = true }
        startDetachedThread { [self] in
            ckvm_thread_set_name("throttle")
            while running.load(ordering: .acquiring), !lifecycle.stopRequested {
                if percentValue.load(ordering: .relaxed) > 0 { lifecycle.kickAll() }
                var interval = timespec(tv_sec: 0, tv_nsec: Int(Self.periodNanoseconds))
                nanosleep(&interval, nil)
            }
            done.lock.withLock {
                threadRunning = false
                done.broadcast()
            }
        }
    }

    /// Ends throttling and waits for the kicker thread to finish.
    func clear() {
        percentValue.store(0, ordering: .relaxed)
        guard running.exchange(false, ordering: .acquiringAndReleasing) else { return }
        done.lock.withLock {
            while threadRunning { _ = done.wait() }
        }
    }
}

extension Machine {
    /// True while the machine is paused (the switch-over: never rate-limited).
    var isPausedForMigration: Bool { runState == .paused }

    /// Turns KVM's dirty-page logging on or off on every memory slot (`KVM_MEM_LOG_DIRTY_PAGES`;
    /// changing a slot's flags keeps its contents) and returns the protection in effect.
    ///
    /// With `manualProtection` and a KVM that offers it, reading the log no longer re-arms it:
    /// the caller clears each page's bit (``rearmDirtyPages(region:firstPage:pages:bitmap:)``)
    /// just before it copies the page, and, where KVM offers `initiallySet`, turning logging on
    /// marks every page dirty instead of write-protecting all guest RAM in one step — a stall the
    /// guest sees, proportional to the RAM it has touched. Otherwise logging starts with an empty
    /// log and each read clears what it reports (classic).
    @discardableResult
    func setDirtyLogging(_ enabled: Bool, manualProtection: Bool = false) throws(KVMError) -> VirtualMachine.DirtyLogProtection {
        var protection: VirtualMachine.DirtyLogProtection = []
        if enabled, manualProtection {
            let offered = vm.supportedDirtyLogProtection
            if offered.contains(.manual) {
                try vm.setDirtyLogProtection(offered)
                protection = offered
            }
        }
        for region in memory.regions {
            try vm.setMemoryRegion(slot: region.slot, guestAddress: region.guestAddress, size: region.size,
                                   hostAddress: region.hostAddress, flags: enabled ? .logDirtyPages : [])
        }
        // Back to the classic log once no slot logs, so the next start chooses afresh.
        if !enabled, !vm.supportedDirtyLogProtection.isEmpty { try vm.setDirtyLogProtection([]) }
        if enabled { memory.vmmWrites.start() } else { memory.vmmWrites.stop() }
        return protection
    }

    /// Manual protection: clears the dirty bits `bitmap` names (one per page, from the region's
    /// page `firstPage`) and write-protects those pages, so that the guest's next write to one is
    /// logged. Call it before reading the pages.
    func rearmDirtyPages(region index: Int, firstPage: Int, pages: Int, bitmap: UnsafeRawPointer) throws(KVMError) {
        try vm.clearDirtyLog(slot: memory.regions[index].slot, firstPage: UInt64(firstPage), pages: UInt32(pages), bitmap: bitmap)
    }

    /// The pages written since the last call, per region (KVM's log for vCPU writes, OR-ed with
    /// the VMM's own), one bit per page of the region.
    func takeDirtyPages() throws(KVMError) -> [[UInt64]] {
        let vmm = memory.vmmWrites.take()
        var result: [[UInt64]] = []
        for region in memory.regions {
            let pages = Int(region.size / 4096)
            var bitmap = try vm.dirtyLog(slot: region.slot, pages: pages)
            if !vmm.isEmpty {
                let firstPage = Int(region.guestAddress >> 12)
                for page in 0..<pages {
                    let global = firstPage + page
                    guard global >> 6 < vmm.count, vmm[global >> 6] != 0 else { continue }
                    if vmm[global >> 6] & (1 << UInt64(global & 63)) != 0 { bitmap[page >> 6] |= 1 << UInt64(page & 63) }
                }
            }
            result.append(bitmap)
        }
        return result
    }
}
