#if canImport(Glibc)
internal import Glibc
#endif

/// Boot-time milestones, measured on the host's monotonic clock: the guest's first serial byte,
/// the kernel's first line (`Linux version …`), and the moment the guest's init reports ready by
/// writing the marker byte ``readyValue`` (123, Firecracker's boot-timer value) to the marker port
/// ``port`` (0x3F0, where Firecracker's early boot timer listened) or to the first byte of the
/// MMIO page at ``mmioAddress`` (which a Linux init reaches through `/dev/mem`, e.g.
/// `busybox devmem 0xfebff000 8 123`). Other values written there are ignored.
///
/// Attach it to a machine through ``MachineConfiguration/bootTimer``; it registers itself on both
/// buses and wraps the console to watch the output.
public final class BootTimer: BusDevice, @unchecked Sendable {
    public static let port: UInt64 = 0x3F0
    /// A page in the 32-bit MMIO hole, below the IOAPIC, outside every e820 range (so Linux's
    /// `/dev/mem` allows it) and away from the PCI and virtio-mmio windows.
    public static let mmioAddress: UInt64 = 0xFEBF_F000
    public static let readyValue: UInt8 = 123
    /// The text that marks the kernel's first line.
    public static let kernelBanner = Array("Linux version ".utf8)

    public enum Milestone: String, Sendable, CaseIterable {
        case firstSerialByte = "first serial byte"
        case kernelFirstLine = "kernel's first line"
        case initReady = "init ready marker"
    }

    /// The instant all times are measured from (monotonic nanoseconds).
    public let origin: UInt64
    private let stamps = SpinLockedState<[Milestone: UInt64]>([:])
    private let window = SpinLockedState<[UInt8]>([])

    public init(origin: UInt64 = BootTimer.now()) { self.origin = origin }

    /// Its milestones are host-side measurements of this process, not guest state; a restored
    /// machine measures from its own start.
    public func saveState() throws(SnapshotError) -> DeviceState { .stateless }
    public func restoreState(_ state: DeviceState) throws(SnapshotError) {}

    /// CLOCK_MONOTONIC in nanoseconds.
    public static func now() -> UInt64 {
        var spec = timespec()
        clock_gettime(CLOCK_MONOTONIC, &spec)
        return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
    }

    /// When this process started, on the monotonic clock (from `/proc/self/stat` field 22, in clock
    /// ticks since boot, so 10 ms resolution), or nil if that cannot be read.
    public static func processStart() -> UInt64? {
        let fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        // Fields after the command name (which may hold spaces) start after the last ')'.
        guard let close = buffer[0..<count].lastIndex(of: UInt8(ascii: ")")) else { return nil }
        let fields = buffer[(close + 2)..<count].split(separator: UInt8(ascii: " "))
        // Field 3 is the state; start time is field 22, i.e. index 19 here.
        guard fields.count > 19, let ticks = UInt64(String(decoding: fields[19], as: UTF8.self)) else { return nil }
        let hertz = UInt64(max(sysconf(Int32(_SC_CLK_TCK)), 1))
        // The start time counts from boot on CLOCK_BOOTTIME; convert to CLOCK_MONOTONIC.
        var boot = timespec(), mono = timespec()
        clock_gettime(CLOCK_BOOTTIME, &boot)
        clock_gettime(CLOCK_MONOTONIC, &mono)
        let bootNow = UInt64(boot.tv_sec) * 1_000_000_000 + UInt64(boot.tv_nsec)
        let monoNow = UInt64(mono.tv_sec) * 1_000_000_000 + UInt64(mono.tv_nsec)
        let startSinceBoot = ticks * (1_000_000_000 / hertz)
        // The clocks differ by the time the host spent suspended (often zero; the two reads are a
        // few hundred nanoseconds apart, so clamp).
        let suspended = bootNow > monoNow ? bootNow - monoNow : 0
        guard startSinceBoot >= suspended else { return nil }
        return startSinceBoot - suspended
    }

    /// Time from ``origin`` to a milestone, if it was reached.
    public func elapsed(_ milestone: Milestone) -> Duration? {
        stamps.value[milestone].map { .nanoseconds(Int64($0 &- origin)) }
    }

    func stamp(_ milestone: Milestone) {
        let time = Self.now()
        stamps.update { if $0[milestone] == nil { $0[milestone] = time } }
    }

    /// Watches console bytes on their way to `output`.
    public func watching(_ output: any ConsoleOutput) -> any ConsoleOutput { WatchedConsole(timer: self, output: output) }

    func observe(_ bytes: UnsafeRawBufferPointer) {
        guard !bytes.isEmpty else { return }
        stamp(.firstSerialByte)
        guard stamps.value[.kernelFirstLine] == nil else { return }
        let found = window.update { window -> Bool in
            window.append(contentsOf: bytes)
            let banner = Self.kernelBanner
            var found = false
            if window.count >= banner.count {
                for start in 0...(window.count - banner.count) where window[start] == banner[0] {
                    if Array(window[start..<(start + banner.count)]) == banner { found = true; break }
                }
            }
            // Keep only enough to match a banner split across writes.
            if window.count > banner.count { window.removeFirst(window.count - (banner.count - 1)) }
            return found
        }
        if found { stamp(.kernelFirstLine) }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        data.storeLittleEndian(0)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard offset == 0, data.count >= 1, data[0] == Self.readyValue else { return }
        stamp(.initReady)
    }

    /// One line per milestone: "first serial byte: 12.345 ms" or "… not reached".
    public func report(originName: String = "process start") -> String {
        Milestone.allCases.map { milestone in
            let label = "\(milestone.rawValue) (from \(originName))"
            guard let duration = elapsed(milestone) else { return "\(label): not reached" }
            let (seconds, attoseconds) = duration.components
            let milliseconds = Double(seconds) * 1000 + Double(attoseconds) / 1e15
            return "\(label): \(String(milliseconds: milliseconds)) ms"
        }.joined(separator: "\n")
    }
}

private extension String {
    init(milliseconds: Double) {
        let scaled = Int((milliseconds * 10).rounded())
        self = "\(scaled / 10).\(abs(scaled % 10))"
    }
}

/// A console that tells a ``BootTimer`` about each write before passing it on.
struct WatchedConsole: ConsoleOutput {
    let timer: BootTimer
    let output: any ConsoleOutput
    func write(_ bytes: UnsafeRawBufferPointer) {
        timer.observe(bytes)
        output.write(bytes)
    }
}
