"""JSON errors for every /api path: never an HTML page, never a stack trace."""
import logging

from flask import jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "not_ready",
}


class ApiError(Exception):
    """An error answered as {"error": {"code", "message"}} with an HTTP status."""

    def __init__(self, status, code, message, retry_after=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def error_response(status, code, message, retry_after=None):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(int(retry_after))
    return response


DRAIN_LIMIT = 4 * 1024 * 1024


def _drain_refused_body(environ, length):
    """Returns a callable that reads and drops the rest of a refused body, after the answer is sent.

    Servers read only a little of a body the app did not consume and then drop the
    kept-alive connection, which breaks the client's next request on it.
    """
    def drain():
        if not length or length > DRAIN_LIMIT:
            return
        stream = environ.get("wsgi.input")
        left = length
        try:
            while left > 0:
                data = stream.read(min(left, 65536))
                if not data:
                    return
                left -= len(data)
        except Exception:
            return
    return drain


def is_api_request():
    return request.path == "/api" or request.path.startswith("/api/")


def register(app):
    """Installs the handlers that turn every failure on /api into the JSON error shape."""

    @app.errorhandler(ApiError)
    def _api_error(error):
        return error_response(error.status, error.code, error.message, error.retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(error):
        if not is_api_request():
            return error
        status = error.code or 500
        if status == 413:
            response = error_response(413, "too_large", "The request body is larger than 1 MiB.")
            response.call_on_close(_drain_refused_body(request.environ, request.content_length))
            return response
        return error_response(status, HTTP_CODES.get(status, "http_error"), error.description or error.name)

    @app.errorhandler(Exception)
    def _unexpected(error):
        log.exception("unexpected error on %s %s", request.method, request.path)
        if is_api_request() or request.path == "/healthz":
            return error_response(500, "internal_error", "The server failed to answer this request.")
        return "Internal Server Error", 500
