/*
 * A small virtio driver, written from the virtio 1.2 specification, used to
 * check HyperCore's devices against QEMU's with the same guest.
 *
 * Transports: virtio-pci modern (capabilities, MSI-X) and virtio-mmio
 * version 2 (found through virtio_mmio.device=SIZE@ADDR:IRQ on the command
 * line). Devices: blk (dev=2), console (dev=3), rng (dev=4).
 *
 * Command line: dev=N, mmio=1 (use virtio-mmio), irq=1 (wait for MSI-X
 * interrupts with hlt instead of polling the used ring), ro=1 (expect a
 * read-only disk), rx=1 (console: also read a line of input), bench=1 with
 * bs=BYTES, depth=N, count=N, rand=1 (blk throughput run), end=N (blk: how the
 * run ends once the checks are done: 0 debug exit, 1 i8042 reset, 2 print
 * `parked` and spin with interrupts off, 3 triple fault).
 *
 * Every printed key=value line must be the same on HyperCore and QEMU.
 * The transport and virtqueue code is rt/virtio.c, shared with stateful.c.
 */
#include "rt.h"
#include "virtio.h"

#define EXIT_VIRTIO 0x40

#define F_INDIRECT VIRTIO_F_INDIRECT
#define F_EVENT_IDX VIRTIO_F_EVENT_IDX

#define VEC_CONFIG 0x40
#define VEC_QUEUE 0x41
#define LAPIC 0xfee00000ul

#define fail virtio_fail

/* How the blk test ends (end=N), so a test can check that the VMM closes the
 * disk the guest wrote to however the run ends. */
static void end_run(const char *cmdline)
{
	static const struct { u16 limit; u64 base; } __attribute__((packed)) no_idt = { 0, 0 };
	u64 end = 0;
	cmdline_uint(cmdline, "end", &end);
	switch (end) {
	case 1:
		i8042_reset();
	case 2:
		printf("parked\n");
		for (;;) __asm__ volatile("cli");
	case 3:
		/* #UD with an empty IDT: #GP, #DF, triple fault. */
		__asm__ volatile("lidt %0; ud2" :: "m"(no_idt));
	}
	debug_exit(EXIT_VIRTIO);
}

/* ---- transport (rt/virtio.c) ---- */

static int use_mmio, use_irq;
static struct vdev dev;
static struct vring rings[2];
static struct vq queues[2];

static u8 get_status(void) { return virtio_get_status(&dev); }
static u32 cfg32(u32 off) { return virtio_cfg32(&dev, off); }

static void setup_queue(struct vq *vq, u16 index)
{
	u16 max = virtio_queue_max(&dev, index);
	if (index == 0)
		printf("queue_max=%u\n", max);
	virtio_queue_setup(&dev, vq, index, max, &rings[index], use_irq ? 1 : -1);
}

#define kick virtio_kick
#define publish virtio_publish
#define used_idx virtio_used_idx

static volatile u64 irq_count;

static void on_irq(struct trap_frame *f)
{
	(void)f;
	irq_count++;
	mmio_write32(LAPIC + 0xb0, 0);	/* EOI */
}

/* Waits until `n` more used entries exist. Returns 0 on timeout. */
static int wait_used(struct vq *vq, u16 n) { return virtio_wait_used(vq, n, use_irq); }

/* ---- discovery ---- */

static void find_pci(u32 type)
{
	/* Memory decoding and bus mastering on, INTx off when interrupts come by MSI-X. */
	if (!virtio_find_pci(&dev, type, 0x6 | (use_irq ? 0x400 : 0)))
		fail("no virtio-pci device");
	printf("transport=pci\n");
}

static void find_mmio(const char *cmdline, u32 type)
{
	if (!virtio_find_mmio(&dev, cmdline, type))
		fail("no virtio-mmio device");
	printf("transport=mmio\n");
}

static void enable_msix(void)
{
	idt_init();
	idt_set_handler(VEC_CONFIG, on_irq);
	idt_set_handler(VEC_QUEUE, on_irq);
	mmio_write32(LAPIC + 0xf0, 0x1ff);	/* software-enable the LAPIC */
	outb(0x21, 0xff);			/* mask the 8259s: firmware may have left the PIT ticking */
	outb(0xa1, 0xff);
	u32 table = pci_read32(dev.pci_slot, dev.msix_cap + 4);
	u64 msix_table = pci_bar(dev.pci_slot, table & 7) + (table & ~7u);
	for (u32 v = 0; v < 2; v++) {
		u64 e = msix_table + 16 * v;
		mmio_write32(e + 0, 0xfee00000);	/* LAPIC 0 */
		mmio_write32(e + 4, 0);
		mmio_write32(e + 8, v == 0 ? VEC_CONFIG : VEC_QUEUE);
		mmio_write32(e + 12, 0);		/* unmasked */
	}
	pci_write16(dev.pci_slot, dev.msix_cap + 2, pci_read16(dev.pci_slot, dev.msix_cap + 2) | 0x8000);
	mmio_write16(dev.common + 0x10, 0);
	if (mmio_read16(dev.common + 0x10) != 0)
		fail("config vector refused");
}

/* Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK. Returns the negotiated set. */
static u64 negotiate(u64 wanted)
{
	u64 f = virtio_negotiate(&dev, wanted);
	printf("features_ok=1\n");
	return f;
}

static void driver_ok(void) { virtio_driver_ok(&dev); }

/* ---- virtio-blk ---- */

struct blk_hdr {
	u32 type, reserved;
	u64 sector;
};

#define BLK_IN 0
#define BLK_OUT 1
#define BLK_FLUSH 4
#define BLK_GET_ID 8
#define BLK_WRITE_ZEROES 13
#define MAXDEPTH 8
#define BENCH_BS (64 * 1024)

static struct blk_hdr hdrs[MAXDEPTH];
static volatile u8 statuses[MAXDEPTH];
static u8 sector_buf[MAXDEPTH][512];
static u8 bench_buf[MAXDEPTH][BENCH_BS] __attribute__((aligned(4096)));
static struct desc indirect_table[3] __attribute__((aligned(16)));

/* Builds request `slot` in descriptors 3*slot..3*slot+2; returns the head. */
static u16 blk_build(struct vq *vq, int slot, u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
	u16 h = 3 * slot;
	hdrs[slot].type = type;
	hdrs[slot].reserved = 0;
	hdrs[slot].sector = sector;
	statuses[slot] = 0xff;
	vq->desc[h] = (struct desc){ (u64)&hdrs[slot], 16, DESC_NEXT, h + 1 };
	if (len) {
		vq->desc[h + 1] = (struct desc){ (u64)buf, len, DESC_NEXT | (device_writes ? DESC_WRITE : 0), h + 2 };
		vq->desc[h + 2] = (struct desc){ (u64)&statuses[slot], 1, DESC_WRITE, 0 };
	} else {
		vq->desc[h + 1] = (struct desc){ (u64)&statuses[slot], 1, DESC_WRITE, 0 };
	}
	return h;
}

static int blk_do(struct vq *vq, u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
	publish(vq, blk_build(vq, 0, type, sector, buf, len, device_writes));
	kick(vq);
	if (!wait_used(vq, 1))
		fail("request timed out");
	return statuses[0];
}

static u32 checksum(const u8 *p, u32 n)
{
	u32 h = 2166136261u;
	for (u32 i = 0; i < n; i++)
		h = (h ^ p[i]) * 16777619u;
	return h;
}

static void bench(struct vq *vq, const char *cmdline, u64 capacity)
{
	u64 bs = BENCH_BS, depth = 4, count = 0, rnd = 0;
	cmdline_uint(cmdline, "bs", &bs);
	cmdline_uint(cmdline, "depth", &depth);
	cmdline_uint(cmdline, "rand", &rnd);
	if (bs < 512 || bs > BENCH_BS || bs % 512 || depth < 1 || depth > MAXDEPTH)
		fail("bad bench parameters");
	u64 blocks = capacity * 512 / bs;
	if (!cmdline_uint(cmdline, "count", &count) || count > blocks * 64)
		count = blocks;
	u64 submitted = 0, completed = 0, next_block = 0, seed = 12345;
	u64 sectors = bs / 512;
	/* The chains never change, only the header's sector: build them once. */
	for (u64 slot = 0; slot < depth; slot++)
		blk_build(vq, slot, BLK_IN, 0, bench_buf[slot], bs, 1);
	u64 start = rdtsc();
	while (completed < count) {
		while (submitted < count && submitted - completed < depth) {
			u64 block;
			if (rnd) {
				seed = seed * 6364136223846793005ul + 1442695040888963407ul;
				block = (seed >> 33) % blocks;
			} else {
				block = next_block++;
			}
			u64 slot = submitted % depth;
			hdrs[slot].sector = block * sectors;
			publish(vq, 3 * slot);
			submitted++;
		}
		kick(vq);
		/* Reap whatever is done (in order: each slot is reused only after its turn). */
		if (!wait_used(vq, 1))
			fail("bench request timed out");
		completed++;
		u16 now = used_idx(vq);
		while (now != vq->last_used && completed < submitted) {
			vq->last_used++;
			completed++;
		}
	}
	u64 cycles = rdtsc() - start;
	printf("bench_requests=%lu\n", count);
	printf("bench_bytes=%lu\n", count * bs);
	printf("bench_cycles=%lu\n", cycles);
}

