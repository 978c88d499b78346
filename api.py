"""The JSON API of PROTOCOL v1: conversations, messages, the poll, stop and regenerate."""
import collections
import json
import math
import threading
import time
from types import SimpleNamespace

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import bindparam, case, delete, func, select, update

import auth
import buffer
import dialect
from errors import ApiError
from generation import fail_lost_replies
from models import (Chunk, Conversation, Image, Message, RUNNING, db, message_to_dict, new_id, now)
from runtime import get_runtime

bp = Blueprint("api", __name__, url_prefix="/api")
# Polls repeat the same session cookie many times a second: verify each one once.
bp.record_once(lambda state: auth.install_session_cache(state.app))

messages = Message.__table__
conversations = Conversation.__table__
chunks = Chunk.__table__
images = Image.__table__

POLL_TIMEOUT_MAX = 60.0


# Request helpers -------------------------------------------------------------

def json_body(required=True):
    """Returns the request's JSON object, or raises the PROTOCOL error for a bad body."""
    has_body = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "")
    if not has_body and not required:
        return {}
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "The request body must be JSON (Content-Type: application/json).")
    raw = request.get_data(cache=False)
    if len(raw) > current_app.config["MAX_BODY_BYTES"]:
        raise ApiError(413, "too_large", "The request body is larger than 1 MiB.")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "bad_request", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "The request body must be a JSON object.")
    try:
        # JSON may escape lone surrogates (\ud800), which no database can store as text.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "bad_request", "The request body holds text that is not valid Unicode.") from None
    except RecursionError:
        raise ApiError(400, "bad_request", "The request body is nested too deeply.") from None
    return body


def optional_text(body, name, limit, too_large=False):
    """Returns body[name] as a string (None when absent); rejects other types and long values."""
    if name not in body or body[name] is None:
        return None
    value = body[name]
    if not isinstance(value, str):
        raise ApiError(400, "bad_request", f"'{name}' must be a string.")
    if "\x00" in value:
        raise ApiError(400, "bad_request", f"'{name}' must not contain NUL characters.")
    if len(value) > limit:
        if too_large:
            raise ApiError(413, "too_large", f"'{name}' is longer than {limit} characters.")
        raise ApiError(400, "bad_request", f"'{name}' is longer than {limit} characters.")
    return value


def checked_model(value):
    if value is None:
        return None
    if value not in current_app.config["CHAT_MODEL_LIST"]:
        choices = ", ".join(current_app.config["CHAT_MODEL_LIST"])
        raise ApiError(400, "bad_request", f"Unknown model '{value[:100]}'; choose one of: {choices}.")
    return value


def owner():
    who = auth.current_owner()
    if who is None:
        raise ApiError(401, "unauthorized", "Sign in with an access token first.")
    return who


def may_be_id(value):
    """Tells whether value could be a stored id: at most 32 characters, and no NUL, which PostgreSQL refuses."""
    return len(value) <= 32 and "\x00" not in value


def owned_conversation(conversation_id, who):
    conversation = db.session.get(Conversation, conversation_id) if may_be_id(conversation_id) else None
    if conversation is None or conversation.owner != who:
        raise ApiError(404, "not_found", "No such conversation.")
    return conversation


def owned_message_row(conn, message_id, who):
    row = None
    if may_be_id(message_id):
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
    if row is None or row.owner != who:
        raise ApiError(404, "not_found", "No such message.")
    return row


def message_json(conn, row):
    """Renders a message row, with the text committed so far while it runs."""
    data = message_to_dict(row)
    if row.status in RUNNING:
        data["content"] = buffer.full_text(conn, row.id)
    return data


def created(payload):
    return jsonify(payload), 201


# Session -----------------------------------------------------------------------

@bp.get("/session")
def session_state():
    return jsonify({"signed_in": auth.current_owner(create=False) is not None,
                    "auth_required": auth.auth_required()})


@bp.post("/session")
def session_sign_in():
    body = json_body()
    token = optional_text(body, "token", 1000)
    if not token or not auth.sign_in(token):
        raise ApiError(401, "bad_token", "That access token is not valid.")
    return jsonify({"signed_in": True})


