/// Builds minimal ELF64 PVH images in memory: one PT_LOAD with `code` at `loadAddress` and a
/// PT_NOTE carrying the Xen PVH entry note. For tests of the loader and of failure paths.
enum TinyELF {
    static func make(code: [UInt8], loadAddress: UInt64 = 0x100000, entry: UInt64? = nil, withNote: Bool = true) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 64 + 2 * 56)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
            withUnsafeBytes(of: value.littleEndian) { for (i, b) in $0.enumerated() { bytes[offset + i] = b } }
        }
        let note: [UInt8] = {
            var n = [UInt8](repeating: 0, count: 12 + 4 + 4)
            withUnsafeBytes(of: UInt32(4).littleEndian) { for (i, b) in $0.enumerated() { n[i] = b } }      // namesz
            withUnsafeBytes(of: UInt32(4).littleEndian) { for (i, b) in $0.enumerated() { n[4 + i] = b } }  // descsz
            withUnsafeBytes(of: UInt32(18).littleEndian) { for (i, b) in $0.enumerated() { n[8 + i] = b } } // type
            n[12] = 0x58; n[13] = 0x65; n[14] = 0x6E; n[15] = 0 // "Xen\0"
            withUnsafeBytes(of: UInt32(truncatingIfNeeded: entry ?? loadAddress).littleEndian) {
                for (i, b) in $0.enumerated() { n[16 + i] = b }
            }
            return n
        }()
        let codeOffset = bytes.count
        let noteOffset = codeOffset + code.count
        bytes += code
        if withNote { bytes += note }
        // ELF header
        bytes[0] = 0x7F; bytes[1] = 0x45; bytes[2] = 0x4C; bytes[3] = 0x46
        bytes[4] = 2; bytes[5] = 1; bytes[6] = 1
        put(UInt16(2), at: 16)              // ET_EXEC
        put(UInt16(62), at: 18)             // x86-64
        put(UInt32(1), at: 20)
        put(entry ?? loadAddress, at: 24)
        put(UInt64(64), at: 32)             // phoff
        put(UInt16(64), at: 52)
        put(UInt16(56), at: 54)
        put(UInt16(withNote ? 2 : 1), at: 56)
        // PT_LOAD
        put(UInt32(1), at: 64); put(UInt32(7), at: 68)
        put(UInt64(codeOffset), at: 72); put(loadAddress, at: 80); put(loadAddress, at: 88)
        put(UInt64(code.count), at: 96); put(UInt64(code.count), at: 104); put(UInt64(16), at: 112)
        // PT_NOTE
        if withNote {
            put(UInt32(4), at: 120); put(UInt64(noteOffset), at: 128)
            put(UInt64(note.count), at: 152); put(UInt64(note.count), at: 160); put(UInt64(4), at: 168)
        }
        return bytes
    }
}
