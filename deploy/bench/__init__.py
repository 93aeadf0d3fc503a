"""`make bench` / `tallyflow bench`: throughput, memory and latency of the usage flow, in one run.

For each traffic profile (``settings.PROFILES``: ``low``, 400 keys, and ``high``, 200 orgs x
5,000 customers x 10 codes, about one output row per event) one generated stream (``--events``
records over 4 partitions, a few duplicates, malformed and very late ones) is produced once
into a local dev broker; then each contender reads all of it in its own child process, timed
from process start to exit, its peak RSS sampled from ``/proc/<pid>/status``:

- ``baseline``: a plain confluent-kafka consumer, ``json`` and a dict of (org, code, minute) ->
  [count, exact scaled-integer sum], read to partition EOF (not end offsets: FIELD-NOTES);
- ``read-ceiling``: the same consumer with no decoding at all, to show how fast records can
  reach one Python process here (what no contender can beat on this broker);
- ``tallyflow-wN``: ``python -m bytewax.run dataflows.usage:flow -w N`` in stop-at-end mode on an
  embedded chdb directory with a recovery store (``-s 5 -b 30``), then checked against
  ``recovery.reconcile.recompute`` of the raw topic, so a fast but wrong run is flagged; it
  reports rows written per second and peak RSS per open window key too;
- ``tallyflow-w1-redis``: the same with live totals and enrichment on (a private redis-server);
- ``quix``: Quix Streams 3.28 (its own venv ``.venv-quix``, see ``--with-quix``), a tumbling
  1-minute count+sum per message key (org:customer) and code, first profile only.

It also measures the dedup store's memory per remembered transaction id (in a child) and,
unless ``--no-latency``, the event->row latency of a tail-mode flow at a steady produce rate.
``--scaling`` instead runs clusters of 1, 2, 4... one-worker processes (``deploy.bench.scaling``).
Results print as tables with the targets (PASS/MISS and the gap) and land as JSON in
``bench-results/bench-<UTC time>.json``. From Python::

    from deploy.bench import BenchOptions, run_bench
    results = run_bench(BenchOptions(events=5_000, workers=(1,), quix="skip", latency=False))
    results["profiles"]["high"]["correctness"]["tallyflow-w1"]["ok"]

Modules: ``settings`` (options, profiles, shapes, targets), ``orchestration`` (the run and the
command line), ``contenders``, ``latency``, ``profiling``, ``scaling``, ``report``, ``process``
(child processes), ``children`` and ``quix_app`` (the child programs), ``values``. Every module
imports only the standard library at the top: ``tallyflow bench --help`` stays cheap and the
Quix child imports this package under ``.venv-quix``, where the project's dependencies are absent.
"""

from deploy.bench.orchestration import add_arguments, main, run_bench, run_cli
from deploy.bench.profiling import summarize_profile
from deploy.bench.report import format_report
from deploy.bench.settings import PROFILES, BenchOptions, FlowShape, TrafficProfile
from deploy.bench.values import event_time_ms, scaled_value

__all__ = ["BenchOptions", "FlowShape", "PROFILES", "TrafficProfile", "add_arguments",
           "event_time_ms", "format_report", "main", "run_bench", "run_cli", "scaled_value",
           "summarize_profile"]
