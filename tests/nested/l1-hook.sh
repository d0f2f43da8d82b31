#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Host hooks that L2 calls in L1 (`rg-host COMMAND ARGS...`, tests/guest/src/host.rs):
# l1.sh serves L2's virtio-serial port `dmaheap.hook` and runs this script once per
# request, under a deadline, with DPID (the daemon), HERE (/opt/extra/nested), CTL (the
# control socket) and DAEMON_ARGS in the environment. Prints the reply's lines; its exit
# status is the reply's status.
#
#   boot                  1 (L2 boots once)
#   stats                 the daemon's stats (JSON)
#   ctl ARGS...           vhost-user-dmaheap ctl ARGS... (the daemon runs with
#                         --control-debug: buffers, peek, poke)
#   find-buffer HEX [LEN] the live buffer (`ID HEAP OFFSET LEN`) whose first bytes are HEX
#                         and whose length is at least LEN (as run-guest's hook)
#   expect ID OFF HEX     peek buffer ID at OFF on the host and compare with HEX; a
#                         mismatch fails the hook, and so the guest's case
#   daemon-args           the daemon's --heap arguments, one per line
#   pfns-start            record the page frames the kernel maps into user space from now
#                         on (kprobes on vmf_insert_pfn and remap_pfn_range: pagemap skips
#                         the VM_PFNMAP mappings of dma-heap and udmabuf buffers)
#   pfns LEN              stop recording; the page frames behind each LEN-byte dma-buf or
#                         memfd mapping of L2's QEMU (which the guest's accesses fault in)
#                         and of the daemon (l1-pfns.c)
#   trace-start HEAP      function-trace the begin/end_cpu_access of the exporter that
#                         serves the daemon's heap HEAP (its name in the daemon)
#   trace-stop            stop tracing; per traced function, the calls made by the daemon's
#                         threads and by other threads, and `daemon begin=N end=N lost=N`
#
# Kprobes and the function tracer are armed at their first use and stay armed: arming
# and disarming patch kernel text, which waits for every L1 vCPU while L2 runs on them.
# The 3 hangs of L2's command on 2026-12-01 all came in cases whose hooks did that
# (tests/nested/README.md). Later uses only switch the instance's recording on and off.
set -u
T=/sys/kernel/tracing
PFNS=$T/instances/vdh-pfns # a tracing instance per use: they do not disturb each other
SYNC=$T/instances/vdh-sync
say() { printf '%s\n' "$*"; }
fail() {
	say "$*"
	exit 1
}

# heap_source NAME: the source of the daemon's heap NAME (dma-heap:HOST, udmabuf, memfd).
heap_source() {
	name=$1
	eval "set -- $DAEMON_ARGS"
	while [ $# -gt 0 ]; do
		spec=
		case "$1" in
		--heap) spec=${2:-} && shift ;;
		--heap=*) spec=${1#--heap=} ;;
		esac
		shift
		case "$spec" in
		"$name="*) spec=${spec#*=} && echo "${spec%%,*}" && return 0 ;;
		esac
	done
	return 1
}

# The exporter's CPU-access callbacks for a source (drivers/dma-buf/heaps/*.c, udmabuf.c).
exporter_functions() {
	case "$1" in
	dma-heap:system | dma-heap:system_cc_shared)
		echo system_heap_dma_buf_begin_cpu_access system_heap_dma_buf_end_cpu_access ;;
	# Every other dma-heap of the nested L1 kernel is a CMA area (cma_heap.c).
	dma-heap:*) echo cma_heap_dma_buf_begin_cpu_access cma_heap_dma_buf_end_cpu_access ;;
	udmabuf) echo begin_cpu_udmabuf end_cpu_udmabuf ;;
	*) return 1 ;;
	esac
}

