"""tallyflow sinks: ClickHouse, Kafka outputs and Redis, each stating its guarantee.
Imports only :mod:`operators` and :mod:`state` below it."""
