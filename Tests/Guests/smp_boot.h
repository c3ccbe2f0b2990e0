/*
 * Starting application processors with INIT-SIPI-SIPI through the xAPIC,
 * shared by smp.c and stateful.c (linked with smp_ap.S, the trampoline).
 */
#ifndef SMP_BOOT_H
#define SMP_BOOT_H
#include "rt.h"

/*
 * Waits assume a TSC of about 2 GHz. Only their order of magnitude matters:
 * KVM's and QEMU's APICs need none of them.
 */
#define TSC_PER_US	2000

void delay_us(u64 us);
/* Copies the trampoline to 0x8000, makes `entry` the APs' long-mode
 * continuation, and sends INIT, then two SIPIs, to all but self. */
void smp_start_aps(const void *entry);

#endif
