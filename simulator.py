"""A fake OpenAI server on 127.0.0.1 that streams chat replies and draws images, with knobs for speed, faults and stalls.

It speaks the OpenAI wire format (`/v1/models`, `/v1/chat/completions`, `/v1/images/generations`)
and powers the app's demo mode, the tests and the benchmarks. Server-wide defaults come from the
constructor (or the command line); each request can override them with directives written in
the last user message (or the image prompt), for example::

    Tell me a story [[sim content=lorem tokens=20 rate=50 cut_after=5]]

Directive keys: content, tokens, rate, latency, status, plain, fail_times, retry_after,
cut_after, stall_after, stall, malformed_after, error_after, html, ping, crlf, multiline,
choices_null, no_usage, split_utf8, finish. See `DIRECTIVE_KEYS` below.

Stream statistics (`GET /_sim/stats`): a stream counts as *completed* when the server wrote
everything it planned to write (a deliberate `cut_after` or `error_after` included) and as a
*disconnect* when the client closed it first, so `streams_started` always equals
`streams_completed + disconnects + active_streams`.
"""
import base64
import collections
import hashlib
import http.server
import json
import re
import secrets
import select
import socket
import struct
import sys
import threading
import time
import zlib

import click

CONTENT_KINDS = ("demo", "lorem", "echo", "xss", "timestamps", "unicode")
MODELS = ("sim-chat", "sim-chat-large", "sim-image")
DEFAULT_TOKENS = {"lorem": 50, "timestamps": 200, "unicode": 40}
LAST_REQUESTS_KEPT = 50
IMAGES_KEPT = 500
MAX_IMAGE_SIDE = 2048
SPLIT_UTF8_PAUSE = 0.02
DEFAULT_STALL = 10.0

DIRECTIVE = re.compile(r"[ \t]*\[\[sim(?:\s+([^\]]*?))?\s*\]\]")

# Each key maps to the function that parses its value.
_FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


def _status_code(text):
    value = int(text)
    if not 100 <= value <= 599:
        raise ValueError(text)
    return value


def _content_kind(text):
    if text not in CONTENT_KINDS:
        raise ValueError(text)
    return text


def _flag(text):
    return _FLAG_WORDS[text.lower()]


def _finish_reason(text):
    if not re.fullmatch(r"[a-z_]+", text):
        raise ValueError(text)
    return text


DIRECTIVE_KEYS = {
    "content": _content_kind,
    "tokens": _non_negative_int,
    "rate": _non_negative_float,
    "latency": _non_negative_float,
    "status": _status_code,
    "plain": _flag,
    "fail_times": _non_negative_int,
    "retry_after": _non_negative_float,
    "cut_after": _non_negative_int,
    "stall_after": _non_negative_int,
    "stall": _non_negative_float,
    "malformed_after": _non_negative_int,
    "error_after": _non_negative_int,
    "html": _flag,
    "ping": _flag,
    "crlf": _flag,
    "multiline": _flag,
    "choices_null": _flag,
    "no_usage": _flag,
    "split_utf8": _flag,
    "finish": _finish_reason,
    "url": _flag,
}

# Keys that describe a failure; `fail_times` switches these off once its count is used up.
FAULT_KEYS = ("status", "plain", "cut_after", "stall_after", "stall", "malformed_after", "error_after", "html")


class DirectiveError(ValueError):
    """A `[[sim ...]]` directive that cannot be understood."""


def parse_directives(text):
    """Returns (settings, directive_text, text_without_directives) for a message text."""
    settings = {}
    found = []
    for match in DIRECTIVE.finditer(text):
        found.append(match.group(0).strip())
        for pair in (match.group(1) or "").split():
            key, sep, value = pair.partition("=")
            if key not in DIRECTIVE_KEYS:
                raise DirectiveError(f"Unknown simulator directive key {key!r}.")
            if not sep:
                value = "1"
            try:
                settings[key] = DIRECTIVE_KEYS[key](value)
            except (ValueError, KeyError):
                raise DirectiveError(f"Bad value {value!r} for simulator directive {key!r}.") from None
    if not found:
        return settings, "", text
    return settings, " ".join(found), DIRECTIVE.sub("", text).strip()


def split_tokens(text):
    """Splits text into tokens of a word plus its following whitespace, so they concatenate to text."""
    tokens = re.findall(r"\s*\S+\s*", text) if text.strip() else []
    if not tokens and text:
        return [text]
    return tokens


