"""Storage stays bounded and nothing is lost: compaction, deletion, churn and reclaiming space."""
import functools
import os
import sqlite3
import threading
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

import auth
import dialect
import generation
from models import db
from simulator import lorem_tokens
from tests import pg
from tests.helpers import get_message, new_conversation, poll, poll_to_end, poll_until_text, send, stop, wait_until

TOKEN = "storage-token"
CHURN_REPLIES = 1000
CHURN_THREADS = 6
REPLIES_PER_CONVERSATION = 5
IMAGE_EVERY = 25  # one reply in this many is an image, whose bytes make the churn heavier
# Documented in docs/RELIABILITY.md: after the churn, database file plus log are back within this.
CHURN_BOUND_BYTES = 64 * 1024


def lorem(count):
    return "".join(lorem_tokens(count))


def report(request, line):
    """Writes a measured figure to the terminal, so a run shows the numbers RELIABILITY.md quotes."""
    area = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(f"[{area}] {line}")


@pytest.fixture
def app_config(app_config):
    app_config.update({"ACCESS_TOKENS": TOKEN, "MESSAGES_PER_MINUTE": 100000, "MAX_RUNNING_PER_OWNER": 100})
    return app_config


@pytest.fixture
def client(app):
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"
    return client


TABLES = ("conversations", "messages", "chunks", "images")


@functools.lru_cache(maxsize=None)
def outside_engine(url):
    return create_engine(dialect.normalize_url(url), poolclass=NullPool)


def read_rows(url, sql, **params):
    """Reads the database at url directly, outside the app, as an operator would."""
    with outside_engine(url).connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def write_rows(url, statements):
    """Writes to the database at url directly, in one transaction: [(sql, params), ...]."""
    with outside_engine(url).begin() as conn:
        for sql, params in statements:
            conn.execute(text(sql), params)


def table_snapshot(url):
    """Returns every row of every table, to compare before and after a request."""
    return {table: sorted(map(repr, read_rows(url, f"SELECT * FROM {table}"))) for table in TABLES}


def database_path(app):
    return app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")


def query(app, sql, **params):
    return read_rows(app.config["SQLALCHEMY_DATABASE_URI"], sql, **params)


def chunk_rows(app, message_id):
    return query(app, "SELECT count(*) FROM chunks WHERE message_id = :id", id=message_id)[0][0]


def stored_size(app):
    """Returns the bytes of the database file plus its write-ahead log."""
    path = database_path(app)
    return sum(os.path.getsize(name) for name in (path, path + "-wal") if os.path.exists(name))


# Compaction --------------------------------------------------------------------------------

def follow_collecting_cursors(client, reply_id, saw_chunks):
    """Polls a reply to its end; returns (text, every cursor handed out, last answer)."""
    cursors, text, cursor = ["0"], "", "0"
    while True:
        answer = poll(client, reply_id, cursor, 1.0)
        text += answer["text"]
        cursor = answer["cursor"]
        cursors.append(cursor)
        if chunk_rows(client.application, reply_id):
            saw_chunks.append(cursor)
        if answer["done"]:
            return text, cursors, answer


def assert_compacted_and_every_cursor_answers(client, reply_id, cursors):
    app = client.application
    content = get_message(client, reply_id)["content"]
    assert chunk_rows(app, reply_id) == 0
    stored = query(app, "SELECT content, length FROM messages WHERE id = :id", id=reply_id)[0]
    assert stored == (content, len(content))
    for cursor in cursors:
        answer = poll(client, reply_id, cursor, 0)
        assert answer["text"] == content[int(cursor):]
        assert answer["cursor"] == str(len(content))
        assert answer["done"] is True
    return content


def test_a_done_reply_is_compacted_and_every_cursor_handed_out_still_answers(client):
    reply_id = send(client, new_conversation(client), "hi [[sim tokens=150 rate=300]]")["id"]
    saw_chunks = []
    text, cursors, answer = follow_collecting_cursors(client, reply_id, saw_chunks)
    assert answer["status"] == "done"
    assert saw_chunks, "the text never lived in chunk rows while it streamed"
    assert len(set(cursors)) > 5
    assert assert_compacted_and_every_cursor_answers(client, reply_id, cursors) == text == lorem(150)


