"""Batch throughput: `bench/run --batch [--proxies scillm,scillm-nomw] [--batch-items 640] [--batch-concurrency 64]`.

Called by run.py (which passes itself as `h`, so the proxy start, pinning, /proc accounting and the mock are
the same as for the load scenarios). Per proxy: start it, one unmeasured warm-up batch of `concurrency` items,
then `--runs` measured batches. Each measured run is ONE `POST /v1/scillm/batch/completions` with
`--batch-items` chat items (`model` = the proxy's model, `"concurrency"` = `--batch-concurrency`, a fresh
`batch_id` so no stored result is reused) while the mock answers every call after `--batch-delay-ms`.

Reported per run: client wall time and the server's `elapsed_s`, each ÷ the ideal `items × delay / concurrency`
(what a scheduler that always keeps `concurrency` calls in flight would take); CPU µs per item of the proxy's
whole session (same /proc accounting as CPU µs/req); upstream calls the mock saw; completed / failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time


def post_batch(h, proxy, body: bytes, timeout: float) -> tuple[int, dict | None, float, str]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/scillm/batch/completions", body=body,
                     headers={"Content-Type": "application/json", **proxy.headers})
        r = conn.getresponse()
        raw = r.read()
        wall = time.perf_counter() - t0
    finally:
        conn.close()
    try:
        return r.status, json.loads(raw), wall, ""
    except ValueError:
        return r.status, None, wall, raw[:300].decode("utf-8", "replace")


def batch_body(proxy, batch_id: str, items: int, concurrency: int) -> bytes:
    from loadgen import chat_body

    msgs = chat_body(proxy.model, False)["messages"]
    return json.dumps({"model": proxy.model, "batch_id": batch_id, "concurrency": concurrency,
                       "items": [{"item_id": f"i{k}", "messages": msgs} for k in range(items)]}).encode()


def mock_requests(h) -> int:
    return h.mock_stats().get("requests", -1)


def one_run(h, proxy, pid: int, mock_pid: int, batch_id: str, items: int, concurrency: int, delay_ms: int,
            quiet_wait: float) -> dict:
    body = batch_body(proxy, batch_id, items, concurrency)
    if quiet_wait > 0:
        h.wait_quiet(quiet_wait)
    h.set_delay(delay_ms)
    peak = [0]
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            peak[0] = max(peak[0], h.session_stats(pid)[1])
            stop.wait(0.25)

    th = threading.Thread(target=sampler, daemon=True)
    h.http_get(f"http://127.0.0.1:{h.MOCK_PORT}/__mock/stats?reset=1")
    up0 = mock_requests(h)
    c0 = h.session_stats(pid)[0]
    b0 = h.core_busy_s(h.PROXY_CORE)
    m0 = h.task_cpu_ns(mock_pid)
    th.start()
    try:
        status, res, wall, err = post_batch(h, proxy, body, timeout=max(600.0, items * delay_ms / 1000.0 * 2))
    finally:
        stop.set()
        th.join()
    c1 = h.session_stats(pid)[0]
    b1 = h.core_busy_s(h.PROXY_CORE)
    m1 = h.task_cpu_ns(mock_pid)
    st1 = h.mock_stats()
    up1 = st1.get("requests", -1)
    h.set_delay(0)
    ideal = items * delay_ms / 1000.0 / concurrency
    out = {"batch_id": batch_id, "items": items, "concurrency": concurrency, "delay_ms": delay_ms,
           "status": status, "wall_s": round(wall, 3), "ideal_s": round(ideal, 3),
           "wall_over_ideal": round(wall / ideal, 3) if ideal else None,
           # one proxy process on one core cannot finish faster than the CPU it spends
           "floor_s": round(max(ideal, c1 - c0), 3),
           "wall_over_floor": round(wall / max(ideal, c1 - c0), 3) if ideal else None,
           "proxy_cpu_s": round(c1 - c0, 3), "cpu_us_per_item": round((c1 - c0) / items * 1e6, 1),
           "proxy_core_util": round((c1 - c0) / wall, 3),
           "core0_other_util": round(max(0.0, (b1 - b0) - (c1 - c0)) / wall, 3),
           "mock_cpu_us_per_item": round((m1 - m0) / items / 1e3, 1),
           "upstream_calls": up1 - up0, "upstream_inflight_max": st1.get("pending_max"),
           "peak_rss_mb": round(max(peak[0], h.session_stats(pid)[1]) / 2**20, 1)}
    if res is None or status != 200:
        out["error"] = f"HTTP {status}: {err or json.dumps(res)[:300]}"
        return out
    out.update({k: res.get(k) for k in ("total", "completed", "failed", "elapsed_s")})
    if res.get("elapsed_s"):
        out["elapsed_over_ideal"] = round(res["elapsed_s"] / ideal, 3) if ideal else None
    fails = [r for r in res.get("results", []) if not r.get("ok")]
    if fails:
        out["first_failure"] = {k: fails[0].get(k) for k in ("item_id", "error_code", "status_code", "error")}
    return out


def bench_batch_proxy(h, proxy, args, logdir: str, mock_pid: int, ts: str) -> dict:
    out: dict = {"name": proxy.name, "label": proxy.label, "version": proxy.version, "model": proxy.model}
    if proxy.missing:
        h.log(f"SKIP {proxy.label}: {proxy.missing}")
        out["skipped"] = proxy.missing
        return out
    logpath = os.path.join(logdir, proxy.name + "-batch.log")
    logf = open(logpath, "wb")
    h.set_delay(0)
    p, ready, startup = h.start_proxy(proxy, logf, logpath)
    try:
        if not ready:
            out["failed"] = f"not ready after {startup:.1f}s (exit={p.poll()}); log tail:\n{h.tail(logpath)}"
            h.log(f"FAIL {proxy.label}: {out['failed']}")
            return out
        out["startup_s"] = round(startup, 3)
        time.sleep(1.0)
        out["idle_rss_mb"] = round(h.session_stats(p.pid)[1] / 2**20, 1)
        c = args.batch_concurrency
        warm = one_run(h, proxy, p.pid, mock_pid, f"bench-{ts}-{proxy.name}-warmup", c, c, args.batch_delay_ms, 0)
        if warm.get("error") or warm.get("failed"):
            out["failed"] = f"warm-up batch failed: {warm.get('error') or warm.get('first_failure')}; " \
                            f"log tail:\n{h.tail(logpath)}"
            h.log(f"FAIL {proxy.label}: {out['failed']}")
            return out
        out["runs"] = []
        for i in range(args.runs):
            r = one_run(h, proxy, p.pid, mock_pid, f"bench-{ts}-{proxy.name}-{i + 1}", args.batch_items, c,
                        args.batch_delay_ms, args.quiet_wait)
            out["runs"].append(r)
            h.log(f"{proxy.label:>24} batch run {i + 1}: wall {r['wall_s']} s (ideal {r['ideal_s']} s, "
                  f"{r['wall_over_ideal']}x)  server {r.get('elapsed_s')} s  cpu {r['cpu_us_per_item']} us/item  "
                  f"completed {r.get('completed')} failed {r.get('failed')} upstream {r['upstream_calls']}"
                  + (f"  ERROR {r['error']}" if r.get("error") else ""))
            time.sleep(0.3)
        if p.poll() is not None:
            out["failed"] = f"proxy exited during the run (exit={p.returncode})"
        return out
    finally:
        h.stop_group(p)
        logf.close()


def render(h, meta: dict, args, results: dict[str, dict]) -> str:
    ideal = args.batch_items * args.batch_delay_ms / 1000.0 / args.batch_concurrency
    L = [f"### Batch throughput {meta['timestamp']}", "",
         f"Machine: {meta['cpu']} ({meta['cores']} cores); proxy pinned to core {h.PROXY_CORE}, mock + client to "
         f"core {h.LOAD_CORE}, nice {h.NICE}. One `POST /v1/scillm/batch/completions` per run: "
         f"{args.batch_items} items, `\"concurrency\": {args.batch_concurrency}`, mock answers each call after "
         f"{args.batch_delay_ms} ms → ideal {args.batch_items} × {args.batch_delay_ms / 1000:g} s / "
         f"{args.batch_concurrency} = {ideal:.2f} s. {args.runs} run(s) per proxy after one warm-up batch of "
         f"{args.batch_concurrency} items. Single-core speed: "
         + ", ".join(f"{k} = {v}" for k, v in meta["calibration"].items()) + ".", ""]
    for r in results.values():
        if r.get("skipped"):
            L.append(f"- **{r['label']}: not measured** — {r['skipped']}")
        elif r.get("failed"):
            L.append(f"- **{r['label']}: failed** — {r['failed'].splitlines()[0]}")
    L += ["", "| proxy | model | run | wall s | wall ÷ ideal | server elapsed_s | elapsed ÷ ideal | completed | failed "
          "| upstream calls | max upstream in flight | CPU µs/item | proxy CPU s | wall ÷ max(ideal, CPU s) "
          "| proxy core use | other use of proxy core "
          "| mock µs/item | peak RSS MB |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        for i, x in enumerate(r.get("runs", [])):
            run = str(i + 1) + (" ⚠" if x.get("core0_other_util", 0) > 0.10 else "")
            if x.get("error"):
                L.append(f"| {r['label']} | {r['model']} | {run} | {x['wall_s']} | – | – | – | – | – | "
                         f"{x['upstream_calls']} | {x.get('upstream_inflight_max')} | – | – | – | – | – | – | – |")
                L.append(f"|  |  | error: {x['error'][:200]} |" + " |" * 15)
                continue
            L.append("| " + " | ".join([
                r["label"], r["model"], run, f"{x['wall_s']:.3f}", f"**{x['wall_over_ideal']:.2f}×**",
                f"{x['elapsed_s']:.3f}" if x.get("elapsed_s") is not None else "–",
                f"{x['elapsed_over_ideal']:.2f}×" if x.get("elapsed_over_ideal") else "–",
                str(x.get("completed")), str(x.get("failed")), str(x["upstream_calls"]),
                str(x.get("upstream_inflight_max")),
                h._fmt(x["cpu_us_per_item"], 0), f"{x['proxy_cpu_s']:.2f}", f"{x['wall_over_floor']:.2f}×",
                f"{x['proxy_core_util'] * 100:.0f}%",
                f"{x['core0_other_util'] * 100:.0f}%", h._fmt(x["mock_cpu_us_per_item"], 0),
                h._fmt(x["peak_rss_mb"], 0)]) + " |")
    L.append("")
    if any(x.get("core0_other_util", 0) > 0.10 for r in results.values() for x in r.get("runs", [])):
        L.append("⚠ = more than 10% of the proxy's core was busy with other work during the run: noisy figure.")
        L.append("")
    medians = {}
    for r in results.values():
        xs = [x for x in r.get("runs", []) if not x.get("error")]
        if xs:
            medians[r["name"]] = {k: statistics.median(x[k] for x in xs)
                                  for k in ("wall_s", "wall_over_ideal", "wall_over_floor", "cpu_us_per_item")}
            medians[r["name"]]["label"], medians[r["name"]]["n"] = r["label"], len(xs)
    if medians:
        L += ["Summary (medians): " + "; ".join(
            f"{m['label']}: wall ÷ ideal **{m['wall_over_ideal']:.2f}×**, wall ÷ max(ideal, CPU) "
            f"{m['wall_over_floor']:.2f}×, CPU **{h._fmt(m['cpu_us_per_item'], 0)} µs/item** (median of {m['n']})"
            for m in medians.values()) + ".", ""]
    if "scillm" in medians and "scillm-before" in medians:
        now, before = medians["scillm"], medians["scillm-before"]
        L += [f"This tree ÷ before: wall **{now['wall_s'] / before['wall_s']:.2f}×**, CPU per item "
              f"**{now['cpu_us_per_item'] / before['cpu_us_per_item']:.2f}×** (medians).", ""]
    return "\n".join(L)


def main(h, args, meta: dict, proxies: list, logdir: str, mock, ts: str) -> int:
    meta = {**meta, "mode": "batch", "batch_items": args.batch_items, "batch_concurrency": args.batch_concurrency,
            "batch_delay_ms": args.batch_delay_ms}
    results: dict[str, dict] = {}
    if args.interleave:  # round r: every proxy once (fresh start), so drift in the machine's load hits all alike
        one = argparse.Namespace(**{**vars(args), "runs": 1})
        for rnd in range(args.runs):
            for proxy in proxies:
                r = bench_batch_proxy(h, proxy, one, logdir, mock.pid, f"{ts}-r{rnd + 1}")
                if proxy.name in results:
                    results[proxy.name]["runs"] = results[proxy.name].get("runs", []) + r.get("runs", [])
                    if r.get("failed"):
                        results[proxy.name]["failed"] = r["failed"]
                else:
                    results[proxy.name] = r
    else:
        for proxy in proxies:
            results[proxy.name] = bench_batch_proxy(h, proxy, args, logdir, mock.pid, ts)
    md = render(h, meta, args, results)
    os.makedirs(h.RESULTS_DIR, exist_ok=True)
    stem = os.path.join(h.RESULTS_DIR, ts + "-batch")
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(md)
    h.log(f"wrote {stem}.md and {stem}.json; proxy logs in {logdir}")
    if args.update_readme:
        h.update_readme(args.readme_block or "batch", md)
    ok = all(x.get("completed") == x.get("total") and not x.get("error")
             for r in results.values() for x in r.get("runs", []))
    return 0 if ok and not any(r.get("failed") for r in results.values()) else 1
