#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The L1 half of tests/nested/run: runs in the TCG guest booted by tests/vm/run-guest
# (busybox sh, cwd /opt/extra), from /opt/extra/nested/ which tests/nested/run staged:
#   config.sh            settings of this run (sourced)
#   modules/             decompressed kernel modules of the L1 kernel, `order` lists them
#                        (empty when the L1 kernel has KVM and 9p built in)
#   vhost-user-dmaheap   the static daemon
#   l1-hook.sh, l1-pfns  L2's host hooks (page frames, function traces; see l1-hook.sh)
#   l2-initrd            the L2 guest's initramfs (run-guest's init, the module, the command)
# It loads kvm-amd (so /dev/kvm appears) and 9p unless built in, mounts the trixie tree
# read-only over 9p, starts the daemon on L1's real heaps, runs QEMU from the tree with
# the L2 guest (KVM; TCG with a warning if /dev/kvm did not appear), serves L2's host
# hooks (`rg-host` in L2) on a virtio-serial port, then prints the daemon's stats and
# logs and exits with QEMU's status. L2's console is this script's stdout. Lines for
# tests/nested/run start with `@@NESTED `. Every wait has a deadline.
set -u
here=/opt/extra/nested
# shellcheck source=/dev/null
. "$here/config.sh"
tree=/mnt/trixie
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "@@NESTED $*"; }
heaps() { (cd /dev/dma_heap 2>/dev/null && echo ./* | sed 's|\./||g'); }
# A child that exited stays a zombie until waited for: kill -0 would still succeed.
alive() { [ -e "/proc/$1/stat" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }

say L1-UP "$(up)"
while read -r m; do
	[ -n "$m" ] || continue
	case "$m" in
	# L2 probes AMD MSRs that KVM does not emulate: ignore them, quietly.
	kvm.ko) set -- ignore_msrs=1 report_ignored_msrs=0 ;;
	*) set -- ;;
	esac
	insmod "$here/modules/$m" "$@" 2>&1 || say WARN "insmod $m failed"
done <"$here/modules/order"
# A kvm built into the kernel takes the same settings at run time.
if [ -w /sys/module/kvm/parameters/ignore_msrs ]; then
	echo Y >/sys/module/kvm/parameters/ignore_msrs
	echo N >/sys/module/kvm/parameters/report_ignored_msrs
fi
say L1-KERNEL "$(uname -r)"
say L1-HEAPS "$(heaps)"
mkdir -p "$tree"
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose trixie "$tree"; then
	say FAIL "mounting the trixie tree over 9p failed"
	exit 125
fi
accel=kvm cpu=host deadline=$L2_DEADLINE boot_deadline=$L2_BOOT_DEADLINE
if [ "$L2_ACCEL" = tcg ]; then
	accel=tcg,thread=multi cpu=max deadline=$L2_DEADLINE_TCG boot_deadline=$L2_BOOT_DEADLINE_TCG
	say WARN "L2 under TCG (asked for): expect 1.5-5.5 minutes to boot"
elif [ ! -c /dev/kvm ]; then
	accel=tcg,thread=multi cpu=max deadline=$L2_DEADLINE_TCG boot_deadline=$L2_BOOT_DEADLINE_TCG
	say WARN "no /dev/kvm in L1 (kvm-amd did not load?): L2 falls back to TCG inside TCG," \
		"expect 1.5-5.5 minutes to boot"
	dmesg | grep -iE 'kvm|svm' | tail -n 5
fi
say ACCEL "$accel"
say L1-SETUP "$(up)"

# The daemon, on L1's real heaps: each dma-heap it is given must exist in L1 (say which
# one does not, rather than leave it to the daemon's log).
eval "set -- $DAEMON_ARGS"
for a in "$@"; do
	case "$a" in
	*=dma-heap:*)
		h=${a#*=dma-heap:}
		h=${h%%,*}
		if [ ! -e "/dev/dma_heap/$h" ]; then
			say FAIL "L1 ($(uname -r)) has no /dev/dma_heap/$h (heaps: $(heaps)); the CMA" \
				"heap needs CONFIG_DMABUF_HEAPS_CMA and cma= on L1's command line" \
				"(tests/nested/run --l1-kernel nested)"
			exit 125
		fi
		;;
	esac
done
# The control socket appears after the vhost-user socket listens: wait for it (with a
# deadline), not for a fixed time.
RUST_LOG=$DAEMON_LOG "$here/vhost-user-dmaheap" --socket-path /tmp/vu.sock \
	--control-socket /tmp/ctl.sock --control-debug "$@" >/tmp/daemon.log 2>&1 &
dpid=$!
i=0
while [ ! -S /tmp/ctl.sock ]; do
	if ! alive "$dpid" || [ $i -ge 300 ]; then
		say FAIL "the daemon did not start (within 30 s)"
		say DAEMON-LOG-BEGIN
		cat /tmp/daemon.log
		say DAEMON-LOG-END
		exit 125
	fi
	sleep 0.1
	i=$((i + 1))
done

# L2's host hooks: QEMU's pipe chardev reads what we write to l2-hook.in and writes what
# L2 sends to l2-hook.out. One request line `ID COMMAND ARGS...`, one reply `ID STATUS
# NLINES` and NLINES lines (run-guest's protocol); each hook has a deadline.
mkfifo /tmp/l2-hook.in /tmp/l2-hook.out
(
	exec 5<>/tmp/l2-hook.out 6<>/tmp/l2-hook.in
	export DPID=$dpid HERE=$here CTL=/tmp/ctl.sock DAEMON_ARGS
	while IFS= read -r req <&5; do
		set -f
		# shellcheck disable=SC2086 # split the request into words
		set -- $req
		set +f
		rid=${1:-0}
		[ $# -gt 0 ] && shift
		out=$(timeout -s KILL 60 sh "$here/l1-hook.sh" "$@" 2>&1)
		rc=$?
		n=0
		[ -z "$out" ] || n=$(printf '%s\n' "$out" | wc -l)
		printf '%s %s %s\n' "$rid" "$rc" "$n" >&6
		[ "$n" -eq 0 ] || printf '%s\n' "$out" >&6
		echo "[$(up)] $* -> $rc" >>/tmp/hooks.log
	done
) &
hookd=$!

l2_start=$(up)
say L2-START "$l2_start"
# L2 must print its ready marker within boot_deadline seconds (QEMU copies L2's console
# to /tmp/l2.console), else its QEMU is stopped; the whole QEMU run has `deadline`.
(
	i=0
	while [ $i -lt $((boot_deadline * 2)) ]; do
		grep -q "^@@RG-$L2_NONCE READY" /tmp/l2.console 2>/dev/null && exit 0
		sleep 0.5
		i=$((i + 1))
	done
	say FAIL "L2 did not reach its ready marker within $boot_deadline s: stopping its QEMU"
	kill -KILL "$(cat /tmp/qemu.pid)"
) &
bootdog=$!
# QEMU from the tree, through the tree's loader. The L2 kernel's console is our stdout.
timeout -s KILL "$deadline" env QEMU_MODULE_DIR="$tree/usr/lib/x86_64-linux-gnu/qemu" \
	"$tree/usr/lib64/ld-linux-x86-64.so.2" \
	--library-path "$tree/usr/lib/x86_64-linux-gnu:$tree/usr/lib" \
	"$tree/usr/bin/qemu-system-x86_64" \
	-L "$tree/usr/share/qemu" -L "$tree/usr/share/seabios" \
	-accel "$accel" -cpu "$cpu" -m "$L2_MEMORY" -smp "$L2_SMP" \
	-nodefaults -display none -no-reboot -pidfile /tmp/qemu.pid \
	-object "memory-backend-memfd,id=mem,size=$L2_MEMORY,share=on" \
	-machine pc,memory-backend=mem \
	-chardev stdio,id=con,signal=off,logfile=/tmp/l2.console -serial chardev:con \
	-device virtio-serial-pci -chardev pipe,id=hook,path=/tmp/l2-hook \
	-device virtserialport,chardev=hook,name=dmaheap.hook \
	-chardev socket,id=vu0,path=/tmp/vu.sock \
	-device vhost-user-test-device-pci,chardev=vu0,virtio-id=37,num_vqs=1,config_size=16 \
	-kernel "$tree/boot/vmlinuz-$KVER" -initrd "$here/l2-initrd" \
	-append "$L2_APPEND" </dev/null 2>/tmp/qemu.log
qrc=$?
kill "$bootdog" "$hookd" 2>/dev/null
say L2-QEMU-EXIT "$qrc" "$(up)"

# What the daemon holds now (everything should be released), then stop it.
timeout -s KILL 20 "$here/vhost-user-dmaheap" stats --control-socket /tmp/ctl.sock \
	--json --timeout 10 | sed 's/^/@@NESTED DAEMON-STATS /'
kill -TERM "$dpid" 2>/dev/null
(sleep 10 && alive "$dpid" && say WARN "the daemon did not exit within 10 s of SIGTERM" &&
	kill -KILL "$dpid") &
watchdog=$!
wait "$dpid"
drc=$?
kill "$watchdog" 2>/dev/null
say DAEMON-EXIT "$drc"
say DAEMON-LOG-BEGIN
cat /tmp/daemon.log
say DAEMON-LOG-END
say QEMU-LOG-BEGIN
cat /tmp/qemu.log
[ -s /tmp/hooks.log ] && echo "host hooks L2 called:" && cat /tmp/hooks.log
say QEMU-LOG-END
# L1's kernel log from L2's start on: a KVM or nested-SVM report when L2 died unannounced.
say L1-KMSG-BEGIN
dmesg | awk -v t="$l2_start" '{ s = $0; sub(/^\[ */, "", s); if (s + 0 >= t) print }' |
	tail -n 80
say L1-KMSG-END
exit "$qrc"
