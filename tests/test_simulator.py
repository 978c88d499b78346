"""Tests of the fake OpenAI server against a real Simulator on 127.0.0.1."""
import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simulator import Simulator, demo_text, split_tokens  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sim():
    with Simulator(rate=0) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_stats(sim):
    sim.reset()
    yield


def chat_body(text, stream=True, include_usage=True, model="sim-chat"):
    body = {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def post_chat(sim, text, **options):
    return requests.post(f"{sim.url}/chat/completions", json=chat_body(text, **options), timeout=10)


def parse_events(raw):
    """Returns the SSE events of a body as ("data", text) and ("comment", text) pairs."""
    events, data = [], []
    for line in re.split(r"\r\n|\r|\n", raw):
        if line == "":
            if data:
                events.append(("data", "\n".join(data)))
                data = []
        elif line.startswith(":"):
            events.append(("comment", line[1:].strip()))
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        events.append(("data", "\n".join(data)))
    return events


def stream_events(sim, text, **options):
    response = post_chat(sim, text, **options)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return [data for kind, data in parse_events(response.content.decode("utf-8")) if kind == "data"]


def content_of(datas):
    text = ""
    for data in datas:
        if data == "[DONE]":
            continue
        chunk = json.loads(data)
        for choice in chunk.get("choices") or []:
            text += choice["delta"].get("content") or ""
    return text


def open_raw_stream(sim, text):
    """Sends a streaming chat request over a raw socket and returns the connected socket."""
    body = json.dumps(chat_body(text)).encode("utf-8")
    sock = socket.create_connection(("127.0.0.1", sim.port), timeout=5)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def read_until(sock, marker):
    received = b""
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, "the stream ended before the expected bytes arrived"
        received += chunk
    return received


def wait_for_stats(sim, condition, timeout=1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = sim.stats()
        if condition(stats):
            return stats
        time.sleep(0.02)
    return sim.stats()


def test_stream_frames_come_in_openai_order(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=5]]")
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(data) for data in datas[:-1]]
    for chunk in chunks:
        assert chunk["id"].startswith("chatcmpl-")
        assert chunk["object"] == "chat.completion.chunk"
        assert isinstance(chunk["created"], int)
        assert chunk["model"] == "sim-chat"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-2]
    assert len(content) == 5
    assert all(c["choices"][0]["finish_reason"] is None and "content" in c["choices"][0]["delta"] for c in content)
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 5
    assert content_of(datas) == "Lorem ipsum dolor sit amet."


