/// A read-only view of an ELF executable, enough to load it: its program headers and notes.
///
/// Every field is read with a bounds check against the file's bytes, so a truncated or hostile
/// file produces a ``BootError`` naming the structure and offset, never an out-of-bounds read.
public struct ELFImage: Sendable {
    public struct Segment: Sendable, Equatable {
        public let fileOffset: UInt64
        public let physicalAddress: UInt64
        public let virtualAddress: UInt64
        public let fileSize: UInt64
        public let memorySize: UInt64
    }

    public struct Note: Sendable, Equatable {
        public let name: String
        public let type: UInt32
        public let descriptor: [UInt8]
    }

    public let is64Bit: Bool
    public let machine: UInt16
    public let entry: UInt64
    public let loadSegments: [Segment]
    public let notes: [Note]

    static let maximumProgramHeaders = 256

    public init(bytes: [UInt8], name: String) throws(BootError) {
        let reader = ByteReader(bytes: bytes, file: name)
        guard bytes.count >= 16, bytes[0] == 0x7F, bytes[1] == 0x45, bytes[2] == 0x4C, bytes[3] == 0x46 else {
            throw .notELF(file: name)
        }
        switch bytes[4] {
        case 1: is64Bit = false
        case 2: is64Bit = true
        default: throw .malformed(file: name, structure: "ELF header", offset: 4, detail: "unknown class \(bytes[4])")
        }
        guard bytes[5] == 1 else {
            throw .malformed(file: name, structure: "ELF header", offset: 5, detail: "not little-endian")
        }
        machine = try reader.u16(18, "ELF header")
        guard machine == 3 || machine == 62 else {
            throw .malformed(file: name, structure: "ELF header", offset: 18, detail: "machine \(machine) is not x86 or x86-64")
        }
        let programHeaderOffset: UInt64
        let programHeaderSize: UInt16
        let programHeaderCount: UInt16
        if is64Bit {
            entry = try reader.u64(24, "ELF header")
            programHeaderOffset = try reader.u64(32, "ELF header")
            programHeaderSize = try reader.u16(54, "ELF header")
            programHeaderCount = try reader.u16(56, "ELF header")
        } else {
            entry = UInt64(try reader.u32(24, "ELF header"))
            programHeaderOffset = UInt64(try reader.u32(28, "ELF header"))
            programHeaderSize = try reader.u16(42, "ELF header")
            programHeaderCount = try reader.u16(44, "ELF header")
        }
        guard Int(programHeaderCount) <= Self.maximumProgramHeaders else {
            throw .malformed(file: name, structure: "ELF header", offset: is64Bit ? 56 : 44,
                             detail: "\(programHeaderCount) program headers is more than \(Self.maximumProgramHeaders)")
        }
        guard programHeaderSize >= (is64Bit ? 56 : 32) else {
            throw .malformed(file: name, structure: "ELF header", offset: is64Bit ? 54 : 42,
                             detail: "program header size \(programHeaderSize) is too small")
        }

        var segments: [Segment] = []
        var notes: [Note] = []
        for index in 0..<UInt64(programHeaderCount) {
            let base = programHeaderOffset &+ index &* UInt64(programHeaderSize)
            let structure = "program header \(index)"
            let type = try reader.u32(base, structure)
            let segment: Segment
            if is64Bit {
                segment = Segment(fileOffset: try reader.u64(base + 8, structure),
                                  physicalAddress: try reader.u64(base + 24, structure),
                                  virtualAddress: try reader.u64(base + 16, structure),
                                  fileSize: try reader.u64(base + 32, structure),
                                  memorySize: try reader.u64(base + 40, structure))
            } else {
                segment = Segment(fileOffset: UInt64(try reader.u32(base + 4, structure)),
                                  physicalAddress: UInt64(try reader.u32(base + 12, structure)),
                                  virtualAddress: UInt64(try reader.u32(base + 8, structure)),
                                  fileSize: UInt64(try reader.u32(base + 16, structure)),
                                  memorySize: UInt64(try reader.u32(base + 20, structure)))
            }
            let (end, overflow) = segment.fileOffset.addingReportingOverflow(segment.fileSize)
            guard !overflow, end <= UInt64(bytes.count) else {
                throw .truncated(file: name, structure: structure, needed: end, size: UInt64(bytes.count))
            }
            switch type {
            case 1: // PT_LOAD
                guard segment.fileSize <= segment.memorySize else {
                    throw .malformed(file: name, structure: structure, offset: base,
                                     detail: "file size \(segment.fileSize) exceeds memory size \(segment.memorySize)")
                }
                if segment.memorySize > 0 { segments.append(segment) }
            case 4: // PT_NOTE
                notes += try Self.parseNotes(reader, from: segment.fileOffset, size: segment.fileSize, structure: structure)
            default:
                break
            }
        }
        guard !segments.isEmpty else {
            throw .malformed(file: name, structure: "program headers", offset: programHeaderOffset, detail: "no loadable segment")
        }
        loadSegments = segments
        self.notes = notes
    }

