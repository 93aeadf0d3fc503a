"""Write window rows and late events to ClickHouse, idempotently.

Guarantee: exactly-once effect. Rows are upserts into ReplacingMergeTree
tables (aggregates keyed by window, versioned by the watermark they were emitted at; late events
keyed by source offset), and every buffered row is written before the epoch
that produced it commits. A replay after a crash rewrites identical rows.
With ``Enrichment``, rows of ``usage_aggregates`` also get customer attributes
from Redis at write time; they are not part of the key, so a rewrite with
changed attributes replaces its twin with the same totals.
A row ClickHouse cannot take (a sum beyond its column, a value the engine refuses) is written
to ``usage_rejected_rows`` instead, and the rest of its batch is written (``sinks.rejected``):
one such row never stops billing, nor makes the flow crash and replay into the same error.

    >>> sink = ClickHouseSink("chdb://./var/clickhouse", partitions=2)
    >>> sink.list_parts()
    ['0', '1']
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Callable

from bytewax.outputs import FixedPartitionedSink

from operators.telemetry import metrics, tracing
from operators.graceful_stop import stop_requested
from sinks.buffered import BufferedPartition, SharedBuffer
from sinks.clickhouse_backend import ClickHouseBackend, ClickHouseError, ClickHouseUnavailable, connect
from sinks.columnar import (DecimalOverflow, arrow_stream, block_batch, in_key_order, late_batch, metric_batch,
                             window_batch)
from sinks.rejected import ROW_ERROR_CODES, fits, write_rejected
from sinks.schema import (
    METRIC_AGGREGATES,
    ROLLUP_TABLES,
    USAGE_AGGREGATES,
    USAGE_LATE_EVENTS,
    USAGE_REJECTED_ROWS,
    ensure_schema,
)
from state.records import LateRecord, MetricRow, WindowRow, WindowRowBlock, WindowRows, expanded, row_count

if TYPE_CHECKING:  # imported when enrichment is on: it brings redis (~0.15 s at start-up)
    from sinks.enrichment import CustomerAttributes

log = logging.getLogger(__name__)


_ENCODERS = {
    **{table: window_batch for table in ROLLUP_TABLES.values()},
    METRIC_AGGREGATES: metric_batch,
    USAGE_LATE_EVENTS: late_batch,
}
"""How a table's rows become an Arrow record batch (``sinks.columnar``)."""


Row = WindowRow | MetricRow | LateRecord
Item = Row | WindowRows | WindowRowBlock  # the shard step sends its window rows in batches


def window_table(row: WindowRow) -> str:
    """``usage_aggregates`` or the rollup table of the row's ``grain``."""
    return ROLLUP_TABLES[row.grain]


def metric_table(_row: MetricRow) -> str:
    return METRIC_AGGREGATES


def late_table(_record: LateRecord) -> str:
    return USAGE_LATE_EVENTS


