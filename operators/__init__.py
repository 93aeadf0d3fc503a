"""tallyflow operators: the flow's logic in plain Python (validation, intake, per-shard windows,
the metric catalog, quotas, live totals, telemetry). Imports only :mod:`state` below it."""