def message_text(message):
    """Returns the text of a chat message whose content is a string or a list of parts."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def last_user_text(messages):
    """Returns the text of the last user message, or an empty string."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message)
    return ""


def count_prompt_tokens(messages):
    """Returns a rough token count for the prompt: its words plus a few per message."""
    return sum(len(message_text(m).split()) + 3 for m in messages)


# ---------------------------------------------------------------- content kinds

LOREM_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur excepteur sint occaecat cupidatat "
    "non proident sunt in culpa qui officia deserunt mollit anim id est laborum"
).split()

UNICODE_WORDS = (
    "Hello", "中文", "café", "🙂", "naïve", "日本語", "über", "🚀", "straße", "한국어",
    "jalapeño", "🎉", "Ελληνικά", "😀", "façade", "汉字", "résumé", "👍", "Приветствие", "𝄞",
)

XSS_TEXT = (
    "Here is some ordinary text before the tricky part.\n\n"
    "<img src=x onerror=\"window.__xss=1\">\n\n"
    "<script>window.__xss=1</script>\n\n"
    "A Markdown link: [click](javascript:window.__xss=1)\n\n"
    "<iframe src=\"javascript:window.__xss=1\"></iframe>\n\n"
    "<svg onload=\"window.__xss=1\"><script>window.__xss=1</script></svg>\n\n"
    "<a href=\"javascript:alert(1)\">x</a>\n\n"
    "And some **ordinary text** after it, which should still render normally.\n"
)

DEMO_TEMPLATE = """## A quick tour of what this chat can render

{asked}Here is a sample answer that shows **bold text**, *italics*, `inline code` and a [link to the Python documentation](https://docs.python.org/3/).

### Highlights

- Replies stream in **token by token** over plain long-polling.
- Each poll returns only the text after your `cursor`.
- Reloading the page resumes exactly where the reply was.

### How it works

1. Your message is saved, and a background worker asks the model for a reply.
2. Every piece of text the model sends is appended to a buffer in the database.
3. The page asks for anything new after its cursor and waits briefly when nothing has arrived yet.
4. When the reply is finished, the last poll says so and the page stops asking.

| Feature | Status | Notes |
|---|---|---|
| Streaming | ✅ | Long-polling, no WebSockets |
| Markdown | ✅ | Tables, lists and code |
| Images | ✅ | Generated on request |

A small Python example:

```python
def fibonacci(n):
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


print(fibonacci(10))
```

It builds the list one step at a time, so it runs in linear time and uses very little memory. Running it prints the first ten numbers of the sequence.

And the same idea in JavaScript:

```javascript
function fibonacci(n) {
  const numbers = [0, 1];
  while (numbers.length < n) {
    numbers.push(numbers.at(-1) + numbers.at(-2));
  }
  return numbers.slice(0, n);
}

console.log(fibonacci(10));
```

> **Tip:** press *Stop* at any time; the text you already see is kept, and you can
> regenerate the reply whenever you like.

That is all for this demo. Ask anything else to see another streamed reply, or try an image.

"""


def demo_text(question):
    """Returns the showcase Markdown reply, mentioning the question when there is one."""
    question = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", " ".join(question.split()))
    question = re.sub(r"[\\`*_#|<>\[\]()~]", "", question)
    if len(question) > 80:
        question = question[:77].rstrip() + "…"
    asked = f"You asked: “{question}”. " if question else ""
    return DEMO_TEMPLATE.replace("{asked}", asked)


def lorem_tokens(count):
    """Returns count deterministic lorem-ipsum word tokens."""
    words = [LOREM_WORDS[i % len(LOREM_WORDS)] for i in range(count)]
    if not words:
        return []
    words[0] = words[0].capitalize()
    tokens = [word + " " for word in words]
    tokens[-1] = words[-1] + "."
    return tokens


def unicode_tokens(count):
    """Returns count tokens mixing ASCII, CJK, accented letters and 4-byte emoji."""
    tokens = []
    for i in range(count):
        separator = "\n" if (i + 1) % 10 == 0 else " "
        tokens.append(UNICODE_WORDS[i % len(UNICODE_WORDS)] + separator)
    return tokens


