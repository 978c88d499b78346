"""A polling client for the chat relay: a small Python library and a command line.

Library:

    from client import ChatClient
    chat = ChatClient("http://127.0.0.1:8000", token=None)
    reply = chat.ask("What is long polling?")
    for piece in reply:
        print(piece, end="", flush=True)
    print(reply.status)

Command line:

    python client.py "What is long polling?"
    python client.py --help
"""
import argparse
import json
import logging
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from urllib.parse import quote, urljoin, urlsplit

import requests
from urllib3.exceptions import NewConnectionError

log = logging.getLogger("client")
log.addHandler(logging.NullHandler())

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATUSES = ("done", "stopped", "failed")
# The server holds a poll at most 60 s; the read timeout leaves room on top of the hold.
POLL_READ_MARGIN = 15.0
LONGEST_RETRY_AFTER = 60.0

EXIT_OK = 0
EXIT_REPLY_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class ChatError(Exception):
    """An error answer from the server, or the server staying out of reach (status None)."""

    def __init__(self, code, message, status=None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status


def is_network_error(exc):
    """Tells whether a requests exception means the connection failed rather than the request was wrong."""
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    return isinstance(exc, (requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError,
                            requests.exceptions.ContentDecodingError))


def was_never_sent(exc):
    """Tells whether a network error happened before the request could reach the server."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


def describe_network_error(exc):
    """Returns a short reason for a network error, without the library's layers of wrapping."""
    if isinstance(exc, requests.ConnectTimeout):
        return "timed out while connecting"
    if isinstance(exc, requests.ReadTimeout):
        return "no answer in time"
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(reason, NewConnectionError):
        return "cannot connect: " + str(reason).rsplit(": ", 1)[-1]
    return f"connection lost ({type(exc).__name__})"


def error_of(response):
    """Turns an error answer into a ChatError, whether or not its body is the protocol's JSON."""
    try:
        error = response.json()["error"]
        return ChatError(str(error["code"]), str(error.get("message") or ""), response.status_code)
    except (ValueError, KeyError, TypeError):
        return ChatError(f"http_{response.status_code}", response.reason or "unexpected answer",
                         response.status_code)


def retry_after_of(response):
    """Returns the Retry-After delay in seconds, or None when the answer names none."""
    try:
        return min(max(float(response.headers.get("Retry-After", "")), 0.0), LONGEST_RETRY_AFTER)
    except ValueError:
        return None


def origin_of(url):
    """Returns the scheme, host and port of a URL."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def quoted(identifier):
    """Quotes an opaque id for use as one path segment."""
    return quote(str(identifier), safe="")


class ChatClient:
    """Talks to one chat server as one owner, keeping its session cookie across requests."""

    def __init__(self, base_url, token=None, *, poll_timeout=25, retries=8, backoff=0.5,
                 max_backoff=10.0, connect_timeout=10.0, session=None):
        self.base_url = base_url.rstrip("/")
        self.poll_timeout = poll_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.session = session or requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def config(self):
        """Returns the server's configuration: models, default model, poll timeout."""
        return self.call("GET", "/api/config")

    def conversations(self):
        """Returns this owner's conversations, newest first."""
        return self.call("GET", "/api/conversations")["conversations"]

    def conversation(self, conversation_id):
        """Returns {"conversation": ..., "messages": [...]} for one conversation."""
        return self.call("GET", f"/api/conversations/{quoted(conversation_id)}")

    def new_conversation(self, title=None, model=None, system_prompt=None):
        """Creates a conversation and returns it."""
        fields = {"title": title, "model": model, "system_prompt": system_prompt}
        return self.call("POST", "/api/conversations",
                         body={key: value for key, value in fields.items() if value is not None})

    def ask(self, text, conversation=None, image=False):
        """Sends a message and returns its Reply; without a conversation (id or dict) it starts a new one."""
        if conversation is None:
            conversation = self.new_conversation()
        conversation_id = conversation["id"] if isinstance(conversation, dict) else conversation
        answer = self.call("POST", f"/api/conversations/{quoted(conversation_id)}/messages",
                           body={"content": text, "mode": "image" if image else "chat"})
        return Reply(self, answer["reply"], answer.get("message"))

    def reply(self, message_id):
        """Returns a Reply that follows an existing assistant message from its start."""
        return Reply(self, self.message(message_id))

    def message(self, message_id):
        """Returns one message as the server has it now."""
        return self.call("GET", f"/api/messages/{quoted(message_id)}")

    def poll(self, message_id, cursor="0", timeout=None):
        """Asks once for the text after a cursor, waiting up to timeout seconds for some."""
        timeout = self.poll_timeout if timeout is None else timeout
        return self.call("GET", f"/api/messages/{quoted(message_id)}/poll",
                         params={"cursor": cursor, "timeout": timeout},
                         read_timeout=timeout + POLL_READ_MARGIN)

    def stop(self, message_id):
        """Stops a running reply and returns it, final and with its text frozen."""
        # Stopping twice answers the same final message, so a lost answer may be asked again.
        return self.call("POST", f"/api/messages/{quoted(message_id)}/stop", safe_to_repeat=True)

    def download(self, url):
        """Returns the bytes behind a same-origin URL the server gave, such as an image_url."""
        absolute = urljoin(self.base_url + "/", url)
        if origin_of(absolute) != origin_of(self.base_url):
            raise ChatError("bad_url", f"{url} is not on {self.base_url}")
        return self.send("GET", absolute, read_timeout=60.0).content

    def call(self, method, path, body=None, params=None, read_timeout=30.0, safe_to_repeat=None):
        """Makes one API call and returns its decoded JSON answer (None for an empty one)."""
        response = self.send(method, self.base_url + path, body=body, params=params,
                             read_timeout=read_timeout, safe_to_repeat=safe_to_repeat,
                             headers={"Accept": "application/json"})
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ChatError("bad_answer", f"{method} {path} answered something that is not JSON",
                            response.status_code) from None

    def send(self, method, url, body=None, params=None, read_timeout=30.0, safe_to_repeat=None,
             headers=None):
        """Sends a request, retrying with backoff when that is safe, and returns the successful response."""
        if safe_to_repeat is None:
            safe_to_repeat = method in ("GET", "HEAD", "DELETE")
        failures = 0
        while True:
            retry_after = None
            try:
                response = self.session.request(method, url, json=body, params=params, headers=headers,
                                                timeout=(self.connect_timeout, read_timeout))
            except requests.RequestException as exc:
                problem = ChatError("unreachable", f"{method} {url}: {describe_network_error(exc)}")
                if not is_network_error(exc) or not (safe_to_repeat or was_never_sent(exc)):
                    raise problem from exc
            else:
                if response.ok:
                    return response
                problem = error_of(response)
                if not self.worth_retrying(response.status_code, safe_to_repeat):
                    raise problem
                retry_after = retry_after_of(response)
            failures += 1
            if failures > self.retries:
                raise problem
            delay = self.delay(failures, retry_after)
            log.warning("%s; retry %d of %d in %.1f s", problem, failures, self.retries, delay)
            time.sleep(delay)

    @staticmethod
    def worth_retrying(status, safe_to_repeat):
        """Tells whether an error status may pass if the same request is sent again."""
        if status in (429, 503):
            return True  # the server did not act on the request
        return safe_to_repeat and status in (500, 502, 504)

    def delay(self, failures, retry_after=None):
        """Returns how long to wait before retry number `failures`: exponential, capped, jittered."""
        if retry_after is not None:
            return retry_after
        return min(self.max_backoff, self.backoff * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


class Reply:
    """An assistant reply that you iterate for its text pieces as they arrive, resuming from its cursor."""

    def __init__(self, client, message, user_message=None):
        self.client = client
        self.message_id = message["id"]
        self.conversation_id = message.get("conversation_id")
        self.mode = message.get("mode", "chat")
        self.user_message = user_message
        self.status = message.get("status")
        self.error = message.get("error")
        self.image_url = message.get("image_url")
        self.cursor = "0"
        self.done = False
        self._pieces = []
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<Reply {self.message_id} {self.status} {len(self.content)} chars>"

    def __iter__(self):
        while not self.done:
            text = self.poll()
            if text:
                yield text

    @property
    def content(self):
        """The text received so far; the reply's whole final text once `done` is true."""
        return "".join(self._pieces)

    @property
    def final(self):
        """Whether the server has finished this reply (it may still have text for us)."""
        return self.status in FINAL_STATUSES

    def poll(self, timeout=None):
        """Asks once for text after the cursor and returns it ('' when none came in time)."""
        with self._lock:
            if self.done:
                return ""
            answer = self.client.poll(self.message_id, self.cursor, timeout)
            text = answer.get("text") or ""
            if text:
                self._pieces.append(text)
            self.cursor = answer["cursor"]
            self._update(answer)
            self.done = bool(answer.get("done"))
            return text

    def wait(self):
        """Receives the rest of the text and returns self once the reply is final."""
        for _ in self:
            pass
        return self

    def stop(self):
        """Asks the server to stop the reply and returns self; the text made before the stop still
        arrives through iteration or wait()."""
        self._update(self.client.stop(self.message_id))
        return self

    def refresh(self):
        """Fetches the message as the server has it now and returns it."""
        message = self.client.message(self.message_id)
        self._update(message)
        return message

    def image(self):
        """Downloads the generated image and returns its bytes."""
        if not self.image_url:
            raise ChatError("no_image", f"reply {self.message_id} has no image (status {self.status})")
        return self.client.download(self.image_url)

    def save_image(self, path):
        """Downloads the generated image into a file and returns the path."""
        data = self.image()
        with open(path, "wb") as file:
            file.write(data)
        return path

    def _update(self, answer):
        status = answer.get("status")
        # An answer that was in flight while the reply finished must not make it look unfinished again.
        if status and not (self.final and status not in FINAL_STATUSES):
            self.status = status
        if answer.get("error") is not None or status in FINAL_STATUSES:
            self.error = answer.get("error")
        if answer.get("image_url"):
            self.image_url = answer["image_url"]


# Terminal control sequences: CSI, OSC and other strings, and two-character escapes (7- and 8-bit).
ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f]).*?(?:\x07|\x1b\\|\x9c)"
    r"|\x1b(?:[ -/]+[0-~]|[0-OQ-WYZ\\`a-~])", re.S)
