/*
 * A small virtio 1.2 driver core, written from the specification and shared
 * by virtio.elf and stateful.elf: the virtio-pci modern and virtio-mmio
 * (version 2) transports, feature negotiation, split virtqueues.
 *
 * It prints nothing: callers print what they report. Transport errors it
 * cannot recover from print `error=…` and end the guest with 0x7F.
 */
#ifndef RT_VIRTIO_H
#define RT_VIRTIO_H
#include "rt.h"

#define VIRTIO_ST_ACK		1
#define VIRTIO_ST_DRIVER	2
#define VIRTIO_ST_DRIVER_OK	4
#define VIRTIO_ST_FEATURES_OK	8

#define VIRTIO_F_INDIRECT	(1ul << 28)
#define VIRTIO_F_EVENT_IDX	(1ul << 29)
#define VIRTIO_F_VERSION_1	(1ul << 32)

#define DESC_NEXT	1
#define DESC_WRITE	2
#define DESC_INDIRECT	4

#define VIRTIO_QSZ	32	/* entries per queue, or the device's maximum if smaller */

/* One device, on either transport. */
struct vdev {
	int mmio;
	u64 mmio_base;				/* virtio-mmio */
	u64 common, isr, devcfg, notify_base;	/* virtio-pci capabilities */
	u32 notify_mul, msix_cap;
	int pci_slot;
};

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

/* The memory of one split virtqueue (each part page aligned). */
struct vring {
	struct desc desc[VIRTIO_QSZ] __attribute__((aligned(4096)));
	u16 avail[VIRTIO_QSZ + 3] __attribute__((aligned(4096)));	/* flags, idx, ring[], used_event */
	u32 used[2 * VIRTIO_QSZ + 2] __attribute__((aligned(4096)));	/* flags|idx, {id, len}[], avail_event */
};

struct vq {
	struct vdev *dev;
	u16 index, size;
	volatile struct desc *desc;
	volatile u16 *avail;
	volatile u32 *used;
	u16 avail_idx, last_used;
	u64 notify;
};

void __attribute__((noreturn)) virtio_fail(const char *what);

/*
 * Finds the virtio-pci device of this type on bus 0 and its capabilities,
 * with `command` written to the PCI command register first. 0 if absent.
 */
int virtio_find_pci(struct vdev *d, u32 type, u16 command);
/* The virtio_mmio.device=SIZE@ADDR:IRQ entry holding this device type. 0 if none. */
int virtio_find_mmio(struct vdev *d, const char *cmdline, u32 type);

u8 virtio_get_status(struct vdev *d);
void virtio_set_status(struct vdev *d, u8 s);
/* Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (§3.1.1). Returns the negotiated set. */
u64 virtio_negotiate(struct vdev *d, u64 wanted);
void virtio_driver_ok(struct vdev *d);
u32 virtio_cfg32(struct vdev *d, u32 off);

/* Selects queue `index` and returns its maximum size. */
u16 virtio_queue_max(struct vdev *d, u16 index);
/*
 * Sets up the selected queue `index` (max from virtio_queue_max) in `ring`;
 * msix_vector is the PCI queue vector, or -1 for none.
 */
void virtio_queue_setup(struct vdev *d, struct vq *vq, u16 index, u16 max, struct vring *ring, int msix_vector);

/* Makes chain `head` available (no notify). */
void virtio_publish(struct vq *vq, u16 head);
void virtio_kick(struct vq *vq);
u16 virtio_used_idx(struct vq *vq);
/*
 * Waits until `n` more used entries exist, polling, or with `sleep` in
 * `sti; hlt` (EVENT_IDX used_event set). Returns 0 on timeout.
 */
int virtio_wait_used(struct vq *vq, u16 n, int sleep);

#endif