def test_a_stopped_reply_is_compacted_and_every_cursor_handed_out_still_answers(client):
    reply_id = send(client, new_conversation(client), "hi [[sim tokens=400 rate=60]]")["id"]
    cursors, text, cursor = ["0"], "", "0"
    while len(text) < 80:
        answer = poll(client, reply_id, cursor, 1.0)
        text += answer["text"]
        cursor = answer["cursor"]
        cursors.append(cursor)
    stopped = stop(client, reply_id)
    assert stopped["content"].startswith(text)
    rest, answer = poll_to_end(client, reply_id, cursor)
    cursors.append(answer["cursor"])
    assert answer["status"] == "stopped"
    assert assert_compacted_and_every_cursor_answers(client, reply_id, cursors) == text + rest


def test_a_failed_reply_is_compacted_and_every_cursor_handed_out_still_answers(client):
    reply_id = send(client, new_conversation(client), "hi [[sim tokens=60 cut_after=40 rate=200]]")["id"]
    text, cursors, answer = follow_collecting_cursors(client, reply_id, [])
    assert answer["status"] == "failed"
    assert assert_compacted_and_every_cursor_answers(client, reply_id, cursors) == "".join(lorem_tokens(60)[:40])


def test_a_reply_whose_worker_died_is_compacted_when_found_and_every_cursor_still_answers(client, app):
    # The rows a worker leaves behind when it dies mid-reply: chunks, and a lease in the past.
    conversation_id = new_conversation(client)
    owner = auth.token_owner(TOKEN)
    pieces = ["Left ", "behind ", "by a ", "dead worker."]
    statements = [(
        "INSERT INTO messages (id, conversation_id, owner, position, role, mode, content, length, status,"
        " has_image, model, created_at, worker_id, lease_expires_at) VALUES ('orphan', :conversation, :owner, 1,"
        " 'assistant', 'chat', '', :length, 'streaming', 0, 'sim-chat', :created, 'gone:1', :lease)",
        {"conversation": conversation_id, "owner": owner, "length": len("".join(pieces)), "created": time.time(),
         "lease": time.time() - 1})]
    end = 0
    for piece in pieces:
        end += len(piece)
        statements.append(("INSERT INTO chunks (message_id, end_offset, text) VALUES ('orphan', :end, :text)",
                           {"end": end, "text": piece}))
    write_rows(app.config["SQLALCHEMY_DATABASE_URI"], statements)
    cursors = ["0", "5", "12", str(end)]
    answer = poll(client, "orphan", "0", 0)
    assert answer["status"] == "failed"
    assert answer["error"]["code"] == "worker_lost"
    assert assert_compacted_and_every_cursor_answers(client, "orphan", cursors) == "".join(pieces)


# Deletion --------------------------------------------------------------------------------------

def rows_of_conversation(app, conversation_id):
    """Returns the conversation's rows in every table, read directly."""
    ids = [row[0] for row in query(app, "SELECT id FROM messages WHERE conversation_id = :c", c=conversation_id)]
    return {
        "conversations": query(app, "SELECT * FROM conversations WHERE id = :c", c=conversation_id),
        "messages": query(app, "SELECT * FROM messages WHERE conversation_id = :c", c=conversation_id),
        "chunks": rows_of_messages(app, "SELECT * FROM chunks", ids),
        "images": rows_of_messages(app, "SELECT message_id, length(data) FROM images", ids),
    }


def rows_of_messages(app, select, message_ids):
    marks = ", ".join(f":m{index}" for index in range(len(message_ids))) or "''"
    return query(app, f"{select} WHERE message_id IN ({marks})",
                 **{f"m{index}": message_id for index, message_id in enumerate(message_ids)})


def test_deleting_a_conversation_removes_its_messages_chunks_and_images(client, app):
    doomed = new_conversation(client)
    kept = new_conversation(client)
    for conversation_id in (doomed, kept):
        poll_to_end(client, send(client, conversation_id, "hi [[sim tokens=20]]")["id"])
        poll_to_end(client, send(client, conversation_id, "a red kite", mode="image")["id"])
    running = send(client, doomed, "hi [[sim tokens=2000 rate=100]]")["id"]
    poll_until_text(client, running, min_chars=50)
    before = rows_of_conversation(app, doomed)
    assert len(before["messages"]) == 6
    assert len(before["images"]) == 1 and before["images"][0][1] > 1000
    assert before["chunks"], "the running reply should have chunk rows"
    kept_before = rows_of_conversation(app, kept)

    response = client.delete(f"/api/conversations/{doomed}")
    assert response.status_code == 204
    time.sleep(0.5)  # a reply thread that kept writing would leave orphan chunks by now
    after = rows_of_conversation(app, doomed)
    assert after == {"conversations": [], "messages": [], "chunks": [], "images": []}
    message_ids = [row[0] for row in before["messages"]]
    assert rows_of_messages(app, "SELECT count(*) FROM chunks", message_ids) == [(0,)]
    assert rows_of_messages(app, "SELECT count(*) FROM images", message_ids) == [(0,)]
    assert rows_of_conversation(app, kept) == kept_before
    assert client.get(f"/api/messages/{running}").status_code == 404


