internal import CKVM
#if canImport(Glibc)
internal import Glibc
#endif

/// Guest RAM in a snapshot: one file as large as the RAM, regions back to back, written sparse.
///
/// Only pages the guest has touched are written; every other page stays a hole, so a 4 GiB guest
/// that touched 40 MiB costs about 40 MiB of disk and of write time. "Touched" is what the kernel
/// says through `/proc/self/pagemap` (present or swapped), plus, for RAM that is itself a private
/// mapping of an earlier snapshot, the data ranges of that file (`SEEK_DATA`); a touched page that
/// holds only zeroes is left a hole too.
enum MemoryFile {
    static let pageSize = 4096
    /// Largest single write: runs of touched pages are written with one `pwrite` each.
    static let maximumRun = 8 << 20

    struct WriteResult { var bytesWritten: UInt64 }

    /// Writes `memory` to `fd` (an empty file) and returns how much was written.
    static func write(_ memory: GuestMemory, to fd: Int32, path: String) throws(SnapshotError) -> WriteResult {
        guard ftruncate(fd, off_t(memory.size)) == 0 else { throw .io(path: path, operation: "ftruncate", errno: errno) }
        var written: UInt64 = 0
        let pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        defer { if pagemap >= 0 { close(pagemap) } }
        for region in memory.regions {
            let pages = Int(region.size) / pageSize
            let backingData = memory.backingFile.map { dataRanges(fd: $0, from: region.fileOffset, length: region.size) } ?? []
            var run: (start: Int, count: Int)?
            func flush() throws(SnapshotError) {
                guard let current = run else { return }
                run = nil
                let source = UnsafeRawPointer(bitPattern: region.hostAddress + UInt(current.start * pageSize))!
                let offset = region.fileOffset + UInt64(current.start * pageSize)
                try writeAll(fd, source, count: current.count * pageSize, at: offset, path: path)
                written += UInt64(current.count * pageSize)
            }
            var entries = [UInt64](repeating: 0, count: 65536)
            var page = 0
            var dataIndex = 0
            while page < pages {
                let batch = min(entries.count, pages - page)
                // Without pagemap (not Linux's procfs), every page is a candidate: slower, same result.
                var known = false
                if pagemap >= 0 {
                    let want = batch * 8
                    let offset = off_t((Int(region.hostAddress) / pageSize + page) * 8)
                    let got = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress, want, offset) }
                    known = got == want
                }
                for i in 0..<batch {
                    let index = page + i
                    var candidate = !known || entries[i] & (3 << 62) != 0  // bit 63 present, 62 swapped
                    if !candidate, !backingData.isEmpty {
                        let byte = UInt64(index * pageSize)
                        while dataIndex < backingData.count, backingData[dataIndex].end <= byte { dataIndex += 1 }
                        candidate = dataIndex < backingData.count && backingData[dataIndex].start <= byte
                    }
                    let pointer = UnsafeRawPointer(bitPattern: region.hostAddress + UInt(index * pageSize))!
                    if candidate, !isZero(pointer) {
                        if let current = run, current.start + current.count == index, current.count * pageSize < maximumRun {
                            run = (current.start, current.count + 1)
                        } else {
                            try flush()
                            run = (index, 1)
                        }
                    }
                }
                page += batch
            }
            try flush()
        }
        return WriteResult(bytesWritten: written)
    }

    /// The data (non-hole) ranges of `fd` within `from..<from+length`, relative to `from`.
    static func dataRanges(fd: Int32, from start: UInt64, length: UInt64) -> [(start: UInt64, end: UInt64)] {
        var ranges: [(start: UInt64, end: UInt64)] = []
        var position = off_t(start)
        let end = off_t(start + length)
        while position < end {
            let data = lseek(fd, position, 3 /* SEEK_DATA */)
            if data < 0 || data >= end { break }
            var hole = lseek(fd, data, 4 /* SEEK_HOLE */)
            if hole < 0 || hole > end { hole = end }
            ranges.append((UInt64(data) - start, UInt64(hole) - start))
            position = hole
        }
        return ranges
    }

    @inline(__always)
    static func isZero(_ page: UnsafeRawPointer) -> Bool {
        let words = page.assumingMemoryBound(to: UInt64.self)
        var accumulated: UInt64 = 0
        for i in stride(from: 0, to: pageSize / 8, by: 8) {
            accumulated |= words[i] | words[i + 1] | words[i + 2] | words[i + 3]
                | words[i + 4] | words[i + 5] | words[i + 6] | words[i + 7]
            if accumulated != 0 { return false }
        }
        return true
    }

    static func writeAll(_ fd: Int32, _ source: UnsafeRawPointer, count: Int, at offset: UInt64, path: String) throws(SnapshotError) {
        var done = 0
        while done < count {
            let result = pwrite(fd, source + done, count - done, off_t(offset) + off_t(done))
            if result < 0 {
                if errno == EINTR { continue }
                throw .io(path: path, operation: "write at offset \(offset + UInt64(done))", errno: errno)
            }
            done += result
        }
    }

    /// Fills anonymous `memory` from a memory file (an eager restore): only the file's data
    /// ranges are read, holes stay untouched zero pages.
    static func load(_ fd: Int32, into memory: GuestMemory, path: String) throws(SnapshotError) {
        for region in memory.regions {
            for range in dataRanges(fd: fd, from: region.fileOffset, length: region.size) {
                var position = range.start
                while position < range.end {
                    let count = Int(min(range.end - position, UInt64(maximumRun)))
                    let target = UnsafeMutableRawPointer(bitPattern: region.hostAddress + UInt(position))!
                    let got = pread(fd, target, count, off_t(region.fileOffset + position))
                    if got < 0, errno == EINTR { continue }
                    guard got > 0 else {
                        throw .io(path: path, operation: "read at offset \(region.fileOffset + position)", errno: got < 0 ? errno : EIO)
                    }
                    position += UInt64(got)
                }
            }
        }
    }
}
