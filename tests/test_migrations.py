"""Audit schema migrations: an older database is upgraded with its rows, a newer one refused, and the
models never drift from the revisions (a schema change needs `python scripts/new_migration.py "..."`)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError

from lpm_node.core.audit import Base, Delivery, DeliveryAttempt, Job, Series, session_factory
from lpm_node.core.migrations import BASELINE, SchemaTooNew, alembic_config, head_revision
from tests.support_net import free_port, run_cli

T0 = "2026-01-02 03:04:05.000000"


def _migrate(url: str, target: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), target)
    engine.dispose()


def _baseline_database(path: Path) -> str:
    """A database with the baseline schema and rows of every kind, as lpm-node 0.1.0 left it."""
    url = f"sqlite:///{path}"
    _migrate(url, BASELINE)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO associations (id, calling_ae, called_ae, peer_address, peer_port, started_at, "
                   "outcome, reason, instances_received, instances_refused) "
                   "VALUES (1, 'CT1', 'LPM_NODE', '10.0.0.9', 4000, ?, 'released', '', 2, 0)", (T0,))
        db.execute("INSERT INTO series (id, series_instance_uid, study_instance_uid, modality, series_description, "
                   "calling_ae, calling_address, first_received_at, last_received_at, instance_count, status, "
                   "reason) VALUES (1, '1.2.3.1', '1.2.3', 'CT', 'CHEST', 'CT1', '10.0.0.9', ?, ?, 2, 'done', "
                   "'measured')", (T0, T0))
        db.execute("INSERT INTO jobs (id, series_instance_uid, study_instance_uid, status, created_at, attempts, "
                   "error, device, model, category, dl_parenchymal_hu) "
                   "VALUES (7, '1.2.3.1', '1.2.3', 'done', ?, 1, '', 'cpu', 'm', 'normal', 55.5)", (T0,))
        # the same object to the same destination twice (0.1.0 did not forbid it): merged by the upgrade
        for delivery_id, status in ((1, "dead"), (2, "sent")):
            db.execute("INSERT INTO deliveries (id, job_id, series_instance_uid, destination, object_kind, "
                       "sop_instance_uid, path, status, attempts, next_attempt_at, last_error, created_at) "
                       "VALUES (?, 7, '1.2.3.1', 'PACS@10.0.0.5:104', 'SR', '1.2.9', '/x/sr.dcm', ?, 1, ?, '', ?)",
                       (delivery_id, status, T0, T0))
            db.execute("INSERT INTO delivery_attempts (delivery_id, at, ok, status, error) VALUES (?, ?, ?, '', '')",
                       (delivery_id, T0, status == "sent"))
    return url


def test_baseline_database_is_upgraded_with_its_rows(tmp_path: Path) -> None:
    url = _baseline_database(tmp_path / "audit.sqlite")
    sessions = session_factory(url)  # opening the database upgrades it
    with sessions() as session:
        job = session.get(Job, 7)
        assert job is not None and job.dl_parenchymal_hu == 55.5 and job.status == "done"
        # columns added since 0.1.0 get their defaults on old rows
        assert (job.model_name, job.model_weights_sha256, job.model_test, job.stopped_starts) == ("", "", False, 0)
        series = session.scalars(select(Series)).one()
        assert series.status == "done" and series.first_received_at == dt.datetime(2026, 1, 2, 3, 4, 5)
        delivery = session.scalars(select(Delivery)).one()
        assert (delivery.id, delivery.status) == (1, "sent")  # the oldest row, with the newest state
        attempts = session.scalars(select(DeliveryAttempt)).all()
        assert [a.delivery_id for a in attempts] == [1, 1]
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1  # switched off for the upgrade only
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]


def test_database_made_before_migrations_is_stamped_and_upgraded(tmp_path: Path) -> None:
    url = _baseline_database(tmp_path / "audit.sqlite")
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        db.execute("DROP TABLE alembic_version")  # create_all, as 0.1.0 did, keeps no version
    with session_factory(url)() as session:
        assert session.get(Job, 7) is not None
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]


def test_upgraded_database_enforces_states_and_delivery_uniqueness(tmp_path: Path) -> None:
    url = _baseline_database(tmp_path / "audit.sqlite")
    sessions = session_factory(url)
    with sessions() as session:
        session.get(Job, 7).status = "finished"  # not a JobStatus
        with pytest.raises(IntegrityError, match="CHECK constraint failed"):
            session.commit()
    with sessions() as session:
        session.add(Delivery(job_id=7, series_instance_uid="1.2.3.1", destination="PACS@10.0.0.5:104",
                             object_kind="SR", sop_instance_uid="1.2.9", path="/y/sr.dcm"))
        with pytest.raises(IntegrityError, match="UNIQUE constraint failed"):
            session.commit()


def test_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    session_factory(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(SchemaTooNew, match="9999_from_the_future.*newer than this lpm-node"):
        session_factory(f"sqlite:///{path}")


def test_models_match_the_migrations(tmp_path: Path) -> None:
    """Fails when lpm_node.core.audit changed without a revision: run scripts/new_migration.py."""
    engine = create_engine(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        checks = {row[0]: row[1] for row in connection.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table'")}
    # compare_metadata does not see CHECK constraints: the words of every one are compared here
    for table in Base.metadata.sorted_tables:
        for constraint in table.constraints:
            if constraint.__class__.__name__ == "CheckConstraint":
                assert str(constraint.sqltext) in checks[table.name], (table.name, constraint.name)


def test_commands_upgrade_an_old_database_and_refuse_a_newer_one(tmp_path: Path) -> None:
    _baseline_database(tmp_path / "audit.sqlite")
    listed = run_cli("audit", "--data-dir", str(tmp_path), "--json", timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [row["series_instance_uid"] for row in json.loads(listed.stdout)["series"]] == ["1.2.3.1"]
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    refused = run_cli("serve", "--data-dir", str(tmp_path), "--port", str(free_port()), timeout=120)
    assert refused.returncode == 2
    assert "lpm-node serve: error: the audit database" in refused.stderr and "revision 9999" in refused.stderr


def test_migrations_run_on_postgresql_up_and_down(postgres) -> None:
    """Every revision upgrades and downgrades on PostgreSQL; the result matches the models and enforces them."""
    url = postgres.new_database()
    _migrate(url, BASELINE)
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO jobs (id, series_instance_uid, study_instance_uid, status, created_at, attempts, error, "
            "device, model, category) VALUES (7, '1.2.3.1', '1.2.3', 'done', now(), 1, '', 'cpu', 'm', 'normal')"))
        for delivery_id in (1, 2):  # the same object to the same destination twice: merged by the upgrade
            connection.execute(text(
                "INSERT INTO deliveries (id, job_id, series_instance_uid, destination, object_kind, sop_instance_uid, "
                "path, status, attempts, next_attempt_at, last_error, created_at) VALUES (:id, 7, '1.2.3.1', "
                "'PACS@10.0.0.5:104', 'SR', '1.2.9', '/x/sr.dcm', 'sent', 1, now(), '', now())"), {"id": delivery_id})
    sessions = session_factory(url)  # opening the database upgrades it
    with sessions() as session:
        assert session.get(Job, 7).stopped_starts == 0
        assert len(session.scalars(select(Delivery)).all()) == 1
    with engine.begin() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    with sessions() as session:
        session.get(Job, 7).status = "finished"  # not a JobStatus
        with pytest.raises(IntegrityError, match="ck_jobs_status"):
            session.commit()
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
        assert set(inspect(connection).get_table_names()) == {"alembic_version"}
        command.upgrade(alembic_config(connection), "head")
    engine.dispose()
    sessions.kw["bind"].dispose()
