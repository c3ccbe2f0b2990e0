/// The deterministic write sequence the crash test's writer process performs and the test then
/// checks against (shared so both sides agree). SplitMix64 keeps it reproducible from a seed.
public struct CrashWorkload: Sendable {
    public struct Op: Sendable, Equatable {
        public var offset: UInt64
        public var length: UInt64
    }

    var state: UInt64
    let diskSize: UInt64
    let sectorSize: UInt64

    public init(seed: UInt64, diskSize: UInt64, sectorSize: UInt64) {
        state = seed
        self.diskSize = diskSize
        self.sectorSize = sectorSize
    }

    mutating func random() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Op `index`: 1 to 64 sectors at a random sector-aligned offset.
    public mutating func next(index: Int) -> Op {
        let sectors = random() % 64 + 1
        let maxStart = diskSize / sectorSize - sectors
        let start = random() % (maxStart + 1)
        return Op(offset: start * sectorSize, length: sectors * sectorSize)
    }

    /// Sector `k` of op `op` is filled with a byte derived from both, and starts with the op number,
    /// so every sector on disk says which op wrote it.
    public static func pattern(op: Int, length: Int, sectorSize: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: length)
        for k in 0..<length / sectorSize {
            let fill = UInt8(truncatingIfNeeded: (op &* 31 &+ k) % 251 + 1)
            for j in 0..<sectorSize { out[k * sectorSize + j] = fill }
            withUnsafeBytes(of: UInt32(op + 1).littleEndian) { for j in 0..<4 { out[k * sectorSize + j] = $0[j] } }
        }
        return out
    }
}
