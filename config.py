"""Settings: defaults, overridden by the environment (and an optional .env file)."""
import os

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"

# name -> (type, default). Every setting is documented in the README.
SETTINGS = {
    "OPENAI_API_KEY": (str, ""),
    "OPENAI_BASE_URL": (str, ""),
    "CHAT_MODEL": (str, "gpt-4o-mini"),
    "CHAT_MODELS": (str, ""),
    "IMAGE_MODEL": (str, "gpt-image-1"),
    "DATABASE_URL": (str, ""),
    "SECRET_KEY": (str, ""),
    "ACCESS_TOKENS": (str, ""),
    "POLL_TIMEOUT": (float, 25.0),
    "POLL_TIMEOUT_MAX": (float, 60.0),
    "POLL_GATHER_SECONDS": (float, 0.0),
    "POLL_GATHER_BUSY_WAITERS": (int, 16),
    "CROSS_PROCESS_CHECK_SECONDS": (float, 0.02),
    "POLL_RECHECK_SECONDS": (float, 0.1),
    "FLUSH_INTERVAL_SECONDS": (float, 0.03),
    "UPSTREAM_CONNECT_TIMEOUT": (float, 10.0),
    "UPSTREAM_IDLE_TIMEOUT": (float, 60.0),
    "UPSTREAM_RETRIES": (int, 2),
    "UPSTREAM_RETRY_MAX_WAIT": (float, 20.0),
    "LEASE_SECONDS": (float, 10.0),
    "MAX_CONTENT_CHARS": (int, 32000),
    "MAX_BODY_BYTES": (int, 1024 * 1024),
    "MAX_IMAGE_BYTES": (int, 20 * 1024 * 1024),
    "CONTEXT_BUDGET_CHARS": (int, 24000),
    "MAX_RUNNING_PER_OWNER": (int, 3),
    "MESSAGES_PER_MINUTE": (int, 20),
    "DB_POOL_SIZE": (int, 10),
    "DB_POOL_OVERFLOW": (int, 100),
    "GENERATION_MODE": (str, "thread"),
    "DEMO_RATE": (float, 30.0),
    "EXPOSE_WORKER_ID": (int, 0),
}


def _convert(kind, raw):
    if kind is str:
        return raw.strip()
    return kind(raw.strip())


def from_environment(environ=None):
    """Returns the settings found in the environment, converted to their types."""
    environ = os.environ if environ is None else environ
    found = {}
    for name, (kind, _default) in SETTINGS.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            found[name] = _convert(kind, raw)
        except ValueError:
            raise SystemExit(f"setting {name} must be a {kind.__name__}, got {raw!r}")
    return found


def defaults():
    """Returns every setting at its default value."""
    return {name: default for name, (_kind, default) in SETTINGS.items()}
