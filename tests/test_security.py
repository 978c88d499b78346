"""Security: owner isolation everywhere, cookie flags, constant-time tokens, no key leaks, headers, rate limits."""
import hmac
import http.server
import json
import os
import secrets
import threading
import time

import pytest
import requests
from flask import Flask
from flask.sessions import SecureCookieSessionInterface

import auth
from simulator import Simulator, lorem_tokens
from tests import pg
from tests.helpers import ApiSession, body_of, new_conversation, poll_to_end, send
from tests.servers import gunicorn_server
from tests.test_storage import table_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWNER_TOKEN = "owner-token-0001"
STRANGER_TOKEN = "stranger-token-0002"


def lorem(count):
    return "".join(lorem_tokens(count))


def assert_error(response, status, code):
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:300])
    assert response.mimetype == "application/json"
    assert set(response.json) == {"error"}
    assert response.json["error"]["code"] == code
    assert response.json["error"]["message"]


def snapshot(app):
    """Returns every row of every table, read directly from the database."""
    return table_snapshot(app.config["SQLALCHEMY_DATABASE_URI"])


# Owner isolation ---------------------------------------------------------------------------------

@pytest.fixture(params=["cookie owners", "token owners"])
def owner_and_stranger(request, app_config):
    """Two owners of the same app: two browsers, or two access tokens."""
    by_token = request.param == "token owners"
    if by_token:
        app_config["ACCESS_TOKENS"] = f"{OWNER_TOKEN},{STRANGER_TOKEN}"
    app = request.getfixturevalue("app")
    owner, stranger = app.test_client(), app.test_client()
    if by_token:
        owner.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {OWNER_TOKEN}"
        stranger.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {STRANGER_TOKEN}"
    return app, owner, stranger


def endpoint_calls(conversation_id, message_id):
    """Every request that names a conversation or a message, as (method, path, JSON body)."""
    return [
        ("GET", f"/api/conversations/{conversation_id}", None),
        ("PATCH", f"/api/conversations/{conversation_id}", {"title": "taken over"}),
        ("POST", f"/api/conversations/{conversation_id}/messages", {"content": "hello"}),
        ("DELETE", f"/api/conversations/{conversation_id}", None),
        ("GET", f"/api/messages/{message_id}", None),
        ("GET", f"/api/messages/{message_id}/poll?cursor=0&timeout=0", None),
        ("GET", f"/api/messages/{message_id}/image", None),
        ("POST", f"/api/messages/{message_id}/stop", None),
        ("POST", f"/api/messages/{message_id}/regenerate", None),
    ]


def call(client, method, path, body):
    return client.open(path, method=method, json=body) if body is not None else client.open(path, method=method)


def test_a_stranger_gets_exactly_the_answer_for_a_missing_id_on_every_endpoint(owner_and_stranger):
    app, owner, stranger = owner_and_stranger
    chat = new_conversation(owner, title="private")
    chat_reply = send(owner, chat, "secret plans [[sim tokens=10]]")
    poll_to_end(owner, chat_reply["id"])
    pictures = new_conversation(owner)
    image_reply = send(owner, pictures, "a secret map", mode="image")
    _, answer = poll_to_end(owner, image_reply["id"])
    assert owner.get(answer["image_url"]).status_code == 200
    user_message = owner.get(f"/api/conversations/{chat}").json["messages"][0]["id"]
    stranger.get("/api/conversations")  # the stranger's first request may set its own cookie
    before = snapshot(app)
    tried = 0
    for conversation_id, message_id in ((chat, chat_reply["id"]), (chat, user_message), (pictures, image_reply["id"])):
        missing_conversation = secrets.token_urlsafe(16)
        missing_message = secrets.token_urlsafe(16)
        theirs = endpoint_calls(conversation_id, message_id)
        missing = endpoint_calls(missing_conversation, missing_message)
        for (method, path, body), (_, missing_path, _) in zip(theirs, missing):
            answer = call(stranger, method, path, body)
            expected = call(stranger, method, missing_path, body)
            assert_error(answer, 404, "not_found")
            assert (answer.status_code, answer.json) == (expected.status_code, expected.json), (method, path)
            assert sorted(answer.headers.keys()) == sorted(expected.headers.keys())
            tried += 1
    assert tried == 27
    assert stranger.get("/api/conversations").json["conversations"] == []
    assert snapshot(app) == before, "a stranger's request changed what is stored"
    assert [c["title"] for c in owner.get("/api/conversations").json["conversations"]] == ["a secret map", "private"]


