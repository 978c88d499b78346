"""Browser-test fixtures: Debian's Chromium, the simulator, the app under gunicorn, and a console watch."""
import re

import pytest

from simulator import Simulator
from tests.servers import gunicorn_server

CHROMIUM = "/usr/bin/chromium"

# Settings that keep the browser suite quick and free of the limits meant for real users.
SERVER_ENV = {
    "OPENAI_API_KEY": "sk-browser-tests",
    "CHAT_MODEL": "sim-chat",
    "CHAT_MODELS": "sim-chat,sim-chat-large",
    "IMAGE_MODEL": "sim-image",
    "POLL_TIMEOUT": "10",
    "MESSAGES_PER_MINUTE": "1000",
    "MAX_RUNNING_PER_OWNER": "20",
    "UPSTREAM_RETRY_MAX_WAIT": "0.2",
    "UPSTREAM_IDLE_TIMEOUT": "10",
}


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """Launches Debian's Chromium instead of a browser downloaded by Playwright."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": ["--disable-dev-shm-usage"]}


@pytest.fixture(scope="session")
def browser_sim():
    """The upstream the app talks to: the project's simulator, as fast as possible unless a message says otherwise."""
    with Simulator(rate=0, content="lorem") as sim:
        yield sim


@pytest.fixture(scope="session")
def app_server(browser_sim):
    """The app under gunicorn with two workers, relaying the simulator."""
    with gunicorn_server(env={**SERVER_ENV, "OPENAI_BASE_URL": browser_sim.url}, workers=2, threads=32) as url:
        yield url


@pytest.fixture(scope="session")
def base_url(app_server):
    """Makes page.goto("/") and page.request use the test server."""
    return str(app_server)


class ConsoleWatch:
    """Collects console errors, uncaught page errors and JavaScript dialogs from browser contexts."""

    def __init__(self):
        self.problems = []
        self.allowed = []

    def allow(self, pattern):
        """Accepts console errors matching pattern (a regex) for the rest of this test."""
        self.allowed.append(re.compile(pattern))

    def watch(self, context):
        context.on("console", self._on_console)
        context.on("weberror", lambda error: self.problems.append(f"page error: {error.error}"))
        context.on("dialog", self._on_dialog)

    def _on_console(self, message):
        if message.type == "error":
            self.problems.append(f"console error: {message.text}")

    def _on_dialog(self, dialog):
        self.problems.append(f"dialog ({dialog.type}): {dialog.message}")
        dialog.dismiss()

    def unexpected(self):
        return [p for p in self.problems if not any(pattern.search(p) for pattern in self.allowed)]


@pytest.fixture
def console_watch():
    """Fails the test when the page logged a console error, threw, or opened a dialog."""
    watch = ConsoleWatch()
    yield watch
    problems = watch.unexpected()
    if problems:
        pytest.fail("the page reported problems:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def new_context(new_context, console_watch, base_url):
    """Creates browser contexts that are watched for errors and may use the clipboard."""

    def create(**kwargs):
        context = new_context(**kwargs)
        console_watch.watch(context)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base_url)
        return context

    return create
