"""Small helpers shared by the API tests: the simulator upstream, sending messages, following cursors, waiting."""
import time
from urllib.parse import urlencode

import pytest
import requests

from simulator import Simulator, lorem_tokens


def lorem(count):
    """Returns the exact text of count lorem tokens from the simulator."""
    return "".join(lorem_tokens(count))


def simulator_fixture(scope="module", **settings):
    """Returns a `sim` fixture with a simulator of its own, so its statistics count only its scope's requests."""
    settings = {"rate": 0, "content": "lorem", **settings}

    @pytest.fixture(scope=scope, name="sim")
    def own_simulator():
        with Simulator(**settings) as simulator:
            yield simulator

    return own_simulator


def app_config_fixture_using_sim():
    """Returns an `app_config` fixture that points the test app at the `sim` fixture's simulator."""

    @pytest.fixture(name="app_config")
    def app_config_using_sim(app_config, sim):
        app_config["OPENAI_BASE_URL"] = sim.url
        return app_config

    return app_config_using_sim


def simulator_env(simulator, **settings):
    """Returns the server environment that makes the app use the simulator as its upstream, plus settings."""
    return {"OPENAI_BASE_URL": simulator.url, "OPENAI_API_KEY": "sk-test", "CHAT_MODEL": "sim-chat",
            "IMAGE_MODEL": "sim-image", **settings}


def body_of(response):
    """Returns the JSON body of a Flask test response or a requests response."""
    get_json = getattr(response, "get_json", None)
    return get_json() if get_json is not None else response.json()


class ApiSession(requests.Session):
    """A requests session that sends paths relative to one server's base URL."""

    def __init__(self, base_url, timeout=30.0):
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.default_timeout = timeout

    def request(self, method, url, *args, **kwargs):
        if url.startswith("/"):
            url = self.base_url + url
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, *args, **kwargs)


def bearer_session(base_url, token, timeout=20):
    """Returns an ApiSession that sends the access token with every request."""
    session = ApiSession(base_url, timeout=timeout)
    session.headers["Authorization"] = f"Bearer {token}"
    return session


def new_conversation(client, **fields):
    """Creates a conversation and returns its id."""
    response = client.post("/api/conversations", json=fields)
    assert response.status_code == 201, body_of(response)
    return body_of(response)["id"]


def post_message(client, conversation_id, content, mode="chat"):
    """Posts a user message and returns the 202 response that started its reply."""
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": content, "mode": mode})
    assert response.status_code == 202, body_of(response)
    return response


def send(client, conversation_id, content, mode="chat"):
    """Posts a user message and returns the pending assistant reply it started."""
    return body_of(post_message(client, conversation_id, content, mode))["reply"]


def ask(client, content, mode="chat"):
    """Starts a reply to content in a new conversation and returns the reply's id."""
    return send(client, new_conversation(client), content, mode)["id"]


def ask_served_by(client, content):
    """Starts a reply to content in a new conversation; returns (reply id, PID in the answer's X-Served-By)."""
    response = post_message(client, new_conversation(client), content)
    return body_of(response)["reply"]["id"], int(response.headers["X-Served-By"])


def poll_response(client, message_id, cursor="0", timeout=2.0):
    """Polls once and returns the response, which must be a 200."""
    query = urlencode({"cursor": cursor, "timeout": timeout})
    response = client.get(f"/api/messages/{message_id}/poll?{query}")
    assert response.status_code == 200, body_of(response)
    return response


def poll(client, message_id, cursor="0", timeout=2.0):
    """Polls once and returns the answer, which must be a 200."""
    return body_of(poll_response(client, message_id, cursor, timeout))


def poll_to_end(client, message_id, cursor="0", deadline_seconds=20.0, poll_timeout=2.0):
    """Follows the cursors until the reply is done; returns (all text after cursor, last answer)."""
    deadline = time.monotonic() + deadline_seconds
    text = ""
    while True:
        answer = poll(client, message_id, cursor, poll_timeout)
        text += answer["text"]
        cursor = answer["cursor"]
        if answer["done"]:
            return text, answer
        assert time.monotonic() < deadline, f"reply {message_id} still {answer['status']} after {deadline_seconds} s"


def poll_to_end_counting_answers(client, message_id, timeout=2.0, on_response=None):
    """Polls from cursor 0 to the end, passing on_response each response; returns (text, answer, answers with text)."""
    text, cursor, answers_with_text = "", "0", 0
    while True:
        response = poll_response(client, message_id, cursor, timeout)
        if on_response is not None:
            on_response(response)
        answer = body_of(response)
        text += answer["text"]
        cursor = answer["cursor"]
        answers_with_text += bool(answer["text"])
        if answer["done"]:
            return text, answer, answers_with_text


def poll_until_text(client, message_id, min_chars=1, deadline_seconds=10.0):
    """Polls until at least min_chars of text arrived; returns (text, last answer)."""
    deadline = time.monotonic() + deadline_seconds
    text, cursor = "", "0"
    while True:
        answer = poll(client, message_id, cursor, 1.0)
        text += answer["text"]
        cursor = answer["cursor"]
        if len(text) >= min_chars or answer["done"]:
            return text, answer
        assert time.monotonic() < deadline, f"reply {message_id} sent no text in {deadline_seconds} s"


def get_message(client, message_id):
    """Returns the message object as GET /api/messages/<id> answers it."""
    response = client.get(f"/api/messages/{message_id}")
    assert response.status_code == 200, body_of(response)
    return body_of(response)


def stop(client, message_id):
    """Stops a reply and returns the message the stop answered."""
    response = client.post(f"/api/messages/{message_id}/stop")
    assert response.status_code == 200, body_of(response)
    return body_of(response)


def wait_until(predicate, timeout, interval=0.05):
    """Returns True as soon as predicate() is true, or False after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
