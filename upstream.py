"""The OpenAI HTTP API: streaming chat completions, SSE parsing and image generation.

Nothing here knows about Flask or the database.
"""
import base64
import codecs
import json
import logging
import os
import socket
import threading
import time

import requests

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """A failure of the upstream, with a PROTOCOL error code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class Stopped(Exception):
    """The reply was stopped while the upstream was being contacted."""


class SSEParser:
    """Turns bytes of a text/event-stream into the data strings of its events."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._data = []
        self._skip_lf = False
        self._started = False

    def feed(self, chunk):
        """Returns the data of every event completed by chunk."""
        text = self._decoder.decode(chunk)
        return self._lines(text)

    def close(self):
        """Returns the data of an event left unterminated at the end of the stream."""
        events = self._lines(self._decoder.decode(b"", final=True))
        if self._pending:
            self._line(self._pending, events)
            self._pending = ""
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _lines(self, text):
        events = []
        if not text:
            return events
        if self._started is False:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]
        self._skip_lf = False
        buffer = self._pending + text
        start = 0
        length = len(buffer)
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr == -1 and lf == -1:
                break
            if cr == -1 or (lf != -1 and lf < cr):
                self._line(buffer[start:lf], events)
                start = lf + 1
                continue
            self._line(buffer[start:cr], events)
            if cr + 1 < length:
                start = cr + 2 if buffer[cr + 1] == "\n" else cr + 1
            else:
                # A CR at the end of the chunk may be the first half of a CRLF.
                self._skip_lf = True
                start = cr + 1
        self._pending = buffer[start:]
        return events

    def _line(self, line, events):
        if line == "":
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)


def raw_socket(response):
    """Returns the socket under a streaming requests response, if it can be found."""
    raw = getattr(response, "raw", None)
    connection = getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        return sock
    try:
        return raw._fp.fp.raw._sock
    except AttributeError:
        return None


class ChatStream:
    """One streaming chat completion: iterate text pieces, then read finish_reason and usage."""

    def __init__(self, response, idle_timeout):
        self._response = response
        self._idle_timeout = idle_timeout
        self._aborted = threading.Event()
        self._sock = raw_socket(response)
        self.finish_reason = None
        self.usage = None
        self.malformed_events = 0

    def abort(self):
        """Closes the upstream connection now, from any thread, so the upstream stops generating."""
        self._aborted.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def is_aborted(self):
        return self._aborted.is_set()

    def close(self):
        self._response.close()

    def iter_text(self):
        """Yields the text pieces of the reply as they arrive; raises UpstreamError on faults."""
        parser = SSEParser()
        finished = False
        try:
            for chunk in self._iter_bytes():
                for data in parser.feed(chunk):
                    piece, finished = self._handle(data)
                    if piece:
                        yield piece
                    if finished:
                        return
            for data in parser.close():
                piece, finished = self._handle(data)
                if piece:
                    yield piece
                if finished:
                    return
        finally:
            self.close()
        if self._aborted.is_set():
            return
        if self.finish_reason is None:
            raise UpstreamError("upstream_error", "The upstream stream ended before the reply was complete.")

    def _iter_bytes(self):
        raw = self._response.raw
        while not self._aborted.is_set():
            try:
                data = raw.read1(65536)
            except Exception as exc:  # urllib3 wraps socket errors in several ways
                if self._aborted.is_set():
                    return
                raise _read_error(exc, self._idle_timeout) from None
            if not data:
                return
            yield data

    def _handle(self, data):
        """Returns (text piece, whether the stream is complete) for one event's data."""
        if data.strip() == "[DONE]":
            return "", True
        try:
            event = json.loads(data)
        except ValueError:
            # Some servers emit stray lines; skipping one keeps the text that follows.
            self.malformed_events += 1
            log.warning("skipping a malformed event from the upstream")
            return "", False
        if not isinstance(event, dict):
            self.malformed_events += 1
            return "", False
        if event.get("error"):
            raise UpstreamError("upstream_error", _error_text(event["error"]))
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        piece = ""
        for choice in event.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                piece += content
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return piece, False


def _read_error(exc, idle_timeout):
    text = f"{type(exc).__name__}: {exc}"
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return UpstreamError("upstream_timeout", f"The upstream sent nothing for {idle_timeout:g} seconds.")
    return UpstreamError("upstream_error", "The upstream connection broke before the reply was complete.")


def _error_text(error):
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or "The upstream reported an error.")
    return str(error)


def _http_error(response):
    """Maps a non-2xx upstream answer to an UpstreamError."""
    status = response.status_code
    try:
        detail = _error_text(response.json().get("error"))
    except Exception:
        detail = (response.text or "").strip()[:200] or response.reason or ""
    if status in (401, 403):
        return UpstreamError("upstream_auth", f"The upstream refused the API key ({status}): {detail}")
    if status == 429:
        return UpstreamError("upstream_rate_limited", f"The upstream is rate limiting requests (429): {detail}")
    return UpstreamError("upstream_error", f"The upstream answered {status}: {detail}")


