import Testing
@testable import HyperCore

/// A settable clock for the RTC.
final class TestClock: @unchecked Sendable {
    private let state = SpinLockedState<(Int64, Int64)>((0, 0))
    func set(seconds: Int64, nanoseconds: Int64 = 0) { _ = state.exchange((seconds, nanoseconds)) }
    var clock: CMOSRTC.Clock { { [state] in state.value } }
}

@Suite("CMOS RTC")
struct CMOSRTCTests {
    // 2026-11-22 13:45:56 UTC, a Sunday.
    static let instant: Int64 = 1_795_355_156

    func make(_ seconds: Int64 = instant, nanoseconds: Int64 = 0) -> (CMOSRTC, TestClock) {
        let clock = TestClock()
        clock.set(seconds: seconds, nanoseconds: nanoseconds)
        return (CMOSRTC(memorySize: 256 << 20, clock: clock.clock), clock)
    }

    /// Reads a register through the ports, as a guest does.
    func portRead(_ rtc: CMOSRTC, _ index: UInt8) -> UInt8 {
        var value: UInt8 = 0
        withUnsafeBytes(of: index) { rtc.write(offset: 0, data: $0) }
        withUnsafeMutableBytes(of: &value) { rtc.read(offset: 1, data: $0) }
        return value
    }

    @Test("time and date in BCD, 24-hour mode (the reset state)")
    func bcdTime() {
        let (rtc, _) = make()
        #expect(CMOSRTC.brokenDown(Self.instant) == .init(year: 2026, month: 11, day: 22, hour: 13, minute: 45, second: 56, weekday: 0))
        #expect(portRead(rtc, 0x00) == 0x56)
        #expect(portRead(rtc, 0x02) == 0x45)
        #expect(portRead(rtc, 0x04) == 0x13)
        #expect(portRead(rtc, 0x06) == 0x01) // Sunday = 1
        #expect(portRead(rtc, 0x07) == 0x22)
        #expect(portRead(rtc, 0x08) == 0x11)
        #expect(portRead(rtc, 0x09) == 0x26)
        #expect(portRead(rtc, 0x32) == 0x20)
        #expect(portRead(rtc, 0x0A) == 0x26)
        #expect(portRead(rtc, 0x0B) == 0x02)
        #expect(portRead(rtc, 0x0C) == 0x00)
        #expect(portRead(rtc, 0x0D) == 0x80)
    }

    @Test("binary and 12-hour formats follow register B")
    func binaryAnd12Hour() {
        let (rtc, _) = make()
        rtc.writeRegister(0x0B, 0x06) // binary, 24-hour
        #expect(rtc.readRegister(0x00) == 56)
        #expect(rtc.readRegister(0x04) == 13)
        #expect(rtc.readRegister(0x09) == 26)
        rtc.writeRegister(0x0B, 0x04) // binary, 12-hour
        #expect(rtc.readRegister(0x04) == 0x80 | 1) // 1 PM
        rtc.writeRegister(0x0B, 0x00) // BCD, 12-hour
        #expect(rtc.readRegister(0x04) == 0x81)
    }

    @Test("update-in-progress is set only in the last 244 µs of a second")
    func updateInProgress() {
        let (rtc, clock) = make()
        #expect(rtc.readRegister(0x0A) & 0x80 == 0)
        clock.set(seconds: Self.instant, nanoseconds: 999_800_000)
        #expect(rtc.readRegister(0x0A) & 0x80 != 0)
        clock.set(seconds: Self.instant, nanoseconds: 999_700_000)
        #expect(rtc.readRegister(0x0A) & 0x80 == 0)
    }