class Backoff:
    """Exponential backoff with a cap: 0.2 s, 0.4 s, … up to ``cap_s``."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 10.0) -> None:
        self.first_s, self.cap_s, self.attempt = first_s, cap_s, 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.first_s * 2**self.attempt)
        self.attempt += 1
        return delay


class StoppedDuringOutage(RuntimeError):
    """A graceful stop was asked for while ClickHouse could not take a write."""


def with_retries(action, what: str, sleep=time.sleep):
    """Run ``action`` until ClickHouse accepts it; block (backpressure) while it is unreachable.

    Blocking here stops the worker, so the source stops pulling from Kafka and
    nothing piles up in memory. A stop signal ends the wait with an error: the
    epoch is not committed, so a resume replays it.
    """
    backoff = Backoff()
    while True:
        try:
            return action()
        except ClickHouseUnavailable as err:
            if stop_requested():
                raise StoppedDuringOutage(
                    f"stopped while ClickHouse was unavailable for {what}; "
                    "the flow resumes from its last snapshot"
                ) from err
            delay = backoff.next_delay()
            metrics.record_sink_retry(what)
            log.warning("ClickHouse unavailable, retrying",
                        extra={"what": what, "attempt": backoff.attempt, "retry_in_s": delay,
                               "error": str(err)})
            sleep(delay)


@dataclass(frozen=True)
class Enrichment:
    """Customer attributes for ``usage_aggregates`` rows (``sinks.enrichment``): which fields,
    from which Redis, cached how long. Looked up once per flush for the distinct customers."""

    redis_url: str = field(repr=False)  # may hold a password
    fields: tuple[str, ...]
    cache_ttl_ms: int = 60_000

    def client(self) -> CustomerAttributes:
        from sinks.enrichment import CustomerAttributes

        return CustomerAttributes(self.redis_url, self.fields, self.cache_ttl_ms)


def insert_now(backend: ClickHouseBackend, table: str, columns: tuple, payload: bytes, rows: int) -> None:
    """Insert an Arrow stream of ``rows`` rows, retrying while ClickHouse is unreachable."""
    started = time.perf_counter()
    with_retries(lambda: backend.insert_arrow(table, columns, payload), table)
    seconds = time.perf_counter() - started
    metrics.record_sink_write(table, rows, seconds)
    log.debug("flushed", extra={"table": table, "rows": rows, "seconds": round(seconds, 4)})


class BackgroundInserts:
    """Inserts that run on a thread of their own while the worker goes on.

    The engine does an insert's work (sorting, compressing, writing the part) on its own
    threads, without the GIL; a worker that waited for it sat idle for about 1.3 s of a 10 s
    high-cardinality run. Now it hands the encoded batch here and goes on, at most
    ``MAX_IN_FLIGHT`` batches ahead (then it waits: ClickHouse being slow or down still
    holds the worker back, and memory stays bounded). ``wait`` is the partition's snapshot:
    nothing of an epoch is left unwritten when it commits. An insert that fails is kept with
    its ``write_alone`` for the worker's thread (``refused``/``wait``): rows ClickHouse refused
    are then written there one group at a time, and any other error is raised there.
    """

    MAX_IN_FLIGHT = 2

    def __init__(self, backend: ClickHouseBackend) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self._queue: list[tuple] = []
        self._in_flight = 0
        self._failed: list[tuple[Exception, Callable[[], None]]] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="clickhouse-inserts", daemon=True)
        self._thread.start()

    def submit(self, table: str, columns: tuple, payload: bytes, rows: int,
               write_alone: Callable[[], None]) -> None:
        with self._cond:
            while self._in_flight >= self.MAX_IN_FLIGHT:
                self._cond.wait()
            self._in_flight += 1
            self._queue.append((table, columns, payload, rows, write_alone))
            self._cond.notify_all()

    def refused(self) -> list[tuple[Exception, Callable[[], None]]]:
        """The inserts that failed so far (each once), without waiting for the others."""
        with self._cond:
            failed, self._failed = self._failed, []
            return failed

    def wait(self) -> list[tuple[Exception, Callable[[], None]]]:
        """Wait until every insert handed over is done; the ones that failed."""
        with self._cond:
            while self._in_flight:
                self._cond.wait()
        return self.refused()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                table, columns, payload, rows, write_alone = self._queue.pop(0)
            failure = None
            try:
                insert_now(self._backend, table, columns, payload, rows)
            except Exception as err:  # handed to the worker's thread, never lost
                failure = (err, write_alone)
            with self._cond:
                if failure is not None:
                    self._failed.append(failure)
                self._in_flight -= 1
                self._cond.notify_all()


@dataclass
class WorkerWriter:
    """What the partitions of one sink on one worker share: their buffer, so a flush writes
    every partition's rows in one insert per table (16 shards' partitions on one worker made
    16 small inserts, 16 parts for ClickHouse to merge, where one does), and one customer
    attributes client with its cache, and the thread that inserts. The last partition to close
    stops the thread and closes the client. A partition built alone has one of its own."""

    buffer: SharedBuffer
    inserts: BackgroundInserts
    attributes: CustomerAttributes | None
    partitions: int = 0
    closed: bool = False

    def release(self) -> None:
        with self.buffer.lock:
            self.partitions -= 1
            if self.partitions == 0 and not self.closed:
                self.closed = True
                self.inserts.stop()
                if self.attributes is not None:
                    self.attributes.close()

    @classmethod
    def start(cls, backend: ClickHouseBackend, attributes: CustomerAttributes | None) -> "WorkerWriter":
        return cls(SharedBuffer(), BackgroundInserts(backend), attributes)


class ClickHousePartition(BufferedPartition[Item]):
    def __init__(self, backend: ClickHouseBackend, max_rows: int, max_age_s: float,
                 attributes: CustomerAttributes | None = None,
                 table_of: Callable[[Row], str] = window_table, *,
                 writer: WorkerWriter | None = None) -> None:
        """``writer``: what this partition shares with the others of its sink on its worker
        (``ClickHouseSink.build_part``); by default its own, with ``attributes``."""
        writer = WorkerWriter.start(backend, attributes) if writer is None else writer
        writer.partitions += 1
        super().__init__(max_rows, max_age_s, buffer=writer.buffer)
        self._backend = backend
        self._writer = writer
        self._attributes = writer.attributes
        self._inserts = writer.inserts
        self._table_of = table_of

    def flush_due(self) -> None:
        """A full or old batch: encoded here, inserted while the worker goes on (at most
        ``BackgroundInserts.MAX_IN_FLIGHT`` at a time); a refusal seen since is dealt with."""
        self.hand_over()
        self._after(self._inserts.refused())

    def settle(self) -> None:
        """Wait for every insert handed to the background; rows it refused are set aside
        (``_write``) before this returns, and any other error is raised here."""
        self._after(self._inserts.wait())

    def _after(self, refusals: list[tuple[Exception, Callable[[], None]]]) -> None:
        for err, write_alone in refusals:
            if not (isinstance(err, ClickHouseError) and _about_rows(err)):
                raise err
            write_alone()

    def rows_in(self, values: list[Item]) -> int:
        return row_count(values)

    def flush_items(self, items: list[Item]) -> None:
        with tracing.trace_sink(items) as rows_only:  # strips SinkTrace carriers (tracing on)
            by_table: dict[str, list] = {}
            blocks_by_table: dict[str, list] = {}
            table_of = self._table_of
            for item in rows_only:
                if item.__class__ is WindowRows:
                    by_table.setdefault(ROLLUP_TABLES[item.grain], []).extend(item.rows)
                elif item.__class__ is WindowRowBlock:
                    blocks_by_table.setdefault(ROLLUP_TABLES[item.grain], []).append(item)
                else:
                    by_table.setdefault(table_of(item), []).append(item)
            for table, rows in by_table.items():
                self._write(table, rows)
            for table, blocks in blocks_by_table.items():
                self._write_blocks(table, blocks)

    def _write_blocks(self, table: str, blocks: list[WindowRowBlock]) -> None:
        """Insert windows' first rows kept as columns, in one batch; a sum too wide for its
        column or a row the engine refuses, and they are written as rows by :meth:`_write`,
        which sets those rows aside."""
        try:
            batch = self._block_batch(table, blocks)
        except DecimalOverflow:
            self._write(table, expanded(blocks))
            return
        self._insert_batch(table, batch, key_ordered=True,
                           write_alone=lambda: self._write(table, expanded(blocks), background=False))

    def _block_batch(self, table: str, blocks: list[WindowRowBlock]):
        return block_batch(blocks, table, self._enrichment(table), key_ordered=True)

    def _enrichment(self, table: str) -> tuple[tuple[str, ...], Callable] | None:
        """``(fields, lookup)`` for rows of ``table``: ``lookup(customers)`` gives the
        attributes of those of the distinct ``(org, customer)`` pairs that have some, once per
        batch; None where rows are not enriched (no lookup is made)."""
        if table != USAGE_AGGREGATES or self._attributes is None:
            return None
        return self._attributes.fields, self._attributes.present

    def _write(self, table: str, rows: list, background: bool = True) -> None:
        """Insert ``rows``; those ClickHouse cannot take go to ``usage_rejected_rows``.

        Encoding checks every sum against its column, so rows are asked one by one whether
        they ``fit`` only when some sum does not (a batch in which all fit is encoded once).
        The insert of a whole batch runs in the background (``background``); if ClickHouse
        refuses a row of it, the batch is written again here, halved until the row is alone.
        """
        try:
            batch = self._batch(table, rows)
        except DecimalOverflow:
            batch = None
            out_of_range = [row for row in rows if not fits(row)]
            rows = [row for row in rows if fits(row)]
            self._reject(table, out_of_range, "total_out_of_range",
                         f"the sum does not fit the column of {table}")
        if rows and background:
            batch = self._batch(table, rows) if batch is None else batch
            self._insert_batch(table, batch, write_alone=lambda: self._insert_isolating(table, rows))
        elif rows:
            self._insert_isolating(table, rows, batch)

    def _insert_isolating(self, table: str, rows: list, batch=None) -> None:
        """Insert ``rows`` (``batch``: already encoded); if the engine refuses some of them,
        halve until they are alone."""
        try:
            self._insert(table, rows, batch)
        except ClickHouseError as err:
            if not _about_rows(err):
                raise  # about the setup, not a row: stop, with the engine's message
            if len(rows) == 1:
                self._reject(table, rows, "clickhouse_refused", str(err))
                return
            middle = len(rows) // 2
            self._insert_isolating(table, rows[:middle])
            self._insert_isolating(table, rows[middle:])

    def _reject(self, table: str, rows: list, reason: str, detail: str) -> None:
        with_retries(lambda: write_rejected(self._backend, table, rows, reason, detail),
                     USAGE_REJECTED_ROWS)

    def _batch(self, table: str, rows: list):
        """``rows`` as an Arrow record batch (``DecimalOverflow`` when a sum does not fit)."""
        enrichment = self._enrichment(table)
        if enrichment is not None:
            return window_batch(rows, table, enrichment)
        return _ENCODERS[table](rows, table)

    def _insert(self, table: str, rows: list, batch=None) -> None:
        self._insert_batch(table, self._batch(table, rows) if batch is None else batch)

    def _insert_batch(self, table: str, batch, key_ordered: bool = False,
                      write_alone: Callable[[], None] | None = None) -> None:
        """Insert ``batch`` sorted by the table's key (``key_ordered``: it is already): here,
        or with ``write_alone`` (what to do if ClickHouse refuses some of its rows) in the
        background."""
        columns = tuple(batch.schema.names)
        payload = arrow_stream(batch if key_ordered else in_key_order(batch, table))
        if write_alone is not None:
            self._inserts.submit(table, columns, payload, batch.num_rows, write_alone)
        else:
            insert_now(self._backend, table, columns, payload, batch.num_rows)

    def close(self) -> None:
        # The backend is shared by every partition in this process and outlives
        # them (see ``_process_backend``): flush, and close only what is ours.
        try:
            super().close()
        finally:
            self._writer.release()


def _about_rows(err: ClickHouseError) -> bool:
    """Whether the engine refused some rows' values (retrying them cannot help), not the
    setup or the connection."""
    return not isinstance(err, ClickHouseUnavailable) and err.code in ROW_ERROR_CODES


_BACKENDS: dict[str, ClickHouseBackend] = {}
_BACKENDS_LOCK = threading.Lock()
_SCHEMA_READY: set[tuple[str, tuple[str, ...]]] = set()
_SCHEMA_LOCK = threading.Lock()


def _ensure_schema_once(url: str, backend: ClickHouseBackend, fields: tuple[str, ...]) -> None:
    """``ensure_schema`` once per process for ``url`` and the enrichment ``fields``: every
    partition of every ClickHouse output is built through here (3 outputs x 16 partitions by
    default), and the tables, once made, stay (each check cost ~8 ms of CPU on chdb)."""
    with _SCHEMA_LOCK:
        if (url, fields) not in _SCHEMA_READY:
            with_retries(lambda: ensure_schema(backend, fields), "create tables")
            _SCHEMA_READY.add((url, fields))


def _process_backend(url: str) -> ClickHouseBackend:
    """One backend per URL for the whole process, never closed before exit.

    Worker threads share it (both backends serialise or are thread-safe). Closing and
    reopening the embedded engine while another worker thread still uses it crashed
    chdb 4.4 ("double free") and hung ``-w 2`` runs; a process ends the engine at exit.
    """
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(url)
        if backend is None:
            backend = _BACKENDS[url] = connect(url)
        return backend


LEGACY_PARTITIONS = 4
"""Sink partitions of every earlier release: a recovery store may hold snapshots for "0".."3"."""


def sink_partitions(shards: int) -> int:
    """How many writers the ClickHouse output has: one per shard, and never fewer than 4.

    Rows reach the sink keyed by their shard, so more writers than shards would sit idle, and
    shards are what a cluster is sized by (``TALLYFLOW_SHARDS`` >= the workers that share the
    state). Bytewax spreads the writers evenly over every worker of the cluster, so with 16
    shards, 1 to 16 workers each write their share instead of 4 of them writing everything.
    (``list_parts`` cannot ask Bytewax for the worker count; the shard count is the stable
    stand-in, fixed for the life of a recovery store like the partitions must be.)

    Why never fewer than 4: on resume Bytewax routes every partition snapshot in the recovery
    store to that partition's worker, and a stored partition missing from ``list_parts`` stops
    the flow ("Key … is not in this worker's routing map"). Stores written before this change
    hold "0".."3"; a store's partitions only grow with this rule (its shard count is fixed).

        >>> sink_partitions(16), sink_partitions(2), sink_partitions(32)
        (16, 4, 32)
    """
    return max(LEGACY_PARTITIONS, shards)


class ClickHouseSink(FixedPartitionedSink[Item, None]):
    """ClickHouse output of one typed stream, split into ``partitions`` (``sink_partitions``);
    ``table_of`` says where a row goes (:func:`window_table`, the default,
    :func:`metric_table`, :func:`late_table`). The partitions a worker holds write together:
    one insert per table per flush, whatever the number of partitions (``WorkerWriter``).

    Items arrive keyed by shard (``"0"``, ``"1"``, …); shard ``k`` goes to partition ``"k"``
    when it exists, so each writer takes whole shards and none is hashed onto another's:

        >>> sink = ClickHouseSink("chdb://./var/clickhouse", partitions=16)
        >>> everywhere = sorted(sink.list_parts())   # how Bytewax orders the cluster's partitions
        >>> [everywhere[sink.part_fn(k)] for k in ("0", "3", "15")]
        ['0', '3', '15']
    """

    def __init__(self, url: str, *, partitions: int = LEGACY_PARTITIONS, max_rows: int = 50_000,
                 max_age_s: float = 2.0, enrichment: Enrichment | None = None,
                 table_of: Callable[[Row], str] = window_table) -> None:
        if partitions < 1:
            raise ValueError(f"ClickHouseSink partitions must be >= 1, got {partitions}")
        self.url = url
        self.partitions = partitions
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.enrichment = enrichment if enrichment and enrichment.fields else None
        self.table_of = table_of
        # Bytewax indexes part_fn's value into the sorted global list of partitions.
        self._index = {name: i for i, name in enumerate(sorted(self._parts()))}
        self._writers: dict[int, WorkerWriter] = {}
        self._writers_lock = threading.Lock()

    def list_parts(self) -> list[str]:
        """The partitions; called when the flow starts, so the tables' counters read 0 from then."""
        metrics.declare_tables((*ROLLUP_TABLES.values(), METRIC_AGGREGATES, USAGE_LATE_EVENTS))
        return self._parts()

    def _parts(self) -> list[str]:
        return [str(i) for i in range(self.partitions)]

    def part_fn(self, item_key: str) -> int:
        """Shard ``"k"`` -> the index of partition ``"k"`` in Bytewax's sorted list; any other
        key (more shards than partitions cannot happen, see ``sink_partitions``) is hashed."""
        index = self._index.get(item_key)
        return index if index is not None else super().part_fn(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> ClickHousePartition:
        """A partition that shares its buffer, and its customer attributes' cache, with this
        sink's other partitions on the same worker (:class:`WorkerWriter`)."""
        backend = _process_backend(self.url)
        _ensure_schema_once(self.url, backend, self.enrichment.fields if self.enrichment else ())
        with self._writers_lock:
            worker = threading.get_ident()  # Bytewax builds a worker's partitions on its thread
            writer = self._writers.get(worker)
            if writer is None or writer.closed:
                attributes = self.enrichment.client() if self.enrichment else None
                writer = self._writers[worker] = WorkerWriter.start(backend, attributes)
            return ClickHousePartition(backend, self.max_rows, self.max_age_s, table_of=self.table_of,
                                       writer=writer)


