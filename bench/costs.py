"""Measures two costs of the product under gunicorn (one worker) that the full benchmark only shows mixed together.

    python -m bench.costs reply     # server CPU to start and end one short reply (post, poll, finish)
    python -m bench.costs poll      # event-loop CPU per poll, and process CPU per token, in steady state
    python -m bench.costs poll --product-root /tmp/old    # the same for another checkout

`reply`: 8 owners each post 40 messages of 2-token replies in turn and poll each to its end; the
worker's CPU (from /proc) over the whole run, divided by the replies. `poll`: 50 streams of
500-token replies at 50 tokens/s; the worker's main thread (the event loop that answers polls)
and the whole process are sampled over 4 s in the middle, when every stream is running.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import launch  # noqa: E402
from bench.procstat import tree_pids  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat_path, children=False):
    """Returns utime + stime (and the reaped children's, if asked) from a /proc stat file."""
    fields = open(stat_path).read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / TICKS


def tree_cpu(pid):
    total = 0.0
    for member in tree_pids(pid):
        try:
            total += cpu_seconds(f"/proc/{member}/stat", children=True)
        except OSError:
            pass
    return total


def reply_cost(product, owners=8, replies_per_owner=40):
    """Returns (replies, polls, server CPU seconds) for owners posting short replies one after another."""
    polls = []

    def owner(count):
        session = requests.Session()
        conversation = session.post(product.url + "/api/conversations", json={}, timeout=10).json()["id"]
        made = 0
        for index in range(count):
            posted = session.post(f"{product.url}/api/conversations/{conversation}/messages", timeout=10,
                                  json={"content": f"question {index} [[sim tokens=2 rate=2000]]"})
            posted.raise_for_status()
            reply_id, cursor = posted.json()["reply"]["id"], "0"
            while True:
                answer = session.get(f"{product.url}/api/messages/{reply_id}/poll?cursor={cursor}&timeout=5",
                                     timeout=10).json()
                made += 1
                cursor = answer["cursor"]
                if answer["done"]:
                    break
        polls.append(made)

    def run(count, each):
        threads = [threading.Thread(target=owner, args=(each,)) for _ in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(2, 2)  # warm-up: imports, pools, the first connections
    polls.clear()
    before = tree_cpu(product.pid)
    run(owners, replies_per_owner)
    return owners * replies_per_owner, sum(polls), tree_cpu(product.pid) - before


def poll_cost(product, streams=50, tokens=500, rate=50.0, out_dir=None):
    """Returns (event-loop µs per poll, process µs per token, polls per token) in steady state."""
    worker = int(open(f"/proc/{product.pid}/task/{product.pid}/children").read().split()[0])
    out = os.path.join(out_dir or tempfile.mkdtemp(prefix="bench-costs-"), "poll-clients.json")
    clients = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "clients.py"), "--mode", "product",
                                "--base", product.url, "--streams", str(streams), "--tokens", str(tokens),
                                "--rate", f"{rate:g}", "--spread", "0.5", "--out", out], cwd=ROOT)
    try:
        time.sleep(4.0)
        loop_before = cpu_seconds(f"/proc/{worker}/task/{worker}/stat")
        process_before, started = cpu_seconds(f"/proc/{worker}/stat"), time.monotonic()
        time.sleep(4.0)
        loop_after = cpu_seconds(f"/proc/{worker}/task/{worker}/stat")
        process_after, ended = cpu_seconds(f"/proc/{worker}/stat"), time.monotonic()
    finally:
        clients.wait(tokens / rate + 60)
    with open(out) as handle:
        report = json.load(handle)
    requests_made = sum(stream["requests"] for stream in report["streams"])
    delivered = sum(stream["tokens"] for stream in report["streams"])
    seconds = ended - started
    polls_per_second = requests_made / (tokens / rate)
    return ((loop_after - loop_before) / seconds / polls_per_second * 1e6,
            (process_after - process_before) / seconds / (streams * rate) * 1e6,
            requests_made / delivered)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("reply", "poll"))
    parser.add_argument("--product-root", default=ROOT, help="Run the product from this checkout instead.")
    args = parser.parse_args(argv)
    log_dir = tempfile.mkdtemp(prefix="bench-costs-")
    rate, tokens = (2000, 2) if args.what == "reply" else (50, 500)
    simulator = launch.simulator(rate, tokens, log_dir)
    try:
        settings = {"MESSAGES_PER_MINUTE": 100000} if args.what == "reply" else {}
        with launch.product(simulator.url + "/v1", 1, 128, settings, log_dir, args.product_root) as product:
            if args.what == "reply":
                replies, polls, cpu = reply_cost(product)
                print(f"{replies} replies, {polls / replies:.1f} polls each: {cpu / replies * 1000:.2f} ms of "
                      "server CPU per reply")
            else:
                per_poll, per_token, polls_per_token = poll_cost(product, out_dir=log_dir)
                print(f"steady state: event loop {per_poll:.0f} µs per poll, process {per_token:.0f} µs per token, "
                      f"{polls_per_token:.2f} polls per token")
    finally:
        simulator.stop()


if __name__ == "__main__":
    main()
