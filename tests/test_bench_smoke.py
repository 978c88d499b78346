"""The benchmark's smoke mode: every system relays short replies to 5 clients with no token lost or repeated."""
import json
import subprocess
import sys

from tests.servers import ROOT, stop_process_group


def test_the_smoke_benchmark_delivers_every_token_exactly_once_in_every_system(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        # SIGTERM first: the bench then stops the servers it started in their own sessions.
        stop_process_group(process, timeout=20)
    assert process.returncode == 0, output
    with open(tmp_path / "summary.json") as handle:
        results = json.load(handle)["results"]
    assert set(results) == {"sse", "memory", "shortpoll", "product-1w", "product-2w", "memory-stdlib"}, output
    for name, rounds in results.items():
        figures = rounds["5"]
        # Only completeness is judged here; timings on a shared CI machine mean nothing.
        assert figures["tokens"] == 5 * 20, (name, figures)
        assert (figures["lost"], figures["duplicated"], figures["out_of_order"], figures["errors"]) == (0, 0, 0, 0), \
            (name, figures)