static void test_blk(const char *cmdline)
{
	u64 ro = 0, want_bench = 0;
	cmdline_uint(cmdline, "ro", &ro);
	cmdline_uint(cmdline, "bench", &want_bench);
	u64 f = negotiate((1ul << 2) | (1ul << 5) | (1ul << 6) | (1ul << 9) | (1ul << 14) | F_INDIRECT |
			  (use_irq ? F_EVENT_IDX : 0));
	if (use_irq) enable_msix();
	setup_queue(&queues[0], 0);
	driver_ok();
	struct vq *vq = &queues[0];
	u64 capacity = (u64)cfg32(0) | (u64)cfg32(4) << 32;
	printf("capacity=%lu\n", capacity);
	if (want_bench) {
		bench(vq, cmdline, capacity);
		debug_exit(EXIT_VIRTIO);
	}
	printf("blk_size=%u\n", f & (1ul << 6) ? cfg32(20) : 0);
	printf("seg_max=%u\n", f & (1ul << 2) ? cfg32(12) : 0);
	printf("f_flush=%u\n", (u32)(f >> 9) & 1);
	printf("f_ro=%u\n", (u32)(f >> 5) & 1);
	printf("f_indirect=%u\n", (u32)(f >> 28) & 1);

	/* Write sector 1 with a pattern, read it back. */
	u8 *buf = sector_buf[0];
	for (int i = 0; i < 512; i++) buf[i] = (u8)(i * 7 + 3);
	int ws = blk_do(vq, BLK_OUT, 1, buf, 512, 0);
	printf("write=%d\n", ws);
	for (int i = 0; i < 512; i++) buf[i] = 0;
	printf("read=%d\n", blk_do(vq, BLK_IN, 1, buf, 512, 1));
	int same = 1;
	for (int i = 0; i < 512; i++) same &= buf[i] == (u8)(i * 7 + 3);
	if (!ro)
		printf("verify=%s\n", same ? "ok" : "bad");
	printf("sector1=%x\n", ro ? checksum(buf, 512) : 0);

	printf("flush=%d\n", blk_do(vq, BLK_FLUSH, 0, 0, 0, 1));

	char id[21];
	for (int i = 0; i < 21; i++) id[i] = 0;
	printf("get_id=%d\n", blk_do(vq, BLK_GET_ID, 0, id, 20, 1));
	printf("id=%s\n", id);

	printf("out_of_range=%d\n", blk_do(vq, BLK_IN, capacity, buf, 512, 1));
	printf("straddling_end=%d\n", blk_do(vq, BLK_IN, capacity - 1, sector_buf[0], 1024, 1));
	printf("last_read=%d\n", blk_do(vq, BLK_IN, capacity - 1, buf, 512, 1));
	printf("last=%x\n", checksum(buf, 512));
	printf("unsupported=%d\n", blk_do(vq, 0xff, 0, 0, 0, 1));

	/* Four reads in flight at once, one notify. */
	for (int s = 0; s < 4; s++)
		publish(vq, blk_build(vq, s, BLK_IN, 8 + s, sector_buf[s], 512, 1));
	kick(vq);
	if (!wait_used(vq, 4))
		fail("in-flight requests timed out");
	u32 sum = 0;
	int all_ok = 1;
	for (int s = 0; s < 4; s++) {
		all_ok &= statuses[s] == 0;
		sum ^= checksum(sector_buf[s], 512) + s;
	}
	printf("inflight=%s\n", all_ok ? "ok" : "bad");
	printf("inflight_sum=%x\n", sum);

	/* The same read through an indirect table. */
	if (f & F_INDIRECT) {
		hdrs[0] = (struct blk_hdr){ BLK_IN, 0, 9 };
		statuses[0] = 0xff;
		indirect_table[0] = (struct desc){ (u64)&hdrs[0], 16, DESC_NEXT, 1 };
		indirect_table[1] = (struct desc){ (u64)sector_buf[4], 512, DESC_NEXT | DESC_WRITE, 2 };
		indirect_table[2] = (struct desc){ (u64)&statuses[0], 1, DESC_WRITE, 0 };
		vq->desc[0] = (struct desc){ (u64)indirect_table, sizeof(indirect_table), DESC_INDIRECT, 0 };
		publish(vq, 0);
		kick(vq);
		if (!wait_used(vq, 1))
			fail("indirect request timed out");
		printf("indirect=%d\n", statuses[0]);
		printf("indirect_match=%u\n", checksum(sector_buf[4], 512) == checksum(sector_buf[1], 512));
	}

	if (!ro && (f & (1ul << 14))) {
		struct { u64 sector; u32 num, flags; } wz = { 2, 1, 0 };
		for (int i = 0; i < 512; i++) buf[i] = 0xaa;
		blk_do(vq, BLK_OUT, 2, buf, 512, 0);
		printf("write_zeroes=%d\n", blk_do(vq, BLK_WRITE_ZEROES, 0, &wz, sizeof(wz), 0));
		blk_do(vq, BLK_IN, 2, buf, 512, 1);
		u32 nonzero = 0;
		for (int i = 0; i < 512; i++) nonzero |= buf[i];
		printf("zeroed=%u\n", nonzero == 0);
	}
	if (use_irq)
		printf("interrupts=%s\n", irq_count > 0 ? "yes" : "no");
	printf("status=0x%x\n", get_status());
	end_run(cmdline);
}

