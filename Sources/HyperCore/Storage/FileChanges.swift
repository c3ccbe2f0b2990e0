/// Which parts of a file were written since a copier last looked: what lets a file that keeps
/// changing be copied without stopping its writer (storage copy during live migration). The
/// copier starts tracking, copies the whole file, then repeatedly takes the changed chunks and
/// copies them again; once the writer stops, one last take makes the copy exact.
///
/// A write is noted **after** it reached the file, so a chunk the copier reads before a write
/// completes is always taken again later.
public final class FileChanges: @unchecked Sendable {
    /// Granularity of the tracking: a write marks every 64 KiB chunk it touches.
    public static let chunkSize: UInt64 = 64 << 10
    private let lock = PthreadLock()
    private var changed: Set<UInt64> = []
    private var tracking = false

    init() {}

    /// Begins recording (forgetting anything recorded before).
    public func start() { lock.withLock { tracking = true; changed = [] } }

    /// Stops recording and forgets.
    public func stop() { lock.withLock { tracking = false; changed = [] } }

    /// The chunks written since the last take (indexes in ascending order), and forgets them.
    public func take() -> [UInt64] {
        lock.withLock {
            let chunks = changed.sorted()
            changed = []
            return chunks
        }
    }

    /// How many chunks were written since the last take.
    public var pendingChunks: Int { lock.withLock { changed.count } }

    func note(offset: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = offset / Self.chunkSize, last = (offset + length - 1) / Self.chunkSize
        lock.withLock {
            guard tracking else { return }
            for chunk in first...last { changed.insert(chunk) }
        }
    }
}
