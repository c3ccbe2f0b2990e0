#ifndef CSTORAGE_H
#define CSTORAGE_H
#include <stdint.h>

/// Linux file calls Swift's Glibc module does not import without _GNU_SOURCE.

/// Frees the host blocks of a range; it reads back as zeros and the file size is unchanged.
/// Returns 0, or -1 with errno (EOPNOTSUPP when the file system cannot punch holes).
int cstorage_punch_hole(int fd, int64_t offset, int64_t length);

/// An anonymous in-memory file (the fuzzer opens its inputs through one).
int cstorage_memfd(const char *name);
#endif