@bp.delete("/session")
def session_sign_out():
    auth.sign_out()
    return Response(status=204)


# Configuration -------------------------------------------------------------

@bp.get("/config")
def config():
    owner()
    settings = current_app.config
    return jsonify({
        "models": settings["CHAT_MODEL_LIST"],
        "default_model": settings["CHAT_MODEL"],
        "image_model": settings["IMAGE_MODEL"],
        "poll_timeout": settings["POLL_TIMEOUT"],
        "upstream": settings["UPSTREAM_KIND"],
        "max_content_chars": settings["MAX_CONTENT_CHARS"],
    })


# Conversations -------------------------------------------------------------

@bp.get("/conversations")
def list_conversations():
    who = owner()
    rows = db.session.execute(
        select(Conversation).where(Conversation.owner == who)
        .order_by(Conversation.updated_at.desc(), Conversation.id)).scalars().all()
    return jsonify({"conversations": [row.to_dict() for row in rows]})


@bp.post("/conversations")
def create_conversation():
    who = owner()
    body = json_body(required=False)
    settings = current_app.config
    title = optional_text(body, "title", 200)
    model = checked_model(optional_text(body, "model", 100))
    system_prompt = optional_text(body, "system_prompt", settings["MAX_CONTENT_CHARS"], too_large=True)
    moment = now()
    conversation = Conversation(id=new_id(), owner=who, title=(title or "").strip(),
                                model=model or settings["CHAT_MODEL"], system_prompt=system_prompt or "",
                                created_at=moment, updated_at=moment)
    db.session.add(conversation)
    db.session.commit()
    return created(conversation.to_dict())


@bp.get("/conversations/<conversation_id>")
def get_conversation(conversation_id):
    who = owner()
    conversation = owned_conversation(conversation_id, who)
    payload = {"conversation": conversation.to_dict()}
    db.session.commit()
    with db.engine.connect() as conn:
        rows = conn.execute(select(messages).where(messages.c.conversation_id == conversation_id)
                            .order_by(messages.c.position)).all()
        payload["messages"] = [message_json(conn, row) for row in rows]
    return jsonify(payload)


@bp.patch("/conversations/<conversation_id>")
def update_conversation(conversation_id):
    who = owner()
    body = json_body()
    conversation = owned_conversation(conversation_id, who)
    title = optional_text(body, "title", 200)
    model = checked_model(optional_text(body, "model", 100))
    system_prompt = optional_text(body, "system_prompt", current_app.config["MAX_CONTENT_CHARS"], too_large=True)
    if title is not None:
        conversation.title = title.strip()
    if model is not None:
        conversation.model = model
    if system_prompt is not None:
        conversation.system_prompt = system_prompt
    conversation.updated_at = now()
    db.session.commit()
    return jsonify(conversation.to_dict())


@bp.delete("/conversations/<conversation_id>")
def delete_conversation(conversation_id):
    who = owner()
    owned_conversation(conversation_id, who)
    db.session.commit()
    runtime = get_runtime()
    with db.engine.begin() as conn:
        running = conn.execute(select(messages.c.id).where(
            messages.c.conversation_id == conversation_id, messages.c.status.in_(RUNNING))).scalars().all()
        for message_id in running:
            buffer.finalize(conn, message_id, "stopped")
        ids = select(messages.c.id).where(messages.c.conversation_id == conversation_id)
        conn.execute(delete(chunks).where(chunks.c.message_id.in_(ids)))
        conn.execute(delete(images).where(images.c.message_id.in_(ids)))
        conn.execute(delete(messages).where(messages.c.conversation_id == conversation_id))
        conn.execute(delete(conversations).where(conversations.c.id == conversation_id))
    for message_id in running:
        runtime.stop_local(message_id)
    runtime.notifier.notify(running)
    return Response(status=204)


# Messages --------------------------------------------------------------------

# Built once: every posted message runs them, and building a statement costs more than running it.
_OWNED_CONVERSATION = select(conversations.c.id, conversations.c.owner, conversations.c.model,
                             conversations.c.title).where(conversations.c.id == bindparam("conversation_id"))
