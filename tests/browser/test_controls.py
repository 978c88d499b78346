"""Writing, stopping, regenerating, retrying, drawing and per-conversation settings, as a user does them."""
import re

from playwright.sync_api import expect

from tests.browser.helpers import (
    assistant_messages, by_id, message_box, open_app, reply_text, send, server_message, wait_for_words,
    wait_status, words)


def test_stop_freezes_the_text_and_shows_it_as_stopped(page):
    open_app(page)
    reply = send(page, "Talk for a while [[sim content=lorem tokens=300 rate=15]]")
    wait_for_words(reply, 4)
    send_button = page.locator("#send-button")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    expect(send_button).to_be_hidden()
    assert send_button.is_disabled()

    stop.click()
    wait_status(reply, "stopped")
    expect(reply.locator(".message-note")).to_have_text("Stopped")
    frozen = reply_text(reply)
    page.wait_for_timeout(1200)
    assert reply_text(reply) == frozen
    message = server_message(page, reply.get_attribute("data-message-id"))
    assert message["status"] == "stopped"
    assert words(message["content"]) == words(frozen)
    expect(stop).to_be_hidden()
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_regenerate_replaces_the_last_reply(page):
    open_app(page)
    first = send(page, "One [[sim content=lorem tokens=8 rate=0]]")
    wait_status(first, "done")
    last = send(page, "Two [[sim content=lorem tokens=12 rate=0]]")
    wait_status(last, "done")
    expect(page.get_by_role("button", name="Regenerate")).to_have_count(1)
    expect(first.get_by_role("button", name="Regenerate")).to_have_count(0)
    old_id = last.get_attribute("data-message-id")

    last.get_by_role("button", name="Regenerate").click()
    expect(by_id(page, old_id)).to_have_count(0)
    expect(assistant_messages(page)).to_have_count(2)
    new = assistant_messages(page).last
    wait_status(new, "done")
    new_id = new.get_attribute("data-message-id")
    assert new_id != old_id
    assert words(reply_text(new)) == words(server_message(page, new_id)["content"])
    assert page.request.get(f"/api/messages/{old_id}").status == 404
    page.reload()
    expect(by_id(page, new_id)).to_have_attribute("data-status", "done")
    expect(by_id(page, old_id)).to_have_count(0)


def test_an_upstream_error_shows_the_reason_and_retry_works(page):
    open_app(page)
    reply = send(page, "Break [[sim content=lorem tokens=40 rate=50 error_after=6 fail_times=1]]")
    wait_status(reply, "failed")
    note = reply.locator(".message-note")
    expect(note).to_contain_text("The AI service returned an error")
    assert len(reply_text(reply).split()) == 6
    failed_id = reply.get_attribute("data-message-id")
    assert server_message(page, failed_id)["error"]["code"] == "upstream_error"

    reply.get_by_role("button", name="Retry").click()
    expect(by_id(page, failed_id)).to_have_count(0)
    retried = assistant_messages(page).last
    wait_status(retried, "done")
    content = server_message(page, retried.get_attribute("data-message-id"))["content"]
    assert words(reply_text(retried)) == words(content)
    assert len(content.split()) == 40
    expect(page.locator("article[data-status='failed']")).to_have_count(0)


def test_enter_sends_shift_enter_adds_a_line_and_the_box_grows(page):
    open_app(page)
    box = message_box(page)
    box.click()
    height = box.bounding_box()["height"]
    box.type("first line")
    for line in ("second line", "third line", "fourth line"):
        box.press("Shift+Enter")
        box.type(line)
    assert box.input_value() == "first line\nsecond line\nthird line\nfourth line"
    assert box.bounding_box()["height"] > height * 2
    expect(page.locator("article.message")).to_have_count(0)

    box.type(" [[sim content=echo rate=0]]")
    box.press("Enter")
    user = page.locator("article[data-role='user']")
    expect(user).to_have_count(1)
    expect(user.locator(".user-text")).to_have_text(re.compile(r"^first line\nsecond line\nthird line\nfourth line"))
    expect(box).to_have_value("")
    wait_status(assistant_messages(page).last, "done")
    assert box.bounding_box()["height"] < height * 1.5


