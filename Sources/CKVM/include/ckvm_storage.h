// Linux file calls the storage layer needs that Swift's Glibc module does not import without
// _GNU_SOURCE (part of CKVM, the project's one C module; the definitions are in storage.c).
#ifndef CKVM_STORAGE_H
#define CKVM_STORAGE_H
#include <stdint.h>
/// Frees the host blocks of a range; it reads back as zeros and the file size is unchanged.
/// Returns 0, or -1 with errno (EOPNOTSUPP when the file system cannot punch holes).
int cstorage_punch_hole(int fd, int64_t offset, int64_t length);

/// Copies a byte range between files inside the kernel (no user-space copy; a reflink where the file
/// system can). Returns bytes copied, or -1 with errno.
int64_t cstorage_copy_range(int from_fd, int64_t from_offset, int to_fd, int64_t to_offset, int64_t length);

/// An anonymous in-memory file (the fuzzer opens its inputs through one).
int cstorage_memfd(const char *name);

/// libFuzzer's entry point for programs with their own main (the vhdx-fuzz target under
/// -sanitize=fuzzer, where SwiftPM routes main to the target's own symbol). Only declared here.
#include <stddef.h>
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

#endif
