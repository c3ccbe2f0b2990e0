/// Times the consecutive phases of one operation: each ``lap(_:)`` records the time since the
/// previous one (or since the start). Migration reports where its time went with these.
struct PhaseClock {
    private(set) var laps: [(String, UInt64)] = []
    private var mark: UInt64

    init(startingAt start: UInt64 = monotonicNanoseconds()) { mark = start }

    /// Starts the next lap now, without recording what came before.
    mutating func restart() { mark = monotonicNanoseconds() }

    mutating func lap(_ name: String) {
        let now = monotonicNanoseconds()
        laps.append((name, now - mark))
        mark = now
    }

    /// Laps as a JSON object of milliseconds, in order.
    static func json(_ laps: [(String, UInt64)]) -> JSONValue {
        .object(laps.map { ($0.0, milliseconds($0.1)) })
    }

    /// Nanoseconds as milliseconds to the microsecond.
    static func milliseconds(_ nanoseconds: UInt64) -> JSONValue { .double(Double(nanoseconds / 1000) / 1000) }
}
