"""Every endpoint and status code of the HTTP contract, with the real simulator upstream."""
import json
import threading
import time

import pytest

LOREM = "[[sim content=lorem tokens=20]]"


def new_conversation(client, **fields):
    response = client.post("/api/conversations", json=fields)
    assert response.status_code == 201, response.json
    return response.json


def send(client, conversation_id, content, mode=None):
    body = {"content": content}
    if mode:
        body["mode"] = mode
    return client.post(f"/api/conversations/{conversation_id}/messages", json=body)


def poll_to_end(client, message_id, timeout=10):
    cursor, text = "0", ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = client.get(f"/api/messages/{message_id}/poll?cursor={cursor}&timeout=5").json
        assert answer["cursor"] == str(int(cursor) + len(answer["text"]))
        text += answer["text"]
        cursor = answer["cursor"]
        if answer["done"]:
            return text, answer
    raise AssertionError("reply did not finish")


def ask(client, content=LOREM, **fields):
    conversation = new_conversation(client, **fields)
    response = send(client, conversation["id"], content)
    assert response.status_code == 202, response.json
    return conversation, response.json


def assert_error(response, status, code):
    assert response.status_code == status, (response.status_code, response.data[:300])
    body = response.json
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# Conversations ------------------------------------------------------------------

def test_creating_a_conversation_answers_201_with_the_resource(client):
    conversation = new_conversation(client, title="Plans", system_prompt="Be brief.", model="sim-chat-large")
    assert set(conversation) == {"id", "title", "model", "system_prompt", "created_at", "updated_at"}
    assert conversation["title"] == "Plans"
    assert conversation["model"] == "sim-chat-large"
    assert conversation["system_prompt"] == "Be brief."
    assert conversation["created_at"].endswith("Z")


def test_creating_a_conversation_needs_no_body(client):
    response = client.post("/api/conversations")
    assert response.status_code == 201
    assert response.json["model"] == "sim-chat"


def test_conversations_are_listed_newest_first_and_a_new_message_moves_one_up(client):
    first = new_conversation(client, title="first")
    time.sleep(0.01)
    second = new_conversation(client, title="second")
    listed = client.get("/api/conversations").json["conversations"]
    assert [c["id"] for c in listed] == [second["id"], first["id"]]
    response = send(client, first["id"], LOREM)
    poll_to_end(client, response.json["reply"]["id"])
    listed = client.get("/api/conversations").json["conversations"]
    assert [c["id"] for c in listed] == [first["id"], second["id"]]


def test_a_conversation_is_read_with_its_messages_oldest_first(client):
    conversation, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    body = client.get(f"/api/conversations/{conversation['id']}").json
    assert body["conversation"]["id"] == conversation["id"]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant"]
    assert body["messages"][1]["status"] == "done"
    assert body["conversation"]["title"]  # titled from the first message


def test_patch_changes_title_model_and_system_prompt(client):
    conversation = new_conversation(client)
    response = client.patch(f"/api/conversations/{conversation['id']}",
                            json={"title": "Renamed", "model": "sim-chat-large", "system_prompt": "Hi"})
    assert response.status_code == 200
    assert (response.json["title"], response.json["model"], response.json["system_prompt"]) == \
        ("Renamed", "sim-chat-large", "Hi")


def test_patch_rejects_an_unknown_model_and_changes_nothing(client):
    conversation = new_conversation(client, title="Keep")
    assert_error(client.patch(f"/api/conversations/{conversation['id']}", json={"title": "X", "model": "nope"}),
                 400, "bad_request")
    assert client.get(f"/api/conversations/{conversation['id']}").json["conversation"]["title"] == "Keep"


