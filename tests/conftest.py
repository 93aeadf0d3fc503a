"""Fixtures every test module can use: a real dev broker and real ClickHouse engines."""

from support.clickhouse import chdb_url, clickhouse_url, dev_clickhouse  # noqa: F401
from support.kafka import kafka_broker  # noqa: F401

import pytest

from deploy.runner import kill_leftover_flows


@pytest.fixture(autouse=True)
def no_flow_outlives_its_test():
    """A test that fails half-way must not leave a dataflow process running."""
    yield
    kill_leftover_flows()


def pytest_addoption(parser):
    parser.addoption("--kills", type=int, default=5,
                     help="SIGKILLs the crash test deals the flow (a soak: --kills 20)")
    parser.addoption("--outage-seconds", type=float, default=8.0,
                     help="how long the ClickHouse outage test keeps the server down")
