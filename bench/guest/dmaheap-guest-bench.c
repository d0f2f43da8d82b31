// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * In-guest benchmarks of virtio-dmaheap (P2, P3-guest, P4 of bench/README.md): the
 * virtio heap (host-backed, /dev/dma_heap/host-system) against the guest kernel's own
 * `system` heap, in the same VM and the same run, with the same code.
 *
 * Static binary built with the trixie tree's gcc (bench/run does it). Output: one line
 * per result, `BENCH {json}`, which bench/report.py collects.
 *
 *   dmaheap-guest-bench [--quick] [--virtio NAME] [--system NAME] [p2] [p3] [p4]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <linux/dma-buf.h>
#include <linux/dma-heap.h>

#define KIB 1024ULL
#define MIB (1024ULL * 1024ULL)
#define PAGE 4096ULL

static int quick;

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int open_heap(const char *name)
{
	char path[128];
	int fd;

	snprintf(path, sizeof(path), "/dev/dma_heap/%s", name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "open %s: %s\n", path, strerror(errno));
		exit(1);
	}
	return fd;
}

/* Returns the dma-buf fd or -errno. */
static int heap_alloc(int heap, uint64_t len)
{
	struct dma_heap_allocation_data d = {
		.len = len,
		.fd_flags = O_RDWR | O_CLOEXEC,
	};

	if (ioctl(heap, DMA_HEAP_IOCTL_ALLOC, &d) < 0)
		return -errno;
	return (int)d.fd;
}

