"""Telemetry: one metrics system for the whole flow, the status page, traces and lag.

=======================  ===========================================================================
:mod:`.metrics`          the API operators, sources and sinks call (``record_*``), and the recorder
                         behind it: OpenTelemetry instruments, so Prometheus and OTLP see every one
:mod:`.board`            the in-process figures of the status page
:mod:`.tracing`          sampled traces decode → window → sink
:mod:`.lag`              the consumer-lag probe sources call, and ``tallyflow lag``'s report
:mod:`.settings`         what telemetry reads from the environment
:mod:`.setup`            OpenTelemetry set-up, Prometheus relabelling (``configure_telemetry``)
:mod:`.server`           the HTTP server: ``/metrics``, ``/status``, ``/status.json``, ``/healthz``
=======================  ===========================================================================

It sits in the ``operators`` layer so that operators, sources and sinks can all record; it
imports only the standard library, OpenTelemetry and :mod:`state` below it (plus, for the
traces, the intake's validation beside it).
"""
