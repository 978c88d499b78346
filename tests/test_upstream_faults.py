"""Upstream faults, stops and images, through the API with the real simulator as the upstream."""
import time

import pytest
import requests

from simulator import Simulator, lorem_tokens, render_png, unicode_tokens
from tests.helpers import (app_config_fixture_using_sim, ask, body_of, get_message, lorem, poll, poll_to_end,
                           poll_until_text, simulator_fixture, stop, wait_until)
from tests.servers import free_port
from upstream import Upstream, UpstreamError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

sim = simulator_fixture(scope="function")
app_config = app_config_fixture_using_sim()


def client_with(request, **settings):
    """Returns the test client of an app built with these settings on top of the test config."""
    request.getfixturevalue("app_config").update(settings)
    return request.getfixturevalue("client")


def finished(client, message_id):
    """Polls the reply to its end; returns (polled text, last answer, message)."""
    text, answer = poll_to_end(client, message_id)
    message = get_message(client, message_id)
    assert message["content"] == text
    assert message["status"] == answer["status"]
    assert message["error"] == answer["error"]
    return text, answer, message


def assert_failed(answer, code):
    assert answer["status"] == "failed"
    assert answer["done"] is True
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]


# HTTP errors before the stream --------------------------------------------------

@pytest.mark.parametrize("status", [401, 403])
def test_an_auth_refusal_fails_the_reply_with_upstream_auth_at_once(client, sim, status):
    text, answer, _ = finished(client, ask(client, f"hi [[sim status={status}]]"))
    assert_failed(answer, "upstream_auth")
    assert text == ""
    assert sim.stats()["chat_requests"] == 1


def test_a_wrong_api_key_fails_the_reply_with_upstream_auth(request):
    with Simulator(rate=0, content="lorem", api_key="sk-another-key") as strict:
        client = client_with(request, OPENAI_BASE_URL=strict.url)
        _, answer, _ = finished(client, ask(client, "hi"))
    assert_failed(answer, "upstream_auth")


def test_one_rate_limit_answer_is_retried_and_the_reply_completes(client, sim):
    text, answer, message = finished(client, ask(client, "hi [[sim status=429 fail_times=1 tokens=8]]"))
    assert answer["status"] == "done"
    assert answer["error"] is None
    assert text == lorem(8)
    assert sim.stats()["chat_requests"] == 2


def test_rate_limiting_after_the_retries_fails_the_reply_with_upstream_rate_limited(client, sim):
    _, answer, _ = finished(client, ask(client, "hi [[sim status=429]]"))
    assert_failed(answer, "upstream_rate_limited")
    assert sim.stats()["chat_requests"] == 3


@pytest.mark.parametrize("directive", ["status=500", "status=500 plain=1", "status=502", "status=400"])
def test_a_server_error_fails_the_reply_with_upstream_error(client, sim, directive):
    text, answer, _ = finished(client, ask(client, f"hi [[sim {directive}]]"))
    assert_failed(answer, "upstream_error")
    assert text == ""


def test_a_server_error_once_is_retried_and_the_reply_completes(client, sim):
    text, answer, _ = finished(client, ask(client, "hi [[sim status=503 fail_times=1 tokens=5]]"))
    assert answer["status"] == "done"
    assert text == lorem(5)
    assert sim.stats()["chat_requests"] == 2


