#include "CStorage.h"
#include <fcntl.h>
#include <sys/mman.h>
#include <linux/falloc.h>

int cstorage_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int cstorage_memfd(const char *name) {
    return memfd_create(name, MFD_CLOEXEC);
}