def fit_tokens(tokens, count):
    """Returns the tokens truncated or repeated to count tokens; None keeps them as they are."""
    if count is None or not tokens:
        return list(tokens)
    repeated = tokens * (count // len(tokens) + 1)
    return repeated[:count]


def timestamp_token():
    """Returns a token holding the current time in integer microseconds since the epoch."""
    return f"{time.time_ns() // 1000} "


class Reply:
    """The tokens of one reply; timestamp replies compute each token when it is emitted."""

    def __init__(self, tokens, timestamps=False):
        self.tokens = tokens
        self.timestamps = timestamps

    def __len__(self):
        return len(self.tokens)

    def token(self, index):
        """Returns the text of token index at the moment it is emitted."""
        return timestamp_token() if self.timestamps else self.tokens[index]


def build_reply(kind, count, question):
    """Returns the Reply for a content kind, a token count (None = natural) and the question text."""
    if kind == "demo":
        return Reply(fit_tokens(split_tokens(demo_text(question)), count))
    if kind == "lorem":
        return Reply(lorem_tokens(DEFAULT_TOKENS["lorem"] if count is None else count))
    if kind == "echo":
        return Reply(split_tokens(question))
    if kind == "xss":
        return Reply(split_tokens(XSS_TEXT))
    if kind == "timestamps":
        return Reply([""] * (DEFAULT_TOKENS["timestamps"] if count is None else count), timestamps=True)
    if kind == "unicode":
        return Reply(unicode_tokens(DEFAULT_TOKENS["unicode"] if count is None else count))
    raise ValueError(f"unknown content kind {kind!r}")


# ---------------------------------------------------------------- images

def _png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def render_png(prompt, width=256, height=256):
    """Returns a PNG of diagonal colour bands whose colours derive from a hash of the prompt."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    colours = [digest[0:3], digest[3:6], digest[6:9]]
    period = 48 + digest[9] % 80
    band = bytearray()
    for x in range(period):
        # A triangle wave through the three colours, so the bands wrap around seamlessly.
        position = 2 * x / period
        if position > 1:
            position = 2 - position
        scaled = position * 2
        first, second = (colours[0], colours[1]) if scaled <= 1 else (colours[1], colours[2])
        t = scaled if scaled <= 1 else scaled - 1
        band += bytes(int(a + (b - a) * t) for a, b in zip(first, second))
    repeats = (width + period) // period + 1
    pattern = bytes(band) * repeats
    shades = {}
    rows = []
    for y in range(height):
        level = 64 - (32 * y) // max(height - 1, 1)  # 64 at the top, 32 at the bottom
        table = shades.get(level)
        if table is None:
            table = bytes(min(255, (v * level) // 48) for v in range(256))
            shades[level] = table
        offset = (y % period) * 3
        rows.append(b"\x00" + pattern[offset:offset + width * 3].translate(table))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"".join(rows), 6)) + _png_chunk(b"IEND", b""))


def parse_size(size):
    """Returns (width, height) for an image size such as "256x256"; "auto" or None means 1024x1024."""
    if size in (None, "auto"):
        return 1024, 1024
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", str(size))
    if not match:
        raise ValueError(size)
    width, height = int(match.group(1)), int(match.group(2))
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise ValueError(size)
    return width, height


# ---------------------------------------------------------------- errors

ERROR_KINDS = {
    400: ("invalid_request_error", None, "The request was invalid."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", "unsupported_country_region_territory", "Country, region, or territory not supported."),
    404: ("invalid_request_error", "not_found", "The requested resource does not exist."),
    405: ("invalid_request_error", "method_not_allowed", "Method not allowed."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def error_body(status, message=None, code=None, param=None):
    """Returns an OpenAI-style error object for an HTTP status."""
    kind, default_code, default_message = ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None,
                 f"The simulator answered {status} as asked."))
    return {"error": {"message": message or default_message, "type": kind, "param": param,
                      "code": code if code is not None else default_code}}


class _ClientGone(Exception):
    """The client closed the connection."""


# ---------------------------------------------------------------- HTTP handler

class SimulatorHandler(http.server.BaseHTTPRequestHandler):
    """Handles one connection of the simulator; every response closes the connection."""

    protocol_version = "HTTP/1.1"
    server_version = "OpenAISimulator/1.0"

    def version_string(self):
        return self.server_version

    @property
    def simulator(self):
        return self.server.simulator

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.simulator._track_connection(self.connection, True)

    def finish(self):
        self.simulator._track_connection(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):
        if self.simulator.log_requests:
            sys.stderr.write(f"simulator: {self.address_string()} {format % args}\n")

    # -- dispatch

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method):
        self.close_connection = True
        sim = self.simulator
        sim._count("requests")
        path = self.path.split("?", 1)[0]
        routes = {
            "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/images/generations": ("POST", self._images),
            "/_sim/stats": ("GET", self._stats),
            "/_sim/reset": ("POST", self._reset),
        }
        try:
            if path in routes:
                allowed, handler = routes[path]
                if method != allowed:
                    self._read_body()
                    return self._send_error(405, f"Use {allowed} for {path}.")
                return handler()
            match = re.fullmatch(r"/files/([0-9a-f]+)\.png", path)
            if match and method == "GET":
                return self._file(match.group(1))
            self._read_body()
            self._send_error(404, f"Unknown path {path}.")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, _ClientGone):
            pass

    # -- helpers

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send_bytes(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status, payload, headers=()):
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._send_bytes(status, body, "application/json", headers)

    def _send_error(self, status, message=None, code=None, param=None, headers=()):
        self._send_json(status, error_body(status, message, code, param), headers)

    def _authorized(self):
        key = self.simulator.api_key
        if not key:
            return True
        given = self.headers.get("Authorization", "")
        if given == f"Bearer {key}":
            return True
        if not given:
            message = ("You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
            self._send_error(401, message, code=None)
        else:
            self._send_error(401, "Incorrect API key provided.", code="invalid_api_key")
        return False

    def _json_body(self):
        """Reads, records and parses a JSON request body; answers 400 and returns None if it is not an object."""
        raw = self._read_body()
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
            self.simulator._record_request(raw.decode("utf-8", errors="replace"))
        else:
            self.simulator._record_request(body)
        if not self._authorized():
            return None
        if not isinstance(body, dict):
            self._send_error(400, "We could not parse the JSON body of your request.")
            return None
        return body

    def _wait(self, seconds):
        """Waits for seconds while watching the socket; raises _ClientGone if the client closes it."""
        deadline = time.monotonic() + seconds
        sock = self.connection
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                readable, _, _ = select.select([sock], [], [], min(remaining, 0.25))
                if readable:
                    peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                    if peeked == b"":
                        raise _ClientGone()
                    # The client sent more bytes; it is still there, so just pass the time.
                    time.sleep(min(max(deadline - time.monotonic(), 0), 0.05))
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                raise _ClientGone() from None

    def _settings(self, text):
        """Returns the effective settings for a request text, or None after answering 400."""
        try:
            directives, directive_text, clean = parse_directives(text)
        except DirectiveError as exc:
            self._send_error(400, str(exc))
            return None
        sim = self.simulator
        settings = {"content": sim.content, "tokens": sim.tokens, "rate": sim.rate, "latency": sim.latency}
        settings.update(sim.default_directives)
        settings.update(directives)
        if "fail_times" in settings and not sim._fault_applies(directive_text, settings["fail_times"]):
            for key in FAULT_KEYS:
                settings.pop(key, None)
        settings["clean_text"] = clean
        return settings

    def _send_fault_status(self, settings):
        """Answers the status or HTML page the settings ask for; returns True if it answered."""
        status = settings.get("status")
        if settings.get("html"):
            page = (f"<!DOCTYPE html>\n<html><head><title>{status or 200}</title></head>"
                    "<body><h1>Welcome</h1><p>This is a web page, not an API response.</p></body></html>\n")
            self._send_bytes(status or 200, page.encode("utf-8"), "text/html; charset=utf-8")
            return True
        if status is None:
            return False
        headers = []
        retry_after = settings.get("retry_after")
        if status == 429 or retry_after is not None:
            value = 1 if retry_after is None else retry_after
            headers.append(("Retry-After", str(int(value)) if float(value).is_integer() else str(value)))
        if settings.get("plain"):
            try:
                phrase = http.HTTPStatus(status).phrase
            except ValueError:
                phrase = "Error"
            self._send_bytes(status, phrase.encode("utf-8"), "text/plain; charset=utf-8", headers)
        else:
            self._send_error(status, headers=headers)
        return True

    # -- endpoints

    def _models(self):
        if not self._authorized():
            return
        created = 1700000000
        data = [{"id": name, "object": "model", "created": created, "owned_by": "simulator"} for name in MODELS]
        self._send_json(200, {"object": "list", "data": data})

    def _stats(self):
        self._send_json(200, self.simulator.stats())

    def _reset(self):
        self._read_body()
        self.simulator.reset()
        self._send_json(200, {"ok": True})

    def _file(self, image_id):
        self._read_body()
        png = self.simulator._image(image_id)
        if png is None:
            return self._send_error(404, "No such file.")
        self._send_bytes(200, png, "image/png")

    def _chat(self):
        self.simulator._count("chat_requests")
        body = self._json_body()
        if body is None:
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self._send_error(400, "'messages' must be a non-empty array.", param="messages")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._send_error(400, "You must provide a model parameter.", param="model")
        settings = self._settings(last_user_text(messages))
        if settings is None:
            return
        stream = body.get("stream") is True
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        include_usage = options.get("include_usage") is True and not settings.get("no_usage")
        reply = build_reply(settings["content"], settings["tokens"], settings["clean_text"])
        prompt_tokens = count_prompt_tokens(messages)
        if stream and not settings.get("html") and settings.get("status") is None:
            return ChatStream(self, model, reply, settings, include_usage, prompt_tokens).run()
        self._wait(settings["latency"])
        if self._send_fault_status(settings):
            return
        self._complete_chat(model, reply, settings, prompt_tokens)

    def _complete_chat(self, model, reply, settings, prompt_tokens):
        """Answers a non-streaming chat completion after the time the tokens would take."""
        rate = settings["rate"]
        duration = (max(len(reply) - 1, 0) / rate) if rate else 0.0
        if settings.get("stall_after") is not None or settings.get("stall") is not None:
            duration += settings.get("stall", DEFAULT_STALL)
        self._wait(duration)
        if settings.get("cut_after") is not None:
            return self._cut()
        if settings.get("error_after") is not None:
            return self._send_error(500)
        if settings.get("malformed_after") is not None:
            return self._send_bytes(200, b"{this is not json", "application/json")
        text = "".join(reply.token(i) for i in range(len(reply)))
        self._send_json(200, {
            "id": new_completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": settings.get("finish", "stop")}],
            "usage": usage(prompt_tokens, len(reply)),
        })

    def _cut(self):
        """Closes the connection abruptly, without finishing the response."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def _images(self):
        self.simulator._count("image_requests")
        body = self._json_body()
        if body is None:
            return
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self._send_error(400, "'prompt' must be a non-empty string.", param="prompt")
        model = body.get("model") if isinstance(body.get("model"), str) else "dall-e-2"
        settings = self._settings(prompt)
        if settings is None:
            return
        try:
            width, height = parse_size(body.get("size"))
        except ValueError:
            return self._send_error(400, f"Invalid size {body.get('size')!r}.", param="size")
        count = body.get("n", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10:
            return self._send_error(400, "'n' must be an integer from 1 to 10.", param="n")
        self._wait(settings["latency"])
        if self._send_fault_status(settings):
            return
        if settings.get("cut_after") is not None:
            return self._cut()
        clean = settings["clean_text"] or prompt
        # `url=1` answers a URL whatever was asked, as some compatible servers do.
        as_url = settings.get("url") or (model.startswith("dall-e") and body.get("response_format") != "b64_json")
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        data = []
        for index in range(count):
            png = render_png(f"{clean}\n{index}" if index else clean, width, height)
            item = {}
            if as_url:
                item["url"] = f"http://{host}/files/{self.simulator._store_image(png)}.png"
            else:
                item["b64_json"] = base64.b64encode(png).decode("ascii")
            if model.startswith("dall-e"):
                item["revised_prompt"] = f"A colourful abstract picture of: {clean}"
            data.append(item)
        self._send_json(200, {"created": int(time.time()), "data": data})


def new_completion_id():
    """Returns a fresh chat completion id."""
    return "chatcmpl-" + secrets.token_hex(12)


def usage(prompt_tokens, completion_tokens):
    """Returns an OpenAI usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatStream:
    """Writes one streaming chat completion as SSE frames, applying the request's knobs and faults."""

    def __init__(self, handler, model, reply, settings, include_usage, prompt_tokens):
        self.handler = handler
        self.model = model
        self.reply = reply
        self.settings = settings
        self.include_usage = include_usage
        self.prompt_tokens = prompt_tokens
        self.newline = "\r\n" if settings.get("crlf") else "\n"
        self.id = new_completion_id()
        self.created = int(time.time())

    def run(self):
        """Writes the whole stream and records how it ended in the simulator's statistics."""
        sim = self.handler.simulator
        sim._stream_started()
        outcome = "disconnects"
        try:
            self._write_stream()
            outcome = "streams_completed"
        except (_ClientGone, BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            pass
        except OSError:
            pass
        finally:
            sim._stream_ended(outcome)

    def _write_stream(self):
        handler = self.handler
        settings = self.settings
        handler._wait(settings["latency"])
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        self._send_chunk({"role": "assistant", "content": ""})
        count = len(self.reply)
        choices_null_at = count // 2 if settings.get("choices_null") else None

        def at(key):
            value = settings.get(key)
            return None if value is None else min(value, count)

        cut_at, error_at, malformed_at = at("cut_after"), at("error_after"), at("malformed_after")
        stall_at = at("stall_after")
        if stall_at is None and settings.get("stall") is not None:
            stall_at = 0
        rate = settings["rate"]
        start = time.monotonic()
        for index in range(count + 1):
            if index == cut_at:
                handler._cut()
                return
            if index == error_at:
                self._send_json({"error": error_body(500)["error"]})
                return
            if index == malformed_at:
                self._write("data: {this is not json" + self.newline + self.newline)
            if index == stall_at:
                began = time.monotonic()
                handler._wait(settings.get("stall", DEFAULT_STALL))
                start += time.monotonic() - began
            if index == choices_null_at:
                self._send_json({"id": self.id, "object": "chat.completion.chunk",
                                 "created": self.created, "model": self.model})
            if index == count:
                break
            if rate:
                handler._wait(start + index / rate - time.monotonic())
            if index and settings.get("ping"):
                self._write(": ping" + self.newline + self.newline)
            self._send_chunk({"content": self.reply.token(index)})
        self._send_chunk({}, settings.get("finish", "stop"))
        if self.include_usage:
            choices = None if settings.get("choices_null") else []
            self._send_json({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                             "model": self.model, "choices": choices,
                             "usage": usage(self.prompt_tokens, count)})
        self._write("data: [DONE]" + self.newline + self.newline)

    def _send_chunk(self, delta, finish_reason=None):
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        self._send_json(chunk)

    def _send_json(self, payload):
        if self.settings.get("multiline"):
            lines = split_json_in_two(payload)
        else:
            lines = [json.dumps(payload, ensure_ascii=False, separators=(",", ":"))]
        self._write("".join(f"data: {line}{self.newline}" for line in lines) + self.newline)

    def _write(self, text):
        data = text.encode("utf-8")
        wfile = self.handler.wfile
        if not self.settings.get("split_utf8") or len(data) == len(text):
            wfile.write(data)
            return
        # Write each multi-byte character in two halves, with a pause so they arrive in separate reads.
        pending = bytearray()
        for char in text:
            encoded = char.encode("utf-8")
            if len(encoded) == 1:
                pending += encoded
                continue
            half = len(encoded) // 2
            wfile.write(bytes(pending) + encoded[:half])
            time.sleep(SPLIT_UTF8_PAUSE)
            pending = bytearray(encoded[half:])
        if pending:
            wfile.write(bytes(pending))


def split_json_in_two(payload):
    """Returns the compact JSON of a non-empty dict as two lines, broken after its first key's colon."""
    items = list(payload.items())
    first_key, first_value = items[0]
    rest = json.dumps(dict(items[1:]), ensure_ascii=False, separators=(",", ":"))
    second = json.dumps(first_value, ensure_ascii=False, separators=(",", ":"))
    second += ("," + rest[1:]) if len(items) > 1 else "}"
    return ["{" + json.dumps(first_key, ensure_ascii=False) + ":", second]


# ---------------------------------------------------------------- the server

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # A burst of replies connecting at once must not lose connection attempts (the default is 5).
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            return
        super().handle_error(request, client_address)


class Simulator:
    """A fake OpenAI server serving from a daemon thread; use start()/stop() or a with block."""

    def __init__(self, host="127.0.0.1", port=0, rate=30.0, tokens=None, content="demo", latency=0.0,
                 api_key=None, *, log_requests=False, defaults=""):
        if content not in CONTENT_KINDS:
            raise ValueError(f"content must be one of {', '.join(CONTENT_KINDS)}")
        # Directive settings applied to every request, e.g. "cut_after=20" or "status=500 fail_times=1".
        self.default_directives = parse_directives(f"[[sim {defaults}]]")[0] if defaults.strip() else {}
        self.host = host
        self._port = port
        self.rate = rate or 0.0
        self.tokens = tokens
        self.content = content
        self.latency = latency or 0.0
        self.api_key = api_key
        self.log_requests = log_requests
        self._lock = threading.Lock()
        self._server = None
        self._thread = None
        self._connections = set()
        self._images = collections.OrderedDict()
        self._reset_state()

    # -- lifecycle

    def start(self):
        """Binds the socket and serves in a named daemon thread; returns self."""
        if self._server is not None:
            return self
        server = _Server((self.host, self._port), SimulatorHandler)
        server.simulator = self
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"simulator-{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops serving, closes the listening socket and ends open connections; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def serve_forever(self):
        """Serves until KeyboardInterrupt, then stops."""
        self.start()
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def port(self):
        return self._port

    @property
    def url(self):
        return f"http://{self.host}:{self._port}/v1"

    # -- statistics

    def stats(self):
        """Returns the request and stream counters, as GET /_sim/stats does."""
        with self._lock:
            result = dict(self._counters)
            result["last_requests"] = list(self._last_requests)
            result["active_streams"] = self._counters["streams_started"] - (
                self._counters["streams_completed"] + self._counters["disconnects"])
        return result

    def reset(self):
        """Clears the statistics and the fail_times counters."""
        with self._lock:
            self._reset_state()

    def _reset_state(self):
        self._counters = {"requests": 0, "chat_requests": 0, "image_requests": 0,
                          "streams_started": 0, "streams_completed": 0, "disconnects": 0}
        self._last_requests = collections.deque(maxlen=LAST_REQUESTS_KEPT)
        self._fault_counts = {}
        # Streams still running when reset happens must not drive active_streams negative.
        self._running = getattr(self, "_running", 0)
        self._counters["streams_started"] = self._running

    def _count(self, name):
        with self._lock:
            self._counters[name] += 1

    def _record_request(self, body):
        with self._lock:
            self._last_requests.append(body)

    def _stream_started(self):
        with self._lock:
            self._running += 1
            self._counters["streams_started"] += 1

    def _stream_ended(self, outcome):
        with self._lock:
            self._running -= 1
            self._counters[outcome] += 1

    def _fault_applies(self, directive_text, fail_times):
        """Counts a request carrying directive_text; True while the count is within fail_times."""
        with self._lock:
            seen = self._fault_counts.get(directive_text, 0) + 1
            self._fault_counts[directive_text] = seen
        return seen <= fail_times

    def _track_connection(self, connection, open_):
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    # -- images

    def _store_image(self, png):
        image_id = secrets.token_hex(12)
        with self._lock:
            self._images[image_id] = png
            while len(self._images) > IMAGES_KEPT:
                self._images.popitem(last=False)
        return image_id

    def _image(self, image_id):
        with self._lock:
            return self._images.get(image_id)


# ---------------------------------------------------------------- command line

@click.command("simulator")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8001, show_default=True, type=int, help="Port to listen on (0 picks a free one).")
@click.option("--rate", default=30.0, show_default=True, type=float, help="Tokens per second (0 = as fast as possible).")
@click.option("--tokens", default=None, type=int, help="Default reply length in tokens for generated content.")
@click.option("--content", default="demo", show_default=True, type=click.Choice(CONTENT_KINDS),
              help="Default kind of reply content.")
@click.option("--latency", default=0.0, show_default=True, type=float, help="Seconds before the first token.")
@click.option("--api-key", default=None, help="Require this bearer token on /v1 requests.")
@click.option("--fault", default="", metavar="DIRECTIVES",
              help='Directives applied to every request, e.g. "cut_after=20" or "stall_after=5 stall=90".')
def cli(host, port, rate, tokens, content, latency, api_key, fault):
    """Run the fake OpenAI server in the foreground until Ctrl-C."""
    try:
        sim = Simulator(host=host, port=port, rate=rate, tokens=tokens, content=content, latency=latency,
                        api_key=api_key, log_requests=True, defaults=fault)
    except DirectiveError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    sim.start()
    click.echo(f"Simulator serving at {sim.url}")
    click.echo("Press Ctrl-C to stop.")
    sys.stdout.flush()
    sim.serve_forever()


def main(argv=None):
    """Runs the command line with argv (default: sys.argv[1:]) and returns its exit code."""
    try:
        cli.main(args=argv, prog_name="simulator.py")
    except SystemExit as exit_:
        return exit_.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