UNFINISHED_SEQUENCE = re.compile(
    r"(?:\x1b|\x1b\[[0-?]*[ -/]*|\x9b[0-?]*[ -/]*|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x9c]*"
    r"|\x1b[ -/]+)\Z", re.S)
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
LONGEST_HELD_SEQUENCE = 4096


class TerminalSafeText:
    """Removes terminal control sequences from streamed text, even when one is split across pieces."""

    def __init__(self):
        self.held = ""

    def feed(self, text):
        """Returns the displayable part of the text so far, holding back an unfinished sequence."""
        text = ESCAPE_SEQUENCE.sub("", self.held + text)
        unfinished = UNFINISHED_SEQUENCE.search(text)
        if unfinished and len(text) - unfinished.start() <= LONGEST_HELD_SEQUENCE:
            self.held, text = text[unfinished.start():], text[:unfinished.start()]
        else:
            self.held = ""
        return CONTROL_CHARACTER.sub("", text)

    def flush(self):
        """Returns what was held back, without its control characters, at the end of the text."""
        text, self.held = self.held, ""
        return CONTROL_CHARACTER.sub("", text)


class Terminated(BaseException):
    """Raised in the main thread when the process gets SIGTERM."""


def raise_terminated(signum, frame):
    """Turns SIGTERM into an exception, so the running reply is stopped like on Ctrl-C."""
    raise Terminated()


