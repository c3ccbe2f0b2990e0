import Testing
@testable import HyperCore

/// Drives the UART's registers directly, as the 8250 driver would.
struct UARTHarness {
    let line = RecordingLine()
    let output = BufferOutput()
    let uart: Serial16550
    init() { uart = Serial16550(output: output, interrupt: line) }

    func read(_ register: UInt64) -> UInt8 {
        var byte: UInt8 = 0
        withUnsafeMutableBytes(of: &byte) { uart.read(offset: register, data: $0) }
        return byte
    }
    func write(_ register: UInt64, _ value: UInt8) {
        var byte = value
        withUnsafeBytes(of: &byte) { uart.write(offset: register, data: $0) }
    }
}

@Suite("16550A UART")
struct SerialTests {
    @Test("THR bytes reach the output; LSR shows THRE|TEMT")
    func transmit() {
        let h = UARTHarness()
        for byte in "hi\n".utf8 { h.write(0, byte) }
        #expect(h.output.text == "hi\n")
        #expect(h.read(5) == 0x60)
    }

    @Test("DLAB switches offsets 0 and 1 to the divisor latch, and THR writes stop transmitting")
    func divisorLatch() {
        let h = UARTHarness()
        h.write(3, 0x83)
        h.write(0, 0x01); h.write(1, 0x02)
        #expect(h.read(0) == 0x01 && h.read(1) == 0x02)
        #expect(h.output.bytes.isEmpty)
        h.write(3, 0x03)
        #expect(h.read(1) == 0x00) // IER again
    }

    @Test("THR-empty interrupt: raised when enabled, acknowledged by reading IIR, raised again by a write")
    func thrEmptyInterrupt() {
        let h = UARTHarness()
        h.write(2, 0x07) // FIFO on
        h.write(1, 0x02)
        #expect(h.line.isHigh)
        #expect(h.read(2) == 0xC2)
        #expect(!h.line.isHigh)
        #expect(h.read(2) == 0xC1)
        h.write(0, 0x41)
        #expect(h.line.isHigh)
        #expect(h.line.risingEdges == 2)
    }

    @Test("host input: data-ready, received-data interrupt, FIFO depth, overflow kept in the host queue")
    func receive() {
        let h = UARTHarness()
        h.write(2, 0xC7)  // FIFO on, trigger level 14
        h.write(1, 0x01)  // received-data interrupt
        #expect(!h.line.isHigh)
        h.uart.receive(Array(repeating: UInt8(ascii: "x"), count: 20) + Array("yz".utf8))
        #expect(h.line.isHigh)
        #expect(h.read(2) == 0xC4) // 16 ≥ trigger: received data available
        #expect(h.read(5) & 0x01 == 0x01)
        var received: [UInt8] = []
        while h.read(5) & 0x01 != 0 { received.append(h.read(0)) }
        #expect(received.count == 22)
        #expect(Array(received.suffix(2)) == Array("yz".utf8))
        #expect(!h.line.isHigh)
        #expect(h.read(2) == 0xC1)
    }

    @Test("a byte below the FIFO trigger level reports a character timeout, not received data")
    func timeoutInterrupt() {
        let h = UARTHarness()
        h.write(2, 0xC7)
        h.write(1, 0x01)
        h.uart.receive([0x41])
        #expect(h.read(2) == 0xCC)
        #expect(h.read(0) == 0x41)
    }

    @Test("loopback: THR comes back in RBR, MSR mirrors MCR, nothing leaves the chip")
    func loopback() {
        let h = UARTHarness()
        h.write(4, 0x1F)
        #expect(h.read(6) & 0xF0 == 0xF0)
        h.write(4, 0x10)
        #expect(h.read(6) & 0xF0 == 0x00)
        h.write(0, 0x55)
        #expect(h.read(5) == 0x61)
        #expect(h.read(0) == 0x55)
        #expect(h.output.bytes.isEmpty)
        h.write(4, 0x03)
        #expect(h.read(6) & 0xF0 == 0xB0) // a terminal is attached again
    }

    @Test("a second byte into a full non-FIFO receiver sets overrun, cleared by reading LSR")
    func overrun() {
        let h = UARTHarness()
        h.write(4, 0x10)
        h.write(0, 1); h.write(0, 2)
        #expect(h.read(5) & 0x02 == 0x02)
        #expect(h.read(5) & 0x02 == 0)
    }

    @Test("scratch register holds any value")
    func scratch() {
        let h = UARTHarness()
        for value: UInt8 in [0, 0x5A, 0xA5, 0xFF] {
            h.write(7, value)
            #expect(h.read(7) == value)
        }
    }
}

@Suite("i8042")
struct I8042Tests {
    final class ResetCounter: @unchecked Sendable { var count = 0 }

    func make() -> (I8042, ResetCounter) {
        let counter = ResetCounter()
        return (I8042(onReset: { counter.count += 1 }), counter)
    }

    func io(_ device: I8042, write port: UInt64, _ value: UInt8) {
        var byte = value
        withUnsafeBytes(of: &byte) { device.write(offset: port, data: $0) }
    }
    func io(_ device: I8042, read port: UInt64) -> UInt8 {
        var byte: UInt8 = 0
        withUnsafeMutableBytes(of: &byte) { device.read(offset: port, data: $0) }
        return byte
    }

    @Test("0xFE on the command port pulses reset")
    func pulseReset() {
        let (device, resets) = make()
        io(device, write: 4, 0xFE)
        #expect(resets.count == 1)
    }

    @Test("clearing bit 0 of the output port resets; setting it does not")
    func outputPortReset() {
        let (device, resets) = make()
        io(device, write: 4, 0xD1); io(device, write: 0, 0x03)
        #expect(resets.count == 0)
        io(device, write: 4, 0xD1); io(device, write: 0, 0x02)
        #expect(resets.count == 1)
    }

    @Test("self-test answers 0x55; the command byte round-trips; status shows output-full")
    func probe() {
        let (device, resets) = make()
        #expect(io(device, read: 4) & 0x01 == 0)
        io(device, write: 4, 0xAA)
        #expect(io(device, read: 4) & 0x01 == 0x01)
        #expect(io(device, read: 0) == 0x55)
        #expect(io(device, read: 4) & 0x01 == 0)
        io(device, write: 4, 0x60); io(device, write: 0, 0x47)
        io(device, write: 4, 0x20)
        #expect(io(device, read: 0) == 0x47)
        #expect(resets.count == 0)
    }
}
