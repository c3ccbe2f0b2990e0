#if canImport(Glibc)
internal import Glibc
#endif

/// The PC's CMOS real-time clock (MC146818): index port 0x70, data port 0x71.
///
/// The clock reads the host's wall clock (UTC, as Linux assumes of an RTC unless told otherwise)
/// plus an offset the guest sets by writing the time registers. Register B selects BCD or binary
/// (DM, bit 2) and 24- or 12-hour (bit 1) format; setting its SET bit (7) freezes the time
/// registers for the guest to write, and clearing it starts the clock from what was written.
/// Register A's update-in-progress bit (7) is set in the last 244 µs of every second, as the
/// MC146818 does, so a guest that waits for it to clear before reading (Linux's `mc146818_get_time`)
/// behaves as on hardware. Writing the index port also sets the NMI mask (bit 7), which is kept
/// but has no effect: NMIs reach the guest through the LAPIC. Bytes 0x0E–0x7F are battery-backed
/// RAM, prefilled with the memory-size fields PC firmware reads. Periodic, alarm and update
/// interrupts (IRQ 8) are not generated; register C always reads 0.
public final class CMOSRTC: BusDevice, @unchecked Sendable {
    public static let port: UInt64 = 0x70

    public enum Register {
        public static let seconds = 0x00, minutes = 0x02, hours = 0x04, weekday = 0x06
        public static let dayOfMonth = 0x07, month = 0x08, year = 0x09
        public static let a = 0x0A, b = 0x0B, c = 0x0C, d = 0x0D
        public static let century = 0x32
    }

    /// Register A after reset: 32.768 kHz time base (divider 010), 1024 Hz rate.
    public static let defaultRegisterA: UInt8 = 0x26
    /// Register B after reset: 24-hour mode, BCD, no interrupts.
    public static let defaultRegisterB: UInt8 = 0x02
    /// Register D: valid RAM and time (VRT).
    public static let registerD: UInt8 = 0x80
    /// How long before each second boundary UIP reads as set (the MC146818's 244 µs).
    public static let updateInProgressNanoseconds: Int64 = 244_000

    /// The host clock: seconds and nanoseconds since the Unix epoch.
    public typealias Clock = @Sendable () -> (seconds: Int64, nanoseconds: Int64)

    public static let hostClock: Clock = {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return (Int64(spec.tv_sec), Int64(spec.tv_nsec))
    }

    struct State: Codable, Equatable {
        var index: Int = 0
        var nmiMasked = false
        var ram = [UInt8](repeating: 0, count: 128)
        /// Guest time = host time + offset.
        var offset: Int64 = 0
        /// While SET is on: the frozen time the guest is editing (seconds since the epoch).
        var held: Int64?
    }

    private let clock: Clock
    private let state: SpinLockedState<State>

    /// `memorySize` fills the CMOS memory-size bytes (0x15–0x18, 0x30–0x31, 0x34–0x35, 0x5B–0x5D).
    public init(memorySize: UInt64 = 0, clock: @escaping Clock = CMOSRTC.hostClock) {
        self.clock = clock
        var initial = State()
        initial.ram[Register.a] = Self.defaultRegisterA
        initial.ram[Register.b] = Self.defaultRegisterB
        initial.ram[Register.d] = Self.registerD
        Self.fillMemorySize(&initial.ram, memorySize)
        state = SpinLockedState(initial)
    }