def default_state_path():
    """Returns where the command line remembers its cookie and last conversation per server."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "chat-client", "state.json")


def load_state(path):
    """Reads the state file; a missing or unreadable one is an empty state."""
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path, state):
    """Writes the state file atomically, readable by its owner only (it holds a session cookie)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".state-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(state, file, indent=2)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def cookies_of(session):
    """Returns the session's cookies as plain dicts for the state file."""
    return [{"name": cookie.name, "value": cookie.value, "domain": cookie.domain, "path": cookie.path,
             "secure": cookie.secure, "expires": cookie.expires} for cookie in session.cookies]


def restore_cookies(session, cookies):
    """Puts cookies read from the state file back into a session."""
    for cookie in cookies or []:
        try:
            session.cookies.set(cookie["name"], cookie["value"], domain=cookie.get("domain") or "",
                                path=cookie.get("path") or "/", secure=bool(cookie.get("secure")),
                                expires=cookie.get("expires"))
        except (KeyError, TypeError):
            continue


EPILOG = """\
The reply streams to stdout as it arrives. Without --conversation or --new, the
question continues the conversation this command used last on the same server
(remembered with the session cookie in the state file); if there is none, it
starts a new one.

environment:
  CHAT_URL     server URL (default %(default_url)s)
  CHAT_TOKEN   access token, sent as "Authorization: Bearer <token>"
  CHAT_STATE   state file (default %(state)s)
  NO_COLOR     no colour on stderr, even on a terminal

exit status:
  0    the reply finished
  1    the reply failed or was stopped elsewhere (reason on stderr)
  2    bad command line
  3    the server refused a request (e.g. 401 without a valid token, 404 unknown conversation)
  4    the server could not be reached, also after retries
  130  interrupted with Ctrl-C: the reply was stopped (143 for SIGTERM)
  141  stdout was closed by its reader: the reply was stopped
"""