    private static func parseNotes(_ reader: ByteReader, from start: UInt64, size: UInt64, structure: String) throws(BootError) -> [Note] {
        var notes: [Note] = []
        var offset = start
        let end = start + size
        func align4(_ value: UInt64) -> UInt64 { (value + 3) & ~3 }
        while offset + 12 <= end {
            let nameSize = UInt64(try reader.u32(offset, structure))
            let descriptorSize = UInt64(try reader.u32(offset + 4, structure))
            let type = try reader.u32(offset + 8, structure)
            let nameStart = offset + 12
            let descriptorStart = nameStart + align4(nameSize)
            let next = descriptorStart + align4(descriptorSize)
            guard nameSize <= size, descriptorSize <= size, next <= end else {
                throw .malformed(file: reader.file, structure: "ELF note in \(structure)", offset: offset, detail: "note runs past its segment")
            }
            let nameBytes = try reader.bytes(nameStart, Int(nameSize), structure).prefix { $0 != 0 }
            notes.append(Note(name: String(decoding: nameBytes, as: UTF8.self), type: type,
                              descriptor: try reader.bytes(descriptorStart, Int(descriptorSize), structure)))
            offset = next
        }
        return notes
    }

    /// The 32-bit PVH entry point (Xen note `XEN_ELFNOTE_PHYS32_ENTRY`, type 18), if the image has one.
    public var pvhEntry: UInt64? {
        guard let note = notes.first(where: { $0.name == "Xen" && $0.type == 18 }) else { return nil }
        switch note.descriptor.count {
        case 4: return UInt64(ByteReader.littleEndian(note.descriptor[0..<4]))
        case 8: return ByteReader.littleEndian(note.descriptor[0..<8])
        default: return nil
        }
    }
}

/// Bounds-checked little-endian reads from a byte array.
struct ByteReader {
    let bytes: [UInt8]
    let file: String

    func bytes(_ offset: UInt64, _ count: Int, _ structure: String) throws(BootError) -> [UInt8] {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= UInt64(bytes.count) else {
            throw .truncated(file: file, structure: structure, needed: end, size: UInt64(bytes.count))
        }
        return Array(bytes[Int(offset)..<Int(end)])
    }

    private func value(_ offset: UInt64, _ count: Int, _ structure: String) throws(BootError) -> UInt64 {
        let (end, overflow) = offset.addingReportingOverflow(UInt64(count))
        guard !overflow, end <= UInt64(bytes.count) else {
            throw .truncated(file: file, structure: structure, needed: end, size: UInt64(bytes.count))
        }
        return Self.littleEndian(bytes[Int(offset)..<Int(end)])
    }

    static func littleEndian(_ slice: ArraySlice<UInt8>) -> UInt64 {
        var result: UInt64 = 0
        for (shift, byte) in slice.enumerated() { result |= UInt64(byte) << (8 * UInt64(shift)) }
        return result
    }

    func u8(_ offset: UInt64, _ structure: String) throws(BootError) -> UInt8 { UInt8(try value(offset, 1, structure)) }
    func u16(_ offset: UInt64, _ structure: String) throws(BootError) -> UInt16 { UInt16(try value(offset, 2, structure)) }
    func u32(_ offset: UInt64, _ structure: String) throws(BootError) -> UInt32 { UInt32(try value(offset, 4, structure)) }
    func u64(_ offset: UInt64, _ structure: String) throws(BootError) -> UInt64 { try value(offset, 8, structure) }
}

/// Why a kernel, initrd or firmware image could not be loaded.
public enum BootError: Error, Equatable, Sendable, CustomStringConvertible {
    case notELF(file: String)
    case truncated(file: String, structure: String, needed: UInt64, size: UInt64)
    case malformed(file: String, structure: String, offset: UInt64, detail: String)
    case noPVHEntry(file: String)
    case doesNotFit(file: String, what: String, address: UInt64, size: UInt64, memory: UInt64)
    case commandLineTooLong(length: Int, maximum: Int)
    case notBzImage(file: String, detail: String)
    case unsupported(file: String, detail: String)
    case cannotRead(file: String, errno: Int32)
    case tooLarge(file: String, size: UInt64, maximum: UInt64)
    /// The guest has less RAM below the 32-bit MMIO hole than the image needs.
    case insufficientMemory(file: String, needed: UInt64, available: UInt64, why: String)

    public var description: String {
        switch self {
        case let .notELF(file):
            return "\(file): not an ELF file (no \\x7fELF magic); pass a PVH-capable ELF (vmlinux) or a bzImage"
        case let .truncated(file, structure, needed, size):
            return "\(file): truncated: the \(structure) needs \(needed) bytes but the file has \(size)"
        case let .malformed(file, structure, offset, detail):
            return "\(file): malformed \(structure) at offset \(offset): \(detail)"
        case let .noPVHEntry(file):
            return "\(file): the ELF has no PVH entry note (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH=y"
        case let .doesNotFit(file, what, address, size, memory):
            return "\(file): the \(what) at guest address 0x\(String(address, radix: 16)) (\(size) bytes) does not fit in \(memory >> 20) MiB of guest RAM; raise --memory"
        case let .commandLineTooLong(length, maximum):
            return "the kernel command line is \(length) bytes; the maximum is \(maximum)"
        case let .notBzImage(file, detail):
            return "\(file): not a bzImage: \(detail)"
        case let .unsupported(file, detail):
            return "\(file): \(detail)"
        case let .cannotRead(file, errno):
            return "\(file): cannot read: \(SystemError.describe(errno))"
        case let .insufficientMemory(file, needed, available, why):
            let mib = (needed + (1 << 20) - 1) >> 20
            return "\(file): needs guest RAM up to 0x\(String(needed, radix: 16)) (\(mib) MiB) but only \(available >> 20) MiB is available below the MMIO hole: \(why); raise --memory to at least \(mib + 16)M"
        case let .tooLarge(file, size, maximum):
            return "\(file): \(size) bytes is larger than the \(maximum >> 20) MiB this loader accepts"
        }
    }
}