def test_a_stranger_can_neither_stop_nor_regenerate_nor_delete_a_running_reply(owner_and_stranger):
    app, owner, stranger = owner_and_stranger
    conversation_id = new_conversation(owner)
    reply = send(owner, conversation_id, "go on [[sim tokens=80 rate=100]]")
    assert_error(stranger.post(f"/api/messages/{reply['id']}/stop"), 404, "not_found")
    assert_error(stranger.post(f"/api/messages/{reply['id']}/regenerate"), 404, "not_found")
    assert_error(stranger.delete(f"/api/conversations/{conversation_id}"), 404, "not_found")
    assert_error(stranger.post(f"/api/conversations/{conversation_id}/messages", json={"content": "x"}), 404,
                 "not_found")
    text, answer = poll_to_end(owner, reply["id"])
    assert answer["status"] == "done"
    assert text == lorem(80)


# Cookies -----------------------------------------------------------------------------------------------

def cookie_attributes(response):
    header = response.headers["Set-Cookie"]
    return header, [part.strip().lower() for part in header.split(";")[1:]]


def test_the_owner_cookie_is_httponly_samesite_lax_and_not_secure_by_default(client, monkeypatch):
    monkeypatch.delenv("SESSION_COOKIE_SECURE", raising=False)
    header, attributes = cookie_attributes(client.get("/api/conversations"))
    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "secure" not in attributes
    assert header.startswith("session=")


def test_with_session_cookie_secure_set_the_owner_cookie_is_secure(request, monkeypatch):
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "1")
    client = request.getfixturevalue("client")
    _, attributes = cookie_attributes(client.get("/api/conversations", base_url="https://localhost"))
    assert {"secure", "httponly", "samesite=lax"} <= set(attributes)


def test_the_signed_in_cookie_has_the_same_flags(request, app_config, monkeypatch):
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "1")
    app_config["ACCESS_TOKENS"] = OWNER_TOKEN
    client = request.getfixturevalue("client")
    response = client.post("/api/session", json={"token": OWNER_TOKEN}, base_url="https://localhost")
    assert response.status_code == 200
    _, attributes = cookie_attributes(response)
    assert {"secure", "httponly", "samesite=lax"} <= set(attributes)


def test_a_tampered_or_forged_cookie_is_a_new_owner_who_sees_nothing(app, client):
    new_conversation(client, title="mine")
    cookie = client.get_cookie("session")
    victim = SecureCookieSessionInterface().get_signing_serializer(app).loads(cookie.value)["owner"]
    # The same owner id, signed with another secret.
    other = Flask("forger")
    other.secret_key = "not-the-secret"
    forged_value = SecureCookieSessionInterface().get_signing_serializer(other).dumps({"owner": victim})
    tampered_value = cookie.value[:-2] + ("AA" if not cookie.value.endswith("AA") else "BB")
    for value in (forged_value, tampered_value):
        intruder = app.test_client()
        intruder.set_cookie("session", value)
        response = intruder.get("/api/conversations")
        assert response.status_code == 200
        assert response.json["conversations"] == []
        assert "session=" in response.headers["Set-Cookie"], "the intruder should get an owner of its own"
    assert [c["title"] for c in client.get("/api/conversations").json["conversations"]] == ["mine"]


# Access tokens ------------------------------------------------------------------------------------------

TOKENS = ["alpha-token-1", "beta-token-22", "gamma-token-333"]


@pytest.fixture
def compare_calls(monkeypatch):
    """Records every hmac.compare_digest call while still comparing for real."""
    calls = []
    real = hmac.compare_digest

    def counting(left, right):
        calls.append((left, right))
        return real(left, right)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    return calls


@pytest.mark.parametrize("candidate", TOKENS + ["wrong", "alpha-token-", "alpha-token-12", "x" * 5000,
                                                 "ünïcode-token", "\udcff\udcfe", "beta-token-22 "])