def test_delete_removes_the_conversation_and_its_messages(client):
    conversation, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    assert client.delete(f"/api/conversations/{conversation['id']}").status_code == 204
    assert_error(client.get(f"/api/conversations/{conversation['id']}"), 404, "not_found")
    assert_error(client.get(f"/api/messages/{sent['reply']['id']}"), 404, "not_found")
    assert_error(client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0"), 404, "not_found")


def test_delete_stops_the_running_reply_first(client):
    conversation, sent = ask(client, "[[sim content=lorem tokens=400 rate=50]]")
    time.sleep(0.3)
    assert client.delete(f"/api/conversations/{conversation['id']}").status_code == 204
    assert client.get("/api/conversations").json["conversations"] == []


def test_unknown_conversation_answers_404(client):
    assert_error(client.get("/api/conversations/doesnotexist"), 404, "not_found")
    assert_error(client.patch("/api/conversations/doesnotexist", json={"title": "x"}), 404, "not_found")
    assert_error(client.delete("/api/conversations/doesnotexist"), 404, "not_found")
    assert_error(send(client, "doesnotexist", "hi"), 404, "not_found")


# Messages ---------------------------------------------------------------------

def test_posting_a_message_answers_202_with_the_user_message_and_a_pending_reply(client):
    conversation, sent = ask(client)
    message, reply = sent["message"], sent["reply"]
    keys = {"id", "conversation_id", "role", "mode", "content", "status", "error", "image_url", "model",
            "created_at", "finished_at"}
    assert set(message) == keys and set(reply) == keys
    assert message["role"] == "user" and message["content"] == LOREM and message["status"] == "done"
    assert reply["role"] == "assistant" and reply["status"] == "pending" and reply["mode"] == "chat"
    assert reply["conversation_id"] == conversation["id"]
    assert reply["finished_at"] is None


def test_the_reply_finishes_with_the_upstream_text(client, simulator):
    _, sent = ask(client)
    text, answer = poll_to_end(client, sent["reply"]["id"])
    message = client.get(f"/api/messages/{sent['reply']['id']}").json
    assert message["status"] == "done" and message["content"] == text and text
    assert message["finished_at"] is not None
    assert answer == {"id": sent["reply"]["id"], "cursor": str(len(text)), "text": answer["text"],
                      "status": "done", "done": True, "error": None, "image_url": None}


def test_a_second_message_while_a_reply_runs_answers_409(client):
    conversation, sent = ask(client, "[[sim content=lorem tokens=200 rate=50]]")
    assert_error(send(client, conversation["id"], "again"), 409, "reply_running")
    client.post(f"/api/messages/{sent['reply']['id']}/stop")


@pytest.mark.parametrize("body", [{}, {"content": ""}, {"content": "   "}, {"content": 5},
                                  {"content": "hi", "mode": "video"}, {"content": ["a"]}])
def test_bad_message_bodies_answer_400(client, body):
    conversation = new_conversation(client)
    assert_error(client.post(f"/api/conversations/{conversation['id']}/messages", json=body), 400, "bad_request")
    assert client.get(f"/api/conversations/{conversation['id']}").json["messages"] == []


def test_content_over_the_limit_answers_413(client, app):
    conversation = new_conversation(client)
    too_long = "x" * (app.config["MAX_CONTENT_CHARS"] + 1)
    assert_error(send(client, conversation["id"], too_long), 413, "too_large")


def test_a_body_over_one_mebibyte_answers_413(client):
    conversation = new_conversation(client)
    body = json.dumps({"content": "y" * (1024 * 1024 + 10)})
    response = client.post(f"/api/conversations/{conversation['id']}/messages", data=body,
                           content_type="application/json")
    assert_error(response, 413, "too_large")


def test_a_body_that_is_not_json_answers_415(client):
    conversation = new_conversation(client)
    response = client.post(f"/api/conversations/{conversation['id']}/messages", data="content=hi",
                           content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "unsupported_media_type")


def test_json_with_a_charset_parameter_is_accepted(client):
    conversation = new_conversation(client)
    response = client.post(f"/api/conversations/{conversation['id']}/messages",
                           data=json.dumps({"content": LOREM}), content_type="application/json; charset=utf-8")
    assert response.status_code == 202


@pytest.mark.parametrize("raw", [b"{", b"[1,2]", b"\xff\xfe", b"null", b'"text"'])
def test_malformed_json_answers_400(client, raw):
    response = client.post("/api/conversations", data=raw, content_type="application/json")
    assert_error(response, 400, "bad_request")


def test_wrong_field_types_answer_400(client):
    assert_error(client.post("/api/conversations", json={"title": 5}), 400, "bad_request")
    assert_error(client.post("/api/conversations", json={"system_prompt": ["x"]}), 400, "bad_request")


def test_get_message_answers_the_message(client):
    _, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    assert client.get(f"/api/messages/{sent['message']['id']}").json["content"] == LOREM
    assert_error(client.get("/api/messages/nope"), 404, "not_found")


# Stop and regenerate -----------------------------------------------------------

def test_stop_answers_the_final_message_and_freezes_its_text(client):
    _, sent = ask(client, "[[sim content=lorem tokens=400 rate=40]]")
    reply_id = sent["reply"]["id"]
    time.sleep(0.5)
    stopped = client.post(f"/api/messages/{reply_id}/stop")
    assert stopped.status_code == 200
    assert stopped.json["status"] == "stopped" and stopped.json["finished_at"]
    frozen = stopped.json["content"]
    time.sleep(0.4)
    text, answer = poll_to_end(client, reply_id)
    assert text == frozen and answer["status"] == "stopped" and answer["done"] is True
    assert client.get(f"/api/messages/{reply_id}").json["content"] == frozen


def test_stopping_a_final_message_answers_it_unchanged(client):
    _, sent = ask(client)
    text, _ = poll_to_end(client, sent["reply"]["id"])
    again = client.post(f"/api/messages/{sent['reply']['id']}/stop")
    assert again.status_code == 200 and again.json["status"] == "done" and again.json["content"] == text


def test_regenerate_replaces_the_last_reply(client):
    conversation, sent = ask(client)
    old_id = sent["reply"]["id"]
    poll_to_end(client, old_id)
    response = client.post(f"/api/messages/{old_id}/regenerate")
    assert response.status_code == 202
    new_reply = response.json["reply"]
    assert new_reply["id"] != old_id and new_reply["status"] == "pending"
    poll_to_end(client, new_reply["id"])
    assert_error(client.get(f"/api/messages/{old_id}"), 404, "not_found")
    messages = client.get(f"/api/conversations/{conversation['id']}").json["messages"]
    assert [m["id"] for m in messages] == [sent["message"]["id"], new_reply["id"]]


def test_regenerate_of_an_earlier_message_answers_409(client):
    conversation, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    second = send(client, conversation["id"], LOREM).json
    poll_to_end(client, second["reply"]["id"])
    assert_error(client.post(f"/api/messages/{sent['reply']['id']}/regenerate"), 409, "not_last_reply")
    assert_error(client.post(f"/api/messages/{second['message']['id']}/regenerate"), 409, "not_last_reply")


def test_regenerate_while_the_reply_runs_answers_409(client):
    _, sent = ask(client, "[[sim content=lorem tokens=300 rate=40]]")
    assert_error(client.post(f"/api/messages/{sent['reply']['id']}/regenerate"), 409, "reply_running")
    client.post(f"/api/messages/{sent['reply']['id']}/stop")


def test_stop_and_regenerate_need_no_body(client):
    _, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    response = client.post(f"/api/messages/{sent['reply']['id']}/regenerate", data=b"", content_type=None)
    assert response.status_code == 202


# The poll ----------------------------------------------------------------------

def test_a_repeated_poll_replays_the_same_text(client):
    _, sent = ask(client)
    text, _ = poll_to_end(client, sent["reply"]["id"])
    for cursor in (0, 3, len(text) // 2, len(text)):
        answer = client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor={cursor}&timeout=0").json
        assert answer["text"] == text[cursor:]
        assert answer["done"] is True


def test_a_missing_cursor_means_zero(client):
    _, sent = ask(client)
    text, _ = poll_to_end(client, sent["reply"]["id"])
    assert client.get(f"/api/messages/{sent['reply']['id']}/poll?timeout=0").json["text"] == text


@pytest.mark.parametrize("cursor", ["-1", "abc", "1.5", "99999", " 1", "0x10", "１"])
def test_a_bad_cursor_answers_400_bad_cursor(client, cursor):
    _, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    assert_error(client.get(f"/api/messages/{sent['reply']['id']}/poll", query_string={"cursor": cursor}),
                 400, "bad_cursor")


def test_a_non_numeric_timeout_answers_400(client):
    _, sent = ask(client)
    assert_error(client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=soon"), 400, "bad_request")
    assert_error(client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=nan"), 400, "bad_request")


def test_timeout_zero_answers_at_once(client):
    _, sent = ask(client, "[[sim content=lorem tokens=5 latency=3]]")
    started = time.monotonic()
    answer = client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=0").json
    assert time.monotonic() - started < 0.5
    assert answer["text"] == "" and answer["cursor"] == "0" and answer["done"] is False
    client.post(f"/api/messages/{sent['reply']['id']}/stop")


def test_a_waiting_poll_times_out_with_empty_text_and_the_same_cursor(client):
    _, sent = ask(client, "[[sim content=lorem tokens=5 latency=3]]")
    started = time.monotonic()
    answer = client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=0.6").json
    assert 0.5 <= time.monotonic() - started < 2.0
    assert answer["text"] == "" and answer["cursor"] == "0" and answer["done"] is False
    client.post(f"/api/messages/{sent['reply']['id']}/stop")


def test_a_negative_timeout_is_clamped_to_zero(client):
    _, sent = ask(client, "[[sim content=lorem tokens=5 latency=3]]")
    started = time.monotonic()
    client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=-5")
    assert time.monotonic() - started < 0.5
    client.post(f"/api/messages/{sent['reply']['id']}/stop")


def test_a_waiting_poll_wakes_as_soon_as_text_arrives(client):
    _, sent = ask(client, "[[sim content=lorem tokens=3 latency=1.0]]")
    started = time.monotonic()
    answer = client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=20").json
    elapsed = time.monotonic() - started
    assert answer["text"]
    assert 0.8 <= elapsed < 1.6, elapsed


def test_a_waiting_poll_wakes_when_the_reply_is_stopped(client):
    _, sent = ask(client, "[[sim content=lorem tokens=5 latency=5]]")
    reply_id = sent["reply"]["id"]
    threading.Timer(0.4, lambda: client.post(f"/api/messages/{reply_id}/stop")).start()
    started = time.monotonic()
    answer = client.get(f"/api/messages/{reply_id}/poll?cursor=0&timeout=20").json
    assert time.monotonic() - started < 1.5
    assert answer["status"] == "stopped" and answer["done"] is True


def test_poll_answers_carry_no_store(client):
    _, sent = ask(client)
    response = client.get(f"/api/messages/{sent['reply']['id']}/poll?cursor=0&timeout=0")
    assert response.headers["Cache-Control"] == "no-store"
    assert response.mimetype == "application/json"


def test_api_errors_are_json_even_for_unknown_paths_and_methods(client):
    assert_error(client.get("/api/nothing-here"), 404, "not_found")
    assert_error(client.put("/api/conversations"), 405, "method_not_allowed")


# Config and health ---------------------------------------------------------------

def test_config_lists_models_and_the_upstream(client):
    body = client.get("/api/config").json
    assert body["models"] == ["sim-chat", "sim-chat-large"]
    assert body["default_model"] == "sim-chat" and body["image_model"] == "sim-image"
    assert body["poll_timeout"] == 5.0
    assert body["upstream"] == "custom"


def test_healthz_answers_ok(client):
    assert client.get("/healthz").json == {"ok": True}


def test_healthz_answers_503_when_the_database_is_gone(app_config, tmp_path):
    from app import create_app
    app_config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/db.sqlite"
    application = create_app(app_config)
    (tmp_path / "db.sqlite").unlink()
    (tmp_path / "db.sqlite").mkdir()
    with application.app_context():
        from models import db
        db.engine.dispose()
    response = application.test_client().get("/healthz")
    assert response.status_code == 503 and response.json["ok"] is False


def test_security_headers_are_sent(client):
    response = client.get("/api/config")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_the_session_cookie_is_httponly_and_samesite_lax(client):
    response = client.get("/api/conversations")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_the_api_key_never_appears_in_answers(client, app):
    _, sent = ask(client)
    poll_to_end(client, sent["reply"]["id"])
    for path in ("/api/config", "/api/conversations", f"/api/messages/{sent['reply']['id']}", "/"):
        assert app.config["OPENAI_API_KEY"] not in client.get(path).get_data(as_text=True)


def test_the_posted_reply_is_answered_pending_even_when_the_upstream_is_instant(client):
    for _ in range(5):
        _, sent = ask(client, "[[sim content=lorem tokens=3]]")
        assert sent["reply"]["status"] == "pending" and sent["reply"]["content"] == ""
        poll_to_end(client, sent["reply"]["id"])
        regenerated = client.post(f"/api/messages/{sent['reply']['id']}/regenerate").json["reply"]
        assert regenerated["status"] == "pending"
        poll_to_end(client, regenerated["id"])
