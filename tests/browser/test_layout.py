"""Phone width, dark mode and the language switch."""
import re

from playwright.sync_api import expect

from tests.browser.helpers import assistant_messages, open_app, send, wait_status

PHONE = {"width": 390, "height": 844}


def test_a_phone_width_viewport_collapses_the_sidebar_and_still_chats(new_context):
    page = new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True).new_page()
    open_app(page)
    sidebar = page.locator("#sidebar")
    expect(sidebar).to_be_hidden()
    toggle = page.get_by_role("button", name="Toggle sidebar")
    expect(toggle).to_have_attribute("aria-expanded", "false")

    reply = send(page, "Show me code [[sim content=demo rate=0]]", press_enter=False)
    wait_status(reply, "done")
    expect(reply.locator("table")).to_be_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
    code_box = reply.locator(".code-block").first.bounding_box()
    assert code_box["x"] >= 0 and code_box["x"] + code_box["width"] <= PHONE["width"]
    first = page.url

    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    page.get_by_role("button", name="New chat").click()
    expect(sidebar).to_be_hidden()
    expect(page).to_have_url(re.compile(r"/$"))

    toggle.click()
    page.locator(".conversation-link").first.click()
    expect(sidebar).to_be_hidden()
    expect(page).to_have_url(first)
    expect(assistant_messages(page)).to_have_count(1)


def test_the_page_follows_the_dark_system_setting(new_context):
    dark = new_context(color_scheme="dark").new_page()
    open_app(dark)
    light = new_context(color_scheme="light").new_page()
    open_app(light)
    background = "() => getComputedStyle(document.body).backgroundColor"
    assert dark.evaluate(background) == "rgb(33, 33, 33)"
    assert light.evaluate(background) == "rgb(255, 255, 255)"

    reply = send(dark, "Code please [[sim content=demo rate=0]]")
    wait_status(reply, "done")
    code_background = reply.locator(".code-block pre code").first.evaluate(
        "el => getComputedStyle(el).backgroundColor")
    assert code_background == "rgb(13, 17, 23)"


def test_ui_text_follows_the_browser_language_and_the_switch_overrides_it(new_context):
    page = new_context(locale="zh-CN").new_page()
    open_app(page)
    expect(page.get_by_role("textbox", name="消息")).to_be_visible()
    expect(page.get_by_role("button", name="新对话")).to_be_visible()
    expect(page.get_by_role("button", name="图片模式")).to_be_visible()
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")

    page.get_by_role("combobox", name="语言").select_option("en")
    expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    expect(page.get_by_role("button", name="New chat")).to_be_visible()
    page.reload()
    expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    reply = send(page, "Hello [[sim content=lorem tokens=3 rate=0]]")
    wait_status(reply, "done")
    expect(reply.get_by_role("button", name="Regenerate")).to_be_visible()

    page.get_by_role("combobox", name="Language").select_option("zh")
    expect(reply.get_by_role("button", name="重新生成")).to_be_visible()
    expect(page.get_by_role("button", name="发送")).to_be_visible()
