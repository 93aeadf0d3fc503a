"""What flows between the steps of the usage dataflow, and out of it.

Plain msgspec structs: cheap to build, to pickle across workers, and to
encode as JSON rows for ClickHouse.
"""

from __future__ import annotations

import msgspec


class ShardEvent(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A valid, on-time event on its way to its shard, built by position and read by name.

    An ``array_like`` struct outside the garbage collector: about as cheap to build as a
    tuple and faster to read than a NamedTuple, which the collector would keep tracking.

    ``digest`` is the transaction's dedup digest; ``watermark_before`` is its partition's
    watermark just before it (each window store decides with it, so the decision is the same
    on every replay); ``offset`` is its Kafka offset; ``metric_values`` is ``None`` or
    ``[(metric_index, group, value), ...]`` for the catalog metrics of its code::

        >>> event = ShardEvent(7, "org", "cust", "api_calls", 60_000, 1_000_000_000, 0, 41, "tx-1", None)
        >>> event.timestamp_ms, event.value_scaled, event.offset
        (60000, 1000000000, 41)
    """

    digest: int
    organization_id: str
    external_customer_id: str
    code: str
    timestamp_ms: int
    value_scaled: int
    watermark_before: int
    offset: int
    transaction_id: str
    metric_values: list | None


class ShardBatch(msgspec.Struct, frozen=True, gc=False):
    """One Kafka partition's progress as one shard needs it: its events, then its watermark.

    ``late`` holds ``(due_ms, digest, LateRecord)``: events that missed their
    window, checked against counted transactions once the flow's watermark
    reaches ``due_ms`` (by then every on-time copy has been seen).
    """

    partition: int
    n_partitions: int
    watermark: int
    at_end: bool
    events: list[ShardEvent]
    late: list = []
    idle: bool = False
    topic: str = ""
    traces: list = []  # operators.telemetry.tracing.TraceCarry of sampled events (tracing on only)


class WindowRow(msgspec.Struct, frozen=True, gc=False):
    """One aggregate row of ``usage_aggregates``; ``version`` grows with every correction."""

    organization_id: str
    external_customer_id: str
    code: str
    window_start_ms: int
    window_end_ms: int
    event_count: int
    total_scaled: int
    version: int
    is_deleted: bool = False
    grain: str = ""  # "" for the main windows, "hour" or "day" for rollups


class WindowRows(msgspec.Struct, frozen=True, gc=False):
    """The ``WindowRow`` s of one table (``grain``) a shard emitted in one batch: one item on
    the stream instead of one per row.

    At one row per event a shard emits as many rows as it counts events; as single items each
    row cost the engine a conversion, a routing call and a hop per step (about a tenth of a
    high-cardinality run). The sink takes the batch whole::

        >>> batch = WindowRows("hour", [WindowRow("o", "c", "x", 0, 3_600_000, 1, 5, 1, grain="hour")])
        >>> batch.grain, len(batch.rows)
        ('hour', 1)
    """

    grain: str  # "" for usage_aggregates, "hour" or "day" for the rollups
    rows: list[WindowRow]


class WindowRowBlock(msgspec.Struct, frozen=True, gc=False):
    """The rows of one window written for the first time, as columns: its keys, counts and
    sums, with the window, version and grain they share.

    A window's first emission writes every key it holds (at one row per event, nearly every
    row the flow writes); kept as columns, no ``WindowRow`` is built per row only for the sink
    to read each back column by column. :meth:`rows` gives them as rows where one is needed::

        >>> block = WindowRowBlock("", 0, 60_000, 5, [("o", "c", "x"), ("o", "d", "x")], (2, 1), (7, 3))
        >>> len(block), block.rows()[1]
        (2, WindowRow(organization_id='o', external_customer_id='d', code='x', window_start_ms=0, window_end_ms=60000, event_count=1, total_scaled=3, version=5, is_deleted=False, grain=''))
    """

    grain: str  # "" for usage_aggregates, "hour" or "day" for the rollups
    window_start_ms: int
    window_end_ms: int
    version: int
    keys: list  # [(organization_id, external_customer_id, code)]
    counts: tuple  # event counts, none of them 0 (a row with count 0 is a deletion: not a block)
    totals: tuple  # scaled sums

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self) -> list[WindowRow]:
        start, end, version, grain = self.window_start_ms, self.window_end_ms, self.version, self.grain
        return [WindowRow(org, customer, code, start, end, count, total, version, False, grain)
                for (org, customer, code), count, total in zip(self.keys, self.counts, self.totals)]


def expanded(items: list) -> list:
    """``items`` with every ``WindowRowBlock`` replaced by its rows.

        >>> row = WindowRow("o", "c", "x", 0, 60_000, 1, 1, 1)
        >>> len(expanded([row, WindowRowBlock("", 0, 60_000, 5, [("o", "d", "x")], (1,), (3,))]))
        2
    """
    rows: list = []
    for item in items:
        if item.__class__ is WindowRowBlock:
            rows += item.rows()
        else:
            rows.append(item)
    return rows


def row_count(items: list) -> int:
    """The rows ``items`` hold: a block or a ``WindowRows`` batch counts its rows."""
    return sum(len(item.rows) if item.__class__ is WindowRows else
               len(item) if item.__class__ is WindowRowBlock else 1 for item in items)


class MetricRow(msgspec.Struct, frozen=True, gc=False):
    """One row of ``metric_aggregates``: a catalog metric for a customer, group and window."""

    metric: str
    organization_id: str
    external_customer_id: str
    group_key: str
    window_start_ms: int
    window_end_ms: int
    value_scaled: int
    event_count: int
    version: int
    is_deleted: bool = False


class CountedUsage(msgspec.Struct, frozen=True, gc=False):
    """What one shard counted in one batch (deduped, on time), summed per customer, code and day.

    ``deltas`` maps ``(organization_id, external_customer_id, code, day_start_ms)`` to
    ``(count, total_scaled, max_event_ms)``. Emitted only when live totals are enabled; it
    leaves the shard step keyed by the shard, like every other output. ``watermark`` is the
    shard's ``decided_through`` after the batch: no later batch counts an event older than it
    minus the longest window and lateness, so live totals may drop periods well before it.
    """

    deltas: dict
    watermark: int = -(2**63)
    provisional: bool = False  # the end of input flushed undecided events: show, do not keep


class LateRecord(msgspec.Struct, frozen=True, gc=False):
    """A valid event that arrived after its window closed: a row of ``usage_late_events``."""

    organization_id: str
    external_customer_id: str
    code: str
    transaction_id: str
    timestamp_ms: int
    value_scaled: int
    reason: str
    watermark_ms: int
    source_topic: str
    source_partition: int
    source_offset: int
    raw: bytes


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """An input message that is not a valid event, bound for the DLQ topic untouched."""

    key: bytes | None
    value: bytes | None
    headers: list
    reason: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int

    def dlq_headers(self) -> list[tuple[str, bytes]]:
        """The original headers plus ours, which name the reason and the source position.

        Incoming ``tallyflow.*`` headers (any case) are dropped first: a producer could
        otherwise forge a reason or a source position in the DLQ.

        >>> letter = DeadLetter(None, b"{", [("tallyflow.reason", b"ok"), ("trace", b"1")],
        ...                     "malformed_json", "", "usage", 0, 7)
        >>> [name for name, _ in letter.dlq_headers()][:3]
        ['trace', 'tallyflow.reason', 'tallyflow.detail']
        """
        return [
            *(header for header in self.headers if not header[0].lower().startswith("tallyflow.")),
            ("tallyflow.reason", self.reason.encode()),
            ("tallyflow.detail", self.detail.encode("utf-8", "replace")[:1024]),
            ("tallyflow.source.topic", self.source_topic.encode()),
            ("tallyflow.source.partition", str(self.source_partition).encode()),
            ("tallyflow.source.offset", str(self.source_offset).encode()),
        ]
