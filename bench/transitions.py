"""Benchmark: cost of a checked state transition against a bare conditional UPDATE.

Every status change in Keystone goes through ``keystone_core.states.transition`` (read the
current state, check the table, conditional UPDATE, expire the ORM copy). This measures
what that costs per transition, one transaction each, against a baseline of the bare
``UPDATE … WHERE id=:id AND status=:expected`` in the same run, on SQLite and on MariaDB.

    uv run python bench/transitions.py [--rows 2000] [--mariadb mysql+pymysql://root@127.0.0.1:3306/keystone_bench]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pymysql
from sqlalchemy import Engine, text, update
from sqlmodel import Session, SQLModel

import keystone_core.models  # noqa: F401  (registers tables)
from keystone_core.db import create_db_engine
from keystone_core.models import Factory, Order, OrderStatus, Organization
from keystone_core.settings import load_settings
from keystone_core.states import transition_order


def seed(engine: Engine, rows: int) -> list[int]:
    SQLModel.metadata.drop_all(engine)
    SQLModel.metadata.create_all(engine)
    with Session(engine) as session:
        org = Organization(name="bench", slug="bench")
        session.add(org)
        session.flush()
        factory = Factory(organization_id=org.id, name="bench", slug="bench")  # type: ignore[arg-type]
        session.add(factory)
        session.flush()
        orders = [Order(factory_id=factory.id, name=f"o{i}", target_count=1) for i in range(rows)]  # type: ignore[arg-type]
        session.add_all(orders)
        session.commit()
        return [o.id for o in orders if o.id is not None]


def bare_update(engine: Engine, ids: list[int]) -> None:
    table = Order.__table__  # type: ignore[attr-defined]
    for order_id in ids:
        with engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.id == order_id, table.c.status == OrderStatus.CREATED.value)
                .values(status=OrderStatus.IN_PROGRESS.value)
            )


def checked_transition(engine: Engine, ids: list[int]) -> None:
    for order_id in ids:
        with Session(engine) as session:
            transition_order(session, order_id, OrderStatus.IN_PROGRESS)
            session.commit()


def measure(engine: Engine, rows: int, work: Callable[[Engine, list[int]], None]) -> float:
    ids = seed(engine, rows)
    started = time.perf_counter()
    work(engine, ids)
    elapsed = time.perf_counter() - started
    with engine.connect() as conn:
        moved = conn.execute(
            text("SELECT COUNT(*) FROM orders WHERE status='in_progress'")
        ).scalar()
    assert moved == rows, f"only {moved} of {rows} rows moved"
    return rows / elapsed


def mariadb_engine(url: str) -> Engine | None:
    settings = load_settings(env="test", database_url=url)
    host_url = url.rsplit("/", 1)[0]
    database = url.rsplit("/", 1)[1]
    try:
        conn = pymysql.connect(host="127.0.0.1", port=int(host_url.rsplit(":", 1)[1]), user="root")
    except pymysql.err.OperationalError as exc:
        print(f"MariaDB skipped: {exc.args[-1]}")
        return None
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    conn.close()
    return create_db_engine(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mariadb", default="mysql+pymysql://root@127.0.0.1:3306/keystone_bench")
    args = parser.parse_args()

    engines: dict[str, Engine] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_settings = load_settings(
            env="test", database_url=f"sqlite:///{Path(tmp) / 'bench.db'}"
        )
        engines["sqlite"] = create_db_engine(sqlite_settings)
        maria = mariadb_engine(args.mariadb)
        if maria is not None:
            engines["mariadb"] = maria

        print(f"{args.rows} transitions per run, {args.repeat} runs, one transaction each\n")
        print(f"{'backend':<9} {'bare UPDATE/s':>14} {'transition()/s':>15} {'ratio':>7}")
        for name, engine in engines.items():
            baseline, checked = [], []
            for _ in range(args.repeat):  # interleave so drift hits both alike
                baseline.append(measure(engine, args.rows, bare_update))
                checked.append(measure(engine, args.rows, checked_transition))
            b, c = statistics.median(baseline), statistics.median(checked)
            print(f"{name:<9} {b:>14.0f} {c:>15.0f} {c / b:>7.2f}")
            SQLModel.metadata.drop_all(engine)
            engine.dispose()


if __name__ == "__main__":
    main()
