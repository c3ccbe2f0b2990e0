/// Opens a disk image for a device: VHDX when the file starts with the VHDX identifier (whatever
/// its name), raw otherwise. A `.vhdx`/`.avhdx` name that is not a VHDX is refused rather than
/// silently exposed to the guest as raw bytes.
public func openDisk(path: String, readOnly: Bool) throws(VHDXError) -> any BlockBackend {
    let format = try detectDiskFormat(path: path)
    switch format {
    case .vhdx: return try VHDXImage(path: path, options: .init(readOnly: readOnly))
    case .raw: return try RawImage(path: path, readOnly: readOnly)
    }
}

public enum DiskFormat: String, Sendable {
    case raw, vhdx

    /// The format a new file gets from its extension.
    public static func fromExtension(_ path: String) -> DiskFormat? {
        let lower = path.lowercased()
        if lower.hasSuffix(".vhdx") || lower.hasSuffix(".avhdx") { return .vhdx }
        if lower.hasSuffix(".img") || lower.hasSuffix(".raw") { return .raw }
        return nil
    }
}

/// The format of an existing file, by content.
public func detectDiskFormat(path: String) throws(VHDXError) -> DiskFormat {
    let file = try DiskFile(path: path, readOnly: true)
    let head = try file.read(count: 8, at: 0)
    if head.hasSignature("vhdxfile", at: 0) { return .vhdx }
    if DiskFormat.fromExtension(path) == .vhdx { throw .notVHDX(path: path) }
    return .raw
}
