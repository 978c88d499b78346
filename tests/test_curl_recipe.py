"""The curl recipe in docs/CLIENT.md, run verbatim with the real curl binary against the app under gunicorn."""
import os
import re
import shutil
import signal
import subprocess

import pytest

from client import ChatClient
from tests.servers import ROOT, gunicorn_server

RECIPE_DOC = os.path.join(ROOT, "docs", "CLIENT.md")
TOKEN = "recipe-token"
QUESTION = "What is long polling?\nAnswer on two lines. [[sim content=echo rate=20]]"
LONG_QUESTION = "Tell me a long story. [[sim content=lorem tokens=400 rate=20]]"


def recipe_script():
    """Returns the bash script between the recipe markers of the document."""
    with open(RECIPE_DOC, encoding="utf-8") as handle:
        document = handle.read()
    found = re.search(r"<!-- recipe:start -->\s*```bash\n(.*?)```\s*<!-- recipe:end -->", document, re.S)
    assert found, "docs/CLIENT.md has no recipe between <!-- recipe:start --> and <!-- recipe:end -->"
    return found.group(1)


def run_recipe(tmp_path, base_url, token=None):
    """Runs the recipe with bash and curl and returns the CompletedProcess (text)."""
    script = tmp_path / "recipe.sh"
    script.write_text(recipe_script(), encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("CHAT_")}
    environment.update({"CHAT_URL": base_url, "QUESTION": QUESTION, "LONG_QUESTION": LONG_QUESTION})
    if token:
        environment["CHAT_TOKEN"] = token
    process = subprocess.Popen(["bash", str(script)], env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, encoding="utf-8", start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        # The script's own group: bash and any curl it is still running.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def server_env(simulator, **extra):
    return {"OPENAI_BASE_URL": simulator.url, "OPENAI_API_KEY": "sk-test-secret-key-0000",
            "CHAT_MODEL": "sim-chat", "IMAGE_MODEL": "sim-image", "POLL_TIMEOUT": "5",
            "MESSAGES_PER_MINUTE": "1000", **extra}


@pytest.fixture(scope="module")
def curl():
    path = shutil.which("curl")
    assert path, "the recipe needs the curl binary (apt-get install curl)"
    return path


@pytest.fixture(scope="module")
def token_server(simulator):
    with gunicorn_server(env=server_env(simulator, ACCESS_TOKENS=TOKEN)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def open_server(simulator):
    with gunicorn_server(env=server_env(simulator)) as base_url:
        yield base_url


def test_recipe_chats_polls_to_the_end_and_stops_a_reply(curl, token_server, tmp_path):
    done = run_recipe(tmp_path, token_server, token=TOKEN)
    assert done.returncode == 0, done.stderr

    chat = ChatClient(token_server, token=TOKEN)
    conversation = chat.conversations()[0]
    assert conversation["title"] == "curl recipe"
    assert f"conversation: {conversation['id']}" in done.stderr
    first, second = [message for message in chat.conversation(conversation["id"])["messages"]
                     if message["role"] == "assistant"]
    assert first["status"] == "done"
    assert first["content"] == "What is long polling?\nAnswer on two lines."
    assert second["status"] == "stopped"
    assert 0 < len(second["content"].split()) < 400
    # Polling on after the stop printed the frozen text exactly: nothing missing, nothing twice.
    assert done.stdout == first["content"] + "\n" + second["content"] + "\n"
    assert f"reply {first['id']}: done" in done.stderr
    assert f"reply {second['id']}: stopped" in done.stderr


def test_recipe_keeps_one_owner_through_its_cookie_jar_on_an_open_server(curl, open_server, tmp_path):
    done = run_recipe(tmp_path, open_server)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("What is long polling?\nAnswer on two lines.\n")
    assert ": done\n" in done.stderr and ": stopped\n" in done.stderr


def test_recipe_fails_with_the_server_error_without_a_token(curl, token_server, tmp_path):
    done = run_recipe(tmp_path, token_server)
    assert done.returncode != 0
    assert "unauthorized" in done.stdout + done.stderr
