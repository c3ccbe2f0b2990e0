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
u8 virtio_cfg8(struct vdev *d, u32 off);
u16 virtio_cfg16(struct vdev *d, u32 off);

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

/* ---- virtio-net (§5.1): polling driver, one rx and one tx queue ---- */

#define VIRTIO_NET_F_MTU	(1ul << 3)
#define VIRTIO_NET_F_MAC	(1ul << 5)
#define VIRTIO_NET_F_MRG_RXBUF	(1ul << 15)
#define VIRTIO_NET_F_STATUS	(1ul << 16)
#define VIRTIO_NET_S_LINK_UP	1
#define VIRTIO_NET_HDR		12	/* struct virtio_net_hdr_v1 */
#define VNET_BUF		2048	/* bytes per rx and tx buffer (header included) */

struct vnet {
	struct vdev *dev;
	struct vq rx, tx;
	u8 (*rxbuf)[VNET_BUF], (*txbuf)[VNET_BUF];
	u16 tx_free;		/* tx descriptors not in flight */
	u64 features;
	u8 mac[6];
	u16 status, mtu;
};

/*
 * Negotiates (MAC, STATUS, MTU, MRG_RXBUF of `wanted`), sets up rx 0 and
 * tx 1 in `rings` with VIRTIO_QSZ buffers each from `rxbuf`/`txbuf`, posts
 * every rx buffer and sets DRIVER_OK.
 */
void vnet_init(struct vnet *n, struct vdev *d, u64 wanted, struct vring rings[2],
	       u8 (*rxbuf)[VNET_BUF], u8 (*txbuf)[VNET_BUF]);
/* Sends one Ethernet frame (len <= VNET_BUF - 12). Returns 0 if no tx buffer was free. */
int vnet_send(struct vnet *n, const void *frame, u32 len);
/*
 * The next received frame, copied into `frame` (up to `cap` bytes), or -1
 * when none is waiting. `num_buffers` gets the header's count.
 */
int vnet_recv(struct vnet *n, void *frame, u32 cap, u16 *num_buffers);

/*
 * The batched path (net.c's batch=B): every tx buffer holds the same frame,
 * written once by vnet_fill_tx; vnet_send_filled queues it and notifies the
 * device only when `kick` is set or the ring is full (0 when no buffer is
 * free). vnet_rx_next returns the next received frame in place (its length
 * in *len, its buffer in *id) or 0; vnet_rx_release gives the buffer back once
 * read, and the caller notifies the rx queue once per batch.
 */
void vnet_fill_tx(struct vnet *n, const void *frame, u32 len);
int vnet_send_filled(struct vnet *n, u32 len, int kick);
const u8 *vnet_rx_next(struct vnet *n, u32 *len, u16 *id);
void vnet_rx_release(struct vnet *n, u16 id);

#endif
