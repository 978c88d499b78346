"""Owners: who is calling, from the signed session cookie or a Bearer access token."""
import hashlib
import hmac
import secrets
import threading
import time

from flask import current_app, request, session
from flask.sessions import SecureCookieSessionInterface

SESSION_KEY = "owner"


class CachedSessionInterface(SecureCookieSessionInterface):
    """The signed-cookie session, with each distinct cookie's signature checked once a minute at most.

    Polls arrive many times a second with the same cookie; re-verifying and decoding it every
    time is wasted work. A changed or expired cookie is verified again as usual.
    """

    max_entries = 10000
    recheck_seconds = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._verified = {}  # cookie value -> (monotonic deadline, session contents)

    def open_session(self, app, request):
        value = request.cookies.get(self.get_cookie_name(app))
        if value:
            cached = self.cached_entry(value)
            if cached is not None:
                return self.session_class(cached[1])
        opened = super().open_session(app, request)
        if value and opened:
            with self._lock:
                if len(self._verified) >= self.max_entries:
                    self._verified.clear()
                self._verified[value] = (time.monotonic() + self.recheck_seconds, dict(opened))
        return opened

    def cached_entry(self, value):
        """Returns (monotonic deadline, contents) of a session cookie verified within the last minute, else None."""
        cached = self._verified.get(value)
        if cached is not None and cached[0] > time.monotonic():
            return cached
        return None


def install_session_cache(app):
    """Makes app check each session cookie's signature once a minute at most."""
    if type(app.session_interface) is SecureCookieSessionInterface:
        app.session_interface = CachedSessionInterface()


def token_owner(token):
    """Returns the owner id that an access token stands for."""
    return "t_" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:40]


def configured_tokens():
    """Returns the operator's access tokens (empty when the app is open)."""
    return current_app.config["ACCESS_TOKEN_LIST"]


def auth_required():
    return bool(configured_tokens())


def check_token(token):
    """Returns the owner for a valid token, else None; compares in constant time."""
    return owner_for_token(token, configured_tokens())


def owner_for_token(token, tokens):
    """Returns the owner for token if it is one of tokens, else None; compares in constant time."""
    if not token:
        return None
    candidate = token.encode("utf-8", "surrogateescape")
    matched = None
    # Every configured token is compared, so timing tells nothing about which one matched.
    for configured in tokens:
        if hmac.compare_digest(candidate, configured.encode("utf-8")):
            matched = configured
    return token_owner(matched) if matched is not None else None


def bearer_token():
    return bearer_from(request.headers.get("Authorization", ""))


def bearer_from(header):
    """Returns the token of an Authorization header value of the Bearer scheme, else None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def session_owner(owner, settings):
    """Returns the owner a session names when it may act: any owner in an open app, a token's owner otherwise."""
    if not isinstance(owner, str) or not owner:
        return None
    if settings["ACCESS_TOKEN_LIST"] and owner not in settings["ACCESS_TOKEN_OWNERS"]:
        return None
    return owner


def current_owner(create=True):
    """Returns the caller's owner id, or None when the caller must sign in first."""
    if auth_required():
        token = bearer_token()
        if token is not None:
            return check_token(token)
    owner = session_owner(session.get(SESSION_KEY), current_app.config)
    if owner is not None or auth_required() or not create:
        return owner
    owner = "s_" + secrets.token_urlsafe(24)
    session[SESSION_KEY] = owner
    session.permanent = True
    return owner


def sign_in(token):
    """Signs the browser session in with an access token; returns whether it was valid."""
    owner = check_token(token)
    if owner is None:
        return False
    session.clear()
    session[SESSION_KEY] = owner
    session.permanent = True
    return True


def sign_out():
    session.clear()