_TOUCH_CONVERSATION = (update(conversations).where(conversations.c.id == bindparam("conversation_id"))
                       .values(updated_at=bindparam("moment")))
_TOUCH_AND_TITLE_CONVERSATION = _TOUCH_CONVERSATION.values(title=bindparam("new_title"))
_CONVERSATION_TAIL = (
    select(func.coalesce(func.max(messages.c.position), 0),
           func.coalesce(func.sum(case((messages.c.status.in_(RUNNING), 1), else_=0)), 0))
    .where(messages.c.conversation_id == bindparam("conversation_id")))
_RUNNING_OF_OWNER = (select(func.count()).select_from(messages)
                     .where(messages.c.owner == bindparam("who"), messages.c.status.in_(RUNNING)))
_RECENT_POSTS_OF_OWNER = (
    select(messages.c.created_at)
    .where(messages.c.owner == bindparam("who"), messages.c.role == "user", messages.c.created_at > bindparam("since"))
    .order_by(messages.c.created_at).limit(bindparam("limit")))


def column_defaults(table):
    """Returns the value each column of table takes when an insert leaves it out (scalar defaults, else NULL)."""
    defaults = {}
    for column in table.columns:
        if column.default is not None and column.default.is_scalar:
            defaults[column.name] = column.default.arg
        elif column.nullable:
            defaults[column.name] = None
    return defaults


# The insert below names every column, so the table's defaults are filled in here.
MESSAGE_DEFAULTS = column_defaults(messages)
_INSERT_MESSAGES = buffer.ManyStatement(
    messages.insert().values({column.name: bindparam(column.name) for column in messages.columns}))


def owned_conversation_row(conversation_id, who):
    """Returns (id, owner, model, title) of the caller's conversation, read without the ORM; 404 otherwise."""
    row = None
    if may_be_id(conversation_id):
        with db.engine.connect() as conn:
            row = conn.execute(_OWNED_CONVERSATION, {"conversation_id": conversation_id}).first()
    if row is None or row.owner != who:
        raise ApiError(404, "not_found", "No such conversation.")
    return row


def check_rate_limits(conn, who):
    dialect.lock_owner(conn, who)
    settings = current_app.config
    running = conn.execute(_RUNNING_OF_OWNER, {"who": who}).scalar_one()
    if running >= settings["MAX_RUNNING_PER_OWNER"]:
        raise ApiError(429, "rate_limited",
                       f"At most {settings['MAX_RUNNING_PER_OWNER']} replies may run at once.", retry_after=2)
    limit = settings["MESSAGES_PER_MINUTE"]
    window_start = now() - 60
    recent = conn.execute(_RECENT_POSTS_OF_OWNER, {"who": who, "since": window_start, "limit": limit}).scalars().all()
    if len(recent) >= limit:
        wait = max(1, math.ceil(recent[0] - window_start))
        raise ApiError(429, "rate_limited", f"At most {limit} messages a minute.", retry_after=wait)


def generating_runtime():
    """Returns this process's runtime when it generates the replies it is asked for, else None."""
    return get_runtime() if current_app.config["GENERATION_MODE"] == "thread" else None


def insert_messages(conn, *rows):
    """Inserts new message rows (dicts of their columns; the table's defaults fill the rest); returns them whole."""
    whole = [{**MESSAGE_DEFAULTS, **row} for row in rows]
    _INSERT_MESSAGES.execute(conn, whole)
    return whole


def reply_row(conversation, position, mode, who, moment):
    """Returns the columns of a new pending reply, already claimed when this process generates it."""
    settings = current_app.config
    runtime = generating_runtime()
    return {"id": new_id(), "conversation_id": conversation.id, "owner": who, "position": position,
            "role": "assistant", "mode": mode, "content": "", "length": 0, "status": "pending",
            "model": settings["IMAGE_MODEL"] if mode == "image" else (conversation.model or settings["CHAT_MODEL"]),
            "created_at": moment, "lease_expires_at": moment + settings["LEASE_SECONDS"],
            "worker_id": runtime.worker_id if runtime is not None else None}


