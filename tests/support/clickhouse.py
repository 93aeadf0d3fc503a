"""Pytest fixtures for ClickHouse: an embedded chdb URL and the dev HTTP stand-in server.

chdb hosts one data directory per process, so:

* ``chdb_url`` only names a fresh directory; the engine opens when a backend connects and
  closes when the last backend on it is closed. The fixture fails the test if a backend was
  left open (the next test could not open its own directory).
* ``dev_clickhouse`` runs ``DevClickHouseServer`` in this process on its own directory for the
  test's duration; to look at its data through chdb as well, use
  ``f"chdb://{dev_clickhouse.data_dir}"`` (same directory, shared engine), never ``chdb_url``.
* ``clickhouse_url`` is parametrised over both: ``chdb://…`` and the dev server's ``http://…``.

``tests/conftest.py`` imports them (``from support.clickhouse import …``), so every test module
can ask for them by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from deploy.dev_clickhouse import DevClickHouseServer
from sinks.clickhouse_backend import ClickHouseError, open_chdb_engines

T = TypeVar("T")
UNKNOWN_TABLE = 60  # ClickHouse's error code for a table that does not exist


def before_first_write(read: Callable[[], T], empty: T) -> T:
    """``read()``, or ``empty`` while the flow's sink has not created its tables yet.

    Bytewax builds a sink partition, which creates the tables, when its first item arrives,
    so a test polling a running flow can ask before they exist.
    """
    try:
        return read()
    except ClickHouseError as err:
        if err.code != UNKNOWN_TABLE:
            raise
        return empty


@pytest.fixture
def chdb_url(tmp_path: Path) -> Iterator[str]:
    """``chdb://<tmp>/chdb``: a fresh embedded-engine directory; fails on a leaked backend."""
    data_dir = tmp_path / "chdb"
    yield f"chdb://{data_dir}"
    leaked = [path for path in open_chdb_engines() if path == os.path.realpath(data_dir)]
    if leaked:
        pytest.fail(f"chdb engine on {leaked[0]} still open after the test: close() every backend")


@pytest.fixture
def dev_clickhouse(tmp_path: Path) -> Iterator[DevClickHouseServer]:
    """A started dev ClickHouse server on a free loopback port over a temp data dir."""
    server = DevClickHouseServer(str(tmp_path / "dev-clickhouse"), host="127.0.0.1", port=0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["chdb", "http"])
def clickhouse_url(request: pytest.FixtureRequest) -> str:
    """A ClickHouse URL for each backend: embedded chdb, then HTTP via the dev server."""
    if request.param == "chdb":
        return str(request.getfixturevalue("chdb_url"))
    return str(request.getfixturevalue("dev_clickhouse").url)
