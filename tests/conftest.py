"""Shared fixtures: a real simulator upstream, and the app with a fresh database per test."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from app import create_app  # noqa: E402
from simulator import Simulator  # noqa: E402
from tests import pg  # noqa: E402


@pytest.fixture(scope="session")
def simulator():
    """A real OpenAI-compatible server on 127.0.0.1, fast by default."""
    with Simulator(rate=0, content="lorem") as sim:
        yield sim


@pytest.fixture
def database_url(tmp_path):
    """A fresh database: a SQLite file, or a new PostgreSQL database when TEST_DATABASE_URL is set."""
    if not pg.enabled():
        yield f"sqlite:///{tmp_path / 'app.db'}"
        return
    with pg.fresh_database() as url:
        yield url


@pytest.fixture
def app_config(tmp_path, simulator, database_url):
    """The test config; tests may change it before the app fixture is used."""
    return {
        "TESTING": True,
        "OPENAI_BASE_URL": simulator.url,
        "OPENAI_API_KEY": "sk-test-secret-key-0000",
        "CHAT_MODEL": "sim-chat",
        "CHAT_MODELS": "sim-chat,sim-chat-large",
        "IMAGE_MODEL": "sim-image",
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SECRET_KEY": "test-secret",
        "UPSTREAM_RETRY_MAX_WAIT": 0.2,
        "UPSTREAM_IDLE_TIMEOUT": 5.0,
        "LEASE_SECONDS": 10.0,
        "POLL_TIMEOUT": 5.0,
    }


@pytest.fixture
def app(app_config, tmp_path):
    """The app with a fresh temporary database."""
    os.environ["INSTANCE_PATH"] = str(tmp_path / "instance")
    application = create_app(app_config)
    yield application
    os.environ.pop("INSTANCE_PATH", None)
    state = application.extensions.get("relay_runtime")
    if state is not None:
        state[1].shutdown()
    with application.app_context():
        from models import db
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()
