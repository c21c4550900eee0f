"""Schema migrations of the audit database (Alembic), run from code: no alembic.ini is needed.

``upgrade_database`` is called whenever the node or a command opens the database:
- a new, empty database gets the current tables and is stamped with the newest revision;
- a database made before migrations existed (tables, no ``alembic_version``) is stamped with the baseline
  revision and upgraded;
- an older revision is upgraded to the newest;
- a revision this code does not know (a newer lpm-node wrote it) is refused with ``SchemaTooNew``.

A schema change is a change to lpm_node.core.audit plus a revision in ``versions/``:
``python scripts/new_migration.py "what changed"`` writes one (tests/test_migrations.py fails until it exists).
"""

from __future__ import annotations

import logging
from pathlib import Path

# alembic logs one INFO line per built-in plugin when it is imported: noise in every command's output
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from alembic.script import ScriptDirectory  # noqa: E402
from sqlalchemy import MetaData, inspect  # noqa: E402
from sqlalchemy.engine import Connection, Engine  # noqa: E402

FOLDER = Path(__file__).resolve().parent
BASELINE = "0001"  # the schema of lpm-node 0.1.0, created by Base.metadata.create_all before migrations


class SchemaTooNew(RuntimeError):
    """The database was written by a newer lpm-node (a revision this code does not have)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the packaged revisions, bound to ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(FOLDER))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision stamped in the database (None: not versioned)."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_database(engine: Engine, metadata: MetaData) -> None:
    """Bring the database at ``engine`` to the newest revision (see the module docstring)."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            # batch migrations copy tables; foreign keys are checked again when they are back
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        current = current_revision(connection)
        if current == head:
            return
        if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
            raise SchemaTooNew(
                f"the audit database {engine.url!r} has schema revision {current}, newer than this lpm-node "
                f"(newest known: {head}); run the lpm-node version that wrote it, or restore a backup"
            )
        tables = set(inspect(connection).get_table_names())
        config = alembic_config(connection)
        if current is None and not tables & set(metadata.tables):
            metadata.create_all(connection)
            command.stamp(config, "head")
        else:
            if current is None:
                command.stamp(config, BASELINE)
            command.upgrade(config, "head")
        connection.commit()
        if engine.dialect.name == "sqlite":
            problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"the upgraded audit database breaks foreign keys: {problems[:5]}")
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