    /// Whether the guest last wrote the index port with bit 7 set (NMIs disabled).
    public var nmiMasked: Bool { state.value.nmiMasked }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard data.count >= 1 else { return }
        // The index port is write-only on a PC; reads float high.
        data[0] = offset == 1 ? readData() : 0xFF
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard data.count >= 1 else { return }
        let value = data[0]
        if offset == 0 {
            state.update { s in
                s.index = Int(value & 0x7F)
                s.nmiMasked = value & 0x80 != 0
            }
        } else {
            writeData(value)
        }
    }

    /// The guest time offset is kept relative to the host's wall clock: a restored guest's RTC
    /// reads the current time plus what the guest set, as after a real suspend.
    public func saveState() throws(SnapshotError) -> DeviceState { try DeviceState(state.value) }

    public func restoreState(_ saved: DeviceState) throws(SnapshotError) {
        let restored = try saved.decode(State.self, device: "CMOS RTC")
        guard restored.ram.count == 128, (0..<128).contains(restored.index) else {
            throw .invalidState("CMOS RTC: \(restored.ram.count) bytes of RAM, index \(restored.index)")
        }
        state.update { $0 = restored }
    }

    /// Reads the selected register (also for tests).
    public func readRegister(_ index: Int) -> UInt8 {
        state.update { $0.index = index & 0x7F }
        return readData()
    }

    public func writeRegister(_ index: Int, _ value: UInt8) {
        state.update { $0.index = index & 0x7F }
        writeData(value)
    }

    private func readData() -> UInt8 {
        let now = clock()
        return state.update { s -> UInt8 in
            let registerB = s.ram[Register.b]
            switch s.index {
            case Register.seconds, Register.minutes, Register.hours, Register.weekday,
                 Register.dayOfMonth, Register.month, Register.year, Register.century:
                let time = Self.brokenDown(s.held ?? (now.seconds + s.offset))
                return Self.encode(register: s.index, time: time, registerB: registerB)
            case Register.a:
                var value = s.ram[Register.a] & 0x7F
                if s.held == nil, now.nanoseconds >= 1_000_000_000 - Self.updateInProgressNanoseconds { value |= 0x80 }
                return value
            case Register.c:
                return 0 // no interrupt flags: reading clears them, and none are raised
            case Register.d:
                return Self.registerD
            default:
                return s.ram[s.index]
            }
        }
    }

    private func writeData(_ value: UInt8) {
        let now = clock()
        state.update { s in
            switch s.index {
            case Register.seconds, Register.minutes, Register.hours, Register.weekday,
                 Register.dayOfMonth, Register.month, Register.year, Register.century:
                var time = Self.brokenDown(s.held ?? (now.seconds + s.offset))
                Self.decode(register: s.index, value: value, registerB: s.ram[Register.b], into: &time)
                let seconds = Self.epochSeconds(time)
                if s.held != nil { s.held = seconds } else { s.offset = seconds - now.seconds }
            case Register.a:
                s.ram[Register.a] = value & 0x7F // UIP is read-only
            case Register.b:
                let wasSet = s.ram[Register.b] & 0x80 != 0
                let isSet = value & 0x80 != 0
                if isSet && !wasSet { s.held = now.seconds + s.offset }
                if !isSet && wasSet, let held = s.held { s.offset = held - now.seconds; s.held = nil }
                // SET also clears UIE, as the data sheet says.
                s.ram[Register.b] = isSet ? value & ~0x10 : value
            case Register.c, Register.d:
                break // read-only
            default:
                s.ram[s.index] = value
            }
        }
    }

    // MARK: Time conversion

    struct Time: Equatable {
        var year: Int, month: Int, day: Int, hour: Int, minute: Int, second: Int, weekday: Int // weekday 0 = Sunday
    }

    static func brokenDown(_ seconds: Int64) -> Time {
        var t = time_t(seconds)
        var parts = tm()
        gmtime_r(&t, &parts)
        return Time(year: Int(parts.tm_year) + 1900, month: Int(parts.tm_mon) + 1, day: Int(parts.tm_mday),
                    hour: Int(parts.tm_hour), minute: Int(parts.tm_min), second: Int(parts.tm_sec), weekday: Int(parts.tm_wday))
    }

    static func epochSeconds(_ time: Time) -> Int64 {
        var parts = tm()
        parts.tm_year = Int32(time.year - 1900)
        parts.tm_mon = Int32(time.month - 1)
        parts.tm_mday = Int32(time.day)
        parts.tm_hour = Int32(time.hour)
        parts.tm_min = Int32(time.minute)
        parts.tm_sec = Int32(time.second)
        return Int64(timegm(&parts))
    }

    static func toBCD(_ value: Int) -> UInt8 { UInt8(((value / 10) % 10) << 4 | (value % 10)) }
    static func fromBCD(_ value: UInt8) -> Int { Int(value >> 4) * 10 + Int(value & 0xF) }

    static func encode(register: Int, time: Time, registerB: UInt8) -> UInt8 {
        let binary = registerB & 0x04 != 0
        func format(_ value: Int) -> UInt8 { binary ? UInt8(value) : toBCD(value) }
        switch register {
        case Register.seconds: return format(time.second)
        case Register.minutes: return format(time.minute)
        case Register.hours:
            if registerB & 0x02 != 0 { return format(time.hour) }
            let hour12 = time.hour % 12 == 0 ? 12 : time.hour % 12
            return format(hour12) | (time.hour >= 12 ? 0x80 : 0)
        case Register.weekday: return format(time.weekday + 1)
        case Register.dayOfMonth: return format(time.day)
        case Register.month: return format(time.month)
        case Register.year: return format(time.year % 100)
        case Register.century: return format(time.year / 100)
        default: return 0
        }
    }

    static func decode(register: Int, value: UInt8, registerB: UInt8, into time: inout Time) {
        let binary = registerB & 0x04 != 0
        func number(_ raw: UInt8) -> Int { binary ? Int(raw) : fromBCD(raw) }
        switch register {
        case Register.seconds: time.second = min(number(value), 59)
        case Register.minutes: time.minute = min(number(value), 59)
        case Register.hours:
            if registerB & 0x02 != 0 {
                time.hour = min(number(value), 23)
            } else {
                let hour12 = min(max(number(value & 0x7F), 1), 12) % 12
                time.hour = hour12 + (value & 0x80 != 0 ? 12 : 0)
            }
        case Register.weekday: break // derived from the date
        case Register.dayOfMonth: time.day = max(1, min(number(value), 31))
        case Register.month: time.month = max(1, min(number(value), 12))
        case Register.year: time.year = (time.year / 100) * 100 + number(value) % 100
        case Register.century: time.year = number(value) * 100 + time.year % 100
        default: break
        }
    }

    /// The memory-size bytes PC firmware and some kernels read from CMOS.
    static func fillMemorySize(_ ram: inout [UInt8], _ size: UInt64) {
        guard size > 0 else { return }
        func put16(_ low: Int, _ value: UInt64) {
            let clamped = min(value, 0xFFFF)
            ram[low] = UInt8(clamped & 0xFF)
            ram[low + 1] = UInt8(clamped >> 8)
        }
        put16(0x15, 640)                                                          // base memory, KiB
        let lowEnd = min(size, GuestLayout.mmioHoleStart)
        let extended = lowEnd > 0x100000 ? (lowEnd - 0x100000) >> 10 : 0          // above 1 MiB, KiB
        put16(0x17, extended)
        put16(0x30, extended)
        put16(0x34, lowEnd > 16 << 20 ? (lowEnd - (16 << 20)) >> 16 : 0)          // above 16 MiB, 64 KiB units
        let high = size > GuestLayout.mmioHoleStart ? (size - GuestLayout.mmioHoleStart) >> 16 : 0 // above 4 GiB
        ram[0x5B] = UInt8(high & 0xFF)
        ram[0x5C] = UInt8((high >> 8) & 0xFF)
        ram[0x5D] = UInt8((high >> 16) & 0xFF)
    }
}