def test_the_page_is_usable_by_keyboard_alone(page):
    open_app(page)
    box = message_box(page)
    expect(box).to_be_focused()
    box.type("Keyboard only [[sim content=lorem tokens=5 rate=0]]")
    page.keyboard.press("Enter")
    wait_status(assistant_messages(page).last, "done")
    first_url = page.url

    page.keyboard.press("Control+Shift+O")
    expect(page).to_have_url(re.compile(r"/$"))
    expect(box).to_be_focused()
    page.keyboard.press("Tab")
    image_mode = page.get_by_role("button", name="Image mode")
    expect(image_mode).to_be_focused()
    page.keyboard.press("Space")
    expect(image_mode).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("Space")
    expect(image_mode).to_have_attribute("aria-pressed", "false")

    link = page.locator(".conversation-link").first
    link.focus()
    page.keyboard.press("Enter")
    expect(page).to_have_url(first_url)
    expect(assistant_messages(page)).to_have_count(1)


def test_image_mode_toggle_shows_a_placeholder_then_the_image(page):
    open_app(page)
    toggle = page.get_by_role("button", name="Image mode")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    toggle.click()
    expect(toggle).to_have_attribute("aria-pressed", "true")
    reply = send(page, "A red bicycle [[sim latency=1.5]]")
    expect(reply).to_have_attribute("data-mode", "image")
    expect(reply.locator(".image-placeholder")).to_be_visible()
    wait_status(reply, "done")
    image = reply.get_by_role("img", name=re.compile("Generated image"))
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    expect(reply.locator(".image-placeholder")).to_have_count(0)

    reply.get_by_role("button", name="Open image full size").click()
    lightbox = page.locator("#lightbox")
    expect(lightbox).to_be_visible()
    source = image.get_attribute("src")
    expect(lightbox.locator("img")).to_have_attribute("src", source)
    expect(lightbox.get_by_role("link", name="Open in new tab")).to_have_attribute("href", source)
    page.keyboard.press("Escape")
    expect(lightbox).to_be_hidden()
    assert page.request.get(source).headers["content-type"] == "image/png"


def test_prompts_starting_with_slash_image_or_hua_draw_an_image(page):
    open_app(page)
    reply = send(page, "/image a small boat")
    expect(reply).to_have_attribute("data-mode", "image")
    expect(page.locator("article[data-role='user'] .user-text").last).to_have_text("a small boat")
    wait_status(reply, "done")
    expect(reply.get_by_role("img", name=re.compile("Generated image"))).to_be_visible()

    reply = send(page, "画一只猫")
    expect(reply).to_have_attribute("data-mode", "image")
    wait_status(reply, "done")
    expect(reply.get_by_role("img", name=re.compile("Generated image"))).to_be_visible()
    expect(page.get_by_role("button", name="Image mode")).to_have_attribute("aria-pressed", "false")


def test_model_and_system_prompt_are_kept_per_conversation(page, browser_sim):
    open_app(page)
    wait_status(send(page, "Hi [[sim content=lorem tokens=3 rate=0]]"), "done")
    page.get_by_role("button", name="Settings").click()
    dialog = page.get_by_role("dialog", name="Conversation settings")
    dialog.get_by_label("Model").select_option("sim-chat-large")
    dialog.get_by_label("System prompt").fill("You answer like a pirate.")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_role("combobox", name="Model")).to_have_value("sim-chat-large")

    page.reload()
    expect(page.get_by_role("combobox", name="Model")).to_have_value("sim-chat-large")
    page.get_by_role("button", name="Settings").click()
    expect(dialog.get_by_label("System prompt")).to_have_value("You answer like a pirate.")
    dialog.get_by_role("button", name="Cancel").click()

    wait_status(send(page, "Ahoy [[sim content=lorem tokens=3 rate=0]]"), "done")
    sent = [body for body in browser_sim.stats()["last_requests"]
            if any("Ahoy" in str(m.get("content")) for m in body.get("messages", []))][-1]
    assert sent["model"] == "sim-chat-large"
    assert sent["messages"][0] == {"role": "system", "content": "You answer like a pirate."}

    page.get_by_role("button", name="New chat").click()
    expect(page.get_by_role("combobox", name="Model")).to_have_value("sim-chat")
