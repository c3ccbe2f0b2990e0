internal import Synchronization
#if canImport(Glibc)
internal import Glibc
#endif

/// A small value guarded by a `Mutex`, for state touched from several vCPU threads.
final class SpinLockedState<Value: Sendable>: @unchecked Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    var value: Value { mutex.withLock { $0 } }
    func exchange(_ new: Value) -> Value {
        mutex.withLock { old in
            let previous = old
            old = new
            return previous
        }
    }
    @discardableResult
    func update<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}

/// A pthread mutex on the heap, so its address never moves (Swift does not promise a stable
/// address for a stored property passed with `&`). For state shared by vCPU, I/O and host
/// threads where blocking is acceptable; `Mutex` serves the rest.
final class PthreadLock: @unchecked Sendable {
    fileprivate let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always)
    func withLock<R, E: Error>(_ body: () throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

/// A ``PthreadLock`` with a condition variable on CLOCK_MONOTONIC, for waiting with a deadline.
final class PthreadCondition: @unchecked Sendable {
    let lock = PthreadLock()
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    init() {
        condition = .allocate(capacity: 1)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        condition.deallocate()
    }

    /// Wakes every waiter. Call with the lock held.
    func broadcast() { pthread_cond_broadcast(condition) }

    /// Waits (lock held) until woken or until `deadline` (CLOCK_MONOTONIC nanoseconds) passes;
    /// returns false on timeout.
    func wait(untilNanoseconds deadline: UInt64? = nil) -> Bool {
        guard let deadline else {
            pthread_cond_wait(condition, lock.mutex)
            return true
        }
        var spec = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(condition, lock.mutex, &spec) != ETIMEDOUT
    }
}

/// A one-shot result that threads can wait for with a deadline. The first ``complete(_:)`` wins.
final class OneShot<Value: Sendable>: @unchecked Sendable {
    private let condition = PthreadCondition()
    private var value: Value?

    /// Stores `result` unless a value is already there. Returns whether this call won.
    @discardableResult
    func complete(_ result: Value) -> Bool {
        condition.lock.withLock {
            guard value == nil else { return false }
            value = result
            condition.broadcast()
            return true
        }
    }

    var current: Value? { condition.lock.withLock { value } }

    /// Waits until a value exists or `deadline` (CLOCK_MONOTONIC nanoseconds) passes.
    func wait(untilNanoseconds deadline: UInt64?) -> Value? {
        condition.lock.withLock {
            while value == nil {
                if !condition.wait(untilNanoseconds: deadline) { break }
            }
            return value
        }
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
