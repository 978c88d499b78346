"""Small helpers shared by the API tests: sending messages, following a reply's cursors, waiting."""
import time
from urllib.parse import urlencode

import requests


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


def new_conversation(client, **fields):
    """Creates a conversation and returns its id."""
    response = client.post("/api/conversations", json=fields)
    assert response.status_code == 201, body_of(response)
    return body_of(response)["id"]


def send(client, conversation_id, content, mode="chat"):
    """Posts a user message and returns the pending assistant reply it started."""
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": content, "mode": mode})
    assert response.status_code == 202, body_of(response)
    return body_of(response)["reply"]


def ask(client, content, mode="chat"):
    """Starts a reply to content in a new conversation and returns the reply's id."""
    return send(client, new_conversation(client), content, mode)["id"]


def poll(client, message_id, cursor="0", timeout=2.0):
    """Polls once and returns the answer, which must be a 200."""
    query = urlencode({"cursor": cursor, "timeout": timeout})
    response = client.get(f"/api/messages/{message_id}/poll?{query}")
    assert response.status_code == 200, body_of(response)
    return body_of(response)


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
