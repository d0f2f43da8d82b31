#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# L2's half of tests/nested/real-heaps (runs in L2, cwd /opt/extra, with
# dmaheap-guest-tests beside it): L1's daemon exports L1's system heap, CMA heap, udmabuf
# and memfd as host-system, host-linux,cma, host-udmabuf and host-memfd, and a CMA heap
# with a 16 MiB quota as host-quota.
#   - every heap is there; sysfs says contiguous=1 for the CMA heaps, 0 for the others;
#   - the ABI cases abi-sizes, sync-name and android pass on the CMA heap;
#   - zero-copy (guest writes read in L1, L1's writes read in L2, through the daemon's
#     peek/poke), lifetime (mappings and dup'd fds keep a buffer) and free-returns (the
#     daemon and sysfs give everything back) on the system heap, the CMA heap and udmabuf;
#   - quota on host-quota: ENOMEM at the quota, room again after a free;
#   - host-pages on each heap: a 16 MiB buffer's page frames on L1 (all present; one run
#     for the CMA heap; reported for the others);
#   - host-sync on each heap with a host dma-buf (not memfd, which is NO_SYNC): SYNC
#     brackets reach the exporter's begin/end_cpu_access in L1.
# Prints `ok ...`/`FAIL ...` lines (tests/run-all counts them) and exits 1 on a failure.
set -u
P=host-
HEAPS="system linux,cma udmabuf memfd quota"
REAL_HEAPS="system linux,cma udmabuf"
pass=0 fail=0
ok() { echo "ok   $*" && pass=$((pass + 1)); }
bad() { echo "FAIL $*" && fail=$((fail + 1)); }

for h in $HEAPS; do
	d=$(echo /sys/bus/virtio/drivers/virtio_dmaheap/virtio*/heaps/"$P$h")
	if [ ! -e "/dev/dma_heap/$P$h" ] || [ ! -d "$d" ]; then
		bad "heap $P$h: missing (/dev/dma_heap: $(echo /dev/dma_heap/*))"
		continue
	fi
	want=0
	case "$h" in linux,cma | quota) want=1 ;; esac
	got=$(cat "$d/contiguous")
	if [ "$got" = "$want" ]; then
		ok "heap $P$h: sysfs contiguous=$got"
	else
		bad "heap $P$h: sysfs contiguous=$got, want $want"
	fi
done

# run_case HEAP CASE...: in-guest cases on one heap; their ok/FAIL lines name the heap.
# A missing heap failed once above: its cases are not run.
run_case() {
	h=$1
	shift
	[ -e "/dev/dma_heap/$P$h" ] || return 0
	./dmaheap-guest-tests --heap "$P$h" "$@" >/tmp/case.out 2>&1
	rc=$?
	sed -E -e '/^[0-9]* passed, [0-9]* failed$/d' -e '/^# heap under test/d' \
		-e "s/^(ok   |FAIL )([^ ]*)/\1\2 $P$h/" /tmp/case.out
	n=$(grep -c '^ok ' /tmp/case.out)
	pass=$((pass + n))
	n=$(grep -c '^FAIL ' /tmp/case.out)
	fail=$((fail + n))
	if [ "$rc" -ne 0 ] && [ "$n" -eq 0 ]; then
		bad "$* $P$h: dmaheap-guest-tests exited with status $rc"
	fi
}
# The CMA heap serves the dma-buf ABI as the others do (sizes up to 64 MiB, SYNC, names,
# the Android pattern).
run_case linux,cma abi-sizes sync-name android
for h in system linux,cma udmabuf memfd; do
	run_case "$h" host-pages
done
# memfd buffers are not dma-bufs: SYNC has nothing to reach there.
for h in $REAL_HEAPS; do
	run_case "$h" host-sync zero-copy lifetime free-returns
done
run_case quota quota
echo "# l2-real-heaps: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