    @Test("SET freezes the clock; the time written then runs on from there")
    func setTime() {
        let (rtc, clock) = make()
        rtc.writeRegister(0x0B, 0x82) // SET, 24-hour, BCD
        clock.set(seconds: Self.instant + 100)
        #expect(rtc.readRegister(0x00) == 0x56) // frozen
        clock.set(seconds: Self.instant + 100, nanoseconds: 999_900_000)
        #expect(rtc.readRegister(0x0A) & 0x80 == 0) // no UIP while SET
        rtc.writeRegister(0x09, 0x30) // year 2030
        rtc.writeRegister(0x04, 0x08) // 08:…
        rtc.writeRegister(0x00, 0x00)
        rtc.writeRegister(0x0B, 0x02) // run
        clock.set(seconds: Self.instant + 110)
        #expect(rtc.readRegister(0x09) == 0x30)
        #expect(rtc.readRegister(0x04) == 0x08)
        #expect(rtc.readRegister(0x00) == 0x10) // ten seconds later
        #expect(rtc.readRegister(0x07) == 0x22)
    }

    @Test("index port: bit 7 is the NMI mask, bits 0–6 the register; reads float high")
    func indexPort() {
        let (rtc, _) = make()
        withUnsafeBytes(of: UInt8(0x80 | 0x00)) { rtc.write(offset: 0, data: $0) }
        #expect(rtc.nmiMasked)
        var value: UInt8 = 0
        withUnsafeMutableBytes(of: &value) { rtc.read(offset: 1, data: $0) }
        #expect(value == 0x56) // register 0 despite bit 7
        withUnsafeMutableBytes(of: &value) { rtc.read(offset: 0, data: $0) }
        #expect(value == 0xFF)
        withUnsafeBytes(of: UInt8(0x0D)) { rtc.write(offset: 0, data: $0) }
        #expect(!rtc.nmiMasked)
    }

    @Test("NVRAM keeps what is written; memory-size bytes are filled in")
    func nvram() {
        let (rtc, _) = make()
        rtc.writeRegister(0x40, 0xAB)
        #expect(rtc.readRegister(0x40) == 0xAB)
        rtc.writeRegister(0x0C, 0xFF) // read-only
        #expect(rtc.readRegister(0x0C) == 0)
        // 256 MiB: 255 MiB above 1 MiB in KiB (clamped to 0xFFFF), 240 MiB above 16 MiB in 64 KiB units.
        #expect(UInt16(rtc.readRegister(0x15)) | UInt16(rtc.readRegister(0x16)) << 8 == 640)
        #expect(UInt16(rtc.readRegister(0x30)) | UInt16(rtc.readRegister(0x31)) << 8 == 0xFFFF)
        #expect(UInt16(rtc.readRegister(0x34)) | UInt16(rtc.readRegister(0x35)) << 8 == 240 * 16)
        #expect(rtc.readRegister(0x5B) == 0)
    }

    @Test("the host clock is the default time source")
    func hostClock() {
        let rtc = CMOSRTC()
        let year = 2000 + CMOSRTC.fromBCD(rtc.readRegister(0x09))
        #expect(year >= 2025)
    }
}

@Suite("Boot timer")
struct BootTimerTests {
    @Test("stamps the first byte, the kernel banner split across writes, and the ready marker")
    func milestones() {
        let timer = BootTimer()
        let output = BufferOutput()
        let console = timer.watching(output)
        #expect(timer.elapsed(.firstSerialByte) == nil)
        for chunk in ["early\n[    0.000000] Linux ver", "sion 6.1.0 (x)\n"] {
            Array(chunk.utf8).withUnsafeBytes { console.write($0) }
        }
        #expect(timer.elapsed(.firstSerialByte) != nil)
        #expect(timer.elapsed(.kernelFirstLine) != nil)
        #expect(output.text.hasSuffix("Linux version 6.1.0 (x)\n"))
        withUnsafeBytes(of: UInt8(7)) { timer.write(offset: 0, data: $0) }
        #expect(timer.elapsed(.initReady) == nil)
        withUnsafeBytes(of: BootTimer.readyValue) { timer.write(offset: 0, data: $0) }
        let ready = timer.elapsed(.initReady)
        #expect(ready != nil)
        #expect(timer.report().contains("init ready marker (from process start): "))
    }

