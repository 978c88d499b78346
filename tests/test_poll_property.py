"""The poll property: following cursors gives exactly the final content, in order, once."""
import random
import uuid
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

import buffer
from dialect import tune_engine
from models import Conversation, Message, db
from tests.test_api import ask


def make_engine(path):
    engine = create_engine(f"sqlite:///{path}")
    tune_engine(engine)
    db.metadata.create_all(engine)
    return engine


def insert_running_message(engine, message_id):
    with engine.begin() as conn:
        conn.execute(Conversation.__table__.insert().values(id="c", owner="o", created_at=0.0, updated_at=0.0))
        conn.execute(Message.__table__.insert().values(
            id=message_id, conversation_id="c", owner="o", position=1, role="assistant", mode="chat",
            content="", length=0, status="streaming", created_at=0.0))


def read_row(engine, message_id):
    with engine.connect() as conn:
        return conn.execute(Message.__table__.select().where(Message.__table__.c.id == message_id)).first()


pieces_strategy = st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=pieces_strategy, pauses=st.lists(st.booleans(), min_size=30, max_size=30),
       cursor_fractions=st.lists(st.floats(0, 1), max_size=6))
def test_reading_after_any_cursor_gives_the_rest_of_the_text_before_and_after_compaction(
        tmp_path, pieces, pauses, cursor_fractions):
    engine = make_engine(tmp_path / f"p{uuid.uuid4().hex}.db")
    notifier = buffer.Notifier()
    writer = buffer.ChunkWriter(engine, notifier, flush_interval=0.0, lease_seconds=10)
    message_id = "m1"
    insert_running_message(engine, message_id)
    writer.open(message_id)
    for piece, pause in zip(pieces, pauses):
        writer.append(message_id, piece)
        if pause:
            time.sleep(0.002)  # lets some pieces land in separate chunks
    full = "".join(pieces)
    deadline = time.monotonic() + 5
    while read_row(engine, message_id).length < len(full) and time.monotonic() < deadline:
        time.sleep(0.005)
    for final in (False, True):
        if final:
            assert writer.finish(message_id, status="done")
        row = read_row(engine, message_id)
        assert row.length == len(full)
        cursors = [int(fraction * len(full)) for fraction in cursor_fractions]
        with engine.connect() as conn:
            for cursor in cursors:
                assert buffer.text_after(conn, row, cursor) == full[cursor:]
            # Following the cursor from 0 in random steps also rebuilds the text exactly.
            cursor, rebuilt = 0, ""
            while cursor < len(full):
                rebuilt += buffer.text_after(conn, row, cursor)
                cursor = len(rebuilt)
            assert rebuilt == full
    writer.shutdown()
    engine.dispose()


def test_random_polling_with_replays_rebuilds_the_final_content(client):
    rng = random.Random(7)
    _, sent = ask(client, "[[sim content=unicode tokens=120 rate=400]]")
    reply_id = sent["reply"]["id"]
    history = ["0"]
    text = ""
    while True:
        if rng.random() < 0.2 and len(history) > 1:
            # Replay an older cursor: the answer repeats that text exactly.
            old = rng.choice(history[:-1])
            replay = client.get(f"/api/messages/{reply_id}/poll?cursor={old}&timeout=0").json
            assert (text[int(old):] + "").startswith(replay["text"]) or replay["text"].startswith(text[int(old):])
        cursor = history[-1]
        answer = client.get(f"/api/messages/{reply_id}/poll?cursor={cursor}&timeout={rng.choice([0, 0.05, 2])}").json
        text += answer["text"]
        history.append(answer["cursor"])
        if answer["done"]:
            break
    final = client.get(f"/api/messages/{reply_id}").json["content"]
    assert text == final and len(final) > 0


def test_a_poll_wakes_through_the_notifier_not_a_sleep_loop(client):
    _, sent = ask(client, "[[sim content=lorem tokens=40 rate=20]]")
    reply_id = sent["reply"]["id"]
    cursor, gaps = "0", []
    while True:
        started = time.monotonic()
        answer = client.get(f"/api/messages/{reply_id}/poll?cursor={cursor}&timeout=10").json
        gaps.append(time.monotonic() - started)
        cursor = answer["cursor"]
        if answer["done"]:
            break
    # Tokens arrive every 50 ms; a waiting poll returns within a few ms of each one.
    assert sorted(gaps)[len(gaps) // 2] < 0.09
