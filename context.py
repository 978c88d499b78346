"""Chat memory: which earlier turns are sent upstream with a new reply.

The rule: the system prompt, then the most recent turns, newest first, for as long as
their characters fit the budget (CONTEXT_BUDGET_CHARS); the message being answered is
always sent whole. Finished replies count with their text; stopped replies with the
partial text the user saw; failed replies are left out (their user turn stays); image
turns become a one-line note. Nothing is deleted from the conversation: older turns are
only left out of what is sent.
"""
from dataclasses import dataclass, field

from sqlalchemy import bindparam, select

from models import Conversation, Message

messages = Message.__table__
conversations = Conversation.__table__

IMAGE_NOTE = "[An image was generated here for the prompt above.]"


@dataclass
class History:
    system_prompt: str
    turns: list = field(default_factory=list)  # (role, text), oldest first, the prompt last
    image_prompt: str = ""

    def messages(self, budget):
        """Returns the OpenAI messages for this reply within budget characters."""
        chosen = []
        used = 0
        for index, (role, text) in enumerate(reversed(self.turns)):
            if index > 0 and used + len(text) > budget:
                break
            chosen.append({"role": role, "content": text})
            used += len(text)
        chosen.reverse()
        if self.system_prompt:
            chosen.insert(0, {"role": "system", "content": self.system_prompt})
        return chosen


def turn_of(row):
    """Returns the (role, text) a stored message contributes, or None to leave it out."""
    if row.role == "user":
        return ("user", row.content)
    if row.status == "failed":
        return None
    if row.mode == "image":
        return ("assistant", IMAGE_NOTE) if row.status == "done" else None
    if not row.content:
        return None
    return ("assistant", row.content)


_SYSTEM_PROMPT = select(conversations.c.system_prompt).where(conversations.c.id == bindparam("conversation_id"))
_EARLIER_TURNS = (
    select(messages.c.role, messages.c.mode, messages.c.status, messages.c.content)
    .where(messages.c.conversation_id == bindparam("conversation_id"), messages.c.position < bindparam("position"))
    .order_by(messages.c.position))


def load(conn, reply):
    """Returns the History a reply is generated from."""
    conversation = conn.execute(_SYSTEM_PROMPT, {"conversation_id": reply.conversation_id}).first()
    rows = conn.execute(_EARLIER_TURNS, {"conversation_id": reply.conversation_id, "position": reply.position}).all()
    history = History(system_prompt=(conversation.system_prompt if conversation else "") or "")
    for row in rows:
        turn = turn_of(row)
        if turn is not None:
            history.turns.append(turn)
    for row in reversed(rows):
        if row.role == "user":
            history.image_prompt = row.content
            break
    return history