def lock_conversation(conn, conversation_id, moment, new_title=None):
    """Serializes writers to one conversation by updating its row first (and gives it new_title, if any)."""
    if new_title is None:
        conn.execute(_TOUCH_CONVERSATION, {"conversation_id": conversation_id, "moment": moment})
    else:
        conn.execute(_TOUCH_AND_TITLE_CONVERSATION,
                     {"conversation_id": conversation_id, "moment": moment, "new_title": new_title})


def has_running_reply(conn, conversation_id):
    return conversation_tail(conn, conversation_id)[1] > 0


def conversation_tail(conn, conversation_id):
    """Returns (last position, replies running) of a conversation in one query."""
    row = conn.execute(_CONVERSATION_TAIL, {"conversation_id": conversation_id}).first()
    return row[0], row[1]


def start_generation(reply):
    """Starts generating a reply row that reply_row made, here when this process claimed it."""
    if reply["worker_id"] is not None:
        get_runtime().start_reply(reply["id"], claimed_for=reply["owner"])


@bp.post("/conversations/<conversation_id>/messages")
def post_message(conversation_id):
    who = owner()
    body = json_body()
    settings = current_app.config
    content = optional_text(body, "content", settings["MAX_CONTENT_CHARS"], too_large=True)
    if content is None or not content.strip():
        raise ApiError(400, "bad_request", "'content' must be a non-empty string.")
    mode = body.get("mode", "chat")
    if mode not in ("chat", "image"):
        raise ApiError(400, "bad_request", "'mode' must be \"chat\" or \"image\".")
    conversation = owned_conversation_row(conversation_id, who)
    moment = now()
    with db.engine.begin() as conn:
        lock_conversation(conn, conversation_id, moment, None if conversation.title else title_from(content))
        last_position, running = conversation_tail(conn, conversation_id)
        if running:
            raise ApiError(409, "reply_running", "This conversation already has a reply running; stop it first.")
        check_rate_limits(conn, who)
        user, reply = insert_messages(
            conn,
            {"id": new_id(), "conversation_id": conversation_id, "owner": who, "position": last_position + 1,
             "role": "user", "mode": mode, "content": content, "length": len(content), "status": "done",
             "model": conversation.model, "created_at": moment, "finished_at": moment},
            reply_row(conversation, last_position + 2, mode, who, moment))
    # The answer is built before the reply starts, so it shows the reply pending as PROTOCOL says.
    answer = {"message": message_to_dict(SimpleNamespace(**user)), "reply": message_to_dict(SimpleNamespace(**reply))}
    start_generation(reply)
    return jsonify(answer), 202


def title_from(content):
    line = " ".join(content.split())
    return line[:60] + ("…" if len(line) > 60 else "")


@bp.get("/messages/<message_id>")
def get_message(message_id):
    who = owner()
    with db.engine.connect() as conn:
        row = owned_message_row(conn, message_id, who)
        return jsonify(message_json(conn, row))


@bp.get("/messages/<message_id>/image")
def get_image(message_id):
    who = owner()
    with db.engine.connect() as conn:
        owned_message_row(conn, message_id, who)
        image = conn.execute(select(images.c.mime, images.c.data).where(images.c.message_id == message_id)).first()
    if image is None:
        raise ApiError(404, "not_found", "This message has no image.")
    return Response(bytes(image.data), mimetype=image.mime)


@bp.post("/messages/<message_id>/stop")
def stop_message(message_id):
    who = owner()
    with db.engine.connect() as conn:
        owned_message_row(conn, message_id, who)
    with db.engine.begin() as conn:
        stopped = buffer.finalize(conn, message_id, "stopped")
    if stopped:
        runtime = get_runtime()
        runtime.stop_local(message_id)
        runtime.notifier.notify([message_id])
    with db.engine.connect() as conn:
        return jsonify(message_json(conn, owned_message_row(conn, message_id, who)))


