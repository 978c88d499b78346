"""Alembic environment: migrates the app's database, one process at a time.

Both `flask --app app db upgrade` and the app's own start (app.create_schema) come here.
The whole run happens under dialect.migration_lock, so hosts and workers that start
together take turns, and the later ones find the schema already current.
"""
import logging
from logging.config import fileConfig

from alembic import context
from flask import current_app
from sqlalchemy import inspect

import dialect

config = context.config
log = logging.getLogger("alembic.env")

# The revision that db.create_all() used to build, before the schema had migrations.
BASELINE_REVISION = "0001"

if config.config_file_name and not config.attributes.get("quiet"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def target_metadata():
    return current_app.extensions["migrate"].db.metadata


def engine():
    return current_app.extensions["migrate"].db.engine


def skip_empty_autogenerate(migration_context, revision, directives):
    """Keeps `flask db migrate` from writing a revision when the models did not change."""
    if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        log.info("No changes in schema detected.")


def adopt_unversioned_schema(connection):
    """Marks a database built by db.create_all() (tables, no alembic_version) as the baseline."""
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" not in tables and "messages" in tables:
        log.info("Adopting an existing schema without migration history as revision %s", BASELINE_REVISION)
        context.get_context().stamp(context.script, BASELINE_REVISION)


def run_migrations_offline():
    """Prints the SQL of the migrations instead of running them (`flask db upgrade --sql`)."""
    context.configure(url=engine().url.render_as_string(hide_password=False), target_metadata=target_metadata(),
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    """Runs the migrations on the app's database while holding the migration lock."""
    options = dict(current_app.extensions["migrate"].configure_args)
    options.setdefault("process_revision_directives", skip_empty_autogenerate)
    with dialect.migration_lock(engine()) as connection:
        context.configure(connection=connection, target_metadata=target_metadata(), **options)
        adopt_unversioned_schema(connection)
        # Alembic commits only the transactions it begins itself.
        if connection.in_transaction():
            connection.commit()
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
