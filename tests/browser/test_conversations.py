"""The sidebar of conversations: create, rename, delete, switch, and the URL that names the open one."""
import re

from playwright.sync_api import expect

from tests.browser.helpers import (
    assistant_messages, by_id, conversation_id_from, open_app, reply_text, send, server_message,
    wait_for_words, wait_status, words)


def sidebar_item(page, conversation_id):
    return page.locator(f".conversation-item[data-conversation-id='{conversation_id}']")


def test_conversations_can_be_created_renamed_and_deleted(page):
    open_app(page)
    expect(page.get_by_role("heading", name="What can I help with?")).to_be_visible()
    wait_status(send(page, "First topic [[sim content=lorem tokens=4 rate=0]]"), "done")
    first = conversation_id_from(page)
    expect(sidebar_item(page, first)).to_contain_text("First topic")

    page.get_by_role("button", name="New chat").click()
    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("article.message")).to_have_count(0)
    wait_status(send(page, "Second topic [[sim content=lorem tokens=4 rate=0]]"), "done")
    second = conversation_id_from(page)
    assert second != first
    expect(page.locator(".conversation-item")).to_have_count(2)
    expect(page.locator(".conversation-item").first).to_have_attribute("data-conversation-id", second)

    search = page.get_by_role("searchbox", name="Search chats")
    search.fill("second")
    expect(page.locator(".conversation-item")).to_have_count(1)
    expect(sidebar_item(page, second)).to_be_visible()
    search.fill("")
    expect(page.locator(".conversation-item")).to_have_count(2)

    sidebar_item(page, first).hover()
    sidebar_item(page, first).get_by_role("button", name="Rename").click()
    title = page.get_by_role("textbox", name="Conversation title")
    title.fill("Renamed by the test")
    title.press("Enter")
    expect(sidebar_item(page, first)).to_have_text("Renamed by the test")
    page.reload()
    expect(sidebar_item(page, first)).to_have_text("Renamed by the test")

    sidebar_item(page, first).hover()
    sidebar_item(page, first).get_by_role("button", name="Delete").click()
    confirm = page.get_by_role("dialog", name="Delete conversation?")
    expect(confirm).to_contain_text("Renamed by the test")
    confirm.get_by_role("button", name="Cancel").click()
    expect(sidebar_item(page, first)).to_have_count(1)

    sidebar_item(page, second).get_by_role("button", name="Delete").click()
    confirm.get_by_role("button", name="Delete").click()
    expect(sidebar_item(page, second)).to_have_count(0)
    expect(page).to_have_url(re.compile(r"/$"))
    assert page.request.get(f"/api/conversations/{second}").status == 404
    expect(page.locator(".conversation-item")).to_have_count(1)


def test_the_url_names_the_conversation_so_reload_and_back_return_to_it(page):
    open_app(page)
    wait_status(send(page, "Alpha [[sim content=echo rate=0]]"), "done")
    alpha = conversation_id_from(page)
    page.get_by_role("button", name="New chat").click()
    wait_status(send(page, "Bravo [[sim content=echo rate=0]]"), "done")
    bravo = conversation_id_from(page)

    sidebar_item(page, alpha).get_by_role("link").click()
    expect(page).to_have_url(re.compile(f"/c/{alpha}$"))
    expect(assistant_messages(page)).to_have_text("Alpha")
    sidebar_item(page, bravo).get_by_role("link").click()
    expect(assistant_messages(page)).to_have_text("Bravo")

    page.go_back()
    expect(page).to_have_url(re.compile(f"/c/{alpha}$"))
    expect(assistant_messages(page)).to_have_text("Alpha")
    page.reload()
    expect(assistant_messages(page)).to_have_text("Alpha")
    expect(sidebar_item(page, alpha)).to_have_class(re.compile("active"))
    page.go_forward()
    expect(assistant_messages(page)).to_have_text("Bravo")


def test_switching_conversations_while_a_reply_streams_leaks_nothing(page):
    open_app(page)
    alpha_words = " ".join(["alpha"] * 50)
    streaming = send(page, f"{alpha_words} [[sim content=echo rate=15]]")
    wait_for_words(streaming, 3)
    alpha_reply = streaming.get_attribute("data-message-id")
    alpha = conversation_id_from(page)

    page.get_by_role("button", name="New chat").click()
    bravo_reply = send(page, "bravo bravo bravo [[sim content=echo rate=0]]")
    wait_status(bravo_reply, "done")
    page.wait_for_timeout(800)
    expect(page.locator("#messages")).not_to_contain_text("alpha")
    expect(page.locator("article.message")).to_have_count(2)

    sidebar_item(page, alpha).get_by_role("link").click()
    reply = by_id(page, alpha_reply)
    wait_status(reply, "done")
    content = server_message(page, alpha_reply)["content"]
    assert words(reply_text(reply)) == words(content) == alpha_words
    expect(page.locator("#messages")).not_to_contain_text("bravo")
    expect(page.locator("article.message")).to_have_count(2)


def test_a_second_message_while_a_reply_runs_is_not_possible(page):
    open_app(page)
    reply = send(page, "Slow [[sim content=lorem tokens=200 rate=15]]")
    wait_for_words(reply, 2)
    page.get_by_role("textbox", name="Message").fill("Another question")
    page.get_by_role("textbox", name="Message").press("Enter")
    page.wait_for_timeout(300)
    expect(page.locator("article[data-role='user']")).to_have_count(1)
    expect(page.get_by_role("textbox", name="Message")).to_have_value("Another question")
    page.get_by_role("button", name="Stop").click()
    wait_status(reply, "stopped")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("article[data-role='user']")).to_have_count(2)
