internal import CKVM

/// A CPUID table as `KVM_GET_SUPPORTED_CPUID` returns it and `KVM_SET_CPUID2` takes it.
public struct CPUIDTable: Sendable, Equatable, Codable {
    public struct Entry: Sendable, Equatable, Codable {
        public var function: UInt32
        public var index: UInt32
        /// `KVM_CPUID_FLAG_*` (bit 0: the leaf is indexed by ECX).
        public var flags: UInt32
        public var eax: UInt32
        public var ebx: UInt32
        public var ecx: UInt32
        public var edx: UInt32

        public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0,
                    eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
            self.function = function
            self.index = index
            self.flags = flags
            self.eax = eax
            self.ebx = ebx
            self.ecx = ecx
            self.edx = edx
        }
    }

    public var entries: [Entry]

    public init(entries: [Entry]) { self.entries = entries }

    init(copying table: UnsafeMutablePointer<kvm_cpuid2>) {
        entries = (0..<table.pointee.nent).map { index in
            let e = ckvm_cpuid2_entry(table, index).pointee
            return Entry(function: e.function, index: e.index, flags: e.flags,
                         eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
        }
    }

    /// The entry for a leaf and subleaf, if present.
    public func entry(function: UInt32, index: UInt32 = 0) -> Entry? {
        entries.first { $0.function == function && ($0.flags & 1 == 0 || $0.index == index) }
    }

    /// Applies `change` to every entry of a leaf.
    public mutating func update(function: UInt32, _ change: (inout Entry) -> Void) {
        for i in entries.indices where entries[i].function == function { change(&entries[i]) }
    }

    /// Calls `body` with a heap-allocated `kvm_cpuid2` holding these entries.
    func withKVMCPUID2<R>(_ body: (UnsafeMutablePointer<kvm_cpuid2>) -> R) -> R? {
        guard let table = ckvm_cpuid2_alloc(UInt32(entries.count)) else { return nil }
        defer { ckvm_free(table) }
        for (i, e) in entries.enumerated() {
            let slot = ckvm_cpuid2_entry(table, UInt32(i))
            slot.pointee.function = e.function
            slot.pointee.index = e.index
            slot.pointee.flags = e.flags
            slot.pointee.eax = e.eax
            slot.pointee.ebx = e.ebx
            slot.pointee.ecx = e.ecx
            slot.pointee.edx = e.edx
        }
        return body(table)
    }

    /// The table a vCPU should see: the supported table with that vCPU's APIC ID filled in
    /// (leaf 1 EBX[31:24], leaf 0xB/0x1F EDX), the logical-processor count of the package and the
    /// topology levels of leaves 0xB/0x1F and 4 (see ``CPUSetup/topology(_:vcpu:count:)``).
    public func forVCPU(_ id: UInt32, count: UInt32) -> CPUIDTable {
        var table = self
        table.update(function: 1) { entry in
            entry.ebx = (entry.ebx & 0x0000_FFFF) | (id << 24) | (min(count, 255) << 16)
            if count > 1 { entry.edx |= 1 << 28 } // HTT: the count in EBX[23:16] is valid
        }
        CPUSetup.topology(&table, vcpu: id, count: count)
        return table
    }
}
