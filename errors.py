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
            message = "The request body is larger than 1 MiB."
        else:
            message = error.description or error.name
        return error_response(status, HTTP_CODES.get(status, "http_error"), message)

    @app.errorhandler(Exception)
    def _unexpected(error):
        log.exception("unexpected error on %s %s", request.method, request.path)
        if is_api_request() or request.path == "/healthz":
            return error_response(500, "internal_error", "The server failed to answer this request.")
        return "Internal Server Error", 500