def build_parser():
    """Returns the command line's argument parser."""
    parser = argparse.ArgumentParser(
        prog="client.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the chat server a question and print the reply as it arrives.",
        epilog=EPILOG % {"default_url": DEFAULT_URL, "state": default_state_path()})
    parser.add_argument("question", nargs="+", help='the question (several words are joined); "-" reads it from stdin')
    parser.add_argument("--url", default=os.environ.get("CHAT_URL") or DEFAULT_URL,
                        help="server URL (default: $CHAT_URL or %(default)s)")
    parser.add_argument("--token", default=os.environ.get("CHAT_TOKEN") or None,
                        help="access token (default: $CHAT_TOKEN)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--conversation", metavar="ID", help="continue this conversation")
    which.add_argument("--new", action="store_true", help="start a new conversation")
    parser.add_argument("--image", action="store_true", help="ask for an image; save it and print its path")
    parser.add_argument("--output", "-o", metavar="PATH",
                        help="file for --image (default: image-<message id>.png in the current directory)")
    parser.add_argument("--json", action="store_true", help="print only the final message, as JSON")
    parser.add_argument("--state", metavar="PATH", default=os.environ.get("CHAT_STATE") or default_state_path(),
                        help="state file (default: $CHAT_STATE or %(default)s)")
    parser.add_argument("--retries", metavar="N", type=int, default=8,
                        help="retries after a network error, with exponential backoff (default: %(default)s)")
    return parser


def read_question(args, parser):
    """Returns the question from the arguments, or from stdin when it is "-"."""
    if args.question == ["-"]:
        question = sys.stdin.buffer.read().decode("utf-8", errors="replace").rstrip("\r\n")
    else:
        question = " ".join(args.question)
    if not question.strip():
        parser.error("the question is empty")
    return question


class CommandLine:
    """One run of the command line: ask, print the reply as it arrives, and report how it ended."""

    def __init__(self, args, question, stdout, stderr):
        self.args = args
        self.question = question
        self.stdout = stdout
        self.stderr = stderr
        self.client = ChatClient(args.url, token=args.token, retries=max(args.retries, 0))
        self.server_key = self.client.base_url
        self.state = load_state(args.state)
        self.reply = None
        self.text = TerminalSafeText()
        self.line_open = False
        restore_cookies(self.client.session, self.remembered().get("cookies"))

    def run(self):
        """Asks the question and follows the reply to its end; returns the exit status."""
        self.reply = self.start_reply()
        self.remember()
        for piece in self.reply:
            self.show(piece)
        status = self.finish()
        self.remember()  # the server may have refreshed the session cookie meanwhile
        return status

    def start_reply(self):
        """Sends the question to the chosen, the remembered or a new conversation."""
        conversation = self.args.conversation
        if conversation or self.args.new:
            return self.client.ask(self.question, conversation, image=self.args.image)
        remembered = self.remembered().get("conversation")
        if remembered:
            try:
                return self.client.ask(self.question, remembered, image=self.args.image)
            except ChatError as exc:
                if exc.code != "not_found":
                    raise
        return self.client.ask(self.question, image=self.args.image)

    def show(self, piece):
        """Writes a piece of reply text to stdout at once, unless stdout is for the image path or JSON."""
        if self.args.json or self.args.image:
            return
        text = self.text.feed(piece)
        if text:
            self.stdout.write(text)
            self.stdout.flush()
            self.line_open = not text.endswith("\n")

    def end_text(self):
        """Ends the streamed text; on a terminal, also ends its last line."""
        self.show_rest()
        if self.line_open and self.stdout.isatty():
            self.stdout.write("\n")
        self.line_open = False
        self.stdout.flush()

    def show_rest(self):
        """Writes out text held back at the end of the reply."""
        if not (self.args.json or self.args.image):
            rest = self.text.flush()
            if rest:
                self.stdout.write(rest)
                self.line_open = not rest.endswith("\n")

    def finish(self):
        """Prints how the reply ended and returns the exit status."""
        self.end_text()
        reply = self.reply
        message = reply.refresh() if self.args.json else None
        image_path = None
        if reply.status == "done" and self.args.image:
            if not reply.image_url:
                self.complain("the reply finished without an image")
                return EXIT_REPLY_FAILED
            try:
                image_path = reply.save_image(self.args.output or f"image-{reply.message_id}.png")
            except OSError as exc:
                self.complain(f"could not save the image: {exc}")
                return EXIT_REPLY_FAILED
        if self.args.json:
            self.print_json(message, image_path)
        elif image_path:
            self.stdout.write(image_path + "\n")
        if reply.status == "failed":
            error = reply.error or {}
            self.complain(f"the reply failed ({error.get('code', 'unknown')}): {error.get('message', '')}")
            return EXIT_REPLY_FAILED
        if reply.status == "stopped":
            self.complain("the reply was stopped")
            return EXIT_REPLY_FAILED
        return EXIT_OK

    def print_json(self, message, image_path=None):
        """Prints a message as JSON, with the saved image's path when there is one."""
        if image_path:
            message = {**message, "image_path": image_path}
        self.stdout.write(json.dumps(message, ensure_ascii=False, indent=2) + "\n")
        self.stdout.flush()

    def interrupt(self, status):
        """Stops the running reply after Ctrl-C or SIGTERM, prints the text it kept, and returns status."""
        reply = self.reply
        running = reply is not None and not reply.final
        if reply is not None and not reply.done:
            self.client.retries = min(self.client.retries, 2)
            try:
                reply.stop()
                for piece in reply:
                    self.show(piece)
            except ChatError as exc:
                self.end_text()
                self.complain(f"could not stop the reply: {exc}")
                return status
        self.end_text()
        if reply is not None and self.args.json:
            try:
                self.print_json(reply.refresh())
            except ChatError:
                pass
        self.note("interrupted: the reply was stopped" if running else "interrupted")
        return status

    def stop_quietly(self):
        """Stops the reply if it still runs, ignoring any failure to do so."""
        if self.reply is not None and not self.reply.final:
            self.client.retries = 0
            try:
                self.reply.stop()
            except ChatError:
                pass

    def remembered(self):
        """Returns what the state file remembers for this server."""
        return self.state.get("servers", {}).get(self.server_key, {})

    def remember(self):
        """Saves the conversation and the session cookie, so the next run continues as the same owner."""
        servers = self.state.setdefault("servers", {})
        servers[self.server_key] = {"conversation": self.reply.conversation_id,
                                    "cookies": cookies_of(self.client.session)}
        try:
            save_state(self.args.state, self.state)
        except OSError as exc:
            self.note(f"could not save the state file {self.args.state}: {exc}")

    def complain(self, text):
        """Prints an error on stderr."""
        self.write_stderr(text, "error: ", "\x1b[31m")

    def note(self, text):
        """Prints a note on stderr."""
        self.write_stderr(text, "", "\x1b[2m")

    def write_stderr(self, text, prefix, colour):
        """Writes one line on stderr, coloured only on a terminal without NO_COLOR."""
        if self.stderr.isatty() and not os.environ.get("NO_COLOR"):
            self.stderr.write(f"{colour}{prefix}\x1b[0m{text}\n" if prefix else f"{colour}{text}\x1b[0m\n")
        else:
            self.stderr.write(f"{prefix}{text}\n")
        self.stderr.flush()


