"""Summaries of a benchmark round: latency percentiles, costs per reply and per token, completeness."""
import math
import statistics


def percentile(values, fraction):
    """Returns the nearest-rank percentile of values (fraction in [0, 1]), or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize(streams, n, cpu_seconds, peak_rss, baseline_rss, expected_tokens, clients):
    """Returns the figures of one round from its per-stream client results."""
    latencies = [value for stream in streams for value in stream["latencies_ms"]]
    first = [stream["first_token_ms"] for stream in streams if stream.get("first_token_ms") is not None]
    delivered = sum(stream["tokens"] for stream in streams)
    replies = max(len(streams), 1)
    broken = sum(1 for stream in streams if stream["error"])
    lost = sum(stream["lost"] for stream in streams) + expected_tokens * (n - len(streams))
    return {
        "n": n,
        "streams": len(streams),
        "tokens": delivered,
        "p50_ms": percentile(latencies, 0.50),
        "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else None,
        "first_token_p50_ms": percentile(first, 0.50),
        "first_token_max_ms": max(first) if first else None,
        "requests_per_reply": sum(stream.get("requests", 0) for stream in streams) / replies,
        "bytes_per_reply": sum(stream.get("bytes_sent", 0) + stream.get("bytes_received", 0)
                               for stream in streams) / replies,
        "cpu_seconds": cpu_seconds,
        "cpu_ms_per_1000_tokens": 1e6 * cpu_seconds / delivered if delivered else None,
        "peak_rss_mb": peak_rss / 2**20,
        "rss_per_stream_mb": max(peak_rss - baseline_rss, 0) / 2**20 / n,
        "errors": broken,
        "error_samples": sorted({stream["error"] for stream in streams if stream["error"]})[:5],
        "lost": lost,
        "duplicated": sum(stream["duplicates"] + stream["extra"] for stream in streams),
        "out_of_order": sum(stream["out_of_order"] + stream["garbage"] for stream in streams),
        "client_processes": len(clients),
        "client_cpu_busy": max((client["cpu_seconds"] / client["wall_seconds"] for client in clients), default=0.0),
    }


def is_complete(summary):
    """Tells whether every token of every reply arrived exactly once and in order."""
    return (summary["lost"] == 0 and summary["duplicated"] == 0 and summary["out_of_order"] == 0
            and summary["streams"] == summary["n"])


# Figures of a round that repeated rounds report as their median, and counts that they add up.
MEDIAN_FIELDS = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "first_token_p50_ms", "first_token_max_ms",
                 "requests_per_reply", "bytes_per_reply", "cpu_seconds", "cpu_ms_per_1000_tokens", "peak_rss_mb",
                 "rss_per_stream_mb", "client_cpu_busy", "baseline_rss_mb")
SUM_FIELDS = ("tokens", "errors", "lost", "duplicated", "out_of_order")


def combine(summaries):
    """Returns the summary of repeated rounds of one system at one N: medians of figures, sums of faults.

    Each figure is the median over the rounds on its own; every round must be complete for the
    result to be.
    """
    if len(summaries) == 1:
        return dict(summaries[0], rounds=1)
    combined = dict(summaries[0])
    for field in MEDIAN_FIELDS:
        values = [summary[field] for summary in summaries if summary.get(field) is not None]
        combined[field] = statistics.median(values) if values else None
    for field in SUM_FIELDS:
        combined[field] = sum(summary[field] for summary in summaries)
    combined["streams"] = min(summary["streams"] for summary in summaries)
    combined["error_samples"] = sorted({sample for summary in summaries for sample in summary["error_samples"]})[:5]
    combined["rounds"] = len(summaries)
    combined["per_round"] = {field: [summary[field] for summary in summaries]
                             for field in ("p99_ms", "cpu_ms_per_1000_tokens", "rss_per_stream_mb")}
    return combined