    @Test("process start time is readable and in the past")
    func processStart() throws {
        let start = try #require(BootTimer.processStart())
        #expect(start <= BootTimer.now())
    }
}

@Suite("CPU setup")
struct CPUSetupTests {
    static let base = CPUIDTable(entries: [
        .init(function: 0, eax: 0x1F),
        .init(function: 1, eax: 0x806F8, ebx: 0x0000_0800, ecx: 0x0000_2000, edx: 0x0000_0201),
        .init(function: 4, index: 0, flags: 1, eax: 0x121),
        .init(function: 0xB, index: 0, flags: 1),
        .init(function: 0x1F, index: 0, flags: 1),
    ])

    @Test("KVM signature and feature leaves are present, the hypervisor bit set")
    func kvmLeaves() throws {
        let table = CPUSetup.prepare(Self.base)
        let signature = try #require(table.entry(function: 0x4000_0000))
        #expect(signature.eax >= 0x4000_0001)
        let bytes = [signature.ebx, signature.ecx, signature.edx].flatMap { value in (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
        #expect(String(decoding: bytes.prefix(9), as: UTF8.self) == "KVMKVMKVM")
        #expect(table.entry(function: 0x4000_0001)?.eax ?? 0 & (1 << 3) != 0)
        #expect(try #require(table.entry(function: 1)).ecx & (1 << 31) != 0)
    }

    @Test("per-vCPU APIC IDs and topology leaves for N CPUs", arguments: [1, 2, 6, 32])
    func topology(count: Int) throws {
        for id in [0, count - 1] {
            let table = CPUSetup.prepare(Self.base).forVCPU(UInt32(id), count: UInt32(count))
            let leaf1 = try #require(table.entry(function: 1))
            #expect(leaf1.ebx >> 24 == UInt32(id))
            #expect((leaf1.ebx >> 16) & 0xFF == UInt32(count))
            for leaf: UInt32 in [0xB, 0x1F] {
                let smt = try #require(table.entry(function: leaf, index: 0))
                let core = try #require(table.entry(function: leaf, index: 1))
                let end = try #require(table.entry(function: leaf, index: 2))
                #expect(smt.ebx == 1 && (smt.ecx >> 8) & 0xFF == 1 && smt.edx == UInt32(id))
                #expect(core.ebx == UInt32(count) && (core.ecx >> 8) & 0xFF == 2 && core.edx == UInt32(id))
                #expect(UInt32(1) << core.eax >= UInt32(count))
                #expect((end.ecx >> 8) & 0xFF == 0)
            }
            #expect(try #require(table.entry(function: 4, index: 0)).eax >> 26 == UInt32(count - 1))
        }
    }

    @Test("CPUID policy: named and numeric features, hidden and forced")
    func policy() throws {
        let policy = try CPUIDPolicy.parse("x2apic, -kvmclock,+0x1:ecx:0, 0x40000001:eax:9")
        #expect(policy.hidden.count == 3)
        #expect(policy.forced == [CPUIDPolicy.Bit(leaf: 1, register: .ecx, bit: 0)])
        var table = CPUSetup.prepare(Self.base)
        table.update(function: 1) { $0.ecx |= 1 << 21 }
        table.update(function: 0x4000_0001) { $0.eax = 0xFFFF }
        policy.apply(to: &table)
        #expect(try #require(table.entry(function: 1)).ecx & (1 << 21) == 0)
        #expect(try #require(table.entry(function: 1)).ecx & 1 == 1)
        #expect(try #require(table.entry(function: 0x4000_0001)).eax == 0xFFFF & ~(1 << 3) & ~(1 << 9))
        #expect(throws: CPUIDPolicyError.self) { try CPUIDPolicy.parse("nosuchfeature") }
        #expect(throws: CPUIDPolicyError.self) { try CPUIDPolicy.parse("0x1:exx:3") }
        #expect(throws: CPUIDPolicyError.self) { try CPUIDPolicy.parse("0x1:ecx:32") }
    }
}
