#if canImport(Glibc)
internal import Glibc
#endif

/// Where a console device (UART, virtio-console) sends the guest's bytes.
public protocol ConsoleOutput: Sendable {
    func write(_ bytes: UnsafeRawBufferPointer)
}

/// Writes to a file descriptor (stdout, a log file), retrying short writes.
public final class FileDescriptorOutput: ConsoleOutput {
    public let fileDescriptor: Int32
    public init(fileDescriptor: Int32) { self.fileDescriptor = fileDescriptor }

    public static let standardOutput = FileDescriptorOutput(fileDescriptor: 1)

    /// Opens (creating or truncating) a file to log the console to.
    public convenience init(path: String) throws(KVMError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw KVMError(operation: "open(\(path))", errno: errno, detail: "console log") }
        self.init(fileDescriptor: fd)
    }

    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard var base = bytes.baseAddress else { return }
        var remaining = bytes.count
        while remaining > 0 {
            let written = Glibc.write(fileDescriptor, base, remaining)
            if written < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                return  // console gone (closed pipe): the guest keeps running
            }
            remaining -= written
            base += written
        }
    }
}

/// Keeps everything in memory; tests read it back.
public final class BufferOutput: ConsoleOutput {
    private let storage = SpinLockedState<[UInt8]>([])
    public init() {}
    public func write(_ bytes: UnsafeRawBufferPointer) { storage.update { $0.append(contentsOf: bytes) } }
    public var bytes: [UInt8] { storage.value }
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}

/// Sends bytes to several outputs (the terminal and a log file, say).
public struct TeeOutput: ConsoleOutput {
    public let outputs: [any ConsoleOutput]
    public init(_ outputs: [any ConsoleOutput]) { self.outputs = outputs }
    public func write(_ bytes: UnsafeRawBufferPointer) { for output in outputs { output.write(bytes) } }
}