def test_stream_without_include_usage_has_no_usage_chunk(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=3]]", include_usage=False)
    chunks = [json.loads(data) for data in datas[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in chunk for chunk in chunks)


def test_non_stream_completion_has_message_and_usage(sim):
    response = post_chat(sim, "[[sim content=lorem tokens=4]]", stream=False)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Lorem ipsum dolor sit.", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("kind", ["demo", "lorem", "echo", "xss", "unicode"])
def test_streamed_tokens_concatenate_to_the_full_text(sim, kind):
    prompt = f"Tell me something [[sim content={kind}]]"
    streamed = content_of(stream_events(sim, prompt))
    whole = post_chat(sim, prompt, stream=False).json()["choices"][0]["message"]["content"]
    assert streamed == whole
    assert streamed


def test_demo_reply_shows_what_the_page_can_render(sim):
    datas = stream_events(sim, "How do long polls work? [[sim content=demo]]")
    text = content_of(datas)
    assert 250 <= len(datas) - 4 <= 350
    assert text.startswith("## ")
    assert "How do long polls work?" in text
    for feature in ("**", "`", "](https://", "\n- ", "|---|", "```python\n", "```javascript\n", "\n> "):
        assert feature in text
    assert text == demo_text("How do long polls work?")
    assert text != demo_text("Something else")


def test_tokens_knob_truncates_or_repeats_the_demo(sim):
    assert len(stream_events(sim, "[[sim content=demo tokens=7]]")) == 7 + 4
    assert len(stream_events(sim, "[[sim content=demo tokens=700]]")) == 700 + 4


def test_split_tokens_keeps_every_character():
    text = "  Hello,  world!\n\n```python\n    x = 1\n```\n"
    tokens = split_tokens(text)
    assert "".join(tokens) == text
    assert len(tokens) > 4


def test_echo_repeats_the_user_message_without_directives(sim):
    text = content_of(stream_events(sim, "Say [[sim content=echo]] this back [[sim rate=0]]"))
    assert text == "Say this back"


def test_xss_reply_carries_every_payload(sim):
    text = content_of(stream_events(sim, "[[sim content=xss]]"))
    for payload in ('<img src=x onerror="window.__xss=1">', "<script>window.__xss=1</script>",
                    "[click](javascript:window.__xss=1)", '<iframe src="javascript:window.__xss=1"></iframe>',
                    '<svg onload="window.__xss=1">', '<a href="javascript:alert(1)">x</a>'):
        assert payload in text
    assert not text.startswith("<") and not text.rstrip().endswith(">")


def test_timestamps_are_microseconds_at_emission(sim):
    before = time.time_ns() // 1000
    text = content_of(stream_events(sim, "[[sim content=timestamps tokens=20 rate=200]]"))
    after = time.time_ns() // 1000
    stamps = [int(piece) for piece in text.split()]
    assert len(stamps) == 20
    assert before <= stamps[0] <= stamps[-1] <= after
    assert stamps[-1] - stamps[0] >= 50_000  # 19 gaps of 5 ms


def test_unicode_reply_mixes_scripts_and_emoji(sim):
    datas = stream_events(sim, "[[sim content=unicode tokens=20]]")
    text = content_of(datas)
    assert len(datas) == 20 + 4
    assert "中文" in text and "café" in text
    assert any(len(char.encode("utf-8")) == 4 for char in text)


def test_rate_paces_the_tokens(sim):
    started = time.monotonic()
    stream_events(sim, "[[sim content=lorem tokens=9 rate=40]]")
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed <= 1.5  # 8 gaps of 25 ms
    started = time.monotonic()
    stream_events(sim, "[[sim content=lorem tokens=300]]")
    assert time.monotonic() - started < 1.0


def test_latency_delays_the_first_byte(sim):
    started = time.monotonic()
    stream_events(sim, "[[sim content=lorem tokens=1 latency=0.3]]")
    assert time.monotonic() - started >= 0.28


def test_status_directive_answers_an_openai_error(sim):
    response = post_chat(sim, "[[sim status=500]]")
    assert response.status_code == 500
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"


def test_rate_limit_error_carries_retry_after(sim):
    response = post_chat(sim, "[[sim status=429]]")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert post_chat(sim, "[[sim status=429 retry_after=3]]").headers["Retry-After"] == "3"


def test_plain_status_answers_plain_text(sim):
    response = post_chat(sim, "[[sim status=500 plain=1]]")
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text == "Internal Server Error"


def test_fail_times_fails_first_requests_then_succeeds(sim):
    prompt = "[[sim status=429 fail_times=2 content=lorem tokens=2]]"
    assert [post_chat(sim, prompt).status_code for _ in range(3)] == [429, 429, 200]
    assert post_chat(sim, prompt + " ").status_code == 200
    sim.reset()
    assert post_chat(sim, prompt).status_code == 429


def test_fail_times_also_limits_stream_faults(sim):
    prompt = "[[sim content=lorem tokens=3 cut_after=1 fail_times=1]]"
    assert stream_events(sim, prompt)[-1] != "[DONE]"
    assert stream_events(sim, prompt)[-1] == "[DONE]"


def test_cut_after_ends_the_stream_without_finish_or_done(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=10 cut_after=3]]")
    assert "[DONE]" not in datas
    chunks = [json.loads(data) for data in datas]
    assert len(chunks) == 1 + 3
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)
    assert sim.stats()["disconnects"] == 0


def test_error_after_sends_an_error_frame_and_no_done(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=10 error_after=2]]")
    assert datas[-1] != "[DONE]"
    assert json.loads(datas[-1]) == {"error": {
        "message": "The server had an error while processing your request.",
        "type": "server_error", "param": None, "code": None}}
    assert len(datas) == 1 + 2 + 1


def test_malformed_after_sends_a_broken_frame_then_continues(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=4 malformed_after=2]]")
    assert datas[3] == "{this is not json"
    assert datas[-1] == "[DONE]"
    assert content_of(datas[:3] + datas[4:]) == "Lorem ipsum dolor sit."


def test_stall_holds_back_tokens_then_continues(sim):
    sock = open_raw_stream(sim, "[[sim content=lorem tokens=4 stall_after=2 stall=0.4]]")
    with sock:
        read_until(sock, b'"ipsum "')
        started = time.monotonic()
        rest = read_until(sock, b"[DONE]")
        assert time.monotonic() - started >= 0.35
    assert b'"dolor "' in rest and b'"sit."' in rest


def test_html_answers_a_web_page(sim):
    response = post_chat(sim, "[[sim html=1]]")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.lstrip().startswith("<!DOCTYPE html>")


