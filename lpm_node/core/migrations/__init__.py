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
        if current_revision(connection) == head:
            return
        sqlite = engine.dialect.name == "sqlite"
        if sqlite:
            connection.rollback()
            # batch migrations copy tables; the foreign keys are checked once they are all back
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        try:
            _upgrade(connection, script, head, metadata)
            if sqlite:
                problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if problems:
                    raise RuntimeError(f"the upgraded audit database breaks foreign keys: {problems[:5]}")
        finally:
            if sqlite:
                connection.rollback()
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def _upgrade(connection: Connection, script: ScriptDirectory, head: str | None, metadata: MetaData) -> None:
    current = current_revision(connection)
    if current == head:  # another process upgraded it meanwhile
        return
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise SchemaTooNew(
            f"the audit database {connection.engine.url!r} has schema revision {current}, newer than this "
            f"lpm-node (newest known: {head}); run the lpm-node version that wrote it, or restore a backup"
        )
    config = alembic_config(connection)
    if current is None and not set(inspect(connection).get_table_names()) & set(metadata.tables):
        metadata.create_all(connection)
        command.stamp(config, "head")
    else:
        if current is None:  # made by create_all before migrations existed
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
    connection.commit()
