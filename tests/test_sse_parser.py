"""The upstream's SSE parser and the handling of each chat-completion event."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from upstream import ChatStream, SSEParser, UpstreamError


def events_of(*chunks):
    """Feeds the chunks to a new parser and returns every event it yields, the end of stream included."""
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


def byte_by_byte(data):
    return [data[i:i + 1] for i in range(len(data))]


def chunk_event(content=None, finish_reason=None, **extra):
    delta = {} if content is None else {"content": content}
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})


def new_stream():
    """Returns a ChatStream without a response, to exercise its event handling alone."""
    return ChatStream(None, idle_timeout=1.0)


# Framing -------------------------------------------------------------------------

def test_lf_framed_events_are_split_at_blank_lines():
    assert events_of(b"data: one\n\ndata: two\n\n") == ["one", "two"]


def test_crlf_framed_events_are_split_at_blank_lines():
    assert events_of(b"data: one\r\n\r\ndata: two\r\n\r\n") == ["one", "two"]


def test_cr_only_framed_events_are_split_at_blank_lines():
    assert events_of(b"data: one\r\rdata: two\r\r") == ["one", "two"]


def test_a_crlf_split_across_two_feeds_is_one_line_ending():
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r\n\r\n") == ["a\nb"]


def test_an_event_completes_as_soon_as_its_blank_line_arrives():
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == ["a"]


def test_multi_line_data_is_joined_with_newlines():
    assert events_of(b'data: {"a":\ndata: 1}\n\n') == ['{"a":\n1}']


def test_comments_and_pings_are_ignored():
    assert events_of(b": ping\n\ndata: x\n: keep-alive\n\n:\n\n") == ["x"]


def test_fields_other_than_data_are_ignored():
    assert events_of(b"event: message\nid: 7\nretry: 100\ndata: x\n\n") == ["x"]


def test_a_single_space_after_the_colon_is_dropped_and_the_rest_kept():
    assert events_of(b"data:x\n\ndata:  y\n\n") == ["x", " y"]


def test_blank_lines_without_data_make_no_event():
    assert events_of(b"\n\n\r\n\n") == []


def test_an_event_unterminated_at_the_end_of_the_stream_is_returned_by_close():
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert parser.close() == ["[DONE]"]


def test_a_utf8_character_split_across_feeds_is_decoded_whole():
    parser = SSEParser()
    assert parser.feed(b"data: caf\xc3") == []
    assert parser.feed(b"\xa9 \xf0\x9f") == []
    assert parser.feed(b"\x99\x82\n\n") == ["café 🙂"]


def test_feeding_a_whole_stream_byte_by_byte_gives_identical_events():
    stream = "".join(f"data: {chunk_event(word)}\r\n\r\n" for word in ("中文 ", "café ", "🚀 ", "𝄞", "Привет"))
    stream = (": ping\n\n" + stream + "data: [DONE]\n\n").encode("utf-8")
    whole = events_of(stream)
    assert len(whole) == 6
    assert events_of(*byte_by_byte(stream)) == whole
    assert "\ufffd" not in "".join(whole)


def test_an_empty_feed_between_cr_and_lf_keeps_the_crlf_one_line_ending():
    assert events_of(b"data: a\r", b"", b"\ndata: b\r\n\r\n") == ["a\nb"]


# Events --------------------------------------------------------------------------

def test_done_ends_the_stream():
    assert new_stream()._handle("[DONE]") == ("", True)


def test_a_content_delta_is_returned_as_text():
    stream = new_stream()
    assert stream._handle(chunk_event("Hello")) == ("Hello", False)
    assert stream.finish_reason is None


def test_the_role_chunk_adds_no_text():
    event = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    assert new_stream()._handle(event) == ("", False)


def test_the_finish_reason_is_recorded():
    stream = new_stream()
    assert stream._handle(chunk_event(finish_reason="length")) == ("", False)
    assert stream.finish_reason == "length"


@pytest.mark.parametrize("choices", [[], None, "missing"], ids=["empty", "null", "missing"])
def test_a_usage_chunk_without_choices_records_usage_and_adds_no_text(choices):
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    event = {"id": "chatcmpl-1", "usage": usage}
    if choices != "missing":
        event["choices"] = choices
    stream = new_stream()
    assert stream._handle(json.dumps(event)) == ("", False)
    assert stream.usage == usage


def test_a_null_usage_on_a_content_chunk_keeps_the_text():
    stream = new_stream()
    assert stream._handle(chunk_event("x", usage=None)) == ("x", False)
    assert stream.usage is None


@pytest.mark.parametrize("data", ["{this is not json", "[1, 2]", '"text"', "42", ""])
def test_a_malformed_event_is_skipped_and_counted(data):
    stream = new_stream()
    assert stream._handle(data) == ("", False)
    assert stream.malformed_events == 1


def test_odd_choices_and_deltas_are_skipped():
    event = json.dumps({"choices": [7, {"delta": None}, {"delta": "x"}, {"delta": {"content": 5}},
                                    {"delta": {"content": "ok"}}]})
    assert new_stream()._handle(event) == ("ok", False)


def test_an_error_event_raises_an_upstream_error():
    event = json.dumps({"error": {"message": "The server had an error.", "type": "server_error"}})
    with pytest.raises(UpstreamError) as raised:
        new_stream()._handle(event)
    assert raised.value.code == "upstream_error"
    assert "The server had an error." in raised.value.message


def test_an_error_event_with_a_plain_string_raises_an_upstream_error():
    with pytest.raises(UpstreamError) as raised:
        new_stream()._handle(json.dumps({"error": "overloaded"}))
    assert raised.value.code == "upstream_error"


# Properties ----------------------------------------------------------------------

line_text = st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)), max_size=12)
frame = st.one_of(
    st.lists(line_text, min_size=1, max_size=3).map(lambda values: ("data", values)),
    line_text.map(lambda value: ("comment", value)),
)


def render(frames, newline):
    """Returns the stream text for frames, each ending with a blank line."""
    text = ""
    for kind, value in frames:
        if kind == "comment":
            text += f":{value}{newline}{newline}"
        else:
            text += "".join(f"data: {line}{newline}" for line in value) + newline
    return text


def expected_events(frames):
    return ["\n".join(value) for kind, value in frames if kind == "data"]


def split_at(data, cuts):
    """Returns data cut into non-empty chunks at the given offsets."""
    points = sorted({cut % (len(data) + 1) for cut in cuts} - {0, len(data)})
    return [data[start:end] for start, end in zip([0] + points, points + [len(data)])]


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(frame, max_size=6), newline=st.sampled_from(["\n", "\r\n", "\r"]))
def test_a_valid_stream_parses_to_the_data_it_was_written_from(frames, newline):
    assert events_of(render(frames, newline).encode("utf-8")) == expected_events(frames)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(frame, max_size=6), newline=st.sampled_from(["\n", "\r\n", "\r"]),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_of_a_valid_streams_bytes_yields_the_same_events(frames, newline, cuts):
    data = render(frames, newline).encode("utf-8")
    assert events_of(*split_at(data, cuts)) == expected_events(frames)


def test_a_leading_byte_order_mark_is_ignored():
    assert events_of("\ufeffdata: first\n\n".encode("utf-8")) == ["first"]
