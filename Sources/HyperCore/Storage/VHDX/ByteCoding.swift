/// Little-endian field access for on-disk structures. Every VHDX structure is decoded field by field
/// from a byte array; callers check lengths first, and these helpers trap (rather than read outside
/// the array) if they did not.
extension Array where Element == UInt8 {
    @inline(__always)
    func loadLE<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count, "field outside buffer")
        return withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }

    func u16(_ offset: Int) -> UInt16 { loadLE(UInt16.self, at: offset) }
    func u32(_ offset: Int) -> UInt32 { loadLE(UInt32.self, at: offset) }
    func u64(_ offset: Int) -> UInt64 { loadLE(UInt64.self, at: offset) }

    @inline(__always)
    mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        precondition(offset >= 0 && offset + MemoryLayout<T>.size <= count, "field outside buffer")
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }

    /// True when the ASCII signature `tag` is stored at `offset` (signatures are compared as bytes,
    /// because the specification prints them as byte-swapped integers).
    func hasSignature(_ tag: StaticString, at offset: Int) -> Bool {
        let n = tag.utf8CodeUnitCount
        guard offset >= 0, offset + n <= count else { return false }
        let p = tag.utf8Start
        for i in 0..<n where self[offset + i] != p[i] { return false }
        return true
    }

    mutating func putSignature(_ tag: StaticString, at offset: Int) {
        let p = tag.utf8Start
        for i in 0..<tag.utf8CodeUnitCount { self[offset + i] = p[i] }
    }

    func isAllZero(_ range: Range<Int>) -> Bool {
        for i in range where self[i] != 0 { return false }
        return true
    }
}

/// Rounds `value` up to a multiple of `alignment` (a power of two).
@inline(__always)
func roundUp(_ value: UInt64, _ alignment: UInt64) -> UInt64 {
    (value + alignment - 1) & ~(alignment - 1)
}

/// True if the buffer holds only zero bytes (word-at-a-time).
func isZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
    var i = 0
    let n = buffer.count
    while n - i >= 8 {
        if buffer.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < n {
        if buffer[i] != 0 { return false }
        i += 1
    }
    return true
}

let MiB: UInt64 = 1 << 20

/// True when `offset..<offset+length` lies inside `0..<size`, without overflowing on hostile values.
@inline(__always)
func fits(_ offset: UInt64, _ length: UInt64, within size: UInt64) -> Bool {
    offset <= size && length <= size - offset
}
