"""Runs the delivery benchmark: every system at every N, then prints PASS/FAIL per target and writes the report.

    python -m bench.run                 # N = 1, 20, 100; writes BENCHMARK.md and docs/bench-*.png
    python -m bench.run --smoke         # N = 5, short replies; fails only on lost or duplicated tokens
"""
import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import launch, report  # noqa: E402
from bench.procstat import TreeSampler, rss_bytes, tree_pids  # noqa: E402
from bench.stats import combine, is_complete, summarize  # noqa: E402

SYSTEMS = {
    "sse": "(a) SSE relay",
    "memory": "(b) in-memory long-poll",
    "shortpoll": "(c) 1 s short polling of (b)",
    "product-1w": "(d) product, 1 worker",
    "product-2w": "(d) product, 2 workers",
    "memory-stdlib": "(b′) in-memory long-poll, stdlib server",
}
DEFAULT_SYSTEMS = ("sse", "memory", "shortpoll", "product-1w", "product-2w", "memory-stdlib")
CLIENT_MODES = {"sse": "sse", "memory": "memory", "shortpoll": "shortpoll",
                "product-1w": "product", "product-2w": "product", "memory-stdlib": "memory"}
STREAMS_PER_CLIENT_PROCESS = 50


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="N=5, 20-token replies, results only under --out; fails only on lost or duplicated tokens.")
    parser.add_argument("--sizes", default=None, help="Comma-separated stream counts (default 1,20,100).")
    parser.add_argument("--rate", type=float, default=50.0, help="Tokens per second of each stream.")
    parser.add_argument("--tokens", type=int, default=None, help="Tokens per reply (default 200).")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="Comma-separated, from: " + ", ".join(SYSTEMS))
    parser.add_argument("--threads", type=int, default=128, help="Flask threads per worker for the product; threads of the in-memory long-poll.")
    parser.add_argument("--client-processes", type=int, default=0,
                        help=f"Client processes per round (default: one per {STREAMS_PER_CLIENT_PROCESS} streams).")
    parser.add_argument("--spread", type=float, default=None, help="Seconds over which stream starts are spread.")
    parser.add_argument("--out", default=None, help="Folder for raw client results and the summary JSON.")
    parser.add_argument("--label", default=None, help="Also keep the summary as bench/results/<label>.json.")
    parser.add_argument("--no-write", action="store_true", help="Do not touch BENCHMARK.md or docs/.")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Rounds of every system at every N, interleaved (each repetition runs every system in "
                             "turn on fresh servers); the report gives the median of each figure.")
    parser.add_argument("--product-root", default=ROOT,
                        help="Run the product from this checkout instead (e.g. an older commit, to compare).")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="Extra setting for the product (repeatable), e.g. POLL_GATHER_SECONDS=0.05.")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in (args.sizes or ("5" if args.smoke else "1,20,100")).split(",")]
    args.tokens = args.tokens or (20 if args.smoke else 200)
    args.spread = args.spread if args.spread is not None else (0.2 if args.smoke else 1.0)
    # Seconds the server idles before each round, and that client processes get to start.
    args.pause, args.setup = (0.2, 0.5) if args.smoke else (1.0, 1.0)
    args.systems = [name for name in args.systems.split(",") if name]
    unknown = [name for name in args.systems if name not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    if args.smoke:
        args.no_write = True
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = args.out or os.path.join(ROOT, "bench", "results", "raw", stamp)
    args.product_env = dict(item.split("=", 1) for item in args.env)
    return args


def start_server(name, upstream_url, args, log_dir):
    if name == "sse":
        return launch.sse_relay(upstream_url, log_dir)
    if name in ("memory", "shortpoll"):
        return launch.memory_longpoll(upstream_url, "gunicorn", args.threads, log_dir)
    if name == "memory-stdlib":
        return launch.memory_longpoll(upstream_url, "stdlib", args.threads, log_dir)
    workers = int(name.split("-")[1].rstrip("w"))
    return launch.product(upstream_url, workers, args.threads, args.product_env, log_dir, args.product_root)


def client_processes(n, args):
    return args.client_processes or max(1, math.ceil(n / STREAMS_PER_CLIENT_PROCESS))


def run_clients(name, server, n, tokens, args, out_dir, spread, measure=True):
    """Runs one round of n streams against server; returns (client reports, cpu, peak rss)."""
    processes = client_processes(n, args)
    mode = CLIENT_MODES[name]
    setup = args.setup + (0.03 * n if mode == "product" else 0.0)
    start_at = time.time() + setup
    shares = [n // processes + (1 if index < n % processes else 0) for index in range(processes)]
    started, first = [], 0
    for index, share in enumerate(shares):
        out = os.path.join(out_dir, f"{name}-n{n}-client{index}.json")
        command = [sys.executable, os.path.join(ROOT, "bench", "clients.py"), "--mode", mode, "--base", server.url,
                   "--first", str(first), "--streams", str(share), "--total", str(n), "--tokens", str(tokens),
                   "--rate", f"{args.rate:g}", "--start-at", f"{start_at:.6f}", "--spread", f"{spread:g}",
                   "--out", out]
        started.append((subprocess.Popen(command, cwd=ROOT), out))
        first += share
    time.sleep(max(0.0, start_at - time.time()))
    deadline = time.monotonic() + tokens / args.rate + spread + 60
    with TreeSampler(server.pid) as sampler:
        for process, _out in started:
            try:
                process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    reports = []
    for process, out in started:
        if os.path.exists(out):
            with open(out) as handle:
                reports.append(json.load(handle))
        else:
            reports.append({"cpu_seconds": 0.0, "wall_seconds": 1.0, "streams": [], "missing": True})
    return reports, sampler.cpu, sampler.peak_rss


def run_system(name, upstream_url, args, rounds, raw, repetition=0):
    log_dir = os.path.join(args.out, f"rep{repetition + 1}") if args.repeat > 1 else args.out
    os.makedirs(log_dir, exist_ok=True)
    server = start_server(name, upstream_url, args, log_dir)
    try:
        # A short warm-up reply loads lazily imported code and opens pools; it is not measured.
        run_clients(name, server, 2, 5, args, log_dir, 0.0)
        time.sleep(args.pause / 2)
        baseline_rss = rss_bytes(tree_pids(server.pid))
        for n in args.sizes:
            time.sleep(args.pause)
            reports, cpu, peak_rss = run_clients(name, server, n, args.tokens, args, log_dir, args.spread)
            streams = [stream for client in reports for stream in client["streams"]]
            summary = summarize(streams, n, cpu, peak_rss, baseline_rss, args.tokens, reports)
            summary["baseline_rss_mb"] = baseline_rss / 2**20
            rounds.setdefault(name, {}).setdefault(n, []).append(summary)
            raw.setdefault(name, {}).setdefault(n, []).extend(
                value for stream in streams for value in stream["latencies_ms"])
            report.print_round(name, summary)
    finally:
        server.stop()


def main(argv=None):
    args = parse_args(argv)
    # A terminated run still stops the servers it started (they live in their own sessions).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.makedirs(args.out, exist_ok=True)
    began = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rounds, raw = {}, {}
    simulator = launch.simulator(args.rate, args.tokens, args.out)
    try:
        upstream_url = simulator.url + "/v1"
        for repetition in range(args.repeat):
            for name in args.systems:
                print(f"== {SYSTEMS[name]}" + (f" (repetition {repetition + 1} of {args.repeat})"
                                               if args.repeat > 1 else ""), flush=True)
                run_system(name, upstream_url, args, rounds, raw, repetition)
    finally:
        simulator.stop()
    results = {name: {n: combine(summaries) for n, summaries in by_n.items()} for name, by_n in rounds.items()}
    if args.repeat > 1:
        print(f"== medians of {args.repeat} rounds", flush=True)
        for name, by_n in results.items():
            for summary in by_n.values():
                report.print_round(name, summary)
    run = {
        "date": began.isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"sizes": args.sizes, "rate": args.rate, "tokens": args.tokens, "spread": args.spread,
                     "repeat": args.repeat,
                     "threads": args.threads, "product_env": args.product_env,
                     "product_root": os.path.relpath(args.product_root, ROOT)},
        "machine": machine_description(load_before, os.getloadavg()),
        "results": {name: {str(n): summary for n, summary in by_n.items()} for name, by_n in results.items()},
        "rounds": ({name: {str(n): summaries for n, summaries in by_n.items()} for name, by_n in rounds.items()}
                   if args.repeat > 1 else None),
    }
    checks = report.evaluate(results, args.sizes)
    run["targets"] = checks
    report.print_targets(checks)
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(run, handle, indent=1)
    if args.label:
        with open(os.path.join(ROOT, "bench", "results", f"{args.label}.json"), "w") as handle:
            json.dump(run, handle, indent=1)
    if args.smoke:
        report.plot(raw, results, args.out)
    elif not args.no_write:
        report.plot(raw, results, os.path.join(ROOT, "docs"))
        report.write_markdown(run, SYSTEMS, os.path.join(ROOT, "BENCHMARK.md"))
    incomplete = [f"{name} N={n}" for name, rounds in results.items() for n, summary in rounds.items()
                  if not is_complete(summary) or summary["errors"]]
    if incomplete:
        print("FAIL: lost, duplicated or out-of-order tokens (or broken streams) in " + ", ".join(incomplete))
        return 1
    return 0 if args.smoke or all(check["passed"] for check in checks) else 2


def machine_description(load_before, load_after):
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    memory_kb = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(memory_kb / 2**20, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "load_before": [round(value, 2) for value in load_before],
            "load_after": [round(value, 2) for value in load_after]}


if __name__ == "__main__":
    sys.exit(main())
