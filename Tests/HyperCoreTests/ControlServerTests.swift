import Testing
@testable import HyperCore
#if canImport(Glibc)
import Glibc
#endif

/// The control socket's contract for owner verbs that start long operations: the reply first,
/// then the events (a client reads them in that order, as `hvrun vm move --storage-only` does).
@Suite("control socket: owner verbs and their events", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct ControlServerTests {
    @Test("an event sent as soon as the work starts still follows the verb's reply; a verb that throws starts nothing",
          .timeLimit(.minutes(1)))
    func eventsFollowTheReply() throws {
        let directory = try TemporaryDirectory()
        let machine = try Machine(try GuestRun.configuration("spin.elf", memory: 16 << 20, cpus: 1))
        let server = try ControlServer(path: directory.file("control.sock"), machine: machine)
        server.commands["quick"] = { [unowned server] _ in
            let events = server.eventsForCurrentRequest()
            // The work is done before the reply could be written: only the ordering holds it back.
            server.afterReply { events.send("QUICK", [("done", .bool(true))]) }
            return [("status", .string("active"))]
        }
        server.commands["refused"] = { [unowned server] _ in
            let events = server.eventsForCurrentRequest()
            server.afterReply { events.send("SHOULD_NOT_BE_SENT", []) }
            throw ControlError.refused("not now")
        }
        try server.start()
        defer { server.close() }

        let connection = try ControlConnection(path: directory.file("control.sock"))
        for round in 0..<50 {
            let reply = try connection.execute("quick")
            #expect(reply["status"]?.stringValue == "active", "round \(round): \(reply.rendered())")
            let event = try connection.readLine(timeoutSeconds: 5)
            #expect(event["event"]?.stringValue == "QUICK", "round \(round): \(event.rendered())")
        }
        #expect(throws: StoreError.self) { try connection.execute("refused") }
        // The next line is the reply to `info`: nothing was queued behind the refusal.
        let info = try connection.execute("info")
        #expect(info["state"] != nil, "\(info.rendered())")
    }
}
