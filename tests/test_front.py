"""The ASGI front answers what Flask would: the same poll JSON, the same reading of a poll's query, the same environ."""
import asyncio
import http.client
import io
import json
import threading

import time

import pytest
import requests
from flask import jsonify, request as flask_request
from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi

import api
import buffer
from front import Front, PollRequest, Protocol, call_wsgi, running_answer, wsgi_environ
from tests.helpers import ApiSession, ask, lorem, poll, poll_until_text, simulator_env
from tests.servers import gunicorn_server


def sent_by(coroutine_function, *args):
    """Runs coroutine_function(send, *args) on a loop of its own thread; returns what it sent.

    A thread of its own, because the browser tests' Playwright keeps a loop running in this one.
    """
    messages = []

    async def send(message):
        messages.append(message)

    runner = threading.Thread(target=lambda: asyncio.run(coroutine_function(send, *args)))
    runner.start()
    runner.join(10)
    return messages


@pytest.mark.parametrize("text", ["", "plain ", 'quotes " and \\ backslash', "é ü 中文 😀\n\t", "\x00\x1f</script>"])
@pytest.mark.parametrize("status", ["pending", "streaming"])
def test_a_fast_poll_answer_is_byte_for_byte_what_flask_sends(app, text, status):
    front = Front(app)
    start, body = sent_by(front.send_json, running_answer("AbC123", status, 7, text))
    row = api.PollRow("AbC123", "owner", 7 + len(text), status, "", None, None, 0, None)
    with app.test_request_context():
        expected = jsonify(api.poll_answer(row, 7, text))
    assert body["body"] == expected.get_data()
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert int(headers[b"content-length"]) == len(body["body"])


@pytest.mark.parametrize("final", [
    buffer.FinalReply("AbC123", "owner", 11, "done", "hello é 😀\x00", None, None, 0),
    buffer.FinalReply("AbC123", "owner", 4, "failed", "part", "upstream_error", "The upstream \"broke\".", 0),
    buffer.FinalReply("AbC123", "owner", 0, "done", "", None, None, 1),
])
@pytest.mark.parametrize("cursor", [0, 4])
def test_an_answer_from_a_replys_end_in_memory_is_byte_for_byte_what_flask_sends(app, final, cursor):
    cursor = min(cursor, final.length)
    front = Front(app)
    start, body = sent_by(front.send_json, front.final_answer(final, cursor))
    row = api.PollRow(final.id, final.owner, final.length, final.status, final.content, final.error_code,
                      final.error_message, final.has_image, None)
    with app.test_request_context():
        expected = jsonify(api.poll_answer(row, cursor, final.content[cursor:]))
    assert body["body"] == expected.get_data()
    assert int(dict(start["headers"])[b"content-length"]) == len(body["body"])


def test_a_poll_waiting_when_its_reply_ends_is_answered_from_memory_as_the_database_would(app_config, request):
    app_config["ACCESS_TOKENS"] = "front-token"
    app = request.getfixturevalue("app")
    client = app.test_client()
    headers = {"Authorization": "Bearer front-token"}
    conversation = client.post("/api/conversations", json={}, headers=headers).get_json()["id"]
    reply_id = client.post(f"/api/conversations/{conversation}/messages", headers=headers,
                           json={"content": "hi [[sim tokens=40 rate=80]]"}).get_json()["reply"]["id"]
    front = Front(app)
    through_flask = []
    real_run_flask = front.run_flask

    async def counted_run_flask(scope, *args):
        through_flask.append(scope["query_string"])
        return await real_run_flask(scope, *args)

    front.run_flask = counted_run_flask
    scope = {"type": "http", "method": "GET", "http_version": "1.1", "scheme": "http", "root_path": "",
             "path": f"/api/messages/{reply_id}/poll", "raw_path": f"/api/messages/{reply_id}/poll".encode(),
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"authorization", b"Bearer front-token")]}

    async def follow(send):
        cursor = "0"
        while True:
            answers = []

            async def collect(message):
                answers.append(message)
                await send(message)

            await front.fast_poll(reply_id, {**scope, "query_string": f"cursor={cursor}&timeout=5".encode()}, collect)
            answer = json.loads(answers[-1]["body"])
            cursor = answer["cursor"]
            if answer["done"]:
                return

    sent = sent_by(follow)
    bodies = [message["body"] for message in sent if message["type"] == "http.response.body"]
    last = json.loads(bodies[-1])
    text = "".join(json.loads(body)["text"] for body in bodies)
    assert last["status"] == "done" and last["done"] and text == lorem(40)
    assert through_flask == [], "the end of the reply was read through Flask"
    after = client.get(f"/api/messages/{reply_id}/poll?cursor={int(last['cursor']) - 5}&timeout=0", headers=headers)
    assert after.get_json()["text"] == text[-5:] and after.get_json()["done"]
    assert front.flask_app.extensions["relay_runtime"][1].writer.final_reply(reply_id, "someone else") is None


