"""Database tables: conversations, messages, the chunk buffer and stored images."""
import secrets
import time
from datetime import datetime, timezone

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

RUNNING = ("pending", "streaming")
FINAL = ("done", "stopped", "failed")


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_id():
    """Returns a random, unguessable id of 22 letters and digits (about 131 bits)."""
    # Letters and digits only: an id never starts with "-", so command lines take it as a value.
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(22))


def now():
    """Returns the current time as seconds since the epoch."""
    return time.time()


def iso(seconds):
    """Formats epoch seconds as an ISO 8601 UTC string."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Conversation(db.Model):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str] = mapped_column(String(100), default="")
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now, index=True)

    def to_dict(self):
        return {
            "id": self.id,
            "title": self.title,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class Message(db.Model):
    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(8), default="chat")
    # The final text once the reply is final; while it runs the text lives in chunks.
    content: Mapped[str] = mapped_column(Text, default="")
    # Characters committed so far: the end of the buffer, and the largest valid cursor.
    length: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    has_image: Mapped[int] = mapped_column(Integer, default=0)
    model: Mapped[str] = mapped_column(String(100), default="")
    finish_reason: Mapped[str | None] = mapped_column(String(40), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_messages_owner_created", "owner", "created_at"),
        Index("ix_messages_status_lease", "status", "lease_expires_at"),
    )


class Chunk(db.Model):
    __tablename__ = "chunks"

    message_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    # Character offset just past this chunk; the primary key orders and finds chunks.
    end_offset: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)


class Image(db.Model):
    __tablename__ = "images"

    # Images live in the database so every host that shares it can serve them.
    message_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    mime: Mapped[str] = mapped_column(String(40))
    data: Mapped[bytes] = mapped_column(LargeBinary)


def message_to_dict(row):
    """Renders a message row (ORM object or Core row) as the PROTOCOL message object."""
    error = None
    if row.error_code:
        error = {"code": row.error_code, "message": row.error_message or ""}
    return {
        "id": row.id,
        "conversation_id": row.conversation_id,
        "role": row.role,
        "mode": row.mode,
        "content": row.content,
        "status": row.status,
        "error": error,
        "image_url": f"/api/messages/{row.id}/image" if row.has_image else None,
        "model": row.model,
        "created_at": iso(row.created_at),
        "finished_at": iso(row.finished_at),
    }
