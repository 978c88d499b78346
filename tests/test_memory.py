"""Chat memory: what history is sent upstream with each reply."""
from context import IMAGE_NOTE, History
from tests.helpers import app_config_fixture_using_sim, simulator_fixture
from tests.test_api import ask, new_conversation, poll_to_end, send

sim = simulator_fixture(scope="function", content="echo")
app_config = app_config_fixture_using_sim()


def last_sent_messages(sim):
    chats = [r for r in sim.stats()["last_requests"] if "messages" in r]
    return chats[-1]["messages"]


def test_the_system_prompt_and_earlier_turns_are_sent(client, sim):
    conversation = new_conversation(client, system_prompt="You are terse.")
    for text in ("first question", "second question"):
        reply = send(client, conversation["id"], text).json["reply"]
        poll_to_end(client, reply["id"])
    sent = last_sent_messages(sim)
    assert sent == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first question"},
        {"role": "user", "content": "second question"},
    ]


def test_older_turns_beyond_the_budget_are_left_out_but_kept_in_the_conversation(app, client, sim):
    app.config["CONTEXT_BUDGET_CHARS"] = 50
    conversation = new_conversation(client)
    for text in ("a" * 30, "b" * 30, "c" * 10):
        reply = send(client, conversation["id"], text).json["reply"]
        poll_to_end(client, reply["id"])
    sent = last_sent_messages(sim)
    assert [m["content"] for m in sent] == ["b" * 30, "c" * 10]
    stored = client.get(f"/api/conversations/{conversation['id']}").json["messages"]
    assert len(stored) == 6


def test_the_message_being_answered_is_sent_even_when_it_alone_exceeds_the_budget(app, client, sim):
    app.config["CONTEXT_BUDGET_CHARS"] = 10
    _, sent = ask(client, "z" * 100)
    poll_to_end(client, sent["reply"]["id"])
    assert [m["content"] for m in last_sent_messages(sim)] == ["z" * 100]


def test_failed_replies_are_left_out_and_stopped_ones_keep_their_partial_text():
    history = History(system_prompt="")
    rows = [("user", "chat", "done", "q1"), ("assistant", "chat", "failed", "broken"),
            ("user", "chat", "done", "q2"), ("assistant", "chat", "stopped", "half"),
            ("user", "image", "done", "画 a cat"), ("assistant", "image", "done", ""),
            ("user", "chat", "done", "q3")]
    from collections import namedtuple
    from context import turn_of
    Row = namedtuple("Row", "role mode status content")
    for row in rows:
        turn = turn_of(Row(*row))
        if turn:
            history.turns.append(turn)
    assert history.messages(10_000) == [
        {"role": "user", "content": "q1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "half"}, {"role": "user", "content": "画 a cat"},
        {"role": "assistant", "content": IMAGE_NOTE}, {"role": "user", "content": "q3"}]
