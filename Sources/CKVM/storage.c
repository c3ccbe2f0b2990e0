#include "ckvm_storage.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <linux/falloc.h>
#include <unistd.h>

int cstorage_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int cstorage_memfd(const char *name) {
    return memfd_create(name, MFD_CLOEXEC);
}

int64_t cstorage_copy_range(int from_fd, int64_t from_offset, int to_fd, int64_t to_offset, int64_t length) {
    off64_t in = from_offset, out = to_offset;
    return copy_file_range(from_fd, &in, to_fd, &out, (size_t)length, 0);
}