@pytest.mark.parametrize("query", [
    b"", b"cursor=0", b"cursor=12&timeout=3", b"cursor=&timeout=0.5", b"timeout=1&cursor=2", b"cursor=5&timeout=999",
    b"cursor=5&timeout=-3", b"cursor=4&cursor=9", b"cursor=%31%32", b"cursor=7&timeout=", b"cursor=7&other=x",
])
def test_a_plain_poll_query_reads_as_flask_reads_it(app, query):
    request = PollRequest.parse(query, app.config)
    with app.test_request_context("/api/messages/x/poll?" + query.decode("ascii")):
        expected = (buffer.parse_cursor(flask_request.args.get("cursor")), api.poll_timeout())
    assert (request.cursor, request.timeout) == expected


@pytest.mark.parametrize("query", [b"cursor=abc", b"cursor=-1", b"cursor=1&timeout=nan", b"cursor=1&timeout=soon",
                                   b"cursor=1234567890123", "cursor=\u00e9".encode("utf-8")])
def test_a_poll_query_flask_refuses_goes_to_flask_for_its_error(app, query):
    assert PollRequest.parse(query, app.config) is None


def test_the_environ_carries_path_query_headers_and_body_as_pep_3333_strings():
    scope = {
        "type": "http", "method": "POST", "http_version": "1.1", "scheme": "http",
        "path": "/api/caf\u00e9 x", "raw_path": b"/api/caf%C3%A9%20x", "query_string": b"a=1&b=%C3%A9",
        "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.2", 5555),
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2"), (b"cookie", b"a=1"),
                    (b"cookie", b"b=2"), (b"x-forwarded-for", b"1.2.3.4"), (b"x_forwarded_for", b"spoofed")],
    }
    environ = wsgi_environ(scope, b"{}", None)
    assert environ["PATH_INFO"] == "/api/caf\u00c3\u00a9 x"  # UTF-8 bytes as latin-1, as every WSGI server gives them
    assert environ["QUERY_STRING"] == "a=1&b=%C3%A9"
    assert environ["CONTENT_TYPE"] == "application/json" and environ["CONTENT_LENGTH"] == "2"
    assert environ["HTTP_COOKIE"] == "a=1; b=2"
    assert environ["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"  # the underscore spelling is dropped, not merged
    assert environ["REMOTE_ADDR"] == "127.0.0.2" and environ["SERVER_PORT"] == "8000"
    assert environ["wsgi.input"].read() == b"{}"


def test_a_wsgi_answer_comes_back_whole_and_its_iterable_is_closed():
    closed = []

    class Body(list):
        def close(self):
            closed.append(True)

    def app(environ, start_response):
        start_response("201 CREATED", [("Content-Type", "text/plain"), ("X-Test", "yes")])
        return Body([b"one ", b"", b"two"])

    status, headers, body = call_wsgi(app, {"wsgi.input": io.BytesIO()})
    assert (status, body, closed) == (201, b"one two", [True])
    assert (b"x-test", b"yes") in headers


def test_held_polls_of_a_workers_own_replies_take_no_flask_thread(simulator):
    """Eight polls held at once on a worker with two Flask threads, and the worker still answers at once."""
    replies = 8
    with gunicorn_server(env=simulator_env(simulator), workers=1, threads=2) as base_url:
        followers = []
        for _ in range(replies):
            client = ApiSession(base_url)
            reply_id = ask(client, "go [[sim tokens=20 rate=50 stall_after=1 stall=8]]")
            _text, answer = poll_until_text(client, reply_id)
            followers.append((client, reply_id, answer["cursor"]))
        answers, took = [None] * replies, [None] * replies

        def hold(index):
            client, reply_id, cursor = followers[index]
            started = time.monotonic()
            answers[index] = poll(client, reply_id, cursor, timeout=3.0)
            took[index] = time.monotonic() - started

        holders = [threading.Thread(target=hold, args=(index,)) for index in range(replies)]
        started = time.monotonic()
        for holder in holders:
            holder.start()
        time.sleep(0.5)
        health_started = time.monotonic()
        assert requests.get(base_url + "/healthz", timeout=10).status_code == 200
        health_took = time.monotonic() - health_started
        for holder in holders:
            holder.join(15)
        wall = time.monotonic() - started
    assert health_took < 1.0, f"/healthz waited {health_took:.2f} s behind held polls"
    assert all(answer is not None and answer["text"] == "" and not answer["done"] for answer in answers), answers
    assert all(seconds >= 2.5 for seconds in took), took  # each was held to its timeout, not refused
    assert wall < 5.0, f"the polls queued instead of being held together ({wall:.2f} s)"


def test_polls_answered_from_memory_keep_the_connection_and_read_on_the_wire_as_flasks_answers(simulator):
    with gunicorn_server(env=simulator_env(simulator), workers=1) as base_url:
        client = ApiSession(base_url)
        reply_id = ask(client, "go [[sim tokens=30 rate=60]]")
        host, port = base_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.get_dict().items())

        def get(cursor):
            connection.request("GET", f"/api/messages/{reply_id}/poll?cursor={cursor}&timeout=5",
                               headers={"Cookie": cookie})
            response = connection.getresponse()
            return response, json.loads(response.read())

        text, cursor, from_memory, sockets = "", "0", [], set()
        while True:
            response, answer = get(cursor)
            sockets.add(id(connection.sock))
            from_memory.append(response)
            text += answer["text"]
            cursor = answer["cursor"]
            if answer["done"]:
                break
        # Not waiting when it asks, this poll of the final reply is Flask's to answer.
        flasks, again = get(0)
        sockets.add(id(connection.sock))
        connection.close()
    assert text == lorem(30) and again["text"] == text and again["done"] and again["status"] == "done"
    assert len(from_memory) > 3 and len(sockets) == 1, "the connection was not kept alive"
    names = sorted(name.lower() for name, _value in flasks.getheaders())
    for response in from_memory:
        assert response.status == 200 and not response.will_close
        assert sorted(name.lower() for name, _value in response.getheaders()) == names
        assert response.getheader("Content-Type") == flasks.getheader("Content-Type") == "application/json"
        assert response.getheader("Server") == flasks.getheader("Server")


def test_the_gunicorn_internals_the_poll_protocol_overrides_are_there():
    """front.Protocol overrides private methods of gunicorn's asgi protocol: an upgrade that renames them fails here."""
    for name in ("_serve_http_request", "_build_http_scope", "_will_close", "_send_response_start", "_send_body"):
        assert callable(getattr(ASGIProtocol, name, None)), name
    assert gasgi.ASGIProtocol is ASGIProtocol or issubclass(gasgi.ASGIProtocol, ASGIProtocol)


def test_connections_of_the_poll_protocol_parse_http_with_gunicorns_c_parser():
    """gunicorn_h1c is in requirements.txt; asked through front.Protocol, gunicorn must still find it."""
    assert Protocol._check_h1c_protocol_available()
    assert ASGIProtocol._h1c_protocol_class is not None and ASGIProtocol._h1c_has_limits