def test_ping_inserts_comment_lines_between_tokens(sim):
    response = post_chat(sim, "[[sim content=lorem tokens=3 ping=1]]")
    events = parse_events(response.text)
    assert [kind for kind, _ in events].count("comment") == 2
    assert ("comment", "ping") in events
    assert content_of([data for kind, data in events if kind == "data"]) == "Lorem ipsum dolor."


def test_crlf_uses_crlf_line_endings_throughout(sim):
    response = post_chat(sim, "[[sim content=lorem tokens=3 crlf=1]]")
    raw = response.content
    assert b"\r\n\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert content_of([d for k, d in parse_events(raw.decode()) if k == "data"]) == "Lorem ipsum dolor."


def test_multiline_splits_each_payload_over_two_data_lines(sim):
    raw = post_chat(sim, "[[sim content=lorem tokens=3 multiline=1]]").text
    frames = [frame for frame in raw.split("\n\n") if frame]
    assert frames[-1] == "data: [DONE]"
    assert all(frame.count("data:") == 2 for frame in frames[:-1])
    datas = [d for k, d in parse_events(raw) if k == "data"]
    assert content_of(datas) == "Lorem ipsum dolor."
    assert json.loads(datas[-2])["usage"]["completion_tokens"] == 3


def test_choices_null_sends_null_choices_and_a_chunk_without_choices(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=4 choices_null=1]]")
    chunks = [json.loads(data) for data in datas[:-1]]
    assert chunks[-1]["choices"] is None and chunks[-1]["usage"]["completion_tokens"] == 4
    assert sum("choices" not in chunk for chunk in chunks) == 1
    assert content_of(datas) == "Lorem ipsum dolor sit."


