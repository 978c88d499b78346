"""Behind a buffering proxy: a real nginx running deploy/nginx-relay.conf in front of gunicorn.

The site buffers responses (64k buffers), gzips every type, ignores X-Accel-Buffering and
cuts a response silent for proxy_read_timeout. Long-poll answers are whole bodies, so
tokens still arrive promptly; a plain SSE stream through the same proxy arrives in one
lump at its end, which is why the product long-polls.
"""
import statistics
import threading
import time

import pytest
import requests

from tests import deployed
from tests.helpers import ask, bearer_session, body_of, simulator_env, simulator_fixture, stop
from tests.nginx import nginx_proxy
from tests.servers import free_port

TOKEN = "proxy-test-token"
POLL_TIMEOUT = 2.0  # the server's hold, kept below SHORT_READ_TIMEOUT as docs/DEPLOY.md asks
POLL_TIMEOUT_MAX = 2.5
SHORT_READ_TIMEOUT = 3  # seconds; the shipped 30 s, scaled down to keep the test fast
TOKENS, RATE = 60, 20  # a three-second reply of timestamp tokens
SSE_TOKENS, SSE_RATE = 30, 15  # a two-second SSE stream


def report(request, line):
    """Writes a measured figure to the terminal, so a run shows the numbers docs/DEPLOY.md quotes."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(f"[proxy] {line}")


sim = simulator_fixture()


@pytest.fixture(scope="module")
def app_server(sim):
    """gunicorn as deploy/relay-web.service runs it."""
    env = simulator_env(sim, ACCESS_TOKENS=TOKEN, POLL_TIMEOUT=POLL_TIMEOUT, POLL_TIMEOUT_MAX=POLL_TIMEOUT_MAX,
                        MAX_RUNNING_PER_OWNER=20, MESSAGES_PER_MINUTE=1000)
    with deployed.unit_server("relay-web.service", env) as base_url:
        yield base_url


def address(base_url):
    return base_url.split("://", 1)[1]


@pytest.fixture(scope="module")
def proxy(app_server, sim):
    """nginx with the shipped site; /v1/ also reaches the simulator, through the same proxy settings."""
    simulator = f"\n    location /v1/ {{\n        proxy_pass http://127.0.0.1:{sim.port};\n    }}\n"
    with nginx_proxy(address(app_server), extra_locations=simulator) as base_url:
        yield base_url


def api(base_url):
    return bearer_session(base_url, TOKEN)


def start_reply(base_url, directive):
    return ask(api(base_url), f"go {directive}")


def follow_timestamps(base_url, reply_id, results):
    """Polls a reply of timestamp tokens to its end, recording each token's delivery latency in seconds."""
    session = api(base_url)
    cursor, text, latencies, encodings = "0", "", [], set()
    while True:
        response = session.get(f"/api/messages/{reply_id}/poll", params={"cursor": cursor, "timeout": 5})
        received = time.time()
        assert response.status_code == 200, response.text[:300]
        answer = body_of(response)
        encodings.add(response.headers.get("Content-Encoding"))
        latencies += [received - int(token) / 1e6 for token in answer["text"].split()]
        text += answer["text"]
        cursor = answer["cursor"]
        if answer["done"]:
            break
    results[base_url] = {"text": text, "latencies": latencies, "encodings": encodings}


def p90(values):
    return statistics.quantiles(values, n=10)[-1]


def test_tokens_reach_a_polling_client_through_the_buffering_proxy_within_twice_the_direct_latency(
        request, app_server, proxy):
    reply_id = start_reply(app_server, f"[[sim content=timestamps tokens={TOKENS} rate={RATE}]]")
    results = {}
    followers = [threading.Thread(target=follow_timestamps, args=(url, reply_id, results)) for url in (app_server, proxy)]
    for follower in followers:
        follower.start()
    for follower in followers:
        follower.join(30)
    direct, proxied = results[app_server], results[proxy]
    assert proxied["text"] == direct["text"]
    assert len(proxied["latencies"]) == TOKENS
    assert "gzip" in proxied["encodings"], "the proxy should gzip the answers, as the hostile config says"
    figures = {name: (statistics.median(result["latencies"]), p90(result["latencies"]))
               for name, result in (("direct", direct), ("proxied", proxied))}
    report(request, "token latency median / p90: " + ", ".join(
        f"{name} {median * 1000:.0f} / {ninety * 1000:.0f} ms" for name, (median, ninety) in figures.items()))
    (direct_median, direct_p90), (proxied_median, proxied_p90) = figures["direct"], figures["proxied"]
    # Within 2x of the direct path; the absolute slack absorbs scheduling noise on a loaded 2-core machine.
    assert proxied_median <= 2 * direct_median + 0.05, figures
    assert proxied_p90 <= 2 * direct_p90 + 0.10, figures
    assert proxied_median < 0.5, figures


