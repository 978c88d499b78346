"""The polling client, library and command line, against the real app under gunicorn and the simulator."""
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

from client import ChatClient, ChatError, load_state, restore_cookies
from tests.servers import ROOT, gunicorn_server

CLIENT = os.path.join(ROOT, "client.py")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = ("tok-one", "tok-two")


def server_env(simulator, **extra):
    """The app's environment for these tests: the simulator upstream, limits out of the way."""
    return {"OPENAI_BASE_URL": simulator.url, "OPENAI_API_KEY": "sk-test-secret-key-0000",
            "CHAT_MODEL": "sim-chat", "IMAGE_MODEL": "sim-image", "POLL_TIMEOUT": "5",
            "MESSAGES_PER_MINUTE": "1000", "MAX_RUNNING_PER_OWNER": "20",
            "UPSTREAM_RETRY_MAX_WAIT": "0.2", **extra}


@pytest.fixture(scope="module")
def open_server(simulator):
    """The app without access tokens: every cookie is its own owner."""
    with gunicorn_server(env=server_env(simulator)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def token_server(simulator):
    """The app with access tokens configured."""
    with gunicorn_server(env=server_env(simulator, ACCESS_TOKENS=",".join(TOKENS))) as base_url:
        yield base_url


@pytest.fixture
def state_file(tmp_path):
    return tmp_path / "state" / "client.json"


def cli_environment(state_file, **extra):
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("CHAT_") and key != "NO_COLOR"}
    environment.update({"CHAT_STATE": str(state_file), "PYTHONUNBUFFERED": "1", **extra})
    return environment


def run_cli(state_file, *args, input=None, cwd=None, timeout=30, **env):
    """Runs `python client.py ARGS...` to its end and returns the CompletedProcess (bytes)."""
    return subprocess.run([sys.executable, CLIENT, *args], input=input, cwd=cwd or ROOT,
                          env=cli_environment(state_file, **env), capture_output=True, timeout=timeout)