# all_exporter_functions: the traceable CPU-access callbacks of every heap of the daemon.
all_exporter_functions() {
	eval "set -- $DAEMON_ARGS"
	for a in "$@"; do
		case "$a" in --heap=*) a=${a#--heap=} ;; *=*) ;; *) continue ;; esac
		spec=${a#*=}
		exporter_functions "${spec%%,*}" || true
	done | tr ' ' '\n' | sort -u | while read -r f; do
		grep -qE "^$f( |\$)" "$T/available_filter_functions" && echo "$f"
	done | tr '\n' ' '
}

tracefs() { # INSTANCE: mount tracefs, create the instance
	[ -e "$T/trace" ] || mount -t tracefs nodev "$T" 2>/dev/null ||
		fail "cannot mount tracefs on $T"
	[ -d "$1" ] || mkdir "$1" || fail "cannot create the tracing instance $1"
}

# tids PID: the threads of process PID.
tids() { (cd "/proc/$1/task" && echo *); }

# events TIDS <TRACE: `TID` and the rest of each event line of one of TIDS.
events() {
	awk -v tids=" $1 " '
		/^#/ { next }
		# `COMM-TID [CPU] FLAGS TIMESTAMP: EVENT: ...` (COMM may hold blanks and dashes)
		match($0, /-[0-9]+ +\[[0-9]+\]/) {
			t = substr($0, RSTART + 1, RLENGTH - 1)
			sub(/ .*/, "", t)
			if (index(tids, " " t " ")) print t, substr($0, RSTART + RLENGTH)
		}'
}

# lost INSTANCE: events the instance's ring buffer dropped.
lost() {
	sed -n 's/^# entries-in-buffer\/entries-written: \([0-9]*\)\/\([0-9]*\).*/\1 \2/p' \
		"$1/trace" | awk '{ print $2 - $1 }'
}

ctl() { "$HERE/vhost-user-dmaheap" ctl --control-socket "$CTL" --timeout 10 "$@"; }

# find_buffer HEX MINLEN: the one live buffer whose first bytes are HEX.
find_buffer() {
	want=$(echo "$1" | tr 'A-F' 'a-f')
	list=$(ctl buffers) || fail "ctl buffers: $list"
	found=$(echo "$list" | while read -r id heap off len; do
		case "$id" in '' | *[!0-9]*) continue ;; esac
		[ "$((len))" -ge "$2" ] || continue
		# A peek error is a buffer freed since the listing (FREE is asynchronous).
		got=$(ctl peek "$id" 0 $((${#want} / 2))) || continue
		[ "$got" = "$want" ] && echo "$id $heap $off $len"
	done)
	n=0
	[ -z "$found" ] || n=$(echo "$found" | wc -l)
	[ "$n" -eq 1 ] || fail "$n buffers start with $1${found:+
$found}"
	say "$found"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
boot) echo 1 ;;
stats)
	exec "$HERE/vhost-user-dmaheap" stats --control-socket "$CTL" --json --timeout 10 ;;
ctl) exec "$HERE/vhost-user-dmaheap" ctl --control-socket "$CTL" --timeout 10 "$@" ;;
find-buffer)
	[ $# -ge 1 ] && [ $# -le 2 ] || fail "usage: find-buffer HEX [LEN]"
	find_buffer "$1" "${2:-0}"
	;;
expect)
	[ $# -eq 3 ] || fail "usage: expect ID OFF HEX"
	want=$(echo "$3" | tr 'A-F' 'a-f')
	got=$(ctl peek "$1" "$2" $((${#want} / 2)))
	rc=$?
	[ "$rc" -eq 0 ] && [ "$got" = "$want" ] && say ok && exit 0
	fail "host check failed: buffer $1 at $2: expected $want, host has $got (ctl status $rc)"
	;;
daemon-args)
	eval "set -- $DAEMON_ARGS"
	for a in "$@"; do say "$a"; done
	;;
pfns-start)
	tracefs "$PFNS"
	# x86-64 arguments: vmf_insert_pfn(vma, addr, pfn), remap_pfn_range(vma, addr, pfn,
	# size, prot). Defined once per boot; a definition in use cannot be written again.
	if [ ! -d "$T/events/vdh_pfns" ]; then
		if ! echo 'p:vdh_pfns/insert vmf_insert_pfn addr=%si:u64 pfn=%dx:u64' \
			>>"$T/kprobe_events" ||
			! echo 'p:vdh_pfns/remap remap_pfn_range addr=%si:u64 pfn=%dx:u64 size=%cx:u64' \
				>>"$T/kprobe_events"; then
			fail "cannot define kprobes on vmf_insert_pfn and remap_pfn_range" \
				"(CONFIG_KPROBE_EVENTS in L1's kernel $(uname -r)?)"
		fi
	fi
	echo 0 >"$PFNS/tracing_on"
	if ! grep -q 1 "$PFNS/events/vdh_pfns/enable"; then
		echo 8192 >"$PFNS/buffer_size_kb"
		echo 1 >"$PFNS/events/vdh_pfns/enable" || fail "cannot enable the vdh_pfns kprobes"
	fi
	echo >"$PFNS/trace"
	echo 1 >"$PFNS/tracing_on"
	say "recording the page frames mapped into user space"
	;;
pfns)
	[ $# -eq 1 ] || fail "usage: pfns LEN"
	tracefs "$PFNS"
	echo 0 >"$PFNS/tracing_on"
	qpid=$(cat /tmp/qemu.pid 2>/dev/null) || fail "no /tmp/qemu.pid"
	n=$(lost "$PFNS")
	[ "${n:-0}" -eq 0 ] || say "warning: the trace lost $n events"
	rc=1
	for who in qemu daemon; do
		pid=$DPID
		[ "$who" = qemu ] && pid=$qpid
		# `ADDR PFN SIZE` of the process's events (insert: one page).
		events "$(tids "$pid")" <"$PFNS/trace" | awk '{
			a = ""; p = ""; s = 4096
			for (i = 2; i <= NF; i++) {
				if ($i ~ /^addr=/) a = substr($i, 6)
				else if ($i ~ /^pfn=/) p = substr($i, 5)
				else if ($i ~ /^size=/) s = substr($i, 6)
			}
			if (a != "" && p != "") print a, p, s
		}' >"/tmp/pfns.$who"
		if out=$("$HERE/l1-pfns" "$pid" "$1" "/tmp/pfns.$who"); then
			echo "$out" | sed "s/^/$who: /"
			[ "$who" = qemu ] && rc=0
		else
			say "$who: no dma-buf or memfd mapping of exactly $1 bytes (pid $pid)"
		fi
		say "$who: $(wc -l <"/tmp/pfns.$who") page-mapping events"
	done
	echo >"$PFNS/trace"
	exit $rc
	;;
trace-start)
	[ $# -eq 1 ] || fail "usage: trace-start HEAP"
	NAME=$1
	src=$(heap_source "$NAME") || fail "the daemon has no heap $NAME: $DAEMON_ARGS"
	funcs=$(exporter_functions "$src") ||
		fail "heap $NAME ($src): no dma-buf exporter to trace (memfd buffers are not dma-bufs)"
	tracefs "$SYNC"
	for f in $funcs; do
		grep -qE "^$f( |\$)" "$T/available_filter_functions" ||
			fail "$f is not traceable in L1's kernel ($(uname -r)) (heap $NAME, $src)"
	done
	echo 0 >"$SYNC/tracing_on"
	# Armed once, for the exporters of every heap of the daemon.
	if [ "$(cat "$SYNC/current_tracer")" != function ]; then
		all=$(all_exporter_functions) || fail "cannot list the daemon's exporters"
		echo "$all" >"$SYNC/set_ftrace_filter" || fail "set_ftrace_filter $all failed"
		echo function >"$SYNC/current_tracer" || fail "no function tracer in L1's kernel"
	fi
	echo "$funcs" >/tmp/sync.funcs
	echo >"$SYNC/trace"
	echo 1 >"$SYNC/tracing_on"
	say "tracing $funcs ($NAME = $src) for the daemon (pid $DPID)"
	;;
trace-stop)
	tracefs "$SYNC"
	echo 0 >"$SYNC/tracing_on"
	funcs=$(cat /tmp/sync.funcs 2>/dev/null) || fail "trace-stop: no trace-start before"
	rm -f /tmp/sync.funcs
	n=$(lost "$SYNC")
	# `FUNCTION <-CALLER` events: the daemon's threads' and the others'.
	events "$(tids "$DPID")" <"$SYNC/trace" >/tmp/sync.daemon
	grep -v '^#' "$SYNC/trace" >/tmp/sync.all
	echo >"$SYNC/trace"
	begin=0 end=0
	for f in $funcs; do
		d=$(grep -c " $f <-" /tmp/sync.daemon)
		a=$(grep -c " $f <-" /tmp/sync.all)
		say "$f daemon=$d others=$((a - d))"
		case "$f" in
		*begin*) begin=$((begin + d)) ;;
		*end*) end=$((end + d)) ;;
		esac
	done
	[ "$begin" -gt 0 ] || [ ! -s /tmp/sync.all ] || say "first events: $(head -n 2 /tmp/sync.all)"
	say "daemon begin=$begin end=$end lost=${n:-?}"
	;;
*) fail "unknown host hook ${cmd:-(none)} (l1-hook.sh)" ;;
esac
