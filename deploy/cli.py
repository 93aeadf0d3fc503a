"""The ``tallyflow`` command line.

Each subcommand is a *builder* in :data:`SUBCOMMANDS`: it adds its arguments to its parser and
returns the handler ``(args) -> exit status``. To add one (``run``, ``reconcile``, ``bench``...),
decorate a builder with ``@subcommand("name")``; its docstring's first line is the help text.
Keep heavy imports inside the handler so ``tallyflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

from dataflows.settings import ClickHouseSettings, KafkaSettings, RedisSettings, Settings
from operators.telemetry.settings import TelemetrySettings
from state.durations import DurationError, parse_duration_ms

Handler = Callable[[argparse.Namespace], int]
Builder = Callable[[argparse.ArgumentParser], Handler]

SUBCOMMANDS: dict[str, Builder] = {}
_DEFAULTS = Settings()
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class CliError(Exception):
    """A problem to report in one line and exit 1."""


def subcommand(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder`` as the subcommand ``name``."""

    def register(builder: Builder) -> Builder:
        if name in SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is registered twice")
        SUBCOMMANDS[name] = builder
        return builder

    return register


def main(argv: list[str] | None = None) -> int:
    """Run ``tallyflow`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.handler is None:
        parser.print_help(sys.stderr)
        return 2
    from confluent_kafka import KafkaException

    from deploy.broker import BrokerError
    from deploy.generator import ProduceError
    from sinks.kafka_client import KafkaUnavailableError, MissingTopicError

    try:
        return args.handler(args)
    except (CliError, BrokerError, ProduceError, KafkaException, KafkaUnavailableError, MissingTopicError,
            ValueError) as err:
        print(f"tallyflow {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tallyflow", description="Exactly-once usage metering: Kafka in, ClickHouse out."
    )
    parser.set_defaults(handler=None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, builder in SUBCOMMANDS.items():
        doc = (builder.__doc__ or "").strip()
        sub = commands.add_parser(name, help=doc.split("\n", 1)[0], description=doc)
        sub.set_defaults(handler=builder(sub))
    return parser


# ---- argument types ---------------------------------------------------------------------------


def duration_ms(text: str) -> int:
    """argparse type: ``30s``, ``5m``, ``1h`` → milliseconds."""
    try:
        return parse_duration_ms(text)
    except DurationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def share(text: str) -> float:
    """argparse type: a fraction in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def epoch_ms(text: str) -> int:
    """argparse type: ``now`` or an RFC 3339 time with an offset → epoch milliseconds."""
    if text.strip().lower() == "now":
        return time.time_ns() // 1_000_000
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give an offset (Z or +02:00): {text!r}")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def kafka_section(**overrides: str | None) -> KafkaSettings:
    """The flow's ``kafka`` settings, read from the environment now, with the command line's
    ``overrides`` (those not None) on top."""
    section = KafkaSettings.from_env()
    return replace(section, **{name: value for name, value in overrides.items() if value is not None})


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C inside the block, so foreground commands stop cleanly."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- subcommands ------------------------------------------------------------------------------


