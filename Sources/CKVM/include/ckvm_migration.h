#ifndef CKVM_MIGRATION_H
#define CKVM_MIGRATION_H
#include <stddef.h>
#include <stdint.h>

// MARK: - Live migration (migration.c)

/// 1 when this CPU has SSE4.2's crc32 instruction (ckvm_crc32c may be used), else 0.
int ckvm_crc32c_hardware(void);
/// CRC-32C of `n` bytes continuing from `crc` (same convention as the Swift CRC32C), with the
/// SSE4.2 instruction: call only when ckvm_crc32c_hardware() is 1.
uint32_t ckvm_crc32c(uint32_t crc, const void *_Nonnull p, size_t n);
/// writev over `count` (≤ 1024) buffers — on a socket sendmsg with MSG_NOSIGNAL, so a closed peer
/// is -EPIPE, never SIGPIPE. Returns bytes written or -errno.
long ckvm_writev(int fd, const void *_Nonnull const *_Nonnull bases, const size_t *_Nonnull lengths, int count);
/// prctl(PR_SET_PDEATHSIG): `signal` (0: none) is sent to this process when its parent ends.
/// Returns 0 or -errno.
int ckvm_set_parent_death_signal(int signal);

#endif
