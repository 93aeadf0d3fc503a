"""Fixtures every test module can use: a real dev broker and real ClickHouse engines."""

from support.clickhouse import chdb_url, clickhouse_url, dev_clickhouse  # noqa: F401
from support.kafka import kafka_broker  # noqa: F401

import pytest

from support.processes import kill_leftover_flows, running_flow_children


@pytest.fixture(autouse=True)
def no_flow_outlives_its_test():
    """A test that fails half-way must not leave a dataflow process running (flows of
    longer-lived fixtures, already running when the test starts, are theirs to stop)."""
    before = frozenset(running_flow_children())
    yield
    kill_leftover_flows(keep=before)


def pytest_addoption(parser):
    parser.addoption("--kills", type=int, default=5,
                     help="SIGKILLs the crash test deals the flow (a soak: --kills 20)")
    parser.addoption("--outage-seconds", type=float, default=8.0,
                     help="how long the ClickHouse outage test keeps the server down")
