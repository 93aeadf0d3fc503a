"""tallyflow state: the bottom layer, imported by every other package and importing none of them.

Record types (:mod:`state.records`), window kinds, watermarks and aggregations (pure maths),
the keyed stores the shards snapshot (dedup digests, open windows, sessions), and small pure
helpers (durations, text tables).

The layers, top to bottom (README "Layout"; checked by ``tests/test_layers.py``)::

    deploy > dataflows > recovery > sinks > operators > state
"""
