import ArgumentParser
import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// `hvrun vm console NAME`: attach this terminal to a running VM's serial console through the VM
/// process's `console.sock` (protocol in ``VMConsoleServer``). Ctrl-] detaches; the VM keeps running.
struct VMConsoleCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "console", abstract: "Attach to a running VM's serial console; Ctrl-] detaches and leaves the VM running.")
    @Argument(help: ArgumentHelp("The VM's name.", valueName: "name")) var name: String
    @Flag(help: "Take the console from another attached client.")
    var force = false
    @Flag(help: "First print the end of console.log (the last 16 KiB): what the guest wrote before this attach, with nothing lost or repeated up to the live output.")
    var replay = false

    func run() throws {
        try storeCommand { store in
            let bundle = try store.bundle(named: name)
            _ = try requireState(store, bundle, [.running, .paused, .starting], for: "attach to the console of")
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw StoreError.system(operation: "socket", path: bundle.consoleSocketPath, errno: errno) }
            defer { close(fd) }
            try connectConsole(fd, bundle.consoleSocketPath)
            let request = Array(("attach" + (force ? " force" : "") + (replay ? " replay" : "") + "\n").utf8)
            guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == request.count else {
                throw StoreError.system(operation: "send", path: bundle.consoleSocketPath, errno: errno)
            }
            var answer: [UInt8] = []
            var byte: UInt8 = 0
            while answer.last != UInt8(ascii: "\n"), answer.count < 16 {
                var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&entry, 1, 5000) == 1, read(fd, &byte, 1) == 1 else { throw StoreError.failed("VM \(name)'s console did not answer") }
                answer.append(byte)
            }
            guard answer == Array("OK\n".utf8) else {
                throw StoreError.refused("VM \(name)'s console is attached elsewhere; hvrun vm console --force \(name) takes it over")
            }
            // The notice comes first; with --replay the server then sends the log's end ahead of
            // the live output, so no line is split by it.
            let terminal = RawTerminal()
            defer { terminal.restore() }
            printError("hvrun: attached to VM \(name)'s console; Ctrl-] detaches\r")
            var buffer = [UInt8](repeating: 0, count: 4096)
            loop: while true {
                var fds = [pollfd(fd: 0, events: Int16(POLLIN), revents: 0), pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
                guard poll(&fds, 2, -1) >= 0 || errno == EINTR else { break }
                if fds[1].revents != 0 {
                    let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if count <= 0 { terminal.restore(); printError("\r\nhvrun: the VM's console closed"); break }
                    buffer[0..<count].withUnsafeBytes { writeOut($0) }
                }
                if fds[0].revents != 0 {
                    let count = buffer.withUnsafeMutableBytes { read(0, $0.baseAddress, $0.count) }
                    if count <= 0 { break }
                    var input = Array(buffer[0..<count])
                    var detach = false
                    if let escape = input.firstIndex(of: 0x1D) {   // Ctrl-]
                        input = Array(input[..<escape])
                        detach = true
                    }
                    if !input.isEmpty { _ = input.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) } }
                    if detach { break loop }
                }
            }
            terminal.restore()
            printError("\r\nhvrun: detached from VM \(name); it keeps running")
        }
    }

    private func connectConsole(_ fd: Int32, _ path: String) throws {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { throw StoreError.failed("\(path) is too long for a Unix socket path") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, byte) in bytes.enumerated() { raw[i] = byte } }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw StoreError.system(operation: "connect", path: path, errno: errno) }
    }
}

/// The terminal in raw mode while attached (every key, Ctrl-C included, goes to the guest).
final class RawTerminal {
    private var saved = termios()
    private var active = false
    init() {
        guard isatty(0) == 1, tcgetattr(0, &saved) == 0 else { return }
        var raw = saved
        cfmakeraw(&raw)
        active = tcsetattr(0, TCSANOW, &raw) == 0
    }
    func restore() {
        if active { tcsetattr(0, TCSANOW, &saved); active = false }
    }
}
