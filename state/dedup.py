"""The transaction digest: one signed 64-bit number per (organization_id, transaction_id).

Counted copies are remembered by digest (``state.counted.CountedCopies``, with the event time of
each counted copy); this module only names the hash, so the intake's hot loop and the
shard agree on it in every process.
"""

from __future__ import annotations

import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_HALF = 2**63

digest_hash = _xxh3
DIGEST_BIAS = _HALF


def transaction_digest(organization_id: str, transaction_id: str) -> int:
    """Stable signed 64-bit digest of (organization_id, transaction_id), equal in every process.

    The hashed text is length-prefixed, ``f"{len(org)}:{org}{txn}"``, so it names one
    pair whatever characters the ids hold (a separator character could appear in an id:
    ``("a\x1fb", "c")`` and ``("a", "b\x1fc")`` would share a digest). A hot loop may
    inline it as ``digest_hash(f"{len(org)}:{org}{txn}".encode()) - DIGEST_BIAS``::

        >>> digest_hash("3:orgt1".encode()) - DIGEST_BIAS == transaction_digest("org", "t1")
        True
        >>> transaction_digest("a\x1fb", "c") == transaction_digest("a", "b\x1fc")
        False
    """
    return _xxh3(f"{len(organization_id)}:{organization_id}{transaction_id}".encode()) - _HALF
