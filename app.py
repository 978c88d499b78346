"""The application factory: configuration, database, routes, headers and commands."""
import logging
import os
import secrets
from datetime import timedelta

import click
from dotenv import load_dotenv
from alembic import command as alembic_command
from flask import Flask, current_app, jsonify, render_template
from flask_migrate import Migrate
from sqlalchemy import text

import config
import dialect
import errors
from models import db

log = logging.getLogger(__name__)

MIGRATIONS_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def create_app(test_config=None):
    """Creates the app: defaults, then the environment (and .env), then test_config."""
    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    app = Flask(__name__, instance_path=os.environ.get("INSTANCE_PATH") or None, instance_relative_config=True)
    app.config.from_mapping(config.defaults())
    app.config.from_mapping(config.from_environment())
    if test_config is not None:
        app.config.from_mapping(test_config)
    os.makedirs(app.instance_path, exist_ok=True)
    derive_settings(app)

    db.init_app(app)
    Migrate(app, db, directory=MIGRATIONS_DIRECTORY)
    with app.app_context():
        dialect.tune_engine(db.engine)
        create_schema()

    # "/api//x" is a JSON 404 like any unknown path, not a redirect with an HTML body.
    app.url_map.merge_slashes = False
    errors.register(app)
    from api import bp as api_bp
    app.register_blueprint(api_bp)
    register_pages(app)
    register_commands(app)

    @app.after_request
    def _headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if errors.is_api_request():
            response.headers["Cache-Control"] = "no-store"
        if app.config["EXPOSE_WORKER_ID"]:
            # Lets multi-process tests see which worker answered.
            response.headers["X-Served-By"] = str(os.getpid())
        return response

    return app


def derive_settings(app):
    """Fills in the settings computed from others."""
    settings = app.config
    if not settings.get("SECRET_KEY"):
        settings["SECRET_KEY"] = instance_secret(app.instance_path)
    if not settings.get("SQLALCHEMY_DATABASE_URI"):
        settings["SQLALCHEMY_DATABASE_URI"] = dialect.normalize_url(
            settings["DATABASE_URL"] or "sqlite:///" + os.path.join(app.instance_path, "chat.db"))
    settings.setdefault("SQLALCHEMY_ENGINE_OPTIONS", dialect.engine_options(
        settings["SQLALCHEMY_DATABASE_URI"], settings["DB_POOL_SIZE"], settings["DB_POOL_OVERFLOW"]))
    settings["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_BYTES"]
    settings["SESSION_COOKIE_HTTPONLY"] = True
    settings["SESSION_COOKIE_SAMESITE"] = "Lax"
    settings["SESSION_COOKIE_SECURE"] = os.environ.get("SESSION_COOKIE_SECURE", "") in ("1", "true", "yes")
    settings["SESSION_REFRESH_EACH_REQUEST"] = False
    settings["PERMANENT_SESSION_LIFETIME"] = timedelta(days=365)

    from auth import token_owner
    tokens = [token.strip() for token in settings["ACCESS_TOKENS"].split(",") if token.strip()]
    settings["ACCESS_TOKEN_LIST"] = tokens
    settings["ACCESS_TOKEN_OWNERS"] = frozenset(token_owner(token) for token in tokens)

    demo = not settings["OPENAI_API_KEY"] and not settings["OPENAI_BASE_URL"]
    if demo:
        settings["UPSTREAM_KIND"] = "demo"
        settings["CHAT_MODEL"] = "sim-chat"
        settings["IMAGE_MODEL"] = "sim-image"
        settings["CHAT_MODEL_LIST"] = ["sim-chat", "sim-chat-large"]
        settings.setdefault("UPSTREAM_BASE_URL", "")
    else:
        base = settings["OPENAI_BASE_URL"] or config.DEFAULT_OPENAI_BASE_URL
        settings["UPSTREAM_KIND"] = "openai" if base.rstrip("/") == config.DEFAULT_OPENAI_BASE_URL else "custom"
        settings["UPSTREAM_BASE_URL"] = base
        listed = [name.strip() for name in settings["CHAT_MODELS"].split(",") if name.strip()]
        if settings["CHAT_MODEL"] not in listed:
            listed.insert(0, settings["CHAT_MODEL"])
        settings["CHAT_MODEL_LIST"] = listed
    if settings["GENERATION_MODE"] not in ("thread", "worker"):
        raise SystemExit("GENERATION_MODE must be 'thread' or 'worker'")


def instance_secret(instance_path):
    """Returns the instance's session secret, creating it once (atomically) when missing."""
    path = os.path.join(instance_path, "secret_key")
    if not os.path.exists(path):
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
            handle.write(secrets.token_hex(32))
        try:
            os.link(temporary, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    with open(path) as handle:
        return handle.read().strip()


def create_schema():
    """Creates or upgrades the schema to the newest migration; processes starting together take turns."""
    settings = current_app.extensions["migrate"].migrate.get_config()
    settings.attributes["quiet"] = True
    # migrations/env.py holds dialect.migration_lock for the whole upgrade.
    alembic_command.upgrade(settings, "head")


def register_pages(app):
    @app.get("/")
    def index():
        return render_template("index.html")

    @app.get("/c/<conversation_id>")
    def conversation_page(conversation_id):
        return render_template("index.html")

    @app.get("/healthz")
    def healthz():
        try:
            with db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            log.warning("health check: the database does not answer")
            response = jsonify({"ok": False, "error": {"code": "not_ready", "message": "The database does not answer."}})
            response.status_code = 503
            return response
        return jsonify({"ok": True})


def register_commands(app):
    import simulator
    app.cli.add_command(simulator.cli)

    @app.cli.command("worker")
    @click.option("--concurrency", default=32, show_default=True, help="Replies run at once.")
    @click.option("--interval", default=0.2, show_default=True, help="Seconds between looks for pending replies.")
    @click.option("--drain-seconds", default=20.0, show_default=True, envvar="REPLY_DRAIN_SECONDS",
                  help="On SIGTERM or SIGINT, how long running replies may finish before the rest fail (worker_lost).")
    def worker_command(concurrency, interval, drain_seconds):
        """Runs pending replies from the database (for GENERATION_MODE=worker)."""
        import signal
        import threading

        from runtime import get_runtime, hold_queued_replies
        runtime = get_runtime(app, generates=True)
        stopping = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stopping.set())
        click.echo(f"worker {runtime.worker_id} running replies (concurrency {concurrency})")
        while not stopping.is_set():
            try:
                free = concurrency - len(runtime.running_ids())
                if free > 0:
                    runtime.claim_pending(free)
                hold_queued_replies(runtime)
            except Exception:
                log.exception("worker pass failed")  # a locked or restarting database: try again
            stopping.wait(interval)
        lost = runtime.drain(drain_seconds)
        click.echo(f"worker {runtime.worker_id} stopped; {len(lost)} running replies failed (worker_lost)")
