"""The reply grows live, renders Markdown safely, survives reloads, second tabs and network errors."""
import re
import time

from playwright.sync_api import expect

from tests.browser.helpers import (
    by_id, clipboard, open_app, reply_text, send, server_message, wait_for_words, wait_status, words)


def test_reply_text_grows_live_and_ends_equal_to_the_server_content(page):
    open_app(page)
    reply = send(page, "Tell me a story [[sim content=lorem tokens=45 rate=12]]")
    seen = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = reply.get_attribute("data-status")
        text = reply_text(reply)
        if not seen or text != seen[-1]:
            seen.append(text)
        if status == "done":
            break
        time.sleep(0.08)
    wait_status(reply, "done")
    final = reply_text(reply)
    intermediate = [text for text in seen if text.strip() and words(text) != words(final)]
    assert len(intermediate) >= 3, seen
    for earlier, later in zip(intermediate, intermediate[1:] + [final]):
        assert words(later).startswith(words(earlier))

    content = server_message(page, reply.get_attribute("data-message-id"))["content"]
    assert words(final) == words(content)
    reply.get_by_role("button", name="Copy message").click()
    assert clipboard(page) == content


def test_a_table_and_highlighted_code_render_and_copy_puts_the_code_on_the_clipboard(page):
    open_app(page)
    reply = send(page, "Show me everything [[sim content=demo rate=0]]")
    wait_status(reply, "done")
    content = server_message(page, reply.get_attribute("data-message-id"))["content"]

    table = reply.locator("table")
    expect(table).to_be_visible()
    expect(table.locator("th")).to_have_text(["Feature", "Status", "Notes"])
    expect(reply.locator("ul > li").first).to_be_visible()
    expect(reply.locator("ol > li")).to_have_count(4)
    expect(reply.locator("blockquote")).to_contain_text("Tip:")
    link = reply.get_by_role("link", name="link to the Python documentation")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(link).to_have_attribute("target", "_blank")

    python = reply.locator(".code-block[data-language='python']")
    expect(python.locator(".code-lang")).to_have_text("python")
    expect(python.locator(".hljs-keyword").first).to_be_visible()
    expect(reply.locator(".code-block[data-language='javascript'] .hljs-keyword").first).to_be_visible()

    python.get_by_role("button", name="Copy").click()
    expected = re.search(r"```python\n(.*?)\n```", content, re.S).group(1)
    assert clipboard(page) == expected
    expect(python.get_by_role("button", name="Copied")).to_be_visible()


def test_copy_on_a_finished_code_block_works_while_the_reply_still_streams(page):
    open_app(page)
    code = "print('first block')\nprint('second line')"
    prose = " ".join(["streaming"] * 120)
    reply = send(page, f"```python\n{code}\n```\n\n{prose}\n[[sim content=echo rate=25]]")
    expect(reply.locator(".markdown p")).to_contain_text("streaming streaming")
    assert reply.get_attribute("data-status") == "streaming"
    reply.get_by_role("button", name="Copy").click()
    assert clipboard(page) == code
    assert reply.get_attribute("data-status") == "streaming"
    page.get_by_role("button", name="Stop").click()
    wait_status(reply, "stopped")


def test_an_unclosed_code_fence_shows_as_code_while_it_streams(page):
    open_app(page)
    lines = "\n".join(f"value_{n} = {n}" for n in range(60))
    reply = send(page, f"Here:\n\n```python\n{lines}\n```\n\nDone.\n[[sim content=echo rate=30]]")
    expect(reply.locator(".code-block pre code")).to_contain_text("value_3 = 3")
    assert reply.get_attribute("data-status") == "streaming"
    assert "```" not in reply_text(reply)
    expect(reply.locator(".code-block")).to_have_count(1)
    page.get_by_role("button", name="Stop").click()
    wait_status(reply, "stopped")


