"""tallyflow dataflows: wiring only (the flow, settings, logs, telemetry wiring).
Imports every layer below it; only :mod:`deploy` imports it."""
