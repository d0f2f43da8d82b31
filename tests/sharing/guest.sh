#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs inside the guest booted by tests/sharing/run (busybox sh, cwd /opt/extra): loads
# the test importer's driver, runs the sharing cases on heap HEAP, unloads the driver.
# Prints `ok NAME` / `FAIL NAME: why` lines; exits non-zero if anything failed.
PATH=/opt/extra:$PATH
heap=${1:-host-share}
rc=0
fail() { echo "FAIL $1"; rc=1; }

bound() { ls -d /sys/bus/virtio/drivers/dmaheap_sharing/virtio* >/dev/null 2>&1; }
if ! insmod /opt/extra/dmaheap_sharing.ko; then
	fail "insmod-dmaheap_sharing: insmod failed"
	exit 1
fi
i=0
while ! bound && [ $i -lt 50 ]; do
	sleep 0.1
	i=$((i + 1))
done
if bound && [ -c /dev/dmaheap_sharing ]; then
	echo "ok   importer-device-bound"
else
	fail "importer-device-bound: no virtio device 38 bound to dmaheap_sharing, or no /dev/dmaheap_sharing"
	ls /sys/bus/virtio/devices/*/device 2>/dev/null | while read -r f; do echo "# $f: $(cat "$f")"; done
	exit 1
fi
dmaheap-guest-tests --heap "$heap" sharing-roundtrip sharing-lifetime sharing-unknown sharing-small \
	sharing-killable sharing-remove || rc=1
# Hostile local clients on the daemon's export socket (host hook; prints its own lines).
rg-host export-abuse || rc=1
# Removal with nothing in flight; after the reload (and the abuse) sharing still works.
if rmmod dmaheap_sharing; then
	echo "ok   rmmod-dmaheap_sharing"
else
	fail "rmmod-dmaheap_sharing: rmmod failed"
fi
if insmod /opt/extra/dmaheap_sharing.ko &&
	dmaheap-guest-tests --heap "$heap" sharing-roundtrip sharing-unknown >/tmp/again 2>&1; then
	echo "ok   reload-dmaheap_sharing"
else
	cat /tmp/again
	fail "reload-dmaheap_sharing: sharing-roundtrip or sharing-unknown failed after rmmod, insmod and the export socket abuse"
fi
exit $rc
