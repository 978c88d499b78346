"""Demo mode shows its banner; with access tokens configured the page asks to sign in first."""
import pytest
from playwright.sync_api import expect

from tests.browser.helpers import send, wait_status
from tests.servers import gunicorn_server

TOKEN = "browser-test-token"


@pytest.fixture(scope="module")
def demo_server():
    """The app in demo mode (no upstream configured) with one access token."""
    with gunicorn_server(env={"ACCESS_TOKENS": TOKEN, "DEMO_RATE": "0", "POLL_TIMEOUT": "10"}, workers=1) as url:
        yield str(url)


def test_sign_in_is_required_and_demo_mode_shows_a_banner(new_context, demo_server, console_watch):
    console_watch.allow(r"status of 401")
    page = new_context().new_page()
    page.goto(demo_server + "/")
    form = page.locator("#signin-form")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_role("textbox", name="Message")).to_be_hidden()

    page.get_by_label("Access token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(form.get_by_role("alert")).to_have_text("That token is not valid.")

    page.get_by_label("Access token").fill(TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    banner = page.get_by_role("note")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Demo mode")

    reply = send(page, "What can you show me?")
    wait_status(reply, "done")
    expect(reply.locator("table")).to_be_visible()

    page.reload()
    expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