def test_check_token_compares_against_every_configured_token_in_constant_time(
        app_config, request, compare_calls, candidate):
    app_config["ACCESS_TOKENS"] = ",".join(TOKENS)
    app = request.getfixturevalue("app")
    with app.test_request_context():
        owner = auth.check_token(candidate)
    assert owner == (auth.token_owner(candidate) if candidate in TOKENS else None)
    # One comparison per configured token, whichever matched and however long the guess.
    assert sorted(right for _, right in compare_calls) == sorted(token.encode() for token in TOKENS)
    assert all(isinstance(left, bytes) for left, _ in compare_calls)


def test_bearer_headers_and_sign_ins_go_through_the_constant_time_check(app_config, request, compare_calls):
    app_config["ACCESS_TOKENS"] = ",".join(TOKENS)
    client = request.getfixturevalue("client")
    assert client.get("/api/conversations", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert len(compare_calls) == len(TOKENS)
    compare_calls.clear()
    assert client.get("/api/conversations", headers={"Authorization": f"Bearer {TOKENS[2]}"}).status_code == 200
    assert len(compare_calls) == len(TOKENS)
    compare_calls.clear()
    assert client.post("/api/session", json={"token": "guess"}).status_code == 401
    assert len(compare_calls) == len(TOKENS)


# The API key never leaks -------------------------------------------------------------------------------

class EchoingUpstream:
    """A hostile upstream that copies the Authorization header it received into its error text."""

    def __init__(self):
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                echoed = f"Incorrect API key provided: {self.headers.get('Authorization', '')}"
                upstream.requests += 1
                if b"midstream" in raw:
                    frames = (json.dumps({"choices": [{"delta": {"content": "Partial "}}]}),
                              json.dumps({"error": {"message": echoed, "type": "server_error"}}))
                    body = "".join(f"data: {frame}\n\n" for frame in frames).encode()
                    self._answer(200, "text/event-stream", body)
                elif b"plain" in raw:
                    self._answer(500, "text/plain", echoed.encode())
                else:
                    self._answer(401, "application/json", json.dumps({"error": {"message": echoed}}).encode())

            def _answer(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.requests = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("prompt, code", [("hi", "upstream_auth"), ("plain", "upstream_error"),
                                          ("midstream", "upstream_error"), ("a picture", "upstream_auth")])
def test_an_upstream_echoing_the_api_key_never_gets_it_into_a_reply(request, app_config, prompt, code):
    upstream = EchoingUpstream()
    key = app_config["OPENAI_API_KEY"]
    app_config.update({"OPENAI_BASE_URL": upstream.url, "UPSTREAM_RETRIES": 0})
    try:
        client = request.getfixturevalue("client")
        reply = send(client, new_conversation(client), prompt, mode="image" if "picture" in prompt else "chat")
        _, answer = poll_to_end(client, reply["id"])
    finally:
        upstream.close()
    assert upstream.requests == 1
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == code
    assert "Incorrect API key provided" in answer["error"]["message"]
    message = client.get(f"/api/messages/{reply['id']}").get_data(as_text=True)
    assert key not in message and key not in json.dumps(answer)


@pytest.fixture(scope="module")
def distinctive_key():
    return "sk-relay-" + secrets.token_hex(16)


@pytest.mark.parametrize("upstream_key", ["same", "other"])
def test_the_api_key_appears_in_no_response_page_or_log_line_of_a_real_server(distinctive_key, upstream_key):
    key = distinctive_key
    with Simulator(rate=0, content="lorem", api_key=key if upstream_key == "same" else "sk-another-key") as sim:
        env = {"OPENAI_BASE_URL": sim.url, "OPENAI_API_KEY": key, "CHAT_MODEL": "sim-chat", "IMAGE_MODEL": "sim-image",
               "GUNICORN_ACCESS_LOG": "-", "UPSTREAM_RETRY_MAX_WAIT": 0.1, "POLL_TIMEOUT": 2}
        with gunicorn_server(env=env, workers=2, extra_args=("--log-level", "debug")) as base_url:
            seen = exercise_everything(base_url)
            log_text = base_url.log_text()
    assert len(seen) > 40
    assert "GET /api/config" in log_text, "the access log should be part of what is scanned"
    for where, text in seen + [("server log", log_text)]:
        assert key not in text, f"the API key leaked in {where}"
        assert key[3:] not in text and key[-12:] not in text, f"part of the API key leaked in {where}"


def exercise_everything(base_url):
    """Uses every page and endpoint, good and bad, including upstream failures; returns what was answered."""
    seen = []
    session = ApiSession(base_url, timeout=20)

    def record(response):
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
        seen.append((f"{response.request.method} {response.request.url}", headers + "\n" + response.text))
        return response

    for path in ("/", "/c/whatever", "/static/style.css", "/static/js/app.js", "/healthz", "/nope",
                 "/api/config", "/api/session", "/api/nope"):
        record(session.get(path))
    conversation_id = record(session.post("/api/conversations", json={"title": "keys"})).json()["id"]
    prompts = ["hello", "[[sim status=401]]", "[[sim status=403]]", "[[sim status=429]]", "[[sim status=500 plain=1]]",
               "[[sim html=1]]", "[[sim tokens=20 error_after=3]]", "[[sim tokens=20 cut_after=4]]",
               "[[sim tokens=10 malformed_after=2]]"]
    for prompt in prompts:
        reply = body_of(record(session.post(f"/api/conversations/{conversation_id}/messages",
                                            json={"content": prompt})))["reply"]
        follow(session, reply["id"], record)
    image = body_of(record(session.post(f"/api/conversations/{conversation_id}/messages",
                                        json={"content": "a key", "mode": "image"})))["reply"]
    follow(session, image["id"], record)
    record(session.get(f"/api/messages/{image['id']}/image"))
    reply_id = body_of(record(session.post(f"/api/conversations/{conversation_id}/messages",
                                           json={"content": "[[sim tokens=300 rate=50]]"})))["reply"]["id"]
    record(session.post(f"/api/messages/{reply_id}/stop"))
    record(session.post(f"/api/messages/{reply_id}/regenerate"))
    follow(session, get_last_reply(session, conversation_id, record), record)
    for path in (f"/api/conversations/{conversation_id}", "/api/conversations", f"/api/messages/{reply_id}"):
        record(session.get(path))
    record(session.post("/api/conversations", data=b"{bad json", headers={"Content-Type": "application/json"}))
    # On a connection of its own: gunicorn closes a connection whose refused body it did not read.
    record(requests.post(f"{base_url}/api/conversations", data=b"x" * (1024 * 1024 + 10),
                         headers={"Content-Type": "application/json"}, timeout=20))
    record(session.get(f"/api/messages/{reply_id}/poll?cursor=-1"))
    record(session.delete(f"/api/conversations/{conversation_id}"))
    return seen


def follow(session, reply_id, record):
    cursor = "0"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        answer = record(session.get(f"/api/messages/{reply_id}/poll", params={"cursor": cursor, "timeout": 2})).json()
        cursor = answer["cursor"]
        if answer["done"]:
            return answer
    raise AssertionError(f"reply {reply_id} did not finish")


def get_last_reply(session, conversation_id, record):
    return record(session.get(f"/api/conversations/{conversation_id}")).json()["messages"][-1]["id"]


# Security headers --------------------------------------------------------------------------------------

def assert_security_headers(response, where):
    policy = response.headers.get("Content-Security-Policy", "")
    assert "frame-ancestors 'none'" in policy, where
    assert "default-src 'self'" in policy and "script-src 'self'" in policy, where
    assert "unsafe-inline" not in policy.split("script-src", 1)[1].split(";")[0], where
    assert response.headers.get("X-Content-Type-Options") == "nosniff", where
    assert response.headers.get("Referrer-Policy") == "no-referrer", where


def static_files():
    folder = os.path.join(ROOT, "static")
    found = []
    for directory, _, names in os.walk(folder):
        for name in names:
            found.append(os.path.relpath(os.path.join(directory, name), folder))
    return sorted(found)


def test_security_headers_are_on_pages_static_files_api_answers_and_errors(app, client):
    @app.get("/api/test-crash")
    def api_crash():
        raise RuntimeError("boom with a secret stack trace")

    @app.get("/test-crash")
    def page_crash():
        raise RuntimeError("boom with a secret stack trace")

    reply_id = send(client, new_conversation(client), "hi [[sim tokens=3]]")["id"]
    poll_to_end(client, reply_id)
    assert static_files(), "no static files to check"
    checks = [("GET", "/"), ("GET", "/c/anything"), ("GET", "/healthz"), ("GET", "/nope"), ("GET", "/api/config"),
              ("GET", "/api/conversations"), ("GET", f"/api/messages/{reply_id}/poll?cursor=0"),
              ("GET", "/api/nope"), ("DELETE", "/api/config"), ("POST", "/api/conversations"),
              ("GET", "/api/test-crash"), ("GET", "/test-crash"), ("GET", "/static/missing.js")]
    checks += [("GET", f"/static/{name}") for name in static_files()]
    for method, path in checks:
        if (method, path) == ("POST", "/api/conversations"):
            response = client.post(path, data=b"x" * (1024 * 1024 + 1), content_type="application/json")
            assert response.status_code == 413
        else:
            response = client.open(path, method=method)
        assert_security_headers(response, f"{method} {path} ({response.status_code})")
        assert "secret stack trace" not in response.get_data(as_text=True)
        assert "Traceback" not in response.get_data(as_text=True)
    crash = client.get("/api/test-crash")
    assert_error(crash, 500, "internal_error")
    assert crash.headers["Cache-Control"] == "no-store"


# Rate limits under concurrent requests -------------------------------------------------------------------

def race(base_url, token, conversation_ids, content):
    """Posts one message to each conversation from its own connection, all at the same moment."""
    barrier = threading.Barrier(len(conversation_ids))
    statuses = [None] * len(conversation_ids)

    def post(index, conversation_id):
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {token}"
            session.get(f"{base_url}/healthz", timeout=10)  # opens the connection before the race
            barrier.wait()
            response = session.post(f"{base_url}/api/conversations/{conversation_id}/messages",
                                    json={"content": content}, timeout=30)
            statuses[index] = (response.status_code, response.json(), response.headers.get("Retry-After"))

    threads = [threading.Thread(target=post, args=(index, cid)) for index, cid in enumerate(conversation_ids)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def conversations_of(base_url, token, count):
    session = ApiSession(base_url)
    session.headers["Authorization"] = f"Bearer {token}"
    return [new_conversation(session) for _ in range(count)]


def assert_only(statuses, accepted):
    assert all(status is not None for status in statuses)
    assert sorted(code for code, _, _ in statuses).count(202) == accepted, [s[:2] for s in statuses]
    for code, body, retry_after in statuses:
        assert code in (202, 429), body
        if code == 429:
            assert body["error"]["code"] == "rate_limited"
            assert int(retry_after) >= 1


@pytest.fixture(scope="module")
def limits_sim():
    with Simulator(rate=0, content="lorem") as sim:
        yield sim


def test_the_running_replies_limit_holds_when_many_requests_race(limits_sim):
    env = {"OPENAI_BASE_URL": limits_sim.url, "OPENAI_API_KEY": "sk-test", "CHAT_MODEL": "sim-chat",
           "ACCESS_TOKENS": "racer", "MAX_RUNNING_PER_OWNER": 3, "MESSAGES_PER_MINUTE": 1000}
    with gunicorn_server(env=env, workers=2, threads=32) as base_url:
        statuses = race(base_url, "racer", conversations_of(base_url, "racer", 24), "[[sim tokens=300 rate=30]]")
        assert_only(statuses, 3)
        running = pg.query(base_url.database_url,
                           "SELECT count(*) FROM messages WHERE status IN ('pending', 'streaming')")
        assert running == [(3,)]


def test_the_messages_per_minute_limit_holds_when_many_requests_race(limits_sim):
    env = {"OPENAI_BASE_URL": limits_sim.url, "OPENAI_API_KEY": "sk-test", "CHAT_MODEL": "sim-chat",
           "ACCESS_TOKENS": "racer", "MAX_RUNNING_PER_OWNER": 1000, "MESSAGES_PER_MINUTE": 5}
    with gunicorn_server(env=env, workers=2, threads=32) as base_url:
        statuses = race(base_url, "racer", conversations_of(base_url, "racer", 24), "[[sim tokens=3]]")
        assert_only(statuses, 5)
        assert pg.query(base_url.database_url, "SELECT count(*) FROM messages WHERE role = 'user'") == [(5,)]
