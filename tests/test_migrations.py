"""Schema migrations, on SQLite and (with TEST_DATABASE_URL) PostgreSQL: upgrades keep every row.

The first revision is the schema db.create_all() used to build. Later revisions each get
a test here that upgrades a database holding data from the revision before.
"""
import subprocess
import sys
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Flask
from flask_migrate import Migrate
from sqlalchemy import create_engine, inspect, select

from app import MIGRATIONS_DIRECTORY
from auth import token_owner
from models import Chunk, Conversation, Image, Message, db
from tests.servers import ROOT, app_environment

HEAD = ScriptDirectory(MIGRATIONS_DIRECTORY).get_current_head()
FIRST_REVISION = "0001"
TOKEN = "migration-test-token"
OWNER = token_owner(TOKEN)
PNG_BYTES = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
TABLES = (Conversation.__table__, Message.__table__, Chunk.__table__, Image.__table__)


def alembic_settings(app):
    settings = app.extensions["migrate"].migrate.get_config()
    settings.attributes["quiet"] = True
    return settings


def migrate_with_alembic_alone(database_url, action, revision):
    """Upgrades or downgrades the database to revision without the app's own start-up upgrade."""
    bare = Flask("schema-at-a-revision")
    bare.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db.init_app(bare)
    Migrate(bare, db, directory=MIGRATIONS_DIRECTORY)
    with bare.app_context():
        try:
            getattr(command, action)(alembic_settings(bare), revision)
        finally:
            db.engine.dispose()


def flask_db_upgrade(database_url, tmp_path):
    """Runs `flask --app app db upgrade` on the database, as an operator would."""
    env = app_environment({"DATABASE_URL": database_url}, str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def versions(engine):
    with engine.connect() as conn:
        if "alembic_version" not in inspect(conn).get_table_names():
            return []
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()


def schema_differences(engine):
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), db.metadata)


def add_sample_data(engine):
    """Stores one conversation with a finished reply, a reply still streaming, and an image."""
    with engine.begin() as conn:
        conn.execute(Conversation.__table__.insert().values(
            id="conv-1", owner=OWNER, title="Before the upgrade", model="sim-chat", system_prompt="Be brief.",
            created_at=1700000000.25, updated_at=1700000100.5))
        common = {"conversation_id": "conv-1", "owner": OWNER, "model": "sim-chat", "has_image": 0}
        rows = [
            {**common, "id": "user-1", "position": 1, "role": "user", "mode": "chat", "content": "Hello?",
             "length": 6, "status": "done", "created_at": 1700000001.0, "finished_at": 1700000001.0},
            {**common, "id": "reply-1", "position": 2, "role": "assistant", "mode": "chat",
             "content": "Hello there, ünïcødé ✓ 🙂", "length": 24, "status": "done", "finish_reason": "stop",
             "prompt_tokens": 12, "completion_tokens": 7, "created_at": 1700000002.0, "finished_at": 1700000003.0},
            {**common, "id": "user-2", "position": 3, "role": "user", "mode": "image", "content": "A kite",
             "length": 6, "status": "done", "created_at": 1700000004.0, "finished_at": 1700000004.0},
            {**common, "id": "reply-2", "position": 4, "role": "assistant", "mode": "image", "content": "",
             "length": 0, "status": "done", "has_image": 1, "model": "sim-image", "created_at": 1700000005.0,
             "finished_at": 1700000006.0},
            {**common, "id": "user-3", "position": 5, "role": "user", "mode": "chat", "content": "More",
             "length": 4, "status": "done", "created_at": 1700000007.0, "finished_at": 1700000007.0},
            # Still streaming on a host that is alive: its lease reaches far into the future.
            {**common, "id": "reply-3", "position": 6, "role": "assistant", "mode": "chat", "content": "",
             "length": 8, "status": "streaming", "worker_id": "host:1:abcdef", "created_at": 1700000008.0,
             "lease_expires_at": 4000000000.0},
        ]
        for row in rows:
            conn.execute(Message.__table__.insert().values(**row))
        conn.execute(Chunk.__table__.insert(), [
            {"message_id": "reply-3", "end_offset": 5, "text": "Half "},
            {"message_id": "reply-3", "end_offset": 8, "text": "way"},
        ])
        conn.execute(Image.__table__.insert().values(message_id="reply-2", mime="image/png", data=PNG_BYTES))


