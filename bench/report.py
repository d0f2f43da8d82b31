#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Merge the host (host.json) and guest (guest*.log, `BENCH {json}` lines) results of
bench/run into results.json, print the table with the targets, and plot results.png.

    bench/report.py DIR          (DIR holds host.json and guest-*.log)
    bench/report.py DIR --no-plot
"""

import glob
import json
import math
import os
import sys

TARGETS = {
    "P1": "daemon/direct alloc+map+free median <= 1.10 for 1-8 MiB",
    "P1b": "recycled/direct median <= 0.50 (the driver's path: ALLOC_BATCH per buffer up to 256 KiB, single ALLOCs one after another above, FREE not waited for, per buffer)",
    "P2": "virtio/system alloc+touch+free <= 1.0 at every size 4 KiB-64 MiB, median and p99",
    "P3": "65,536 live buffers, p99 there <= 1.5x p99 at 1 live",
    "P4": "virtio/system write bandwidth >= 0.95",
    "P5": "daemon RssAnon per live buffer <= 512 B",
}


def human(n):
    return f"{n // (1 << 20)}M" if n >= 1 << 20 else f"{n // 1024}K"


def fmt_us(v):
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v / 1000:.1f}ms"
    return f"{v:.1f}"


def load(d):
    host = None
    hp = os.path.join(d, "host.json")
    if os.path.exists(hp):
        with open(hp) as f:
            host = json.load(f)
    guest = {"p2": [], "p2idle": [], "p4": [], "p3": [], "p3_release": [], "p3_stop": [], "info": None,
             "runs": []}
    for path in sorted(glob.glob(os.path.join(d, "guest-*.log"))):
        run = os.path.basename(path)[len("guest-"):-len(".log")]
        with open(path, errors="replace") as f:
            text = f.read()
        for line in text.splitlines():
            if "the daemon exited early" in line or "the daemon died" in line:
                guest.setdefault("daemon_died", {})[run] = line.strip()
                break
        with open(path, errors="replace") as f:
            for line in f:
                i = line.find("BENCH {")
                if i < 0:
                    continue
                try:
                    r = json.loads(line[i + len("BENCH "):])
                except json.JSONDecodeError:
                    continue
                r["run"] = run
                part = r.get("part")
                if part == "guest":
                    guest["info"] = r
                elif part == "p3" and "stop_live" in r:
                    guest["p3_stop"].append(r)
                elif part in guest:
                    guest[part].append(r)
        guest["runs"].append(run)
    meta = {}
    mp = os.path.join(d, "meta.json")
    if os.path.exists(mp):
        with open(mp) as f:
            meta = json.load(f)
    return host, guest, meta


def verdict(ok):
    return "MET" if ok else "MISSED"


def evaluate(host, guest):
    res = {}
    if host:
        rows = [r for r in host["p1"] if (1 << 20) <= r["size"] <= (8 << 20)]
        if rows:
            worst = max(r["ratio_median"] for r in rows)
            res["P1"] = {"value": worst, "ok": worst <= 1.10,
                         "detail": f"worst median ratio over 1-8 MiB {worst:.2f} "
                                   f"(x{worst / 1.10:.1f} over target)"}
        rec = [r for r in host["p1"] if r["shmem_maps_per_alloc_recycled"] < 0.5]
        if rec:
            # What the guest driver does: sizes it fills its pool with in batches
            # (<= 256 KiB) come from ALLOC_BATCH (the time per buffer), larger ones one
            # ALLOC at a time, in a stream of them (the time per buffer; the device polls
            # its ring between them); it never waits for a FREE.
            def driver_ratio(r):
                if "recycled_batch_ratio_median" in r and r["size"] <= (256 << 10):
                    return r["recycled_batch_ratio_median"]
                if "recycled_stream_ratio_median" in r:
                    return r["recycled_stream_ratio_median"]
                return r.get("recycled_async_ratio_median", r["recycled_ratio_median"])
            worst_r = max(rec, key=driver_ratio)
            worst = driver_ratio(worst_r)
            nonrec = [r["size_h"] for r in host["p1"] if r["shmem_maps_per_alloc_recycled"] >= 0.5]
            res["P1b"] = {"value": worst, "ok": worst <= 0.50 and not nonrec,
                          "detail": f"worst median ratio {worst:.2f} (at {worst_r['size_h']}) over "
                                    f"sizes that recycle, batched up to 256 KiB, a stream of single ALLOCs above, "
                                    f"FREE not waited for; not recycled "
                                    f"(own mapping per buffer): {', '.join(nonrec) or 'none'}"}
        p3 = host["p3"]
        lv = {r["live"]: r for r in p3["levels"]}
        if 1 in lv and 65536 in lv:
            q = lv[65536]["alloc_free"]["p99_us"] / lv[1]["alloc_free"]["p99_us"]
            res["P3"] = {"value": q, "ok": q <= 1.5,
                         "detail": f"p99 at 65,536 / p99 at 1 = {q:.2f}"}
        elif 1 in lv:
            top = max(lv)
            why = ("quick run: levels up to 10,000 only" if host.get("quick")
                   else f"stop: {p3.get('stop')}")
            res["P3"] = {"value": None, "ok": False,
                         "detail": f"65,536 live not reached (top {top}); {why}"}
        if 65536 in lv:
            b = lv[65536]["rssanon_per_buffer_bytes"]
            res["P5"] = {"value": b, "ok": b <= 512,
                         "detail": f"{b:.0f} B RssAnon per buffer at 65,536 live "
                                   f"(VmRSS: {lv[65536]['rss_per_buffer_bytes']:.0f} B)"}
        elif lv:
            top = max(lv)
            b = lv[top]["rssanon_per_buffer_bytes"]
            res["P5"] = {"value": b, "ok": b <= 512,
                         "detail": f"{b:.0f} B RssAnon per buffer at {top} live (quick run)"}
    rows = guest["p2"]
    if rows:
        med = max(rows, key=lambda r: r["ratio_median"])
        p99 = max(rows, key=lambda r: r["ratio_p99"])
        worst = max(med["ratio_median"], p99["ratio_p99"])
        res["P2"] = {"value": worst, "ok": worst <= 1.0,
                     "detail": f"worst median ratio {med['ratio_median']:.2f} "
                               f"(at {human(med['size'])}), worst p99 ratio "
                               f"{p99['ratio_p99']:.2f} (at {human(p99['size'])}), "
                               f"over {human(rows[0]['size'])}-{human(rows[-1]['size'])}"}
    if guest["p4"]:
        r = guest["p4"][-1]
        res["P4"] = {"value": r["ratio_median"], "ok": r["ratio_median"] >= 0.95,
                     "detail": f"{r['virtio_gbps_median']:.2f} vs {r['system_gbps_median']:.2f} "
                               f"GB/s (median of {r['passes']} passes of {human(r['size'])}); "
                               f"first touch {r['ratio_first']:.2f}"}
    return res


def table(host, guest, meta, res):
    out = []
    p = out.append
    if meta:
        p(f"machine: {meta.get('machine', '')}; date {meta.get('date', '')}; "
          f"mode {'quick' if meta.get('quick') else 'full'}; total {meta.get('seconds', '?')} s")
    if host:
        m = host["machine"]
        p(f"host: {m['cpu']} x{m['cpus']}, kernel {m['kernel']}, loadavg at start {m['loadavg']}")
        p("")
        p("P1/P1b  host, in-process vhost-user front end; latency in us (median / p99); "
          "ratio = daemon / direct (median)")
        p(f"{'size':>5} | {'direct':>15} | {'daemon fresh':>17} {'ratio':>6} | "
          f"{'daemon recycled':>17} {'ratio':>6} maps | {'+touch: direct':>14} {'daemon':>9} "
          f"{'recycl':>9} {'ratio':>5} | {'floor fresh':>11} {'warm':>8}")
        for r in host["p1"]:
            d, x, rc = r["daemon"], r["direct"], r["recycled"]
            p(f"{r['size_h']:>5} | {fmt_us(x['median_us']):>7}/{fmt_us(x['p99_us']):>7} | "
              f"{fmt_us(d['median_us']):>8}/{fmt_us(d['p99_us']):>8} {r['ratio_median']:>6.2f} | "
              f"{fmt_us(rc['median_us']):>8}/{fmt_us(rc['p99_us']):>8} "
              f"{r['recycled_ratio_median']:>6.2f} {r['shmem_maps_per_alloc_recycled']:>4.1f} | "
              f"{fmt_us(r['direct_touch']['median_us']):>14} "
              f"{fmt_us(r['daemon_touch']['median_us']):>9} "
              f"{fmt_us(r['recycled_touch']['median_us']):>9} {r['touch_ratio_median']:>5.2f} | "
              f"{fmt_us(r['floor_fresh_memset']['median_us']):>11} "
              f"{fmt_us(r['floor_warm_memset']['median_us']):>8}")
        if "daemon_async_free" in host["p1"][0]:
            p("")
            p("P1/P1b with FREE not waited for (as the guest driver does: its processing delays "
              "the next request instead); us median, ratio to direct")
            batched = "recycled_batch" in host["p1"][0]
            streamed = "recycled_stream" in host["p1"][0]
            n = str(host['p1'][0].get('batch', ''))
            p(f"{'size':>5} | {'fresh async':>11} {'ratio':>6} | {'recycled async':>14} {'ratio':>6}"
              + (f" | {'batch of ' + n + ', per buffer':>22} {'ratio':>6}" if batched else "")
              + (f" | {'stream of ' + n + ', per buffer':>23} {'ratio':>6}" if streamed else ""))
            for r in host["p1"]:
                p(f"{r['size_h']:>5} | {fmt_us(r['daemon_async_free']['median_us']):>11} "
                  f"{r['async_ratio_median']:>6.2f} | "
                  f"{fmt_us(r['recycled_async_free']['median_us']):>14} "
                  f"{r['recycled_async_ratio_median']:>6.2f}"
                  + (f" | {fmt_us(r['recycled_batch']['median_us']):>22} "
                     f"{r['recycled_batch_ratio_median']:>6.2f}" if batched else "")
                  + (f" | {fmt_us(r['recycled_stream']['median_us']):>23} "
                     f"{r['recycled_stream_ratio_median']:>6.2f}" if streamed else ""))
        p("")
        p3 = host["p3"]
        p(f"P3/P5  host: alloc+free of one more 4 KiB buffer with N live (seccomp "
          f"{p3.get('seccomp')}); daemon memory above its idle baseline "
          f"(VmRSS {p3['baseline_vmrss_kib']} KiB)")
        p(f"{'live':>7} | {'median':>8} {'p99':>8} | {'fill us/buf':>11} | {'mappings':>8} | "
          f"{'VmRSS B/buf':>11} {'RssAnon B/buf':>13}")
        for r in p3["levels"]:
            a = r["alloc_free"]
            p(f"{r['live']:>7} | {fmt_us(a['median_us']):>8} {fmt_us(a['p99_us']):>8} | "
              f"{r['fill_us_per_buffer']:>11.1f} | {r['mappings']:>8} | "
              f"{r['rss_per_buffer_bytes']:>11.0f} {r['rssanon_per_buffer_bytes']:>13.0f}")
        if p3.get("stop"):
            p(f"  stops: {p3['stop']}")
        if p3.get("first_attempt"):
            fa = p3["first_attempt"]
            p(f"  first attempt (default seccomp): daemon died at {fa['live_reached']} live; "
              f"audit: {fa.get('seccomp_audit')}")
    if guest["p2"]:
        p("")
        p("P2  guest (TCG): alloc + mmap + touch each page + munmap + close, us "
          "(median / p99); bare = alloc + close")
        p(f"{'size':>5} | {'system heap':>17} | {'virtio heap':>17} | {'ratio':>5} {'p99':>5} | "
          f"{'bare system':>11} {'bare virtio':>11} {'ratio':>5}")
        for r in guest["p2"]:
            v, s = r["virtio_touch"], r["system_touch"]
            p(f"{human(r['size']):>5} | {fmt_us(s['median_us']):>8}/{fmt_us(s['p99_us']):>8} | "
              f"{fmt_us(v['median_us']):>8}/{fmt_us(v['p99_us']):>8} | {r['ratio_median']:>5.2f} "
              f"{r['ratio_p99']:>5.2f} | "
              f"{fmt_us(r['system_bare']['median_us']):>11} "
              f"{fmt_us(r['virtio_bare']['median_us']):>11} {r['bare_ratio_median']:>5.2f}")
    for r in guest["p2idle"]:
        p(f"  after {r['idle_s']} s idle, {human(r['size'])}: virtio "
          f"{fmt_us(r['virtio_touch']['median_us'])} system "
          f"{fmt_us(r['system_touch']['median_us'])} us (median of {r['virtio_touch']['n']}); "
          f"ratio {r['ratio_median']:.2f} (not a P2 target: the virtio heap maps fresh memory)")
    for r in guest["p4"]:
        p("")
        p(f"P4  guest write bandwidth ({human(r['size'])} memset, SYNC-bracketed, {r['passes']} "
          f"passes): virtio {r['virtio_gbps_median']:.2f} GB/s (first touch "
          f"{r['virtio_gbps_first']:.2f}), system {r['system_gbps_median']:.2f} GB/s (first "
          f"touch {r['system_gbps_first']:.2f}); ratio {r['ratio_median']:.2f} (median of "
          f"per-pass ratios {r.get('ratio_paired_median', float('nan')):.2f})")
    if guest["p3"] or guest["p3_stop"]:
        p("")
        p("P3  guest: alloc + close of one more 4 KiB virtio-heap buffer with N live, us")
        for r in guest["p3"]:
            a = r["alloc_free"]
            p(f"{r['live']:>7} | median {fmt_us(a['median_us']):>8} p99 {fmt_us(a['p99_us']):>8} "
              f"| fill {r['fill_us_per_buffer']:.1f} us/buf  [{r['run']}]")
        for run, died in guest.get("daemon_died", {}).items():
            p(f"  [{run}] {died}")
        for r in guest["p3_stop"]:
            p(f"  stopped at {r['stop_live']} live (wanted {r['wanted']}): {r['error']} "
              f"[{r['run']}]")
        for r in guest["p3_release"]:
            p(f"  closing {r['buffers']} buffers: {r['us_per_buffer']:.1f} us each [{r['run']}]")
    p("")
    p("Targets")
    for k in ["P1", "P1b", "P2", "P3", "P4", "P5"]:
        if k in res:
            p(f"  {k:<4} {verdict(res[k]['ok']):<7} {TARGETS[k]}: {res[k]['detail']}")
        else:
            p(f"  {k:<4} {'n/a':<7} {TARGETS[k]}: not measured in this run")
    return "\n".join(out)


def plot(d, host, guest, res):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(14, 10))
    if host:
        xs = [r["size"] / 1024 for r in host["p1"]]
        a = ax[0][0]
        for key, label, style in [
            ("direct", "direct memfd alloc+mmap+free", "o-"),
            ("daemon", "daemon fresh (SHMEM_MAP)", "s-"),
            ("recycled", "daemon recycled (arena)", "^-"),
            ("recycled_batch", "daemon recycled, ALLOC_BATCH per buffer", "v-"),
            ("recycled_stream", "daemon recycled, stream of ALLOCs per buffer", "<-"),
            ("direct_touch", "direct + touch", "o--"),
            ("daemon_touch", "daemon fresh + touch", "s--"),
            ("floor_fresh_memset", "floor: memset fresh mapping", "k:"),
        ]:
            if key not in host["p1"][0]:
                continue
            a.plot(xs, [r[key]["median_us"] for r in host["p1"]], style, label=label)
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("buffer size (KiB)")
        a.set_ylabel("median latency (us)")
        a.set_title("P1/P1b host: alloc + map + free")
        a.legend(fontsize=8)
        a.grid(True, which="both", alpha=0.3)

        a = ax[1][0]
        lv = host["p3"]["levels"]
        a.plot([r["live"] for r in lv], [r["alloc_free"]["median_us"] for r in lv], "o-",
               label="host median")
        a.plot([r["live"] for r in lv], [r["alloc_free"]["p99_us"] for r in lv], "o--",
               label="host p99")
        if guest["p3"]:
            g = [r for r in guest["p3"] if r["run"] == guest["p3"][-1]["run"]]
            a.plot([r["live"] for r in g], [r["alloc_free"]["median_us"] for r in g], "s-",
                   label="guest median")
            a.plot([r["live"] for r in g], [r["alloc_free"]["p99_us"] for r in g], "s--",
                   label="guest p99")
        a2 = a.twinx()
        a2.plot([r["live"] for r in lv], [r["rssanon_per_buffer_bytes"] for r in lv], "r:",
                label="daemon RssAnon B/buffer (P5)")
        a2.set_ylabel("daemon RssAnon bytes per live buffer", color="r")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("live 4 KiB buffers")
        a.set_ylabel("alloc+free latency (us)")
        a.set_title("P3 scale / P5 memory")
        a.legend(fontsize=8, loc="upper left")
        a2.legend(fontsize=8, loc="upper right")
        a.grid(True, which="both", alpha=0.3)
    if guest["p2"]:
        a = ax[0][1]
        xs = [r["size"] / 1024 for r in guest["p2"]]
        for key, label, style in [
            ("system_touch", "guest system heap", "o-"),
            ("virtio_touch", "virtio heap", "s-"),
            ("system_bare", "system heap, no touch", "o:"),
            ("virtio_bare", "virtio heap, no touch", "s:"),
        ]:
            a.plot(xs, [r[key]["median_us"] for r in guest["p2"]], style, label=label)
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("buffer size (KiB)")
        a.set_ylabel("median latency (us)")
        a.set_title("P2 guest (TCG): alloc + mmap + touch + free")
        a.legend(fontsize=8)
        a.grid(True, which="both", alpha=0.3)
    a = ax[1][1]
    names, vals, colors = [], [], []
    for k, tgt, higher in [("P1", 1.10, False), ("P1b", 0.50, False), ("P2", 1.0, False),
                           ("P3", 1.5, False), ("P4", 0.95, True), ("P5", 512, False)]:
        if k in res and res[k]["value"] is not None:
            v = res[k]["value"]
            names.append(f"{k}\n{'>=' if higher else '<='}{tgt:g}")
            vals.append(v / tgt)
            colors.append("tab:green" if res[k]["ok"] else "tab:red")
    a.bar(names, vals, color=colors)
    a.axhline(1.0, color="k", lw=1)
    a.set_yscale("log")
    a.set_ylabel("measured / target (green: met)")
    a.set_title("targets")
    fig.tight_layout()
    out = os.path.join(d, "results.png")
    fig.savefig(out, dpi=90)
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit(__doc__)
    d = args[0]
    host, guest, meta = load(d)
    res = evaluate(host, guest)
    text = table(host, guest, meta, res)
    print(text)
    with open(os.path.join(d, "results.txt"), "w") as f:
        f.write(text + "\n")
    merged = {"meta": meta, "host": host, "guest": guest, "targets": {
        k: {"target": TARGETS[k], **v} for k, v in res.items()}}
    with open(os.path.join(d, "results.json"), "w") as f:
        json.dump(merged, f, indent=1, default=str)
    if "--no-plot" not in sys.argv:
        print(f"plot: {plot(d, host, guest, res)}")


if __name__ == "__main__":
    main()