/* ---- virtio-console ---- */

static char rx_buf[64];

static void test_console(const char *cmdline)
{
	u64 rx = 0;
	cmdline_uint(cmdline, "rx", &rx);
	negotiate(0);
	if (use_irq) enable_msix();
	setup_queue(&queues[0], 0);
	setup_queue(&queues[1], 1);
	driver_ok();
	if (rx) {
		queues[0].desc[0] = (struct desc){ (u64)rx_buf, sizeof(rx_buf) - 1, DESC_WRITE, 0 };
		publish(&queues[0], 0);
		kick(&queues[0]);
	}
	static const char msg[] = "hello from virtio-console\n";
	struct vq *tx = &queues[1];
	tx->desc[0] = (struct desc){ (u64)msg, sizeof(msg) - 1, 0, 0 };
	publish(tx, 0);
	kick(tx);
	printf("console_tx=%s\n", wait_used(tx, 1) ? "ok" : "timeout");
	if (rx) {
		if (!wait_used(&queues[0], 1))
			fail("no console input");
		u32 len = queues[0].used[2 + 2 * ((u16)(queues[0].last_used - 1) % queues[0].size)];
		if (len >= sizeof(rx_buf)) len = sizeof(rx_buf) - 1;
		rx_buf[len] = 0;
		while (len && (rx_buf[len - 1] == '\n' || rx_buf[len - 1] == '\r')) rx_buf[--len] = 0;
		printf("console_rx=%s\n", rx_buf);
	}
	printf("status=0x%x\n", get_status());
	debug_exit(EXIT_VIRTIO);
}

/* ---- virtio-rng ---- */

static u8 rng_buf[2][64];

static void test_rng(void)
{
	negotiate(0);
	if (use_irq) enable_msix();
	setup_queue(&queues[0], 0);
	driver_ok();
	struct vq *vq = &queues[0];
	u32 got[2];
	for (int i = 0; i < 2; i++) {
		vq->desc[0] = (struct desc){ (u64)rng_buf[i], 64, DESC_WRITE, 0 };
		publish(vq, 0);
		kick(vq);
		if (!wait_used(vq, 1))
			fail("rng timed out");
		got[i] = vq->used[2 + 2 * ((u16)(vq->last_used - 1) % vq->size)];
	}
	int differ = 0, nonzero = 0;
	for (int i = 0; i < 64; i++) {
		differ |= rng_buf[0][i] != rng_buf[1][i];
		nonzero |= rng_buf[0][i] != 0;
	}
	printf("rng_bytes=%u,%u\n", got[0], got[1]);
	printf("rng_random=%s\n", differ && nonzero ? "yes" : "no");
	printf("status=0x%x\n", get_status());
	debug_exit(EXIT_VIRTIO);
}

void guest_main(struct hvm_start_info *si)
{
	uart_init();
	const char *cmdline = pvh_cmdline(si);
	u64 dev = 2, v;
	cmdline_uint(cmdline, "dev", &dev);
	if (cmdline_uint(cmdline, "mmio", &v)) use_mmio = v != 0;
	if (cmdline_uint(cmdline, "irq", &v)) use_irq = v != 0 && !use_mmio;
	if (use_mmio) find_mmio(cmdline, dev);
	else find_pci(dev);
	switch (dev) {
	case 2: test_blk(cmdline); break;
	case 3: test_console(cmdline); break;
	case 4: test_rng(); break;
	default: fail("dev must be 2, 3 or 4");
	}
}
