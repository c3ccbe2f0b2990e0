import Testing
import CKVM
@testable import HyperCore

@Suite("CKVM constants")
struct CKVMConstantTests {
    @Test("ioctl numbers survive the trip through the C enum (including those above INT_MAX)")
    func ioctlNumbers() {
        #expect(CKVM_GET_API_VERSION == 0xAE00)
        #expect(CKVM_CREATE_VM == 0xAE01)
        #expect(CKVM_RUN == 0xAE80)
        #expect(CKVM_GET_REGS == 0x8090_AE81)
        #expect(CKVM_SET_REGS == 0x4090_AE82)
        #expect(CKVM_SET_USER_MEMORY_REGION == 0x4020_AE46)
        #expect(CKVM_SET_TSS_ADDR == 0xAE47)
        #expect(CKVM_IRQFD == 0x4020_AE76)
    }

    @Test("the kick signal is a real-time signal (glibc keeps 32 and 33 for itself)")
    func kickSignal() {
        #expect((34...64).contains(ckvm_kick_signal()))
        #expect(ckvm_kick_install() == 0)
    }
}

@Suite("KVM handles", .serialized, .tags(.kvm), .enabled(if: TestHost.kvmUsable, TestHost.kvmSkipReason))
struct KVMHandleTests {
    @Test("the system handle reports API 12, the required capabilities and a supported CPUID table")
    func systemHandle() throws {
        let kvm = try KVM()
        #expect(kvm.apiVersion == 12)
        #expect(RequiredCapabilities.missing(in: kvm).isEmpty)
        #expect(try kvm.vcpuMapSize() >= 4096)
        let cpuid = try kvm.supportedCPUID()
        #expect(cpuid.entry(function: 0) != nil)
        #expect(cpuid.entry(function: 1) != nil)
        #expect(!(try kvm.msrIndexList()).isEmpty)
    }

    @Test("opening a path that is not KVM names the path and the errno")
    func openFailure() {
        #expect(throws: KVMError(operation: "open(/nonexistent/kvm)", errno: 2)) { _ = try KVM(path: "/nonexistent/kvm") }
        let error = KVMError(operation: "open(/dev/kvm)", errno: 13)
        #expect(error.description.contains("kvm group"))
    }

    @Test("vCPU state round-trips through GET/SET ioctls")
    func vcpuStateRoundTrip() throws {
        let kvm = try KVM()
        let vm = try kvm.createVirtualMachine()
        try vm.createInterruptController()
        let vcpu = try vm.createVCPU(id: 0)
        var registers = try vcpu.registers()
        registers.rax = 0x1234_5678_9ABC_DEF0
        registers.r15 = 42
        registers.rip = 0x1000
        try vcpu.setRegisters(registers)
        #expect(try vcpu.registers() == registers)
        var sregs = try vcpu.specialRegisters()
        sregs.cr3 = 0x5000
        try vcpu.setSpecialRegisters(sregs)
        #expect(try vcpu.specialRegisters().cr3 == 0x5000)
        for kind in OpaqueStateKind.allCases {
            let state = try vcpu.opaqueState(kind)
            try vcpu.setOpaqueState(kind, state)
        }
        #expect(throws: KVMError.self) { try vcpu.setOpaqueState(.lapic, [1, 2, 3]) }
        try vcpu.setModelSpecificRegisters([(index: 0xC000_0100, value: 0x7000)]) // FS_BASE
        #expect(try vcpu.modelSpecificRegisters([0xC000_0100]).first?.value == 0x7000)
        #expect(throws: KVMError.self) { try vcpu.setModelSpecificRegisters([(index: 0xDEAD_0000, value: 1)]) }
        #expect(try vcpu.multiprocessingState() == 0) // runnable: the boot CPU
        let ap = try vm.createVCPU(id: 1)
        #expect(try ap.multiprocessingState() == 1)   // uninitialized: waits for INIT/SIPI
        #expect(try vm.interruptControllerState().count == 3)
    }

    /// A VM with 1 MiB of RAM in slot 0 and a real-mode guest that writes to pages 0x20 and 0x22
    /// (addresses 0x20000, 0x22000) and then exits through `out 0x501`.
    struct PageWriter {
        // mov ax,0x2000; mov ds,ax; mov byte [0],1; mov ax,0x2200; mov ds,ax; mov byte [0],1;
        // mov dx,0x501; mov al,0; out dx,al
        static let code: [UInt8] = [0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x01,
                                    0xB8, 0x00, 0x22, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x01,
                                    0xBA, 0x01, 0x05, 0xB0, 0x00, 0xEE, 0xF4]
        let vm: VirtualMachine
        let memory: GuestMemory
        let vcpu: VCPU