@bp.post("/messages/<message_id>/regenerate")
def regenerate(message_id):
    who = owner()
    with db.engine.connect() as conn:
        row = owned_message_row(conn, message_id, who)
    conversation = owned_conversation_row(row.conversation_id, who)
    moment = now()
    with db.engine.begin() as conn:
        lock_conversation(conn, row.conversation_id, moment)
        if has_running_reply(conn, row.conversation_id):
            raise ApiError(409, "reply_running", "A reply is still running in this conversation; stop it first.")
        last = conn.execute(select(messages.c.id, messages.c.role).where(
            messages.c.conversation_id == row.conversation_id)
            .order_by(messages.c.position.desc()).limit(1)).first()
        if row.role != "assistant" or last is None or last.id != message_id:
            raise ApiError(409, "not_last_reply", "Only the last reply of a conversation can be regenerated.")
        check_rate_limits(conn, who)
        conn.execute(delete(chunks).where(chunks.c.message_id == message_id))
        conn.execute(delete(images).where(images.c.message_id == message_id))
        conn.execute(delete(messages).where(messages.c.id == message_id))
        reply, = insert_messages(conn, reply_row(conversation, row.position, row.mode, who, moment))
    answer = {"reply": message_to_dict(SimpleNamespace(**reply))}
    start_generation(reply)
    return jsonify(answer), 202


# The poll ----------------------------------------------------------------------

def poll_timeout():
    return poll_timeout_from(request.args.get("timeout"), current_app.config)


def poll_timeout_from(raw, settings):
    """Returns the seconds a poll may wait, from its raw `timeout` argument; 400 when it is no number."""
    # An operator behind a proxy with a shorter read timeout lowers the ceiling below 60 s.
    limit = min(settings["POLL_TIMEOUT_MAX"], POLL_TIMEOUT_MAX)
    if raw is None or raw == "":
        return min(settings["POLL_TIMEOUT"], limit)
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad_request", "'timeout' must be a number of seconds.") from None
    if math.isnan(value):
        raise ApiError(400, "bad_request", "'timeout' must be a number of seconds.")
    return min(max(value, 0.0), limit)


POLL_COLUMNS = ("id", "owner", "length", "status", "content", "error_code", "error_message", "has_image",
                "lease_expires_at")
PollRow = collections.namedtuple("PollRow", POLL_COLUMNS)
_READ_POLL_ROW = select(*(messages.c[name] for name in POLL_COLUMNS)).where(messages.c.id == bindparam("message_id"))


def read_poll_row(message_id):
    with db.engine.connect() as conn:
        return conn.execute(_READ_POLL_ROW, {"message_id": message_id}).first()


def local_poll_row(runtime, message_id, who):
    """Returns the state of a reply this process writes for who, from memory, or None."""
    if runtime.writer is None:
        return None
    state = runtime.writer.local_state(message_id, who)
    if state is None:
        return None
    return PollRow(message_id, who, state[0], state[1], "", None, None, 0, None)


def fresh_poll_row(runtime, message_id, who, cursor):
    """Returns the reply's state now: from memory while this process writes it, else from the database."""
    local = local_poll_row(runtime, message_id, who)
    if local is not None and local.length >= cursor:
        return local
    return read_poll_row(message_id)


def poll_answer(row, cursor, text):
    end = cursor + len(text)
    final = row.status not in RUNNING
    return {
        "id": row.id,
        "cursor": str(end),
        "text": text,
        "status": row.status,
        "done": final and end >= row.length,
        "error": {"code": row.error_code, "message": row.error_message or ""} if row.error_code else None,
        "image_url": f"/api/messages/{row.id}/image" if row.has_image else None,
    }