@subcommand("broker")
def broker_command(parser: argparse.ArgumentParser) -> Handler:
    """Run the local dev broker (Tansu, in memory) in the foreground until Ctrl-C."""
    parser.add_argument("--port", type=int, default=None, help="listen port (default: a free one)")
    parser.add_argument("--topic", action="append", default=[], help="create this topic (repeatable)")
    parser.add_argument("--partitions", type=positive_int, default=4, help="partitions per --topic")
    parser.add_argument("--retention", type=duration_ms, default="7d", help="retention.ms of --topic")
    parser.add_argument("--log", default=None, help="broker log file (default: a temporary file)")

    def run(args: argparse.Namespace) -> int:
        from deploy.broker import DevBroker, ensure_topic

        broker = DevBroker(args.port, log_path=args.log)
        with sigterm_as_interrupt():
            broker.start()
            try:
                for topic in args.topic:
                    ensure_topic(broker.bootstrap, topic, args.partitions, retention_ms=args.retention)
                print(f"KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
                print(f"broker log: {broker.log_path}; Ctrl-C to stop", file=sys.stderr, flush=True)
                while broker.returncode is None:
                    time.sleep(0.5)
                raise CliError(f"the broker exited with status {broker.returncode}:\n{broker.log_tail()}")
            except KeyboardInterrupt:
                print("stopping the broker", file=sys.stderr)
                return 0
            finally:
                broker.stop()

    return run


@subcommand("generate")
def generate_command(parser: argparse.ArgumentParser) -> Handler:
    """Produce realistic usage events (with duplicates, malformed and very late ones) to Kafka."""
    add = parser.add_argument
    add("--bootstrap", default=None,
        help=f"default: $KAFKA_BOOTSTRAP_SERVERS or {_DEFAULTS.kafka.bootstrap_servers}")
    add("--topic", default=None, help=f"default: $USAGE_TOPIC or {_DEFAULTS.kafka.usage_topic}")
    add("--partitions", type=positive_int, default=None,
        help="partitions of the topic; created if missing (default: the topic's own, else 4)")
    add("--count", type=int, default=100_000, help="records in total, all kinds (default 100000)")
    add("--rate", type=float, default=None, help="records per second (default: as fast as possible)")
    add("--seed", type=int, default=0)
    add("--duplicates", type=share, default=0.05, help="share of exact re-sends (default 0.05)")
    add("--malformed", type=share, default=0.01, help="share of invalid records (default 0.01)")
    add("--very-late", type=share, default=0.001, help="share of very late events (default 0.001)")
    add("--very-late-by", type=duration_ms, default="2d", help="how late a very late event is")
    add("--conflicting", type=share, default=0.0,
        help="share of re-stamped (and maybe revalued) copies of recent transactions, on any "
             "partition (default 0)")
    add("--conflict-shift", type=duration_ms, default="90s",
        help="how far a conflicting copy is re-stamped, ± (default 90s)")
    add("--reused", type=share, default=0.0,
        help="share of new events reusing an id from the stream's start (default 0); they count "
             "again once the stream is longer than DEDUP_HORIZON")
    add("--jitter", type=duration_ms, default="5s", help="event-time disorder, ± (default 5s)")
    add("--start", type=epoch_ms, default="now", help="event time of the first record: RFC 3339 or now")
    add("--span", type=duration_ms, default="10m", help="event time the stream covers (default 10m)")
    add("--organizations", type=positive_int, default=5)
    add("--customers-per-org", type=positive_int, default=20)
    add("--no-progress", action="store_true", help="no progress bar on stderr")

    def run(args: argparse.Namespace) -> int:
        from deploy.broker import ensure_topic, topic_partitions
        from deploy.generator import generate, produce

        if args.count < 0:
            raise CliError(f"--count must be >= 0, got {args.count}")
        section = kafka_section(bootstrap_servers=args.bootstrap, usage_topic=args.topic)
        kafka, args.topic = section.connection, section.usage_topic
        partitions = args.partitions or topic_partitions(kafka, args.topic) or 4
        ensure_topic(kafka, args.topic, partitions)
        records = generate(
            args.count, seed=args.seed, partitions=partitions, organizations=args.organizations,
            customers_per_org=args.customers_per_org, start_ms=args.start, span_ms=args.span,
            jitter_ms=args.jitter, duplicate_share=args.duplicates, malformed_share=args.malformed,
            very_late_share=args.very_late, very_late_by_ms=args.very_late_by,
            conflicting_share=args.conflicting, conflict_shift_ms=args.conflict_shift,
            reused_share=args.reused,
        )
        started = time.monotonic()
        counts = produce(kafka, args.topic, records, rate=args.rate,
                         progress=not args.no_progress, total=args.count)
        elapsed = time.monotonic() - started
        kinds = " ".join(f"{kind}={n}" for kind, n in counts.items())
        print(f"produced {sum(counts.values())} records to {args.topic} ({partitions} partitions) "
              f"in {elapsed:.2f}s: {kinds}")
        return 0

    return run


@subcommand("query")
def query_command(parser: argparse.ArgumentParser) -> Handler:
    """Run one SQL statement against the ClickHouse store and print the result as a table."""
    parser.add_argument("sql")
    parser.add_argument("--url", default=None,
                        help=f"store URL (default: $CLICKHOUSE_URL or {_DEFAULTS.clickhouse.url})")

    def run(args: argparse.Namespace) -> int:
        from state.text_table import format_table

        try:
            from sinks.clickhouse_backend import connect
        except ImportError as err:
            raise CliError(f"the ClickHouse backend is not available: {err}") from err

        url = args.url or ClickHouseSettings.from_env().url
        backend = None
        try:
            backend = connect(url)
            columns, rows = backend.query(args.sql)
        except Exception as err:  # noqa: BLE001 - the engine's own message is the answer
            print(f"tallyflow query: {err}", file=sys.stderr)
            return 1
        finally:
            if backend is not None:
                backend.close()
        print(format_table(columns, rows))
        print(f"({len(rows)} row{'' if len(rows) == 1 else 's'})", file=sys.stderr)
        return 0

    return run


@subcommand("dev-clickhouse")
def dev_clickhouse_command(parser: argparse.ArgumentParser) -> Handler:
    """Serve a chdb data directory over ClickHouse's HTTP interface until Ctrl-C."""
    parser.add_argument("--data", default="var/clickhouse", help="data directory (default var/clickhouse)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)

    def run(args: argparse.Namespace) -> int:
        try:
            from deploy.dev_clickhouse import dev_password, dev_url, serve
        except ImportError as err:
            raise CliError(f"the dev ClickHouse server is not available: {err}") from err

        password = dev_password()  # random per run unless DEV_CLICKHOUSE_PASSWORD picks it
        print(f"CLICKHOUSE_URL={dev_url(args.host, args.port, password)}", flush=True)
        serve(args.data, host=args.host, port=args.port, password=password)  # until Ctrl-C or SIGTERM
        return 0

    return run


@subcommand("reconcile")
def reconcile_command(parser: argparse.ArgumentParser) -> Handler:
    """Recompute the flow's tables from the raw topic and diff them against ClickHouse.

    The rules (windows, lateness, out-of-orderness, dedup horizon, rollups, catalog) come
    from the same environment as the flow's, read when the command runs.
    """
    parser.add_argument("--bootstrap", default=None, help="brokers (default: KAFKA_BOOTSTRAP_SERVERS)")
    parser.add_argument("--topic", default=None, help="input topic (default: USAGE_TOPIC)")
    parser.add_argument("--url", default=None, help="ClickHouse URL (default: CLICKHOUSE_URL)")
    parser.add_argument("--offsets", action="append", default=[], metavar="P:FIRST-LAST",
                        help="only these offsets of partition P (repeatable); windows at the "
                             "range edges then differ unless the range covers them whole")
    parser.add_argument("--windows-from", type=epoch_ms, default=None,
                        help="compare only windows starting at or after this time")
    parser.add_argument("--windows-until", type=epoch_ms, default=None,
                        help="compare only windows starting before this time")
    parser.add_argument("--limit", type=positive_int, default=50, help="differences to print")

    def handle(args: argparse.Namespace) -> int:
        from recovery.reconcile import run_reconcile

        settings = Settings.from_env()  # the flow's, read when the command runs
        kafka = replace(settings.kafka, bootstrap_servers=args.bootstrap or settings.kafka.bootstrap_servers)
        return run_reconcile(
            settings, bootstrap=kafka.connection, topic=args.topic, url=args.url,
            offset_specs=args.offsets, windows_from_ms=args.windows_from,
            windows_until_ms=args.windows_until, limit=args.limit,
        )

    return handle


@subcommand("migrate")
def migrate_command(parser: argparse.ArgumentParser) -> Handler:
    """Create the ClickHouse tables if missing and widen old sum columns to Decimal(76, 18); safe to re-run.

    Tables are created single node, or ON CLUSTER with --cluster. An existing table whose sum
    columns (total_value, metric_aggregates.value) are a narrower Decimal(P, 18) is converted
    with ALTER TABLE ... MODIFY COLUMN (every value kept exactly; returns when every part is
    converted). Other differences are reported, never changed, and make the exit status 1.
    """
    parser.add_argument("--url", default=None,
                        help=f"store URL (default: $CLICKHOUSE_URL or {_DEFAULTS.clickhouse.url})")
    parser.add_argument("--cluster", default=None, metavar="NAME",
                        help="create Replicated local tables and Distributed tables ON CLUSTER NAME "
                             "('{cluster}' uses the server's macro); default: single-node tables")
    parser.add_argument("--enrich-fields", default=None, metavar="A,B",
                        help="enrichment columns of usage_aggregates (default: $ENRICH_FIELDS, as the flow)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the DDL, connect to nothing (widenings depend on the tables found: not shown)")

    def run(args: argparse.Namespace) -> int:
        from sinks.cluster_schema import cluster_ddl, migrate
        from sinks.schema import DDL, enrichment_migrations

        env = dict(os.environ)
        if args.enrich_fields is not None:
            env["ENRICH_FIELDS"] = args.enrich_fields or "off"
        redis = RedisSettings.from_env(env)
        redis.check()
        fields = redis.enrich_fields
        if args.dry_run:
            statements = (cluster_ddl(args.cluster, enrich_fields=fields) if args.cluster
                          else DDL + enrichment_migrations(fields))
            print(";\n\n".join(s.strip() for s in statements) + ";")
            return 0
        from sinks.clickhouse_backend import ClickHouseError, connect

        url = args.url or ClickHouseSettings.from_env().url
        where = f"ON CLUSTER {args.cluster!r}" if args.cluster else "single node"
        backend = None
        try:
            backend = connect(url)
            outcomes = migrate(backend, args.cluster, fields)
        except ClickHouseError as err:
            raise CliError(f"{where}: {err}") from err
        finally:
            if backend is not None:
                backend.close()
        for outcome in outcomes:
            print(f"{outcome.describe()} ({where})")
        return 0 if all(outcome.ok for outcome in outcomes) else 1

    return run


@subcommand("lag")
def lag_command(parser: argparse.ArgumentParser) -> Handler:
    """Print a running flow's per-partition lag and watermarks (read from its /status.json)."""
    parser.add_argument("--url", action="append", default=None,
                        help="a flow process's metrics server (default: http://127.0.0.1:$METRICS_PORT "
                             "or :9464); repeat it for every process of a cluster to see all partitions")
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                        help="redraw every SECONDS until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=5.0, help="HTTP timeout in seconds")

    def run(args: argparse.Namespace) -> int:
        from operators.telemetry.lag import fetch_status, format_lag, merge_status

        port = TelemetrySettings.from_env(os.environ).metrics_port  # the flow's, read now
        urls = args.url or [f"http://127.0.0.1:{port}"]

        def table() -> str:
            return format_lag(merge_status([fetch_status(url, args.timeout) for url in urls]))

        if args.watch is None:
            print(table())
            return 0
        with sigterm_as_interrupt():
            try:
                while True:
                    text = table()
                    print("\033[H\033[2J" + text, flush=True)
                    time.sleep(args.watch)
            except KeyboardInterrupt:
                return 0

    return run


@subcommand("bench")
def bench_command(parser: argparse.ArgumentParser) -> Handler:
    """Benchmark the flow against a plain consumer (and Quix): events/s, RSS, dedup, latency."""
    from deploy.bench import add_arguments  # standard library only at import: cheap

    add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        from deploy.bench import run_cli

        return run_cli(args)

    return run


if __name__ == "__main__":
    sys.exit(main())