def test_finished_code_blocks_are_not_rebuilt_while_later_tokens_arrive(page):
    open_app(page)
    prose = " ".join(["more"] * 80)
    reply = send(page, f"```js\nconst a = 1;\n```\n\n{prose}\n[[sim content=echo rate=30]]")
    expect(reply.locator(".markdown p")).to_contain_text("more more")
    reply.locator(".code-block").evaluate("block => { block.dataset.marker = 'kept'; }")
    wait_for_words(reply, 30)
    assert reply.get_attribute("data-status") == "streaming"
    expect(reply.locator(".code-block[data-marker='kept']")).to_have_count(1)
    page.get_by_role("button", name="Stop").click()
    wait_status(reply, "stopped")


def test_xss_payloads_in_a_reply_execute_nothing(page):
    response = open_app(page)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    reply = send(page, "Be naughty [[sim content=xss rate=0]]")
    wait_status(reply, "done")
    expect(reply.locator(".markdown strong")).to_have_text("ordinary text")
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__xss") is None
    dangerous = reply.evaluate("""reply => {
        const found = [];
        for (const el of reply.querySelectorAll('*')) {
            if (['SCRIPT', 'IFRAME', 'OBJECT', 'EMBED', 'IMG', 'SVG'].includes(el.tagName.toUpperCase())
                && !el.closest('.message-actions, .message-note, .typing')) found.push(el.tagName);
            for (const attr of el.attributes) {
                if (/^on/i.test(attr.name)) found.push(attr.name);
                if (/^\\s*javascript:/i.test(attr.value)) found.push(attr.value);
            }
        }
        return found;
    }""")
    assert dangerous == []
    for link in reply.locator(".markdown a[href]").all():
        assert link.get_attribute("rel") == "noopener noreferrer"


def test_reload_mid_reply_shows_the_whole_reply(page):
    open_app(page)
    reply = send(page, "Long one [[sim content=lorem tokens=70 rate=15]]")
    first_words = words(wait_for_words(reply, 6))
    message_id = reply.get_attribute("data-message-id")
    page.reload()
    reply = by_id(page, message_id)
    expect(reply).to_have_attribute("data-status", re.compile("streaming|pending"))
    assert words(wait_for_words(reply, 6)).startswith(first_words)
    wait_status(reply, "done")
    content = server_message(page, message_id)["content"]
    assert words(reply_text(reply)) == words(content)


def test_two_tabs_show_identical_text(page, context):
    open_app(page)
    reply = send(page, "Both of you [[sim content=lorem tokens=50 rate=15]]")
    message_id = reply.get_attribute("data-message-id")
    wait_for_words(reply, 3)
    second = context.new_page()
    open_app(second, page.url)
    other = by_id(second, message_id)
    wait_for_words(other, 8)
    assert other.get_attribute("data-status") == "streaming"
    wait_status(reply, "done")
    wait_status(other, "done")
    content = server_message(page, message_id)["content"]
    assert reply_text(reply) == reply_text(other)
    assert words(reply_text(other)) == words(content)


def test_network_errors_show_reconnecting_and_lose_no_text(page, console_watch):
    console_watch.allow(r"Failed to load resource: net::ERR_")
    cut = {"on": False}

    def maybe_cut(route):
        if cut["on"]:
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route(re.compile(r"/api/messages/[^/]+/poll"), maybe_cut)
    open_app(page)
    reply = send(page, "Keep going [[sim content=lorem tokens=60 rate=15]]")
    wait_for_words(reply, 5)
    cut["on"] = True
    reconnecting = page.get_by_role("status").filter(has_text="Reconnecting")
    expect(reconnecting).to_be_visible()
    page.wait_for_timeout(1500)
    cut["on"] = False
    expect(reconnecting).to_be_hidden(timeout=15000)
    wait_status(reply, "done")
    content = server_message(page, reply.get_attribute("data-message-id"))["content"]
    reply.get_by_role("button", name="Copy message").click()
    assert clipboard(page) == content
    assert words(reply_text(reply)) == words(content)
