#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
#
# Build virtio_dmaheap.ko for the guest kernel inside the provisioned trixie
# tree (tests/vm/provision), warning-free (W=1, warnings are errors).
#
#   guest-driver/build.sh            -> build/guest-driver/virtio_dmaheap.ko
#   guest-driver/build.sh DIR NAME   -> build/guest-driver/NAME.ko from DIR (e.g. the
#                                       test-only importer in tests/guest/importer)
#
# Environment:
#   VIRTIO_DMAHEAP_ROOT    the tree      (default /var/cache/virtio-dmaheap/trixie)
#   VIRTIO_DMAHEAP_KVER    kernel        (default 7.3.4+deb13-amd64)
#   VIRTIO_DMAHEAP_KO_DIR  output dir    (default <repo>/build/guest-driver, and
#                                         <repo>/build/guest-driver/KVER for any other
#                                         kernel, e.g. one of tests/kernel/build)
#   VIRTIO_DMAHEAP_EXTRA_SYMBOLS  a Module.symvers of modules the driver links against
#                                 besides the kernel's (KBUILD_EXTRA_SYMBOLS), e.g.
#                                 the dma-heap core of tests/vm/build-dma-heaps
#
# Idempotent: sources are copied (mtimes kept) into a build directory inside
# the tree (one per checkout), so make rebuilds only what changed. /proc is mounted for objtool in
# a private mount namespace, so nothing is left mounted and other users of the
# tree are not disturbed. Prints the path of the module on success.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
src=$(cd "${1:-$here}" && pwd)
name=${2:-virtio_dmaheap}
sub=${src##*/}
root=${VIRTIO_DMAHEAP_ROOT:-/var/cache/virtio-dmaheap/trixie}
kver=${VIRTIO_DMAHEAP_KVER:-7.3.4+deb13-amd64}
out=${VIRTIO_DMAHEAP_KO_DIR:-$repo/build/guest-driver}
# Inside the tree, one per checkout: make rebuilds by mtime, and copies (mtimes kept) of
# two checkouts' sources in one directory would link objects of both.
bdir=/var/tmp/virtio-dmaheap-build-$(printf %s "$repo" | cksum | cut -d' ' -f1)
if [ "$kver" != 7.3.4+deb13-amd64 ]; then
	# Other kernels build and deliver apart: a module of one must never be taken for
	# a module of the other.
	out=${VIRTIO_DMAHEAP_KO_DIR:-$repo/build/guest-driver/$kver}
	bdir=$bdir-$kver
fi

# `build` may be an absolute link, valid inside the tree only (project kernels).
if ! chroot "$root" test -d "/lib/modules/$kver/build"; then
	echo "build.sh: no kernel headers at $root/lib/modules/$kver/build;" \
	     "run tests/vm/provision first" >&2
	exit 1
fi

mkdir -p "$root$bdir/$sub" "$root$bdir/spec" "$out"
exec 9>"$root$bdir.lock"
flock 9

# Mirror the sources (a file removed here must not linger there).
for f in "$root$bdir/$sub"/*.[ch]; do
	[ -e "$f" ] || continue
	[ -e "$src/${f##*/}" ] || rm -f "$f"
done
cp -p "$src/Kbuild" "$src"/*.[ch] "$root$bdir/$sub/"
cp -p "$repo/spec/virtio_dmaheap.h" "$root$bdir/spec/"
extra=
if [ -n "${VIRTIO_DMAHEAP_EXTRA_SYMBOLS:-}" ]; then
	cp -p "$VIRTIO_DMAHEAP_EXTRA_SYMBOLS" "$root$bdir/extra.symvers"
	extra=KBUILD_EXTRA_SYMBOLS=$bdir/extra.symvers
fi

log=$root$bdir/build.log
if ! unshare --mount --propagation private sh -c '
	mount -t proc proc "$1/proc" &&
	exec chroot "$1" make -C "/lib/modules/$2/build" M="$3/$4" \
		W=1 KCFLAGS=-Werror $5 modules' sh "$root" "$kver" "$bdir" "$sub" "$extra" \
		>"$log" 2>&1; then
	cat "$log" >&2
	echo "build.sh: build failed" >&2
	exit 1
fi
# modpost and friends warn without failing: treat that as an error too.
if grep -i 'warning' "$log" >&2; then
	echo "build.sh: warnings in the build" >&2
	exit 1
fi

cp "$root$bdir/$sub/$name.ko" "$out/$name.ko.tmp"
mv "$out/$name.ko.tmp" "$out/$name.ko"
echo "$out/$name.ko"
