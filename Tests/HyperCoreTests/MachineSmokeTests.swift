import Testing
@testable import HyperCore

@Suite("Machine smoke", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct MachineSmokeTests {
    @Test("real-mode flat guest: UART write then debug exit", .timeLimit(.minutes(1)))
    func flatGuestWritesAndExits() throws {
        // mov al,'A'; mov dx,0x3f8; out dx,al; mov dx,0x501; mov al,7; out dx,al; hlt
        let image: [UInt8] = [0xB0, 0x41, 0xBA, 0xF8, 0x03, 0xEE, 0xBA, 0x01, 0x05, 0xB0, 0x07, 0xEE, 0xF4]
        let console = BufferOutput()
        var configuration = MachineConfiguration(boot: .flat(image: image, name: "inline", loadAddress: 0x10000))
        configuration.memorySize = 16 << 20
        configuration.console = console
        let machine = try Machine(configuration)
        let exit = try machine.run(timeout: .seconds(20))
        #expect(exit == .debugExit(7))
        #expect(console.text == "A")
    }
}