def read_stream_timed(url, content):
    """POSTs a streaming chat completion; returns (seconds to the headers, [(seconds, bytes) per body read], text)."""
    started = time.monotonic()
    response = requests.post(url, json={"model": "sim-chat", "stream": True,
                                        "messages": [{"role": "user", "content": content}]},
                             stream=True, timeout=30)
    headers_at = time.monotonic() - started
    assert response.status_code == 200
    reads, body = [], b""
    while True:
        # read1 returns what has arrived (decompressed), so each read is timed as it lands.
        piece = response.raw.read1(65536, decode_content=True)
        if not piece:
            break
        reads.append((time.monotonic() - started, len(piece)))
        body += piece
    response.close()
    text = "".join(line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: "))
    return headers_at, reads, text


def test_a_plain_sse_stream_through_the_same_proxy_arrives_in_one_lump_at_the_end(request, sim, proxy):
    content = f"tell me [[sim content=lorem tokens={SSE_TOKENS} rate={SSE_RATE}]]"
    duration = (SSE_TOKENS - 1) / SSE_RATE
    direct_headers, direct_reads, direct_text = read_stream_timed(f"http://127.0.0.1:{sim.port}/v1/chat/completions",
                                                                  content)
    proxied_headers, proxied_reads, proxied_text = read_stream_timed(f"{proxy}/v1/chat/completions", content)
    report(request, f"SSE stream of {duration:.1f} s: direct headers at {direct_headers:.2f} s, first data at "
                    f"{direct_reads[0][0]:.2f} s; proxied headers at {proxied_headers:.2f} s, first data at "
                    f"{proxied_reads[0][0]:.2f} s, last at {proxied_reads[-1][0]:.2f} s")
    assert "[DONE]" in direct_text and "[DONE]" in proxied_text
    # Directly, the stream flows token by token.
    assert direct_reads[0][0] < 0.5 * duration
    assert len(direct_reads) > SSE_TOKENS / 2
    # Through the buffering proxy nothing arrives, not even the headers, until the stream has ended.
    assert proxied_headers > 0.9 * duration
    assert proxied_reads[0][0] > 0.9 * duration
    assert proxied_reads[-1][0] - proxied_reads[0][0] < 0.3


def test_polls_held_for_the_servers_timeout_are_never_cut_by_the_proxys_read_timeout(app_server, sim):
    with nginx_proxy(address(app_server), read_timeout=f"{SHORT_READ_TIMEOUT}s") as proxied:
        reply_id = start_reply(app_server, "[[sim stall=20]]")  # no text for 20 s
        session = api(proxied)
        try:
            for _ in range(3):
                started = time.monotonic()
                response = session.get(f"/api/messages/{reply_id}/poll", params={"cursor": "0"})
                held = time.monotonic() - started
                assert response.status_code == 200, response.text[:300]
                answer = body_of(response)
                assert (answer["text"], answer["cursor"], answer["done"]) == ("", "0", False)
                assert POLL_TIMEOUT - 0.1 <= held < SHORT_READ_TIMEOUT, held
        finally:
            stop(api(app_server), reply_id)


def test_a_client_asking_a_longer_hold_than_the_proxy_allows_is_clamped_to_the_servers_maximum(app_server):
    with nginx_proxy(address(app_server), read_timeout=f"{SHORT_READ_TIMEOUT}s") as proxied:
        reply_id = start_reply(app_server, "[[sim stall=20]]")
        try:
            for base_url in (app_server, proxied):
                started = time.monotonic()
                try:
                    response = api(base_url).get(f"/api/messages/{reply_id}/poll",
                                                 params={"cursor": "0", "timeout": 60}, timeout=SHORT_READ_TIMEOUT + 2)
                except requests.Timeout:
                    pytest.fail(f"{base_url} held a poll asking timeout=60 past POLL_TIMEOUT_MAX={POLL_TIMEOUT_MAX}")
                held = time.monotonic() - started
                assert response.status_code == 200, response.text[:300]
                assert body_of(response)["text"] == ""
                assert POLL_TIMEOUT_MAX - 0.1 <= held < SHORT_READ_TIMEOUT, held
        finally:
            stop(api(app_server), reply_id)


def test_when_the_app_is_down_the_proxy_still_answers_api_requests_in_the_json_error_shape():
    with nginx_proxy(f"127.0.0.1:{free_port()}") as proxied:
        response = requests.get(f"{proxied}/api/config", timeout=10)
        page = requests.get(f"{proxied}/", timeout=10)
    assert response.status_code == 503
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    error = response.json()["error"]
    assert error["code"] == "not_ready" and error["message"]
    assert page.status_code == 502  # pages keep nginx's own error page
