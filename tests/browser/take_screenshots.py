"""Takes the screenshots in docs/screenshots of the page's main states (run: python -m tests.browser.take_screenshots)."""
import os
import sys
import time

from playwright.sync_api import expect, sync_playwright

from simulator import Simulator
from tests.browser.helpers import open_app, send, wait_status
from tests.servers import ROOT, gunicorn_server

CHROMIUM = "/usr/bin/chromium"
OUT = os.path.join(ROOT, "docs", "screenshots")
DESKTOP = {"width": 1280, "height": 820}
PHONE = {"width": 390, "height": 844}


def shot(page, name):
    page.mouse.move(page.viewport_size["width"] - 5, 300)
    path = os.path.join(OUT, f"{name}.png")
    page.screenshot(path=path)
    print(path)


def earlier_conversations(page):
    """Fills the sidebar with a few conversations, as a returning user's would be."""
    for title in ("Packing list for a weekend hike", "SQL join types explained", "Birthday card ideas"):
        page.request.post("/api/conversations", data={"title": title})


def new_chat(page):
    page.get_by_role("button", name="New chat").click()
    expect(page).to_have_url(f"{page.url.split('/c/')[0].rstrip('/')}/")


def main():
    os.makedirs(OUT, exist_ok=True)
    env = {"DEMO_RATE": "25", "POLL_TIMEOUT": "10", "MESSAGES_PER_MINUTE": "1000"}
    with gunicorn_server(env=env, workers=1) as base_url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--disable-dev-shm-usage"])
        context = browser.new_context(base_url=base_url, viewport=DESKTOP, locale="en-US", color_scheme="light")
        page = context.new_page()
        open_app(page)
        earlier_conversations(page)
        page.reload()
        open_app(page)

        reply = send(page, "How does this chat stream its replies?")
        expect(reply.locator("ol > li").nth(1)).to_be_visible(timeout=30000)
        shot(page, "streaming")
        wait_status(reply, "done", timeout=60000)
        demo_url = page.url
        reply.locator(".code-block").first.evaluate("el => el.scrollIntoView({block: 'center'})")
        page.mouse.move(10, 10)
        time.sleep(0.3)
        shot(page, "code")

        new_chat(page)
        reply = send(page, "/image a lighthouse at dusk")
        wait_status(reply, "done", timeout=30000)
        time.sleep(0.3)
        shot(page, "image")

        state = context.storage_state()
        dark = browser.new_context(base_url=base_url, viewport=DESKTOP, locale="en-US", color_scheme="dark",
                                   storage_state=state)
        dark_page = dark.new_page()
        open_app(dark_page, demo_url)
        dark_page.locator(".code-block").first.evaluate("el => el.scrollIntoView({block: 'center'})")
        time.sleep(0.3)
        shot(dark_page, "dark")

        phone = browser.new_context(base_url=base_url, viewport=PHONE, device_scale_factor=2, is_mobile=True,
                                    has_touch=True, locale="en-US", storage_state=state)
        phone_page = phone.new_page()
        open_app(phone_page, demo_url)
        time.sleep(0.3)
        phone_page.screenshot(path=os.path.join(OUT, "phone.png"), scale="css")
        print(os.path.join(OUT, "phone.png"))
        phone_page.get_by_role("button", name="Toggle sidebar").click()
        time.sleep(0.4)
        phone_page.screenshot(path=os.path.join(OUT, "phone-sidebar.png"), scale="css")
        print(os.path.join(OUT, "phone-sidebar.png"))
        error_state(browser)
        browser.close()
    return 0


def error_state(browser):
    """Shows a failed reply: the server's API key is refused by the upstream."""
    with Simulator(api_key="sk-the-right-key") as sim, gunicorn_server(
            env={"OPENAI_BASE_URL": sim.url, "OPENAI_API_KEY": "sk-a-wrong-key", "CHAT_MODEL": "gpt-4o-mini",
                 "UPSTREAM_RETRY_MAX_WAIT": "0.2"}, workers=1) as base_url:
        context = browser.new_context(base_url=base_url, viewport=DESKTOP, locale="en-US", color_scheme="light")
        page = context.new_page()
        open_app(page)
        earlier_conversations(page)
        page.reload()
        open_app(page)
        reply = send(page, "Summarise the design of this app in one paragraph.")
        wait_status(reply, "failed", timeout=30000)
        page.mouse.move(10, 10)
        shot(page, "error")
        context.close()


if __name__ == "__main__":
    sys.exit(main())