def retry_delay(response, attempt, max_wait):
    """Returns how long to wait before the next attempt, honouring Retry-After."""
    if response is not None:
        header = response.headers.get("Retry-After")
        if header:
            try:
                return min(max(float(header), 0.0), max_wait)
            except ValueError:
                pass
    return min(0.5 * (2 ** attempt), max_wait)


class Upstream:
    """An OpenAI-compatible server at base_url."""

    def __init__(self, base_url, api_key="", connect_timeout=10.0, idle_timeout=60.0,
                 retries=2, retry_max_wait=20.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.retries = retries
        self.retry_max_wait = retry_max_wait
        # requests looks up proxies, their exceptions and the CA bundle in the environment on every
        # call, which was a third of starting a reply here; the upstream's are read once instead.
        self._proxies = requests.utils.get_environ_proxies(self.base_url)
        self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    def _headers(self):
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _post(self, path, body, stream, is_stopped):
        """POSTs with retries on 429, 5xx and connect errors; returns a 2xx response."""
        attempt = 0
        while True:
            if is_stopped():
                raise Stopped()
            response = None
            try:
                with requests.Session() as session:
                    session.trust_env = False
                    response = session.post(
                        self.base_url + path, json=body, headers=self._headers(), stream=stream,
                        timeout=(self.connect_timeout, self.idle_timeout), proxies=self._proxies, verify=self._verify)
            except requests.exceptions.ConnectTimeout:
                error = UpstreamError("upstream_timeout", "The upstream did not accept the connection in time.")
            except requests.exceptions.ReadTimeout:
                raise UpstreamError("upstream_timeout",
                                    f"The upstream sent nothing for {self.idle_timeout:g} seconds.") from None
            except requests.exceptions.RequestException as exc:
                error = UpstreamError("upstream_error", f"Could not reach the upstream: {_describe(exc)}")
            else:
                if response.status_code < 300:
                    return response
                error = _http_error(response)
                retryable = response.status_code == 429 or response.status_code >= 500
                response.close()
                if not retryable:
                    raise error
            if attempt >= self.retries:
                raise error
            _sleep_unless_stopped(retry_delay(response, attempt, self.retry_max_wait), is_stopped)
            attempt += 1

    def stream_chat(self, model, messages, is_stopped=lambda: False):
        """Starts a streaming chat completion and returns its ChatStream."""
        body = {"model": model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}}
        response = self._post("/chat/completions", body, True, is_stopped)
        content_type = response.headers.get("Content-Type", "")
        if "text/event-stream" not in content_type and "application/x-ndjson" not in content_type:
            response.close()
            kind = content_type.split(";")[0] or "no content type"
            raise UpstreamError("upstream_error", f"The upstream answered {kind} instead of an event stream.")
        return ChatStream(response, self.idle_timeout)

    def generate_image(self, model, prompt, max_bytes, is_stopped=lambda: False):
        """Generates one image and returns (bytes, mime type); a url answer is downloaded at once."""
        body = {"model": model, "prompt": prompt, "n": 1}
        if model.startswith("dall-e"):
            body["response_format"] = "b64_json"
        response = self._post("/images/generations", body, False, is_stopped)
        try:
            item = (response.json().get("data") or [None])[0]
        except (ValueError, AttributeError):
            item = None
        if not isinstance(item, dict):
            raise UpstreamError("upstream_error", "The upstream's image answer held no image.")
        if item.get("b64_json"):
            try:
                data = base64.b64decode(item["b64_json"], validate=False)
            except ValueError:
                raise UpstreamError("upstream_error", "The upstream's image was not valid base64.") from None
        elif item.get("url"):
            data = self._download(item["url"], max_bytes)
        else:
            raise UpstreamError("upstream_error", "The upstream's image answer held no image.")
        if len(data) > max_bytes:
            raise UpstreamError("upstream_error", "The generated image is too large to keep.")
        return data, sniff_image_type(data)

    def _download(self, url, max_bytes):
        # Image URLs expire after about an hour, so the bytes are fetched right away.
        try:
            with requests.get(url, stream=True, timeout=(self.connect_timeout, self.idle_timeout)) as response:
                if response.status_code >= 300:
                    raise UpstreamError("upstream_error", f"Downloading the image failed ({response.status_code}).")
                data = b""
                for piece in response.iter_content(65536):
                    data += piece
                    if len(data) > max_bytes:
                        raise UpstreamError("upstream_error", "The generated image is too large to keep.")
                return data
        except requests.exceptions.RequestException as exc:
            raise UpstreamError("upstream_error", f"Downloading the image failed: {_describe(exc)}") from None


def sniff_image_type(data):
    """Returns the MIME type of PNG, JPEG, GIF or WebP bytes (PNG when unknown)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def _describe(exc):
    text = str(exc)
    if "Name or service not known" in text or "nodename nor servname" in text or "NameResolution" in text:
        return "the host name could not be resolved"
    if "Connection refused" in text:
        return "the connection was refused"
    if "SSL" in text or "certificate" in text.lower():
        return "the TLS handshake failed"
    return type(exc).__name__


def _sleep_unless_stopped(seconds, is_stopped):
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if is_stopped():
            raise Stopped()
        time.sleep(min(left, 0.1))
