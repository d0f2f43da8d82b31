// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
/*
 * l1-pfns PID LEN [EVENTS]: the page frames behind a buffer mapped by process PID, for
 * tests/nested (runs in L1 as root, built static by tests/nested/run).
 *
 * Looks in /proc/PID/maps for shared mappings of a dma-buf (/dmabuf:) or a memfd
 * (/memfd:) exactly LEN bytes long and prints one line per mapping:
 *
 *   map START-END present=P/N runs=R first_pfn=0x.. contiguous=yes|no from=SRC PATH
 *
 * A page's frame comes from /proc/PID/pagemap (needs CAP_SYS_ADMIN) or, for mappings
 * pagemap skips (VM_PFNMAP: every dma-heap and udmabuf mapping), from EVENTS: lines
 * `ADDR PFN SIZE` (decimal) saying the kernel mapped SIZE bytes of frames from PFN on at
 * ADDR (kprobes on vmf_insert_pfn and remap_pfn_range, see l1-hook.sh). present: pages
 * with a known frame (a page nobody touched yet has none); runs: maximal runs of
 * consecutive frames in address order; contiguous=yes when every page is known and they
 * form one run. SRC: pagemap, events, both or none.
 * Exit status 0 if a mapping matched, 1 if none did, 2 on a usage or I/O error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096UL
#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)

struct event {
	uint64_t addr, pfn, size;
};

static struct event *events;
static size_t nevents;

static int load_events(const char *path)
{
	FILE *f = fopen(path, "r");
	size_t cap = 0;
	struct event e;

	if (!f) {
		fprintf(stderr, "l1-pfns: %s: %s\n", path, strerror(errno));
		return -1;
	}
	while (fscanf(f, "%" SCNu64 " %" SCNu64 " %" SCNu64, &e.addr, &e.pfn, &e.size) == 3) {
		if (nevents == cap) {
			cap = cap ? 2 * cap : 1024;
			events = realloc(events, cap * sizeof(*events));
			if (!events)
				return -1;
		}
		events[nevents++] = e;
	}
	fclose(f);
	return 0;
}

static int report(int pm, unsigned long start, unsigned long end, const char *path)
{
	size_t n = (end - start) / PAGE, present = 0, runs = 0, i, k;
	uint64_t *pfn = calloc(n, sizeof(*pfn)), first = 0, prev = 0;
	int from_pagemap = 0, from_events = 0;
	ssize_t got;

	if (!pfn)
		return -1;
	got = pread(pm, pfn, n * sizeof(*pfn), (off_t)(start / PAGE) * sizeof(*pfn));
	if (got != (ssize_t)(n * sizeof(*pfn))) {
		fprintf(stderr, "l1-pfns: pagemap read at %#lx: %s\n", start,
			got < 0 ? strerror(errno) : "short read");
		free(pfn);
		return -1;
	}
	for (i = 0; i < n; i++) {
		if ((pfn[i] & PM_PRESENT) && (pfn[i] & PM_PFN_MASK))
			from_pagemap = 1;
		pfn[i] = pfn[i] & PM_PRESENT ? pfn[i] & PM_PFN_MASK : 0;
	}
	/* The events fill in what pagemap does not show (and agree where both do). */
	for (k = 0; k < nevents; k++) {
		uint64_t a = events[k].addr, off;

		if (a < start || a >= end)
			continue;
		for (off = 0; off < events[k].size && a + off < end; off += PAGE) {
			i = (a + off - start) / PAGE;
			if (!pfn[i])
				pfn[i] = events[k].pfn + off / PAGE;
			from_events = 1;
		}
	}
	for (i = 0; i < n; i++) {
		if (!pfn[i])
			continue;
		if (!present++)
			first = pfn[i];
		if (present == 1 || pfn[i] != prev + 1)
			runs++;
		prev = pfn[i];
	}
	printf("map %lx-%lx present=%zu/%zu runs=%zu first_pfn=%#" PRIx64
	       " contiguous=%s from=%s %s\n", start, end, present, n, runs, first,
	       present == n && runs == 1 ? "yes" : "no",
	       from_pagemap ? (from_events ? "both" : "pagemap") :
			      (from_events ? "events" : "none"), path);
	free(pfn);
	return 0;
}

int main(int argc, char **argv)
{
	char fn[64], line[4096];
	unsigned long want_len;
	int pm, found = 0;
	FILE *maps;

	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: l1-pfns PID LEN [EVENTS]\n");
		return 2;
	}
	want_len = strtoul(argv[2], NULL, 0);
	if (argc == 4 && load_events(argv[3]))
		return 2;
	snprintf(fn, sizeof(fn), "/proc/%s/maps", argv[1]);
	maps = fopen(fn, "r");
	snprintf(fn, sizeof(fn), "/proc/%s/pagemap", argv[1]);
	pm = open(fn, O_RDONLY);
	if (!maps || pm < 0) {
		fprintf(stderr, "l1-pfns: /proc/%s: %s\n", argv[1], strerror(errno));
		return 2;
	}
	while (fgets(line, sizeof(line), maps)) {
		unsigned long start, end, off, inode;
		char perms[8], dev[16];
		int pos = 0;
		char *path;

		if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &start, &end, perms, &off, dev,
			   &inode, &pos) < 6 || !pos)
			continue;
		path = line + pos;
		path[strcspn(path, "\n")] = 0;
		if (end - start != want_len || perms[3] != 's')
			continue;
		if (strncmp(path, "/dmabuf:", 8) && strncmp(path, "/memfd:", 7))
			continue;
		if (report(pm, start, end, path))
			return 2;
		found++;
	}
	return found ? 0 : 1;
}