def start_cli(state_file, *args, **env):
    """Starts `python client.py ARGS...` with piped stdout and stderr; the caller must end it."""
    return subprocess.Popen([sys.executable, CLIENT, *args], cwd=ROOT, env=cli_environment(state_file, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def end_process(process):
    """Kills a process the test started, by its PID, if it is still running."""
    if process.poll() is None:
        process.kill()
    process.wait(10)


def read_first_output(process, timeout=15.0):
    """Waits for the first bytes on a process's stdout and returns them."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no output in time"
    return os.read(process.stdout.fileno(), 65536)


def chat_client_from_state(base_url, state_file):
    """Returns a library client that is the same owner as the command line, through its state file."""
    chat = ChatClient(base_url)
    restore_cookies(chat.session, load_state(state_file)["servers"][base_url]["cookies"])
    return chat


def remembered_conversation(base_url, state_file):
    return load_state(state_file)["servers"][base_url]["conversation"]


class TcpProxy:
    """Forwards TCP connections to a local port; can cut every connection and refuse new ones a while."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = 0
        self.links = []
        self.cut_while_waiting = 0
        self.lock = threading.Lock()
        self.listening = None
        self.acceptor = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        """Listens (again, on the same port after a cut) and forwards what it accepts."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self.listening = threading.Event()
        self.listening.set()
        self.acceptor = threading.Thread(target=self._accept, args=(listener, self.listening), daemon=True)
        self.acceptor.start()
        return self

    def cut(self):
        """Stops listening and resets every open connection, counting those that awaited an answer."""
        self.listening.clear()
        self.acceptor.join(5)
        with self.lock:
            links, self.links = self.links, []
        for link in links:
            if link["waiting"]:
                self.cut_while_waiting += 1
            for sock in (link["client"], link["server"]):
                # shutdown() wakes the forwarding thread blocked in recv(); close() alone would not.
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, listener, listening):
        with listener:
            while listening.is_set():
                try:
                    client, _ = listener.accept()
                except socket.timeout:
                    continue
                client.settimeout(None)
                server = socket.create_connection(("127.0.0.1", self.target_port))
                link = {"client": client, "server": server, "waiting": False}
                with self.lock:
                    self.links.append(link)
                threading.Thread(target=self._pipe, args=(link, client, server, True), daemon=True).start()
                threading.Thread(target=self._pipe, args=(link, server, client, False), daemon=True).start()

    @staticmethod
    def _pipe(link, source, target, upstream):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                link["waiting"] = upstream
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# The library -------------------------------------------------------------------

def test_reply_yields_pieces_in_order_as_they_arrive_and_they_join_to_the_exact_text(open_server):
    text = "one two three four five six seven eight nine ten eleven twelve\nthirteen  fourteen"
    chat = ChatClient(open_server)
    reply = chat.ask(f"{text} [[sim content=echo rate=20]]")
    assert reply.status == "pending" and reply.message_id and reply.conversation_id
    pieces, done_at_first_piece = [], None
    for piece in reply:
        if not pieces:
            done_at_first_piece = reply.done
        pieces.append(piece)
    assert done_at_first_piece is False
    assert len(pieces) > 1
    assert "".join(pieces) == reply.content == text
    assert reply.done and reply.status == "done" and reply.error is None
    assert chat.message(reply.message_id)["content"] == text


def test_reply_resumes_from_its_cursor_after_the_connection_drops_mid_poll(open_server, caplog):
    proxy = TcpProxy(urlsplit(open_server).port).start()
    try:
        chat = ChatClient(proxy.url, backoff=0.1, max_backoff=0.4, poll_timeout=10)
        # Ten quick tokens, then the upstream stalls, so the client sits in a held poll.
        reply = chat.ask("[[sim content=lorem tokens=40 rate=50 stall_after=10 stall=3]]")
        pieces, cutter, started = [], None, time.monotonic()

        def cut_then_come_back():
            time.sleep(0.8)
            proxy.cut()
            time.sleep(1.0)
            proxy.start()

        with caplog.at_level(logging.WARNING, logger="client"):
            for piece in reply:
                pieces.append(piece)
                if cutter is None:
                    cutter = threading.Thread(target=cut_then_come_back)
                    cutter.start()
        cutter.join(10)
        assert proxy.cut_while_waiting >= 1
        assert time.monotonic() - started < 10  # noticed at once, not after the read timeout
        assert any("retry" in record.getMessage() for record in caplog.records)
        assert reply.status == "done"
        assert "".join(pieces) == reply.content
        assert len(reply.content.split()) == 40
        assert reply.content == chat.message(reply.message_id)["content"]
        assert chat.poll(reply.message_id, "0", timeout=0)["text"] == reply.content
    finally:
        proxy.cut()


def test_stop_freezes_the_reply_and_iteration_still_delivers_its_text_once(open_server):
    chat = ChatClient(open_server)
    reply = chat.ask("[[sim content=lorem tokens=400 rate=20]]")
    pieces = []
    for piece in reply:
        pieces.append(piece)
        if len(pieces) == 1:
            assert reply.stop() is reply
            assert reply.status == "stopped"
    assert reply.done
    frozen = chat.message(reply.message_id)
    assert frozen["status"] == "stopped"
    assert "".join(pieces) == reply.content == frozen["content"]
    assert 0 < len(reply.content.split()) < 400


def test_failed_reply_reports_its_error(open_server):
    reply = ChatClient(open_server).ask("[[sim status=401]]").wait()
    assert reply.status == "failed"
    assert reply.error["code"] == "upstream_auth"


def test_image_reply_gives_a_png_to_download(open_server, tmp_path):
    chat = ChatClient(open_server)
    reply = chat.ask("A lighthouse at dusk", image=True).wait()
    assert reply.status == "done" and reply.image_url
    data = reply.image()
    assert data.startswith(PNG_SIGNATURE)
    path = reply.save_image(tmp_path / "lighthouse.png")
    assert path.read_bytes() == data


def test_ask_continues_a_conversation_given_by_id_or_object(open_server):
    chat = ChatClient(open_server)
    conversation = chat.new_conversation(title="Two questions", system_prompt="Be brief.")
    assert conversation["title"] == "Two questions"
    chat.ask("first [[sim content=echo]]", conversation).wait()
    reply = chat.ask("second [[sim content=echo]]", conversation["id"]).wait()
    assert reply.conversation_id == conversation["id"]
    messages = chat.conversation(conversation["id"])["messages"]
    assert [message["content"] for message in messages] == [
        "first [[sim content=echo]]", "first", "second [[sim content=echo]]", "second"]


def test_another_session_is_another_owner_and_gets_not_found(open_server):
    reply = ChatClient(open_server).ask("mine [[sim content=echo]]").wait()
    with pytest.raises(ChatError) as caught:
        ChatClient(open_server).message(reply.message_id)
    assert caught.value.status == 404 and caught.value.code == "not_found"


def test_an_unreachable_server_raises_after_the_retries(open_server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    chat = ChatClient(f"http://127.0.0.1:{closed_port}", retries=2, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(ChatError) as caught:
        chat.new_conversation()
    assert caught.value.code == "unreachable" and caught.value.status is None
    assert time.monotonic() - started < 5


def test_download_refuses_a_url_on_another_origin():
    chat = ChatClient("http://127.0.0.1:9", token="secret")
    with pytest.raises(ChatError) as caught:
        chat.download("http://example.invalid/api/messages/x/image")
    assert caught.value.code == "bad_url"


# The command line ----------------------------------------------------------------

def test_cli_streams_the_reply_to_stdout_as_it_arrives_with_the_exact_text(open_server, state_file):
    process = start_cli(state_file, "--url", open_server, "--new", "[[sim content=unicode tokens=30 rate=15]]")
    try:
        first = read_first_output(process)
        first_at = time.monotonic()
        rest, errors = process.communicate(timeout=30)
        ended_at = time.monotonic()
    finally:
        end_process(process)
    assert process.returncode == 0, errors
    assert ended_at - first_at > 0.5  # the first text came well before the end
    chat = chat_client_from_state(open_server, state_file)
    messages = chat.conversation(remembered_conversation(open_server, state_file))["messages"]
    assert (first + rest).decode("utf-8") == messages[-1]["content"]
    assert any(ord(character) > 0xFFFF for character in messages[-1]["content"])
    assert errors == b""


def test_cli_continues_the_last_conversation_and_new_or_an_id_chooses_another(open_server, state_file):
    def ask(*args):
        done = run_cli(state_file, "--url", open_server, "--json", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    first = ask("--new", "first [[sim content=echo]]")
    assert first["content"] == "first" and first["status"] == "done" and first["role"] == "assistant"
    again = ask("second [[sim content=echo]]")
    assert again["conversation_id"] == first["conversation_id"]
    other = ask("--new", "third [[sim content=echo]]")
    assert other["conversation_id"] != first["conversation_id"]
    chosen = ask("--conversation", first["conversation_id"], "fourth [[sim content=echo]]")
    assert chosen["conversation_id"] == first["conversation_id"]
    chat = chat_client_from_state(open_server, state_file)
    replies = [message["content"] for message in chat.conversation(first["conversation_id"])["messages"]
               if message["role"] == "assistant"]
    assert replies == ["first", "second", "fourth"]
    assert oct(os.stat(state_file).st_mode & 0o777) == oct(0o600)


def test_cli_reads_the_question_from_stdin_when_it_is_a_dash(open_server, state_file):
    done = run_cli(state_file, "--url", open_server, "-",
                   input="a question\nover two lines [[sim content=echo]]\n".encode())
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "a question\nover two lines"


def test_cli_takes_the_url_from_chat_url(open_server, state_file):
    done = run_cli(state_file, "hello [[sim content=echo]]", CHAT_URL=open_server)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello"


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_stops_the_reply_when_interrupted_and_exits_with_the_signal_status(token_server, state_file,
                                                                                signum, status):
    process = start_cli(state_file, "--url", token_server, "--new", "[[sim content=lorem tokens=400 rate=20]]",
                        CHAT_TOKEN=TOKENS[0])
    try:
        first = read_first_output(process)
        process.send_signal(signum)
        rest, errors = process.communicate(timeout=15)
    finally:
        end_process(process)
    assert process.returncode == status, errors
    chat = ChatClient(token_server, token=TOKENS[0])
    reply = chat.conversation(remembered_conversation(token_server, state_file))["messages"][-1]
    assert reply["status"] == "stopped"
    assert (first + rest).decode() == reply["content"]
    assert len(reply["content"].split()) < 400
    assert b"stopped" in errors


def test_cli_stops_the_reply_when_its_reader_goes_away(open_server, state_file):
    process = start_cli(state_file, "--url", open_server, "--new", "[[sim content=lorem tokens=400 rate=20]]")
    try:
        read_first_output(process)
        process.stdout.close()
        process.wait(15)
    finally:
        end_process(process)
    assert process.returncode == 128 + signal.SIGPIPE
    chat = chat_client_from_state(open_server, state_file)
    reply = chat.conversation(remembered_conversation(open_server, state_file))["messages"][-1]
    assert reply["status"] == "stopped"


def test_cli_exits_1_with_the_reason_on_stderr_when_the_reply_fails(open_server, state_file):
    done = run_cli(state_file, "--url", open_server, "[[sim status=401]]")
    assert done.returncode == 1
    assert b"upstream_auth" in done.stderr
    assert done.stdout == b""


def test_cli_keeps_the_text_of_a_reply_that_fails_midway(open_server, state_file):
    done = run_cli(state_file, "--url", open_server, "[[sim content=lorem tokens=20 error_after=3]]")
    assert done.returncode == 1
    assert b"upstream_error" in done.stderr
    assert len(done.stdout.split()) == 3


def test_cli_with_json_prints_the_failed_message_and_still_exits_1(open_server, state_file):
    done = run_cli(state_file, "--url", open_server, "--json", "[[sim status=401]]")
    assert done.returncode == 1
    message = json.loads(done.stdout)
    assert message["status"] == "failed" and message["error"]["code"] == "upstream_auth"


def test_cli_exits_3_for_an_unknown_conversation(open_server, state_file):
    done = run_cli(state_file, "--url", open_server, "--conversation", "no-such-conversation", "hello")
    assert done.returncode == 3
    assert b"not_found" in done.stderr


def test_cli_exits_4_when_the_server_cannot_be_reached(state_file):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    done = run_cli(state_file, "--url", f"http://127.0.0.1:{closed_port}", "--retries", "1", "hello")
    assert done.returncode == 4
    assert b"cannot connect" in done.stderr


@pytest.mark.parametrize("args", [[], ["--new", "--conversation", "x", "hi"], ["--output", "x.png", "hi"],
                                  ["--url", "127.0.0.1:5000", "hi"], ["   "]])
def test_cli_exits_2_for_a_bad_command_line(state_file, args):
    done = run_cli(state_file, *args)
    assert done.returncode == 2
    assert done.stdout == b""


def test_cli_image_saves_the_png_and_prints_its_path(open_server, state_file, tmp_path):
    wanted = tmp_path / "out.png"
    done = run_cli(state_file, "--url", open_server, "--image", "--output", str(wanted), "A red kite")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"{wanted}\n"
    assert wanted.read_bytes().startswith(PNG_SIGNATURE)

    done = run_cli(state_file, "--url", open_server, "--image", "A blue kite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = tmp_path / done.stdout.decode().strip()
    assert path.name.startswith("image-") and path.suffix == ".png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_cli_writes_no_terminal_codes_to_a_pipe_but_json_keeps_the_exact_text(open_server, state_file):
    text = "plain \x1b[31mred\x1b[0m \x1b]0;title\x07end"
    done = run_cli(state_file, "--url", open_server, f"{text} [[sim content=echo]]")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"plain red end"
    assert b"\x1b" not in done.stderr

    done = run_cli(state_file, "--url", open_server, "--json", f"{text} [[sim content=echo]]")
    assert json.loads(done.stdout)["content"] == text


def test_cli_without_a_token_is_refused_and_told_how_to_sign_in(token_server, state_file):
    done = run_cli(state_file, "--url", token_server, "hello")
    assert done.returncode == 3
    assert b"unauthorized" in done.stderr and b"CHAT_TOKEN" in done.stderr


def test_cli_with_a_wrong_token_is_refused(token_server, state_file):
    done = run_cli(state_file, "--url", token_server, "--token", "not-a-token", "hello")
    assert done.returncode == 3


def test_a_token_is_one_owner_for_the_cli_and_the_library_and_no_other(token_server, state_file):
    done = run_cli(state_file, "--url", token_server, "--json", "hello [[sim content=echo]]",
                   CHAT_TOKEN=TOKENS[0])
    assert done.returncode == 0, done.stderr
    message = json.loads(done.stdout)
    assert message["content"] == "hello"
    same = ChatClient(token_server, token=TOKENS[0])
    assert same.message(message["id"])["content"] == "hello"
    with pytest.raises(ChatError) as caught:
        ChatClient(token_server, token=TOKENS[1]).message(message["id"])
    assert caught.value.status == 404
    with pytest.raises(ChatError) as caught:
        ChatClient(token_server).message(message["id"])
    assert caught.value.status == 401 and caught.value.code == "unauthorized"
