"""ClickHouse inserts run in the background (``sinks.clickhouse_sink.BackgroundInserts``): the
worker goes on while one is under way, a snapshot returns only once every insert handed over
is written, at most ``MAX_IN_FLIGHT`` wait, and a failure comes back to the worker's thread."""

from __future__ import annotations

import threading
import time
import pytest

from sinks.clickhouse_backend import ClickHouseError
from sinks.clickhouse_sink import BackgroundInserts, ClickHousePartition
from state.records import WindowRow


class SlowBackend:
    """Inserts take ``delay_s``; records (table, rows, thread) when each one ends."""

    def __init__(self, delay_s: float = 0.2, fail: Exception | None = None) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.done: list[tuple[str, int, int]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def insert_arrow(self, table, columns, payload, settings=None) -> None:
        import pyarrow as pa

        self.started.set()
        self.release.wait()
        time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        self.done.append((table, pa.ipc.open_stream(payload).read_all().num_rows,
                          threading.get_ident()))

    def command(self, sql):
        return None

    def query(self, sql):
        return [], []


def row(customer: str) -> WindowRow:
    return WindowRow("o", customer, "x", 0, 60_000, 1, 10**18, 1)


def test_the_worker_goes_on_during_an_insert_and_a_snapshot_waits_for_it():
    backend = SlowBackend(delay_s=0.0)
    backend.release.clear()  # the insert blocks until released
    part = ClickHousePartition(backend, max_rows=1, max_age_s=3600.0)
    try:
        part.write_batch([row("a")])  # full: handed over; returns while the insert is blocked
        assert backend.started.wait(5) and backend.done == []
        snapshot = threading.Thread(target=part.snapshot)
        snapshot.start()
        snapshot.join(0.3)
        assert snapshot.is_alive(), "the snapshot returned before the insert was written"
        backend.release.set()
        snapshot.join(5)
        assert [(table, rows) for table, rows, _ in backend.done] == [("usage_aggregates", 1)]
        assert backend.done[0][2] != threading.get_ident(), "the insert ran on the worker's thread"
    finally:
        backend.release.set()
        part.close()


def test_at_most_max_in_flight_inserts_wait_then_the_worker_waits_too():
    backend = SlowBackend(delay_s=0.0)
    backend.release.clear()  # every insert blocks until released
    part = ClickHousePartition(backend, max_rows=1, max_age_s=3600.0)
    try:
        for name in "ab"[:BackgroundInserts.MAX_IN_FLIGHT]:
            part.write_batch([row(name)])
        assert backend.started.wait(2)
        blocked = threading.Thread(target=part.write_batch, args=([row("c")],))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive(), "a third batch was taken while two were in flight"
        backend.release.set()
        blocked.join(5)
        part.snapshot()
        assert sorted(rows for _, rows, _ in backend.done) == [1, 1, 1]
    finally:
        backend.release.set()
        part.close()


def test_an_error_that_is_not_about_rows_is_raised_on_the_worker_at_the_snapshot():
    backend = SlowBackend(delay_s=0.0, fail=ClickHouseError("Table default.usage_aggregates does not exist", code=60))
    part = ClickHousePartition(backend, max_rows=1, max_age_s=3600.0)
    part.write_batch([row("a")])
    with pytest.raises(ClickHouseError) as raised:
        part.snapshot()
    assert raised.value.code == 60
    part._writer.release()


def test_rows_refused_in_the_background_are_written_alone_on_the_worker(monkeypatch):
    """The engine refuses a row of the batch (a row error code): the worker writes the batch
    again, halving it, and sets the one refused row aside; the others are written."""
    import sinks.clickhouse_sink as clickhouse_sink
    from sinks.rejected import ROW_ERROR_CODES

    code = sorted(ROW_ERROR_CODES)[0]
    written, rejected = [], []

    class RefusesBad(SlowBackend):
        def insert_arrow(self, table, columns, payload, settings=None):
            import pyarrow as pa

            customers = pa.ipc.open_stream(payload).read_all().column("external_customer_id").to_pylist()
            if "bad" in customers:
                raise ClickHouseError("refused", code=code)
            written.append((customers, threading.get_ident()))

    monkeypatch.setattr(clickhouse_sink, "write_rejected",
                        lambda backend, table, rows, reason, detail: rejected.append(
                            ([r.external_customer_id for r in rows], reason, threading.get_ident())))
    part = ClickHousePartition(RefusesBad(), max_rows=4, max_age_s=3600.0)
    try:
        part.write_batch([row("a"), row("bad"), row("b"), row("c")])
        part.snapshot()
        worker = threading.get_ident()
        assert sorted(c for customers, _ in written for c in customers) == ["a", "b", "c"]
        assert rejected == [(["bad"], "clickhouse_refused", worker)]
        assert all(thread == worker for _, thread in written), "the halving ran in the background"
    finally:
        part.close()
