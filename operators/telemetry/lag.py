"""Consumer lag: the probe a source calls, and the ``tallyflow lag`` report of running flows."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Mapping

from operators.telemetry import metrics
from operators.telemetry.metrics import record_consumer_lag
from operators.telemetry.settings import TelemetryError
from state.text_table import format_table

log = logging.getLogger(__name__)


class LagProbe:
    """Consumer lag of one partition from librdkafka's cached end offset, at most every ``every_s``.

    The cached end offset comes with every fetch response, so this costs no broker round trip.
    """

    def __init__(self, topic: str, partition: int, every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topic, self.partition, self.every_s, self._clock = topic, partition, every_s, clock
        self._due = 0.0
        self._tp = None

    def maybe_record(self, consumer: Any, next_offset: int, eof_offset: int | None = None) -> None:
        """Record the lag if it is due; ``eof_offset`` (a partition-EOF signal just seen) is the
        end offset itself, recorded at once: the lag after catching up reads 0 right away."""
        if metrics.active() is None:
            return
        if eof_offset is not None:  # nothing read yet and already at the end: no lag either
            record_consumer_lag(self.partition, eof_offset - next_offset if next_offset >= 0 else 0)
            self._due = self._clock() + self.every_s
            return
        now = self._clock()
        if now < self._due:
            return
        self._due = now + self.every_s
        if next_offset < 0:  # nothing read yet: the position is not known
            return
        if self._tp is None:
            from confluent_kafka import TopicPartition

            self._tp = TopicPartition(self.topic, self.partition)
        try:
            _low, high = consumer.get_watermark_offsets(self._tp, cached=True)
        except Exception as err:  # noqa: BLE001 - a metric must never stop the flow
            log.debug("consumer lag unavailable",
                      extra={"topic": self.topic, "partition": self.partition, "error": str(err)})
            return
        if high is not None and high >= 0:
            record_consumer_lag(self.partition, high - next_offset)


def fetch_status(url: str, timeout: float = 5.0) -> dict:
    """GET ``<url>/status.json`` of a running flow; TelemetryError if nothing answers."""
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - operator's URL
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise TelemetryError(f"{target} answered {err.code}") from err
    except (urllib.error.URLError, OSError) as err:
        raise TelemetryError(
            f"no flow answers at {target}: {getattr(err, 'reason', err)} "
            "(is it running with METRICS_PORT set to that port?)") from err
    except json.JSONDecodeError as err:
        raise TelemetryError(f"{target} did not answer JSON: {err}") from err


def merge_status(statuses: list[Mapping[str, Any]]) -> dict:
    """One cluster-wide status from each process's ``/status.json`` (``tallyflow lag --url … --url …``).

    Counters, rates and lag add up; partitions are listed together, and each one's delay is
    recomputed against the newest event seen anywhere in the cluster.

    >>> a = {"partitions": [{"partition": 0, "consumed": 5, "lag": 1, "watermark_ms": 90, "max_event_ms": 100}],
    ...      "totals": {"consumed": 5}, "rates": {"events_per_s": 2.0}, "lag_total": 1}
    >>> b = {"partitions": [{"partition": 1, "consumed": 7, "lag": 0, "watermark_ms": 150, "max_event_ms": 160}],
    ...      "totals": {"consumed": 7}, "rates": {"events_per_s": 3.5}, "lag_total": 0}
    >>> merged = merge_status([b, a])
    >>> [(p["partition"], p["watermark_delay_ms"]) for p in merged["partitions"]], merged["totals"], merged["lag_total"]
    ([(0, 70), (1, 10)], {'consumed': 12}, 1)
    """
    if len(statuses) == 1:
        return dict(statuses[0])
    partitions = sorted((dict(p) for s in statuses for p in s.get("partitions", [])),
                        key=lambda p: p["partition"])
    newest = max((p["max_event_ms"] for p in partitions if p.get("max_event_ms") is not None), default=None)
    for p in partitions:
        if newest is not None and p.get("watermark_ms") is not None:
            p["watermark_delay_ms"] = max(0, newest - p["watermark_ms"])
    totals: dict[str, Any] = {}
    rates: dict[str, float] = {}
    for s in statuses:
        for name, value in s.get("totals", {}).items():
            totals[name] = totals.get(name, 0) + value
        for name, value in s.get("rates", {}).items():
            rates[name] = round(rates.get(name, 0.0) + value, 1)
    return {"partitions": partitions, "totals": totals, "rates": rates,
            "lag_total": sum(s.get("lag_total", 0) for s in statuses)}


def format_lag(status: Mapping[str, Any]) -> str:
    """The per-partition table ``tallyflow lag`` prints.

    >>> print(format_lag({"partitions": [{"partition": 0, "consumed": 1200, "lag": 0,
    ...     "watermark_ms": 1767225590000, "watermark_delay_ms": 2500}],
    ...     "totals": {"consumed": 1200, "invalid": 3, "late": 1, "duplicates": 7},
    ...     "rates": {"events_per_s": 410.5}, "lag_total": 0}))
    partition | consumed | lag | watermark (UTC)      | behind newest (s)
    ----------+----------+-----+----------------------+------------------
            0 |     1200 |   0 | 2025-12-31T23:59:50Z |               2.5
    <BLANKLINE>
    total lag 0 · 410.5 events/s · consumed 1200 · invalid 3 · late 1 · duplicates 7
    """
    from datetime import datetime, timezone

    def when(ms: int | None) -> str | None:
        if ms is None:
            return None
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def delay(ms: int | None) -> float | None:
        return None if ms is None else round(ms / 1000, 1)

    rows = [(p["partition"], p["consumed"], p.get("lag"), when(p.get("watermark_ms")),
             delay(p.get("watermark_delay_ms"))) for p in status.get("partitions", [])]
    table = format_table(["partition", "consumed", "lag", "watermark (UTC)", "behind newest (s)"], rows)
    totals, rates = status.get("totals", {}), status.get("rates", {})
    summary = (f"total lag {status.get('lag_total', 0)} · {rates.get('events_per_s', 0)} events/s · "
               f"consumed {totals.get('consumed', 0)} · invalid {totals.get('invalid', 0)} · "
               f"late {totals.get('late', 0)} · duplicates {totals.get('duplicates', 0)}")
    return f"{table}\n\n{summary}"