def dump(engine):
    """Returns every row of every table, in a stable order."""
    rows = {}
    with engine.connect() as conn:
        for table in TABLES:
            found = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            rows[table.name] = [tuple(bytes(value) if isinstance(value, memoryview) else value for value in row)
                                for row in found]
    return rows


def assert_the_app_serves_the_sample_data(client):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = client.get("/api/conversations", headers=auth).json["conversations"]
    assert [conversation["title"] for conversation in listed] == ["Before the upgrade"]
    messages = client.get("/api/conversations/conv-1", headers=auth).json["messages"]
    assert [message["content"] for message in messages] == [
        "Hello?", "Hello there, ünïcødé ✓ 🙂", "A kite", "", "More", "Half way"]
    answer = client.get("/api/messages/reply-3/poll?cursor=5&timeout=0", headers=auth).json
    assert answer["text"] == "way" and answer["status"] == "streaming"
    assert client.get("/api/messages/reply-2/image", headers=auth).data == PNG_BYTES


@pytest.fixture
def engine(database_url):
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def token_config(app_config):
    app_config["ACCESS_TOKENS"] = TOKEN
    return app_config


def test_flask_db_upgrade_builds_the_schema_of_the_models_in_an_empty_database(database_url, engine, tmp_path):
    flask_db_upgrade(database_url, tmp_path)
    assert versions(engine) == [HEAD]
    assert schema_differences(engine) == []


def test_a_database_at_the_first_revision_keeps_all_its_data_through_flask_db_upgrade(
        database_url, engine, tmp_path, token_config, request):
    migrate_with_alembic_alone(database_url, "upgrade", FIRST_REVISION)
    assert versions(engine) == [FIRST_REVISION]
    add_sample_data(engine)
    before = dump(engine)
    flask_db_upgrade(database_url, tmp_path)
    assert versions(engine) == [HEAD]
    assert dump(engine) == before
    assert schema_differences(engine) == []
    assert_the_app_serves_the_sample_data(request.getfixturevalue("client"))


def test_the_app_adopts_a_database_made_before_migrations_and_keeps_its_data(engine, token_config, request):
    db.metadata.create_all(engine)
    add_sample_data(engine)
    before = dump(engine)
    assert versions(engine) == []
    client = request.getfixturevalue("client")
    assert versions(engine) == [HEAD]
    assert dump(engine) == before
    assert schema_differences(engine) == []
    assert_the_app_serves_the_sample_data(client)


def test_downgrading_to_nothing_and_upgrading_again_rebuilds_the_schema(database_url, engine):
    migrate_with_alembic_alone(database_url, "upgrade", "head")
    migrate_with_alembic_alone(database_url, "downgrade", "base")
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == ["alembic_version"]
    migrate_with_alembic_alone(database_url, "upgrade", "head")
    assert versions(engine) == [HEAD]
    assert schema_differences(engine) == []


def test_processes_starting_together_on_an_empty_database_migrate_it_once(database_url, engine, tmp_path):
    env = app_environment({"DATABASE_URL": database_url}, str(tmp_path))
    # Each process imports the app first, then all create it at the same moment.
    start_at = time.time() + 3
    program = f"import time; from app import create_app; time.sleep(max(0, {start_at} - time.time())); create_app()"
    starts = [subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    try:
        outputs = [start.communicate(timeout=120)[0] for start in starts]
    finally:
        for start in starts:
            if start.poll() is None:
                start.kill()
                start.wait()
    assert [start.returncode for start in starts] == [0, 0, 0, 0], outputs
    assert versions(engine) == [HEAD]
    assert schema_differences(engine) == []