def test_no_usage_ignores_include_usage(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=2 no_usage=1]]")
    chunks = [json.loads(data) for data in datas[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(chunk.get("usage") for chunk in chunks)


def test_finish_length_sets_the_finish_reason(sim):
    datas = stream_events(sim, "[[sim content=lorem tokens=2 finish=length]]")
    assert json.loads(datas[-3])["choices"][0]["finish_reason"] == "length"


def test_split_utf8_splits_characters_across_reads(sim):
    sock = open_raw_stream(sim, "[[sim content=unicode tokens=4 split_utf8=1]]")
    reads = []
    with sock:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reads.append(chunk)
    body = b"".join(reads).split(b"\r\n\r\n", 1)[1].decode("utf-8")
    assert content_of([d for k, d in parse_events(body) if k == "data"]) == "Hello 中文 café 🙂 "
    split_reads = 0
    for chunk in reads:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            split_reads += 1
    assert split_reads >= 2


def test_bad_directive_answers_400(sim):
    response = post_chat(sim, "[[sim content=poetry]]")
    assert response.status_code == 400
    assert "content" in response.json()["error"]["message"]
    assert post_chat(sim, "[[sim colour=red]]").status_code == 400


def test_image_for_gpt_image_is_a_b64_png(sim):
    response = requests.post(f"{sim.url}/images/generations",
                             json={"model": "gpt-image-1", "prompt": "a red fox", "size": "256x256"}, timeout=10)
    assert response.status_code == 200
    item = response.json()["data"][0]
    assert "url" not in item
    png = base64.b64decode(item["b64_json"])
    assert png.startswith(PNG_SIGNATURE)
    assert struct.unpack(">II", png[16:24]) == (256, 256)
    again = requests.post(f"{sim.url}/images/generations",
                          json={"model": "sim-image", "prompt": "a red fox", "size": "256x256"}, timeout=10)
    assert again.json()["data"][0]["b64_json"] == item["b64_json"]


def test_image_for_dall_e_is_a_downloadable_url(sim):
    response = requests.post(f"{sim.url}/images/generations",
                             json={"model": "dall-e-3", "prompt": "a lighthouse", "size": "1024x1024"}, timeout=10)
    item = response.json()["data"][0]
    assert item["revised_prompt"]
    download = requests.get(item["url"], timeout=10)
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "image/png"
    assert download.content.startswith(PNG_SIGNATURE)
    assert struct.unpack(">II", download.content[16:24]) == (1024, 1024)
    as_b64 = requests.post(f"{sim.url}/images/generations",
                           json={"model": "dall-e-2", "prompt": "x", "size": "256x256", "response_format": "b64_json"},
                           timeout=10)
    assert base64.b64decode(as_b64.json()["data"][0]["b64_json"]).startswith(PNG_SIGNATURE)
    assert requests.get(f"http://127.0.0.1:{sim.port}/files/abcdef.png", timeout=10).status_code == 404


def test_image_request_honours_status_and_fail_times(sim):
    body = {"model": "gpt-image-1", "prompt": "a cat [[sim status=503 fail_times=1]]", "size": "64x64"}
    first = requests.post(f"{sim.url}/images/generations", json=body, timeout=10)
    assert first.status_code == 503 and first.json()["error"]["type"] == "server_error"
    assert requests.post(f"{sim.url}/images/generations", json=body, timeout=10).status_code == 200
    assert sim.stats()["image_requests"] == 2


def test_client_closing_mid_stream_counts_as_a_disconnect(sim):
    sock = open_raw_stream(sim, "[[sim content=lorem tokens=100 rate=20]]")
    read_until(sock, b'"ipsum "')
    assert sim.stats()["active_streams"] == 1
    sock.close()
    stats = wait_for_stats(sim, lambda s: s["disconnects"] == 1)
    assert stats["disconnects"] == 1
    assert stats["active_streams"] == 0
    assert stats["streams_completed"] == 0


def test_client_closing_mid_stall_counts_as_a_disconnect_within_a_second(sim):
    sock = open_raw_stream(sim, "[[sim content=lorem tokens=5 stall_after=1 stall=10]]")
    read_until(sock, b'"Lorem "')
    sock.close()
    stats = wait_for_stats(sim, lambda s: s["disconnects"] == 1)
    assert stats["disconnects"] == 1
    assert stats["active_streams"] == 0


def test_completed_streams_are_counted(sim):
    stream_events(sim, "[[sim content=lorem tokens=2]]")
    stream_events(sim, "[[sim content=lorem tokens=2]]")
    stats = sim.stats()
    assert (stats["streams_started"], stats["streams_completed"], stats["disconnects"]) == (2, 2, 0)


def test_api_key_is_required_when_set():
    with Simulator(rate=0, api_key="sekret") as guarded:
        missing = requests.post(f"{guarded.url}/chat/completions", json=chat_body("hi", stream=False), timeout=10)
        assert missing.status_code == 401
        assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
        wrong = requests.get(f"{guarded.url}/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        good = requests.post(f"{guarded.url}/chat/completions", json=chat_body("hi [[sim content=lorem tokens=2]]"),
                             headers={"Authorization": "Bearer sekret"}, timeout=10)
        assert good.status_code == 200
        assert content_of([d for k, d in parse_events(good.text) if k == "data"]) == "Lorem ipsum."


def test_unknown_path_answers_404_json(sim):
    response = requests.get(f"{sim.url}/engines", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(f"{sim.url}/chat/completions", timeout=10).status_code == 405


def test_models_lists_the_simulated_models(sim):
    body = requests.get(f"{sim.url}/models", timeout=10).json()
    assert body["object"] == "list"
    assert [model["id"] for model in body["data"]] == ["sim-chat", "sim-chat-large", "sim-image"]
    assert all(model["object"] == "model" for model in body["data"])


def test_stats_count_requests_and_keep_the_last_bodies(sim):
    for index in range(3):
        post_chat(sim, f"message {index} [[sim content=lorem tokens=1]]", stream=False)
    stats = requests.get(f"http://127.0.0.1:{sim.port}/_sim/stats", timeout=10).json()
    assert stats["requests"] == 4
    assert stats["chat_requests"] == 3
    assert stats["last_requests"][-1]["messages"][-1]["content"].startswith("message 2")
    assert requests.post(f"http://127.0.0.1:{sim.port}/_sim/reset", timeout=10).status_code == 200
    assert sim.stats()["chat_requests"] == 0 and sim.stats()["last_requests"] == []


def test_stop_is_idempotent_and_frees_the_port():
    server = Simulator(rate=0).start()
    port = server.port
    assert server.url == f"http://127.0.0.1:{port}/v1"
    assert requests.get(f"{server.url}/models", timeout=10).status_code == 200
    server.stop()
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_command_line_serves_until_interrupted():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "simulator.py")
    process = subprocess.Popen([sys.executable, script, "--port", "0", "--rate", "0", "--content", "lorem"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://\S+/v1", line).group(0)
        response = requests.post(f"{url}/chat/completions", json=chat_body("hi", stream=False), timeout=10)
        assert response.json()["choices"][0]["message"]["content"].startswith("Lorem ipsum")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        process.stdout.close()


def test_default_directives_apply_to_every_request():
    with Simulator(rate=0, content="lorem", tokens=5, defaults="status=503") as faulty:
        response = requests.post(faulty.url + "/chat/completions",
                                 json={"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}]},
                                 timeout=5)
        assert response.status_code == 503
