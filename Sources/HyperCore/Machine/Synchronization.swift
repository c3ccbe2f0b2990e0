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

/// A one-shot result that threads can wait for with a deadline (pthread mutex + condition on
/// CLOCK_MONOTONIC, since `Mutex` has no condition variable). The first ``complete(_:)`` wins.
final class OneShot<Value: Sendable>: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    private var value: Value?

    init() {
        pthread_mutex_init(&mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(&condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(&condition)
        pthread_mutex_destroy(&mutex)
    }

    /// Stores `result` unless a value is already there. Returns whether this call won.
    @discardableResult
    func complete(_ result: Value) -> Bool {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        guard value == nil else { return false }
        value = result
        pthread_cond_broadcast(&condition)
        return true
    }

    var current: Value? {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return value
    }

    /// Waits until a value exists or `deadline` (CLOCK_MONOTONIC nanoseconds) passes.
    func wait(untilNanoseconds deadline: UInt64?) -> Value? {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        while value == nil {
            if let deadline {
                var spec = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
                if pthread_cond_timedwait(&condition, &mutex, &spec) == ETIMEDOUT { break }
            } else {
                pthread_cond_wait(&condition, &mutex)
            }
        }
        return value
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
