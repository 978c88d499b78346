"""Owners see only their own things; access tokens and rate limits hold."""
import time

import pytest

from tests.test_api import LOREM, ask, assert_error, new_conversation, poll_to_end, send


@pytest.fixture
def other(app):
    """A second browser: another cookie jar, so another owner."""
    return app.test_client()


def test_another_owner_gets_404_for_everything_that_is_not_theirs(client, other):
    conversation, sent = ask(client)
    reply_id = sent["reply"]["id"]
    poll_to_end(client, reply_id)
    cid = conversation["id"]
    assert other.get("/api/conversations").json["conversations"] == []
    assert_error(other.get(f"/api/conversations/{cid}"), 404, "not_found")
    assert_error(other.patch(f"/api/conversations/{cid}", json={"title": "mine"}), 404, "not_found")
    assert_error(other.delete(f"/api/conversations/{cid}"), 404, "not_found")
    assert_error(send(other, cid, "hello"), 404, "not_found")
    assert_error(other.get(f"/api/messages/{reply_id}"), 404, "not_found")
    assert_error(other.get(f"/api/messages/{reply_id}/poll?cursor=0"), 404, "not_found")
    assert_error(other.post(f"/api/messages/{reply_id}/stop"), 404, "not_found")
    assert_error(other.post(f"/api/messages/{reply_id}/regenerate"), 404, "not_found")
    assert_error(other.get(f"/api/messages/{reply_id}/image"), 404, "not_found")
    # Nothing the other owner tried changed anything.
    body = client.get(f"/api/conversations/{cid}").json
    assert body["conversation"]["title"] == conversation["title"] or body["conversation"]["title"]
    assert [m["id"] for m in body["messages"]] == [sent["message"]["id"], reply_id]


def test_another_owner_cannot_stop_a_running_reply(client, other):
    _, sent = ask(client, "[[sim content=lorem tokens=200 rate=100]]")
    assert_error(other.post(f"/api/messages/{sent['reply']['id']}/stop"), 404, "not_found")
    _, answer = poll_to_end(client, sent["reply"]["id"])
    assert answer["status"] == "done"


@pytest.fixture
def token_config(app_config):
    app_config["ACCESS_TOKENS"] = "alpha-token,beta-token"
    return app_config


def test_with_tokens_every_api_call_without_one_answers_401(token_config, client):
    assert_error(client.get("/api/conversations"), 401, "unauthorized")
    assert_error(client.post("/api/conversations", json={}), 401, "unauthorized")
    assert_error(client.get("/api/config"), 401, "unauthorized")
    assert_error(client.get("/api/messages/x/poll?cursor=0"), 401, "unauthorized")
    assert_error(client.get("/api/conversations", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/session").json == {"signed_in": False, "auth_required": True}


def test_a_bearer_token_is_one_owner_shared_with_a_signed_in_browser(token_config, client, app):
    bearer = {"Authorization": "Bearer alpha-token"}
    created = client.post("/api/conversations", json={"title": "from a script"}, headers=bearer)
    assert created.status_code == 201
    browser = app.test_client()
    assert_error(browser.post("/api/session", json={"token": "nope"}), 401, "bad_token")
    assert browser.post("/api/session", json={"token": "alpha-token"}).json == {"signed_in": True}
    listed = browser.get("/api/conversations").json["conversations"]
    assert [c["id"] for c in listed] == [created.json["id"]]
    beta = client.get("/api/conversations", headers={"Authorization": "Bearer beta-token"})
    assert beta.json["conversations"] == []
    assert browser.delete("/api/session").status_code == 204
    assert_error(browser.get("/api/conversations"), 401, "unauthorized")


def test_without_tokens_owners_stay_isolated_and_bearer_headers_are_ignored(client, other):
    new_conversation(client, title="mine")
    headers = {"Authorization": "Bearer anything"}
    assert other.get("/api/conversations", headers=headers).json["conversations"] == []
    assert client.get("/api/session").json == {"signed_in": True, "auth_required": False}


def test_messages_per_minute_are_limited_with_retry_after(app_config, app, client):
    app.config["MESSAGES_PER_MINUTE"] = 3
    conversation = new_conversation(client)
    for _ in range(3):
        sent = send(client, conversation["id"], LOREM)
        assert sent.status_code == 202
        poll_to_end(client, sent.json["reply"]["id"])
    limited = send(client, conversation["id"], LOREM)
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert len(client.get(f"/api/conversations/{conversation['id']}").json["messages"]) == 6


def test_concurrent_replies_per_owner_are_limited(app, client, other):
    app.config["MAX_RUNNING_PER_OWNER"] = 2
    slow = "[[sim content=lorem tokens=300 rate=50]]"
    running = [ask(client, slow)[1]["reply"]["id"] for _ in range(2)]
    conversation = new_conversation(client)
    assert_error(send(client, conversation["id"], slow), 429, "rate_limited")
    assert ask(other, LOREM)[1]["reply"]["status"] == "pending"  # other owners are unaffected
    for reply_id in running:
        client.post(f"/api/messages/{reply_id}/stop")
    time.sleep(0.05)
    assert send(client, conversation["id"], LOREM).status_code == 202
