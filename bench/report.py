"""The benchmark's output: a line per round, PASS/FAIL per target, the BENCHMARK.md tables and the plots."""
import os

from bench.stats import is_complete

PRODUCTS = ("product-1w", "product-2w")
RESULTS_START = "<!-- bench:results:start -->"
RESULTS_END = "<!-- bench:results:end -->"


def _ms(value):
    return "–" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")


def print_round(name, s):
    print(f"  {name:11} N={s['n']:<4} p50 {_ms(s['p50_ms'])} p90 {_ms(s['p90_ms'])} p99 {_ms(s['p99_ms'])} "
          f"max {_ms(s['max_ms'])} ms | first {_ms(s['first_token_p50_ms'])} ms | "
          f"{s['requests_per_reply']:.0f} req/reply | cpu {_ms(s['cpu_ms_per_1000_tokens'])} ms/1k tok | "
          f"rss {s['peak_rss_mb']:.0f} MB | errors {s['errors']} lost {s['lost']} dup {s['duplicated']} | "
          f"clients {s['client_processes']} (busiest {100 * s['client_cpu_busy']:.0f}% CPU)", flush=True)
    for sample in s["error_samples"]:
        print(f"    error: {sample}", flush=True)


def _check(name, target, passed, detail):
    return {"name": name, "target": target, "passed": bool(passed), "detail": detail}


def evaluate(results, sizes):
    """Returns issue 7's targets, each with PASS/FAIL and the figures behind it."""
    checks = []
    big, small = max(sizes), min(sizes)
    for product in PRODUCTS:
        rounds = results.get(product)
        if not rounds:
            continue
        mine = rounds.get(big)
        memory = results.get("memory", {}).get(big)
        sse = results.get("sse", {}).get(big)
        if mine and memory and mine["p99_ms"] is not None and memory["p99_ms"]:
            ratio = mine["p99_ms"] / memory["p99_ms"]
            checks.append(_check(product, f"N={big}: p99 ≤ 0.5 × in-memory long-poll p99", ratio <= 0.5,
                                 f"{_ms(mine['p99_ms'])} ms vs {_ms(memory['p99_ms'])} ms = {ratio:.2f}×"))
        if mine and sse and mine["cpu_ms_per_1000_tokens"] and sse["cpu_ms_per_1000_tokens"]:
            ratio = mine["cpu_ms_per_1000_tokens"] / sse["cpu_ms_per_1000_tokens"]
            checks.append(_check(product, f"N={big}: CPU per 1,000 tokens ≤ 2 × SSE relay", ratio <= 2.0,
                                 f"{_ms(mine['cpu_ms_per_1000_tokens'])} ms vs "
                                 f"{_ms(sse['cpu_ms_per_1000_tokens'])} ms = {ratio:.2f}×"))
        idle = rounds.get(1)
        if idle and idle["p50_ms"] is not None:
            checks.append(_check(product, "N=1: p50 ≤ 25 ms", idle["p50_ms"] <= 25.0,
                                 f"p50 {_ms(idle['p50_ms'])} ms; CPU {_ms(idle['cpu_ms_per_1000_tokens'])} ms "
                                 "per 1,000 tokens"))
        if mine:
            checks.append(_check(product, f"N={big}: memory per active stream ≤ 1 MB",
                                 mine["rss_per_stream_mb"] <= 1.0,
                                 f"{mine['rss_per_stream_mb']:.2f} MB (peak {mine['peak_rss_mb']:.0f} MB, "
                                 f"idle {mine['baseline_rss_mb']:.0f} MB)"))
    for name, rounds in results.items():
        bad = [f"N={n}: lost {s['lost']}, duplicated {s['duplicated']}, out of order {s['out_of_order']}, "
               f"broken streams {s['errors']}" for n, s in sorted(rounds.items())
               if not is_complete(s) or s["errors"]]
        checks.append(_check(name, f"0 tokens lost or duplicated at N={', '.join(str(n) for n in sorted(rounds))}",
                             not bad, "; ".join(bad) or "every token exactly once, in order"))
    del small
    return checks


def print_targets(checks):
    print("== targets")
    for check in checks:
        print(f"  {'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['target']} — {check['detail']}")


