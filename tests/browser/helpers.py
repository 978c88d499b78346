"""Steps the browser tests share: open the page, send a message, read what the user sees."""
import re
import time

from playwright.sync_api import expect

REPLY_TIMEOUT_MS = 20000


def open_app(page, path="/"):
    """Opens the page and waits until the app has loaded its settings and conversation."""
    response = page.goto(path)
    expect(page.locator("body[data-ready='true']")).to_have_count(1)
    return response


def message_box(page):
    return page.get_by_role("textbox", name="Message")


def assistant_messages(page):
    return page.locator("article[data-role='assistant']")


def by_id(page, message_id):
    return page.locator(f"article[data-message-id='{message_id}']")


def send(page, text, press_enter=True):
    """Types text into the message box, sends it, and returns the locator of the new reply."""
    before = assistant_messages(page).count()
    box = message_box(page)
    box.fill(text)
    if press_enter:
        box.press("Enter")
    else:
        page.get_by_role("button", name="Send").click()
    expect(assistant_messages(page)).to_have_count(before + 1)
    return by_id(page, assistant_messages(page).nth(before).get_attribute("data-message-id"))


def wait_status(reply, status, timeout=REPLY_TIMEOUT_MS):
    expect(reply).to_have_attribute("data-status", status, timeout=timeout)


def reply_text(reply):
    """Returns the rendered text of a reply as the user sees it."""
    return reply.locator(".markdown").inner_text()


def words(text):
    """Returns text with runs of whitespace made single spaces, for comparing rendered and raw text."""
    return " ".join(text.split())


def server_message(page, message_id):
    """Returns the message as the server has it (the page's own cookie, so the same owner)."""
    response = page.request.get(f"/api/messages/{message_id}")
    assert response.ok, response.status
    return response.json()


def clipboard(page):
    return page.evaluate("() => navigator.clipboard.readText()")


def wait_for_words(reply, count, timeout=REPLY_TIMEOUT_MS / 1000):
    """Waits until the reply shows at least count words; returns its text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = reply_text(reply)
        if len(text.split()) >= count:
            return text
        time.sleep(0.05)
    raise AssertionError(f"the reply never showed {count} words")


def conversation_id_from(page):
    match = re.search(r"/c/([^/?#]+)", page.url)
    assert match, page.url
    return match.group(1)