def explain(exc):
    """Returns a one-line reason for a ChatError, with a hint when one helps."""
    if exc.status == 401:
        return f"{exc.message or 'not signed in'} ({exc.code}); pass --token or set CHAT_TOKEN"
    if exc.status == 404:
        return f"{exc.message or 'not found'} ({exc.code})"
    if exc.code == "reply_running":
        return f"{exc.message} ({exc.code}); wait for it, or ask with --new"
    return str(exc)


def use_utf8(stream):
    """Makes a text stream write UTF-8 when it goes to a file or pipe, and never fail on a character."""
    if hasattr(stream, "reconfigure"):
        if stream.isatty():
            stream.reconfigure(errors="replace")
        else:
            stream.reconfigure(encoding="utf-8", errors="replace")
    return stream


def main(argv=None):
    """Runs the command line and returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output and not args.image:
        parser.error("--output goes with --image")
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url must start with http:// or https://, not {args.url!r}")
    question = read_question(args, parser)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)
    if sys.stderr.isatty():
        retries = logging.StreamHandler(sys.stderr)
        retries.setFormatter(logging.Formatter("note: %(message)s"))
        log.addHandler(retries)
    command = CommandLine(args, question, use_utf8(sys.stdout), use_utf8(sys.stderr))
    try:
        try:
            return command.run()
        except KeyboardInterrupt:
            return command.interrupt(EXIT_INTERRUPTED)
        except Terminated:
            return command.interrupt(EXIT_TERMINATED)
    except (KeyboardInterrupt, Terminated):
        return EXIT_INTERRUPTED  # a second interruption while stopping: leave at once
    except ChatError as exc:
        command.end_text()
        command.complain(explain(exc))
        return EXIT_UNREACHABLE if exc.status is None else EXIT_REFUSED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): nobody wants the rest, so stop the reply and leave
        # quietly, without a second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        command.stop_quietly()
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