class PollLoad:
    """Counts the polls this process is answering; the gathering hold grows with it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.active = 0

    def __enter__(self):
        with self._lock:
            self.active += 1
        return self

    def __exit__(self, *exc_info):
        with self._lock:
            self.active -= 1


poll_load = PollLoad()


def gather_seconds(settings):
    """Returns how long an answer may wait to gather more text: nothing when this poll is alone.

    The hold grows with the polls in progress here and reaches POLL_GATHER_SECONDS at
    POLL_GATHER_BUSY_WAITERS of them, so busy processes answer fewer, fuller requests.
    """
    others = poll_load.active - 1
    if others <= 0:
        return 0.0
    return settings["POLL_GATHER_SECONDS"] * min(1.0, others / max(settings["POLL_GATHER_BUSY_WAITERS"], 1))


def wait_for_change(runtime, message_id, row, left):
    """Waits until the message moves past row, or left seconds pass; returns it afresh.

    No database connection or transaction is held while waiting. A reply written by this
    process is followed in memory; the database is read when memory cannot tell.
    """
    if runtime.watcher is None:
        # A thread-free web process has nobody to wake it: re-check at a bounded interval.
        deadline = time.monotonic() + left
        while True:
            time.sleep(max(0.0, min(current_app.config["POLL_RECHECK_SECONDS"], deadline - time.monotonic())))
            fresh = read_poll_row(message_id)
            if fresh is None or (fresh.length, fresh.status) != (row.length, row.status):
                return fresh
            if fresh.status in RUNNING and fresh.lease_expires_at is not None and fresh.lease_expires_at < now():
                # No supervisor runs here, so the poll itself notices a worker that died.
                fail_lost_replies(db.engine)
                return read_poll_row(message_id)
            if time.monotonic() >= deadline:
                return fresh
    writer = runtime.writer
    event = runtime.notifier.register(message_id, row.length, row.status)
    try:
        runtime.watcher.kick()
        # The writer updates its memory before it notifies, so when memory still shows row's
        # state no commit of this process can be missed; other processes' reach the watcher.
        if not writer.is_at(message_id, row.length, row.status):
            fresh = read_poll_row(message_id)
            if fresh is None or (fresh.length, fresh.status) != (row.length, row.status):
                return fresh
        event.wait(left)
    finally:
        runtime.notifier.unregister(message_id, event)
    local = local_poll_row(runtime, message_id, row.owner)
    if local is not None and local.length > row.length:
        return local
    return read_poll_row(message_id)


@bp.get("/messages/<message_id>/poll")
def poll(message_id):
    who = owner()
    try:
        cursor = buffer.parse_cursor(request.args.get("cursor"))
    except buffer.BadCursor:
        raise ApiError(400, "bad_cursor", "The cursor is not one this server handed out.") from None
    timeout = poll_timeout()
    if not may_be_id(message_id):
        raise ApiError(404, "not_found", "No such message.")
    with poll_load:
        return jsonify(answer_poll(get_runtime(), message_id, who, cursor, timeout))


def answer_poll(runtime, message_id, who, cursor, timeout):
    """Returns the poll answer after cursor: at once when there is text, else when some comes or time runs out."""
    settings = current_app.config
    deadline = time.monotonic() + timeout
    row = local_poll_row(runtime, message_id, who)
    if row is None or cursor > row.length:
        row = read_poll_row(message_id)
        if row is None or row.owner != who:
            raise ApiError(404, "not_found", "No such message.")
        if row.status in RUNNING and row.lease_expires_at is not None and row.lease_expires_at < now():
            fail_lost_replies(db.engine, runtime.notifier)
            row = read_poll_row(message_id)
    while True:
        if row is None:
            raise ApiError(404, "not_found", "No such message.")
        if cursor > row.length:
            raise ApiError(400, "bad_cursor", "The cursor is past the end of this reply.")
        if cursor < row.length or row.status not in RUNNING:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            return poll_answer(row, cursor, "")
        row = wait_for_change(runtime, message_id, row, left)
    if row.status in RUNNING:
        hold = gather_seconds(settings)
        if hold > 0:
            # The hold counts from when the text after cursor was committed, so no token waits
            # longer than the hold however late this poll arrived.
            committed = runtime.writer.committed_at(message_id, cursor) if runtime.writer is not None else None
            pause = (committed if committed is not None else time.monotonic()) + hold - time.monotonic()
            if pause > 0:
                time.sleep(pause)
                row = fresh_poll_row(runtime, message_id, who, cursor) or row
    text = None
    if row.status in RUNNING and runtime.writer is not None:
        text = runtime.writer.text_between(message_id, cursor, row.length)
    if text is None:
        with db.engine.connect() as conn:
            try:
                text = buffer.text_after(conn, row, cursor)
            except buffer.BadCursor:
                raise ApiError(400, "bad_cursor", "The cursor is past the end of this reply.") from None
    return poll_answer(row, cursor, text)
