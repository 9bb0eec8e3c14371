"""Helpers the benchmarks share (run as scripts: ``bench/`` is on ``sys.path``)."""

from __future__ import annotations

import pymysql


def recreate_database(host: str, port: int, name: str) -> str:
    """Drop and create MariaDB database ``name``; its SQLAlchemy URL (user root)."""
    conn = pymysql.connect(host=host, port=port, user="root", password="")
    with conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    conn.close()
    return f"mysql+pymysql://root@{host}:{port}/{name}"