# Churn and reclaiming space ----------------------------------------------------------------

sqlite_only = pytest.mark.skipif(
    pg.enabled(), reason="SQLite file size, pages and log; PostgreSQL's autovacuum reclaims space by itself")


@sqlite_only
def test_a_new_database_gives_deleted_pages_back(app):
    assert query(app, "PRAGMA auto_vacuum") == [(2,)]  # incremental
    assert query(app, "PRAGMA journal_mode") == [("wal",)]


@sqlite_only
def test_reclaiming_space_gives_up_at_once_while_another_connection_writes(app):
    with app.app_context():
        engine = db.engine
    holder = sqlite3.connect(database_path(app), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE conversations SET title = title")
    try:
        started = time.monotonic()
        assert dialect.reclaim_space(engine, wait_seconds=0.2) is False
        assert time.monotonic() - started < 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert dialect.reclaim_space(engine) is True


def churn(app, replies, threads, errors, done_counter):
    """Creates conversations of a few replies each and deletes them, from several clients at once."""
    lock = threading.Lock()

    def run(worker):
        client = app.test_client()
        client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"
        number = 0
        try:
            while True:
                with lock:
                    if done_counter[0] >= replies:
                        return
                    start = done_counter[0]
                    count = min(REPLIES_PER_CONVERSATION, replies - start)
                    done_counter[0] += count
                conversation_id = new_conversation(client, title=f"churn {worker}")
                for index in range(count):
                    number = start + index
                    if number % IMAGE_EVERY == 0:
                        reply = send(client, conversation_id, f"picture {number}", mode="image")
                        _, answer = poll_to_end(client, reply["id"])
                        assert answer["image_url"], answer
                    else:
                        reply = send(client, conversation_id, f"reply {number} [[sim tokens=40]]")
                        text, answer = poll_to_end(client, reply["id"])
                        assert text == lorem(40)
                    assert answer["status"] == "done", answer
                assert client.delete(f"/api/conversations/{conversation_id}").status_code == 204
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(f"worker {worker}, reply {number}: {error!r}")

    workers = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(threads)]
    for worker in workers:
        worker.start()
    return workers


@sqlite_only
def test_a_churn_of_a_thousand_replies_leaves_the_database_and_its_log_within_the_bound(
        request, app, client, monkeypatch):
    monkeypatch.setattr(generation, "RECLAIM_EVERY_SECONDS", 0.5)
    poll_to_end(client, send(client, new_conversation(client), "warm up [[sim tokens=5]]")["id"])
    client.delete(f"/api/conversations/{client.get('/api/conversations').json['conversations'][0]['id']}")
    assert wait_until(lambda: os.path.getsize(database_path(app) + "-wal") == 0, 5)
    start_size = stored_size(app)

    errors, done_counter, peak = [], [0], [start_size]
    started = time.monotonic()
    workers = churn(app, CHURN_REPLIES, CHURN_THREADS, errors, done_counter)
    while any(worker.is_alive() for worker in workers):
        peak[0] = max(peak[0], stored_size(app))
        time.sleep(0.05)
    took = time.monotonic() - started
    assert not errors, errors[:5]
    assert done_counter[0] == CHURN_REPLIES
    assert query(app, "SELECT count(*) FROM messages") == [(0,)]
    assert query(app, "SELECT count(*) FROM chunks") == [(0,)]
    assert query(app, "SELECT count(*) FROM images") == [(0,)]

    # The idle supervisor gives the deleted pages back and empties the log.
    assert wait_until(lambda: stored_size(app) <= start_size + CHURN_BOUND_BYTES
                      and os.path.getsize(database_path(app) + "-wal") == 0, 10), stored_size(app)
    end_size = stored_size(app)
    report(request, f"churn: {CHURN_REPLIES} replies ({CHURN_REPLIES // IMAGE_EVERY} images) in {took:.1f} s; "
                    f"database+log {start_size} bytes before, peak {peak[0]}, {end_size} after")