static void buf_sync(int fd, uint64_t flags)
{
	struct dma_buf_sync s = { .flags = flags };

	if (ioctl(fd, DMA_BUF_IOCTL_SYNC, &s) < 0) {
		perror("DMA_BUF_IOCTL_SYNC");
		exit(1);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

struct summary {
	int n;
	double median, p99, min, mean;
};

/* Nearest-rank percentiles; sorts v. */
static struct summary summarize(double *v, int n)
{
	struct summary s = { .n = n };
	double sum = 0;
	int i, r;

	qsort(v, n, sizeof(*v), cmp_double);
	for (i = 0; i < n; i++)
		sum += v[i];
	r = (n + 1) / 2;
	s.median = v[r - 1];
	r = (int)((99 * (long)n + 99) / 100);
	s.p99 = v[(r < 1 ? 1 : r) - 1];
	s.min = v[0];
	s.mean = sum / n;
	return s;
}

static void print_summary(const char *key, struct summary s, int comma)
{
	printf("\"%s\":{\"n\":%d,\"median_us\":%.3f,\"p99_us\":%.3f,\"min_us\":%.3f,"
	       "\"mean_us\":%.3f}%s",
	       key, s.n, s.median, s.p99, s.min, s.mean, comma ? "," : "");
}

static void die_alloc(const char *what, uint64_t len, int err)
{
	fprintf(stderr, "%s: alloc of %llu bytes: %s\n", what,
		(unsigned long long)len, strerror(-err));
	exit(1);
}

/* alloc + mmap + touch one byte per page + munmap + close. */
static double once_touch(int heap, uint64_t len, const char *what)
{
	double t0 = now_us();
	int fd = heap_alloc(heap, len);
	volatile uint8_t *p;
	uint64_t off;

	if (fd < 0)
		die_alloc(what, len, fd);
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	for (off = 0; off < len; off += PAGE)
		p[off] = 1;
	munmap((void *)p, len);
	close(fd);
	return now_us() - t0;
}

/* alloc + close (no CPU access). */
static double once_bare(int heap, uint64_t len, const char *what)
{
	double t0 = now_us();
	int fd = heap_alloc(heap, len);

	if (fd < 0)
		die_alloc(what, len, fd);
	close(fd);
	return now_us() - t0;
}

/* Unrecorded rounds of the P2 cases before each size's measurement. */
#define WARM_ROUNDS 3

static void bench_p2(int vheap, int sheap)
{
	static const uint64_t full[] = { 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB,
					 2 * MIB, 4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB,
					 64 * MIB };
	static const uint64_t small[] = { 4 * KIB, 64 * KIB, MIB, 8 * MIB, 64 * MIB };
	const uint64_t *sizes = quick ? small : full;
	int nsizes = quick ? 5 : 11;
	double budget = quick ? 0.3e6 : 2.0e6;
	int max_iters = quick ? 100 : 10000, min_iters = quick ? 5 : 15;
	int i, k;

	for (i = 0; i < nsizes; i++) {
		uint64_t len = sizes[i];
		double *v[4];
		int n = 0;
		double start;
		struct summary s[4];

		for (k = 0; k < 4; k++)
			v[k] = calloc(max_iters, sizeof(double));
		/*
		 * Warm-up, not recorded: a few rounds of the same cases, so that
		 * both heaps reach their steady state (the virtio heap's pool
		 * holds as many buffers of the size as its zeroing worker needs,
		 * each touched once). The system heap goes first: its first, cold
		 * run can take over a second in a nested guest, and that wait
		 * would idle the virtio heap past the device's spare delay (spec
		 * A.5), un-warming it. The after-idle case measures that gap on
		 * purpose.
		 */
		for (k = 0; k < WARM_ROUNDS; k++) {
			once_touch(sheap, len, "system");
			once_touch(vheap, len, "virtio");
			once_bare(sheap, len, "system");
			once_bare(vheap, len, "virtio");
		}
		start = now_us();
		/* Interleaved, order rotating, so noise hits both heaps alike. */
		while (n < max_iters && (n < min_iters || now_us() - start < budget)) {
			if (n & 1) {
				v[0][n] = once_touch(vheap, len, "virtio");
				v[1][n] = once_touch(sheap, len, "system");
				v[2][n] = once_bare(vheap, len, "virtio");
				v[3][n] = once_bare(sheap, len, "system");
			} else {
				v[1][n] = once_touch(sheap, len, "system");
				v[0][n] = once_touch(vheap, len, "virtio");
				v[3][n] = once_bare(sheap, len, "system");
				v[2][n] = once_bare(vheap, len, "virtio");
			}
			n++;
		}
		for (k = 0; k < 4; k++)
			s[k] = summarize(v[k], n);
		printf("BENCH {\"part\":\"p2\",\"size\":%llu,", (unsigned long long)len);
		print_summary("virtio_touch", s[0], 1);
		print_summary("system_touch", s[1], 1);
		print_summary("virtio_bare", s[2], 1);
		print_summary("system_bare", s[3], 1);
		printf("\"ratio_median\":%.3f,\"ratio_p99\":%.3f,\"bare_ratio_median\":%.3f}\n",
		       s[0].median / s[1].median, s[0].p99 / s[1].p99,
		       s[2].median / s[3].median);
		fflush(stdout);
		for (k = 0; k < 4; k++)
			free(v[k]);
	}
}

/*
 * The first alloc + touch after the heaps sat idle longer than the device keeps spare
 * mappings (1 s with a session, spec A.5): the virtio heap maps fresh host memory then.
 * Median of a few samples per size; not part of the P2 target, which is steady state.
 */
static void bench_p2_after_idle(int vheap, int sheap)
{
	static const uint64_t full[] = { MIB, 8 * MIB, 64 * MIB };
	static const uint64_t small[] = { MIB };
	const uint64_t *sizes = quick ? small : full;
	int nsizes = quick ? 1 : 3, reps = 3, i, k;
	unsigned int idle_s = 2;

	for (i = 0; i < nsizes; i++) {
		double v[3], s[3];
		struct summary sv, ss;

		for (k = 0; k < reps; k++) {
			sleep(idle_s);
			v[k] = once_touch(vheap, sizes[i], "virtio");
			s[k] = once_touch(sheap, sizes[i], "system");
		}
		sv = summarize(v, reps);
		ss = summarize(s, reps);
		printf("BENCH {\"part\":\"p2idle\",\"size\":%llu,\"idle_s\":%u,",
		       (unsigned long long)sizes[i], idle_s);
		print_summary("virtio_touch", sv, 1);
		print_summary("system_touch", ss, 1);
		printf("\"ratio_median\":%.3f}\n", sv.median / ss.median);
		fflush(stdout);
	}
}

/* Write bandwidth: memset of a whole mapped buffer, bracketed by SYNC start/end. */
static void bench_p4(int vheap, int sheap)
{
	uint64_t len = quick ? 16 * MIB : 64 * MIB;
	int passes = quick ? 6 : 40;
	int heaps[2] = { vheap, sheap }, fds[2];
	uint8_t *p[2];
	double first[2], *gbs[2], *pair;
	struct summary s[2], sp;
	int h, i;

	for (h = 0; h < 2; h++) {
		fds[h] = heap_alloc(heaps[h], len);
		if (fds[h] < 0)
			die_alloc(h ? "system" : "virtio", len, fds[h]);
		p[h] = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[h], 0);
		if (p[h] == MAP_FAILED) {
			perror("mmap");
			exit(1);
		}
		gbs[h] = calloc(passes, sizeof(double));
	}
	/* First pass: includes whatever faulting / first touch costs. */
	for (h = 0; h < 2; h++) {
		double t0 = now_us();

		buf_sync(fds[h], DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE);
		memset(p[h], 0x5a, len);
		buf_sync(fds[h], DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE);
		first[h] = len / ((now_us() - t0) * 1e3); /* GB/s */
	}
	for (i = 0; i < passes; i++) {
		for (h = 0; h < 2; h++) {
			int hh = (i & 1) ? 1 - h : h;
			double t0 = now_us();

			buf_sync(fds[hh], DMA_BUF_SYNC_START | DMA_BUF_SYNC_WRITE);
			memset(p[hh], i & 0xff, len);
			buf_sync(fds[hh], DMA_BUF_SYNC_END | DMA_BUF_SYNC_WRITE);
			gbs[hh][i] = len / ((now_us() - t0) * 1e3);
		}
	}
	/* Per-pass ratio of the two heaps (each pair ran back to back: robust to drifting
	 * load from other processes). */
	pair = calloc(passes, sizeof(double));
	for (i = 0; i < passes; i++)
		pair[i] = gbs[0][i] / gbs[1][i];
	sp = summarize(pair, passes);
	free(pair);
	for (h = 0; h < 2; h++) {
		s[h] = summarize(gbs[h], passes);
		munmap(p[h], len);
		close(fds[h]);
		free(gbs[h]);
	}
	printf("BENCH {\"part\":\"p4\",\"size\":%llu,\"passes\":%d,"
	       "\"virtio_gbps_median\":%.4f,\"virtio_gbps_max\":%.4f,\"virtio_gbps_first\":%.4f,"
	       "\"system_gbps_median\":%.4f,\"system_gbps_max\":%.4f,\"system_gbps_first\":%.4f,"
	       "\"ratio_median\":%.3f,\"ratio_paired_median\":%.3f,\"ratio_first\":%.3f}\n",
	       (unsigned long long)len, passes, s[0].median, s[0].p99, first[0], s[1].median,
	       s[1].p99, first[1], s[0].median / s[1].median, sp.median,
	       first[0] / first[1]);
	fflush(stdout);
}

/* Scale: latency of alloc + close of one more 4 KiB buffer while N are live. */
static void bench_p3(int heap, const char *name)
{
	static const int full[] = { 1, 100, 1000, 10000, 65536 };
	static const int small[] = { 1, 100, 1000 };
	const int *levels = quick ? small : full;
	int nlevels = quick ? 3 : 5;
	int iters = quick ? 100 : 500;
	int maxn = levels[nlevels - 1];
	struct rlimit rl = { .rlim_cur = maxn + 4096, .rlim_max = maxn + 4096 };
	int *fds = calloc(maxn, sizeof(int));
	double *v = calloc(iters, sizeof(double));
	int live = 0, li, i, err = 0;

	if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
		perror("setrlimit(RLIMIT_NOFILE)");
	for (li = 0; li < nlevels && !err; li++) {
		double t0 = now_us(), fill;
		int from = live;
		struct summary s;

		while (live < levels[li]) {
			int fd = heap_alloc(heap, PAGE);

			if (fd < 0) {
				err = -fd;
				break;
			}
			fds[live++] = fd;
		}
		fill = (now_us() - t0) / (live - from > 0 ? live - from : 1);
		if (err) {
			printf("BENCH {\"part\":\"p3\",\"heap\":\"%s\",\"stop_live\":%d,"
			       "\"wanted\":%d,\"errno\":%d,\"error\":\"%s\"}\n",
			       name, live, levels[li], err, strerror(err));
			break;
		}
		for (i = 0; i < iters; i++)
			v[i] = once_bare(heap, PAGE, name);
		s = summarize(v, iters);
		printf("BENCH {\"part\":\"p3\",\"heap\":\"%s\",\"live\":%d,"
		       "\"fill_us_per_buffer\":%.3f,",
		       name, live, fill);
		print_summary("alloc_free", s, 0);
		printf("}\n");
		fflush(stdout);
	}
	{
		double t0 = now_us();

		for (i = 0; i < live; i++)
			close(fds[i]);
		printf("BENCH {\"part\":\"p3_release\",\"heap\":\"%s\",\"buffers\":%d,"
		       "\"us_per_buffer\":%.3f}\n",
		       name, live, (now_us() - t0) / (live ? live : 1));
	}
	free(fds);
	free(v);
}

int main(int argc, char **argv)
{
	const char *vname = "host-system", *sname = "system";
	int do_p2 = 0, do_p3 = 0, do_p4 = 0, i, vheap, sheap;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--quick"))
			quick = 1;
		else if (!strcmp(argv[i], "--virtio") && i + 1 < argc)
			vname = argv[++i];
		else if (!strcmp(argv[i], "--system") && i + 1 < argc)
			sname = argv[++i];
		else if (!strcmp(argv[i], "p2"))
			do_p2 = 1;
		else if (!strcmp(argv[i], "p3"))
			do_p3 = 1;
		else if (!strcmp(argv[i], "p4"))
			do_p4 = 1;
		else {
			fprintf(stderr, "usage: %s [--quick] [--virtio NAME] [--system NAME] "
				"[p2] [p3] [p4]\n", argv[0]);
			return 2;
		}
	}
	if (!do_p2 && !do_p3 && !do_p4)
		do_p2 = do_p3 = do_p4 = 1;
	vheap = open_heap(vname);
	sheap = open_heap(sname);
	printf("BENCH {\"part\":\"guest\",\"virtio_heap\":\"%s\",\"system_heap\":\"%s\","
	       "\"quick\":%d,\"ncpu\":%ld}\n",
	       vname, sname, quick, sysconf(_SC_NPROCESSORS_ONLN));
	fflush(stdout);
	if (do_p2) {
		bench_p2(vheap, sheap);
		bench_p2_after_idle(vheap, sheap);
	}
	if (do_p4)
		bench_p4(vheap, sheap);
	if (do_p3)
		bench_p3(vheap, "virtio");
	return 0;
}
