/// How one guest page travels in a `memory` section.
///
/// Most pages a guest dirties during a migration are mostly zero: a counter or a pointer written
/// into a fresh page, a page table with a handful of entries, a slab with a few objects. Sending
/// such a page whole spends the link on zeros, so a page whose non-zero words fit in a small
/// fraction of it goes as its *runs*: the zero-free stretches of 8-byte words, each with its
/// offset and length. The scan costs about as much as the copy into the staging buffer that the
/// checksum needs anyway, and on the receiving side a page is rebuilt from a zeroed page.
///
/// Runs payload: a sequence of `offset (u16 LE) · length (u16 LE) · length bytes`, offsets and
/// lengths multiples of 8, every run inside the page, strictly after the previous one, not empty.
public enum PageEncoding: UInt32, Sendable {
    /// 4096 bytes as they are.
    case raw = 0
    /// All zero: no payload.
    case zero = 1
    /// The page's non-zero runs (see the type's description).
    case runs = 2

    static let pageSize = MigrationStream.pageSize
    static let runHeaderSize = 4
    /// A page is sent as runs only if that takes at most this many bytes; beyond it, the saving
    /// no longer pays for the receiver's zero-fill and the sender stops scanning early.
    static let maximumRunsSize = 1024

    /// Encodes the page at `page` as runs into `output` (room for ``maximumRunsSize`` bytes):
    /// the encoded length, or nil when the runs would take more than ``maximumRunsSize``.
    /// `page` may be guest RAM that a vCPU writes meanwhile: the runs then hold some mix of old
    /// and new words, always a well-formed encoding, and the dirty log has the page sent again.
    static func encodeRuns(_ page: UnsafeRawPointer, into output: UnsafeMutableRawPointer) -> Int? {
        let words = page.assumingMemoryBound(to: UInt64.self)
        let wordCount = pageSize / 8
        var size = 0
        var index = 0
        while index < wordCount {
            // Skip zero words eight at a time where possible: most of a sparse page is zero.
            while index + 8 <= wordCount,
                  words[index] | words[index + 1] | words[index + 2] | words[index + 3]
                    | words[index + 4] | words[index + 5] | words[index + 6] | words[index + 7] == 0 {
                index += 8
            }
            while index < wordCount, words[index] == 0 { index += 1 }
            guard index < wordCount else { break }
            let start = index
            while index < wordCount, words[index] != 0 { index += 1 }
            let length = (index - start) * 8
            guard size + runHeaderSize + length <= maximumRunsSize else { return nil }
            let header = UInt32(start * 8) | UInt32(length) << 16
            (output + size).storeBytes(of: header.littleEndian, as: UInt32.self)
            (output + size + runHeaderSize).copyMemory(from: page + start * 8, byteCount: length)
            size += runHeaderSize + length
        }
        return size
    }

    /// Rebuilds a page from its runs, or says why the runs are not a page (nothing is written
    /// then). Every offset and length is checked against the page and the payload before use.
    static func decodeRuns(_ runs: UnsafeRawBufferPointer, into page: UnsafeMutableRawPointer) -> String? {
        guard runs.count <= maximumRunsSize else { return "\(runs.count) bytes of runs (at most \(maximumRunsSize))" }
        // First pass: check everything. Second pass: write (zeros between the runs, then each run).
        var position = 0
        var end = 0
        while position < runs.count {
            guard position + runHeaderSize <= runs.count else { return "a run header cut off at byte \(position)" }
            let (offset, length) = run(at: position, in: runs)
            guard length > 0, offset % 8 == 0, length % 8 == 0, offset >= end, offset + length <= pageSize else {
                return "a run of \(length) bytes at page offset \(offset) (after \(end))"
            }
            guard position + runHeaderSize + length <= runs.count else { return "a run of \(length) bytes cut off at byte \(position)" }
            end = offset + length
            position += runHeaderSize + length
        }
        position = 0
        end = 0
        while position < runs.count {
            let (offset, length) = run(at: position, in: runs)
            (page + end).initializeMemory(as: UInt8.self, repeating: 0, count: offset - end)
            (page + offset).copyMemory(from: runs.baseAddress! + position + runHeaderSize, byteCount: length)
            end = offset + length
            position += runHeaderSize + length
        }
        (page + end).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize - end)
        return nil
    }

    /// The page offset and length of the run whose header is at `position`.
    private static func run(at position: Int, in runs: UnsafeRawBufferPointer) -> (offset: Int, length: Int) {
        let header = UInt32(littleEndian: runs.loadUnaligned(fromByteOffset: position, as: UInt32.self))
        return (Int(header & 0xFFFF), Int(header >> 16))
    }
}