def test_a_refused_connection_fails_the_reply_with_upstream_error(request):
    client = client_with(request, OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    text, answer, _ = finished(client, ask(client, "hi"))
    assert_failed(answer, "upstream_error")
    assert text == ""


def test_an_html_page_instead_of_a_stream_fails_the_reply_with_upstream_error(client, sim):
    _, answer, _ = finished(client, ask(client, "hi [[sim html=1]]"))
    assert_failed(answer, "upstream_error")


# Faults inside the stream --------------------------------------------------------

def test_a_stream_cut_midway_fails_with_upstream_error_and_keeps_the_first_tokens(client, sim):
    text, answer, message = finished(client, ask(client, "hi [[sim tokens=20 cut_after=5]]"))
    assert_failed(answer, "upstream_error")
    assert text == "".join(lorem_tokens(20)[:5])
    assert message["content"] == text


def test_an_error_event_inside_the_stream_fails_with_upstream_error_and_keeps_prior_text(client, sim):
    text, answer, _ = finished(client, ask(client, "hi [[sim tokens=20 error_after=3]]"))
    assert_failed(answer, "upstream_error")
    assert text == "".join(lorem_tokens(20)[:3])


def test_a_stall_beyond_the_idle_timeout_fails_with_upstream_timeout_and_keeps_the_text(request, sim):
    client = client_with(request, UPSTREAM_IDLE_TIMEOUT=1)
    started = time.monotonic()
    text, answer, _ = finished(client, ask(client, "hi [[sim tokens=10 stall_after=3 stall=5]]"))
    assert_failed(answer, "upstream_timeout")
    assert text == "".join(lorem_tokens(10)[:3])
    assert time.monotonic() - started < 4
    assert wait_until(lambda: sim.stats()["active_streams"] == 0, 2)


def test_a_malformed_event_is_skipped_and_the_reply_keeps_all_its_text(client, sim):
    text, answer, _ = finished(client, ask(client, "hi [[sim tokens=12 malformed_after=4]]"))
    assert answer["status"] == "done"
    assert answer["error"] is None
    assert text == lorem(12)


def test_multi_byte_characters_split_across_reads_arrive_exactly(client, sim):
    text, answer, _ = finished(client, ask(client, "hi [[sim content=unicode tokens=12 split_utf8=1]]"))
    assert answer["status"] == "done"
    assert text == "".join(unicode_tokens(12))
    assert "\ufffd" not in text


@pytest.mark.parametrize("quirk", ["ping=1", "crlf=1", "multiline=1", "choices_null=1", "no_usage=1",
                                   "ping=1 crlf=1 multiline=1 choices_null=1"])
def test_quirks_of_compatible_servers_still_give_the_exact_text(client, sim, quirk):
    text, answer, _ = finished(client, ask(client, f"hi [[sim tokens=15 {quirk}]]"))
    assert answer["status"] == "done"
    assert answer["error"] is None
    assert text == lorem(15)


def test_a_stream_ending_without_a_finish_reason_or_done_fails_with_upstream_error(client, sim):
    # cut_after equal to the token count ends the connection right after the last token.
    text, answer, _ = finished(client, ask(client, "hi [[sim tokens=6 cut_after=6]]"))
    assert_failed(answer, "upstream_error")
    assert text == lorem(6)


# Stop ----------------------------------------------------------------------------

def test_stop_freezes_the_text_and_closes_the_upstream_connection(client, sim):
    reply_id = ask(client, "hi [[sim rate=20 tokens=200]]")
    seen, _ = poll_until_text(client, reply_id, min_chars=10)
    disconnects = sim.stats()["disconnects"]
    stopped = stop(client, reply_id)
    assert stopped["status"] == "stopped"
    assert stopped["finished_at"] is not None
    assert stopped["content"].startswith(seen)
    assert wait_until(lambda: sim.stats()["disconnects"] > disconnects, 1.5)
    text, answer = poll_to_end(client, reply_id)
    assert answer["status"] == "stopped"
    assert answer["error"] is None
    assert text == stopped["content"]
    time.sleep(0.3)
    assert get_message(client, reply_id)["content"] == stopped["content"]
    assert poll(client, reply_id, "0", 0)["text"] == stopped["content"]
    assert sim.stats()["chat_requests"] == 1


def test_stop_during_a_stall_closes_the_upstream_connection(client, sim):
    reply_id = ask(client, "hi [[sim tokens=10 stall_after=2 stall=30]]")
    seen, _ = poll_until_text(client, reply_id, min_chars=len(lorem(2)))
    assert wait_until(lambda: sim.stats()["active_streams"] == 1, 1)
    stopped = stop(client, reply_id)
    assert stopped["status"] == "stopped"
    assert stopped["content"] == seen == "".join(lorem_tokens(10)[:2])
    assert wait_until(lambda: sim.stats()["disconnects"] == 1, 1.5)
    assert sim.stats()["active_streams"] == 0


def test_stopping_a_final_reply_changes_nothing(client, sim):
    reply_id = ask(client, "hi [[sim tokens=4]]")
    text, _ = poll_to_end(client, reply_id)
    again = stop(client, reply_id)
    assert again["status"] == "done"
    assert again["content"] == text


# Images --------------------------------------------------------------------------

def assert_image_reply(app, client, reply_id):
    """Checks an image reply is done and its image is served to its owner only."""
    text, answer, message = finished(client, reply_id)
    assert answer["status"] == "done", answer
    assert answer["image_url"] == message["image_url"] == f"/api/messages/{reply_id}/image"
    response = client.get(answer["image_url"])
    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.data.startswith(PNG_SIGNATURE)
    stranger = app.test_client()
    refused = stranger.get(answer["image_url"])
    assert refused.status_code == 404
    assert body_of(refused)["error"]["code"] == "not_found"
    return response.data


def test_an_image_answered_as_b64_json_is_kept_and_served_to_its_owner_only(app, client, sim):
    reply_id = ask(client, "a red fox in the snow", mode="image")
    data = assert_image_reply(app, client, reply_id)
    assert data == render_png("a red fox in the snow", 1024, 1024)
    request = sim.stats()["last_requests"][-1]
    assert request["model"] == "sim-image"


def test_a_dall_e_image_is_kept_and_served_to_its_owner_only(request, sim):
    client = client_with(request, IMAGE_MODEL="dall-e-3")
    reply_id = ask(client, "a lighthouse at dusk", mode="image")
    data = assert_image_reply(client.application, client, reply_id)
    assert data == render_png("a lighthouse at dusk", 1024, 1024)
    assert sim.stats()["last_requests"][-1]["model"] == "dall-e-3"


def test_an_image_url_answer_is_downloaded_at_once(sim):
    # The app asks dall-e models for b64_json, so the URL path runs only against servers that ignore it.
    answer = requests.post(sim.url + "/images/generations", json={"model": "dall-e-3", "prompt": "a boat"},
                           timeout=10).json()
    url = answer["data"][0]["url"]
    data = Upstream(sim.url)._download(url, max_bytes=10 * 1024 * 1024)
    assert data == render_png("a boat", 1024, 1024)


def test_an_image_failure_fails_the_reply_with_the_protocol_code(client, sim):
    _, answer, _ = finished(client, ask(client, "a cat [[sim status=401]]", mode="image"))
    assert_failed(answer, "upstream_auth")
    assert answer["image_url"] is None


def test_an_image_answered_as_a_url_is_downloaded_at_once_and_served_from_the_app(app, client, sim):
    reply_id = ask(client, "a paper boat [[sim url=1]]", mode="image")
    data = assert_image_reply(app, client, reply_id)
    assert data == render_png("a paper boat", 1024, 1024)


def test_the_upstream_goes_through_the_proxy_the_environment_names_unless_no_proxy_exempts_it(sim, monkeypatch):
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    monkeypatch.setenv("http_proxy", dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(UpstreamError, match="Could not reach the upstream"):
        Upstream(sim.url, retries=0).stream_chat("sim-chat", [{"role": "user", "content": "hi [[sim tokens=2]]"}])
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    stream = Upstream(sim.url, retries=0).stream_chat("sim-chat", [{"role": "user", "content": "hi [[sim tokens=2]]"}])
    assert "".join(stream.iter_text()) == lorem(2)
