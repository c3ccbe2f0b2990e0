import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The control socket's contract for owner verbs that start long operations: the reply first,
/// then the events (a client reads them in that order, as `hvrun vm move --storage-only` does).
@Suite("control socket: owner verbs and their events", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct ControlServerTests {
    @Test("an event the operation sends before its verb has even returned still follows the verb's reply, on every round; a refused verb leaves nothing queued",
          .timeLimit(.minutes(1)))
    func eventsFollowTheReply() throws {
        let directory = try TemporaryDirectory()
        let machine = try Machine(try GuestRun.configuration("spin.elf", memory: 16 << 20, cpus: 1))
        let server = try ControlServer(path: directory.file("control.sock"), machine: machine)
        server.commands["quick"] = { [unowned server] _ in
            // Done before the reply could be written: only the server's hold keeps it back.
            server.eventsForCurrentRequest().send("QUICK", [("done", .bool(true))])
            return [("status", .string("active"))]
        }
        server.commands["threaded"] = { [unowned server] _ in
            let events = server.eventsForCurrentRequest()
            startDetachedThread { events.send("THREADED", []) }
            return [("status", .string("active"))]
        }
        server.commands["refused"] = { _ in throw ControlError.refused("not now") }
        try server.start()
        defer { server.close() }

        let connection = try ControlConnection(path: directory.file("control.sock"))
        for round in 0..<50 {
            for (verb, event) in [("quick", "QUICK"), ("threaded", "THREADED")] {
                let reply = try connection.execute(verb)
                #expect(reply["status"]?.stringValue == "active", "round \(round): \(reply.rendered())")
                let line = try connection.readLine(timeoutSeconds: 5)
                #expect(line["event"]?.stringValue == event, "round \(round): \(line.rendered())")
            }
        }
        #expect(throws: StoreError.self) { try connection.execute("refused") }
        // The next line is the reply to `info`: nothing was queued behind the refusal.
        let info = try connection.execute("info")
        #expect(info["state"] != nil, "\(info.rendered())")
    }
}