def plot(raw, results, folder):
    """Draws latency against N and the per-token latency CDF at the largest N as PNG files in folder."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plots")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, rounds in results.items():
        sizes = sorted(rounds)
        line, = axes.plot(sizes, [rounds[n]["p50_ms"] for n in sizes], marker="o", label=f"{name} p50")
        axes.plot(sizes, [rounds[n]["p99_ms"] for n in sizes], marker="x", linestyle="--", color=line.get_color(),
                  label=f"{name} p99")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("concurrent streams N")
    axes.set_ylabel("per-token delivery latency (ms)")
    axes.set_title("Latency against N (50 tokens/s per stream)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "bench-latency-vs-n.png"), dpi=110)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(7, 4.5))
    big = max(n for rounds in raw.values() for n in rounds)
    for name, rounds in raw.items():
        values = sorted(rounds.get(big, []))
        if values:
            axes.plot([max(value, 0.1) for value in values], [(index + 1) / len(values) for index in range(len(values))],
                      label=name)
    axes.set_xscale("log")
    axes.set_xlabel("per-token delivery latency (ms)")
    axes.set_ylabel("fraction of tokens")
    axes.set_title(f"Per-token latency CDF at N={big}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "bench-latency-cdf.png"), dpi=110)
    plt.close(figure)


def results_markdown(run, systems):
    """Returns the generated part of BENCHMARK.md: settings, machine, table and targets."""
    machine = run["machine"]
    settings = run["settings"]
    lines = [
        RESULTS_START,
        f"## Recorded run: {run['date']}",
        "",
        f"Command: `{run['command'].strip()}`",
        "",
        f"Machine: {machine['cpu'] or 'unknown CPU'}, {machine['cores']} cores, {machine['memory_gb']} GB RAM, "
        f"{machine['os']}, Python {machine['python']}. Load average before the run "
        f"{' / '.join(str(value) for value in machine['load_before'])}, after "
        f"{' / '.join(str(value) for value in machine['load_after'])} (1 / 5 / 15 min).",
        "",
        f"Load: each stream is one reply of {settings['tokens']} tokens at {settings['rate']:g} tokens/s; the N "
        f"streams start spread evenly over {settings['spread']:g} s. The product runs gunicorn's asgi worker "
        f"(`front.py`: polls on the event loop, Flask on {settings['threads']} threads per worker)" +
        (f" and {settings['product_env']}" if settings["product_env"] else "") + "." +
        (f" Every system ran {settings['repeat']} rounds at every N, interleaved (each repetition ran every "
         "system in turn on a fresh server), and each figure below is the median of its rounds (faults are "
         "added up); the rounds' own p99 and CPU are listed after the table." if settings.get("repeat", 1) > 1 else ""),
        "",
        "| system | N | p50 ms | p90 ms | p99 ms | max ms | first token p50 ms | requests / reply | "
        "bytes / reply | server CPU ms / 1,000 tokens | peak RSS MB | MB / stream | broken streams | lost | "
        "duplicated | client processes (busiest CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = sorted({int(n) for rounds in run["results"].values() for n in rounds})
    for n in sizes:
        for name, rounds in run["results"].items():
            s = rounds.get(str(n))
            if s is None:
                continue
            lines.append(
                f"| {systems[name]} | {n} | {_ms(s['p50_ms'])} | {_ms(s['p90_ms'])} | {_ms(s['p99_ms'])} | "
                f"{_ms(s['max_ms'])} | {_ms(s['first_token_p50_ms'])} | {s['requests_per_reply']:.1f} | "
                f"{s['bytes_per_reply']:,.0f} | {_ms(s['cpu_ms_per_1000_tokens'])} | {s['peak_rss_mb']:.0f} | "
                f"{s['rss_per_stream_mb']:.2f} | {s['errors']} | {s['lost']} | {s['duplicated']} | "
                f"{s['client_processes']} ({100 * s['client_cpu_busy']:.0f}%) |")
    if settings.get("repeat", 1) > 1:
        lines += ["", f"Each round at N = {sizes[-1]}:", "", "| system | p99 ms | server CPU ms / 1,000 tokens |",
                  "|---|---|---|"]
        for name, rounds in run["results"].items():
            s = rounds.get(str(sizes[-1]))
            if s is not None and "per_round" in s:
                lines.append(f"| {systems[name]} | {', '.join(_ms(v) for v in s['per_round']['p99_ms'])} | "
                             f"{', '.join(_ms(v) for v in s['per_round']['cpu_ms_per_1000_tokens'])} |")
    lines += ["", "Targets (issue 7), judged on ratios within this run:", ""]
    for check in run["targets"]:
        lines.append(f"- **{'PASS' if check['passed'] else 'FAIL'}** {check['name']}: {check['target']} "
                     f"({check['detail']})")
    lines += ["", "![Latency against N](docs/bench-latency-vs-n.png)", "",
              "![Per-token latency CDF](docs/bench-latency-cdf.png)", "", RESULTS_END]
    return "\n".join(lines)


def write_markdown(run, systems, path):
    """Replaces the generated results section of BENCHMARK.md, keeping the hand-written rest."""
    generated = results_markdown(run, systems)
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
    else:
        text = f"# Benchmark\n\n{RESULTS_START}\n{RESULTS_END}\n"
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        tail = rest.split(RESULTS_END, 1)[1]
        text = head + generated + tail
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    with open(path, "w") as handle:
        handle.write(text)