        init(vm: VirtualMachine, flags: VirtualMachine.MemoryRegionFlags) throws {
            self.vm = vm
            memory = try GuestMemory(size: 1 << 20)
            vcpu = try vm.createVCPU(id: 0)
            try setFlags(flags)
            try memory.write(at: 0x10000, bytes: Self.code)
        }

        func setFlags(_ flags: VirtualMachine.MemoryRegionFlags) throws {
            let region = memory.regions[0]
            try vm.setMemoryRegion(slot: 0, guestAddress: 0, size: region.size, hostAddress: region.hostAddress, flags: flags)
        }

        /// Runs the guest from its first instruction to its exit.
        func run() throws {
            let boot = BootState(registers: { var r = Registers(); r.rip = 0; r.rflags = 2; return r }(), mode: .real(segment: 0x1000))
            try vcpu.setSpecialRegisters(boot.specialRegisters(from: try vcpu.specialRegisters()))
            try vcpu.setRegisters(boot.registers)
            while ckvm_ioctl(vcpu.fileDescriptor, CKVM_RUN) == 0, vcpu.run.pointee.exit_reason == UInt32(KVM_EXIT_IO),
                  vcpu.run.pointee.io.port != 0x501 {}
        }

        /// The pages slot 0's dirty log reports.
        func dirtyPages() throws -> [Int] {
            let bitmap = try vm.dirtyLog(slot: 0, pages: 256)
            return (0..<256).filter { bitmap[$0 / 64] & (1 << UInt64($0 % 64)) != 0 }
        }
    }

    @Test("a dirty log reports exactly the pages a guest wrote")
    func dirtyLog() throws {
        let guest = try PageWriter(vm: try KVM().createVirtualMachine(), flags: .logDirtyPages)
        _ = try guest.dirtyPages() // clear what loading dirtied
        try guest.run()
        #expect(try guest.dirtyPages() == [0x20, 0x22])
    }

    @Test("manual dirty-log protection: every page starts dirty, reading clears nothing, a clear re-arms exactly its pages")
    func manualDirtyLog() throws {
        let vm = try KVM().createVirtualMachine()
        let offered = vm.supportedDirtyLogProtection
        guard offered.contains([.manual, .initiallySet]) else {
            print("skipped: this KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with initially-set (offers \(offered.rawValue))")
            return
        }
        let guest = try PageWriter(vm: vm, flags: [])
        try guest.run()   // maps the pages writable before logging starts: the clear must take that back
        try vm.setDirtyLogProtection([.manual, .initiallySet])
        try guest.setFlags(.logDirtyPages)
        #expect(try guest.dirtyPages() == Array(0..<256), "initially set: every page reported")
        #expect(try guest.dirtyPages() == Array(0..<256), "reading does not clear")
        let everything = [UInt64](repeating: ~0, count: 4)
        try everything.withUnsafeBytes { try vm.clearDirtyLog(slot: 0, firstPage: 0, pages: 256, bitmap: $0.baseAddress!) }
        #expect(try guest.dirtyPages() == [])
        try guest.run()
        #expect(try guest.dirtyPages() == [0x20, 0x22], "writes after the clear are logged")
        let page0x20: [UInt64] = [1 << 0x20]
        try page0x20.withUnsafeBytes { try vm.clearDirtyLog(slot: 0, firstPage: 0, pages: 64, bitmap: $0.baseAddress!) }
        #expect(try guest.dirtyPages() == [0x22], "a clear touches only its bits")
        try guest.run()
        #expect(try guest.dirtyPages() == [0x20, 0x22], "the cleared page was write-protected again")
        #expect {
            try page0x20.withUnsafeBytes { try vm.clearDirtyLog(slot: 0, firstPage: 32, pages: 64, bitmap: $0.baseAddress!) }
        } throws: { ($0 as? KVMError)?.description.contains("KVM_CLEAR_DIRTY_LOG") == true }
        try guest.setFlags([])
        try vm.setDirtyLogProtection([])
    }
}
