"""Secrets out of every message: connection URLs shown without their passwords.

A URL may carry a password (``redis://:pw@host``, ``http://user:pw@clickhouse:8123``) and
reach an error, a log line or a ``repr``. Everything that shows a URL shows
:func:`redact_url` of it::

    >>> redact_url("http://default:s3cret@ch:8123/db?max_threads=2")
    'http://default:***@ch:8123/db?max_threads=2'
    >>> redact_url("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    >>> redact_url("https://TOKEN@example.com/x?access_token=abc&db=1")
    'https://***@example.com/x?access_token=***&db=1'
    >>> redact_url("chdb://./var/clickhouse")
    'chdb://./var/clickhouse'

It imports nothing from tallyflow, so any layer may use it.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#]*)@")
_SECRET_PARAM = re.compile(r"(?P<key>[?&;][^=&;#]*(?:pass|secret|token|key)[^=&;#]*=)(?P<value>[^&;#]*)",
                           re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with the password of its user info (or a lone token) and secret parameters hidden.

    >>> redact_url("not a url at all: pw")
    'not a url at all: pw'
    """
    def userinfo(match: re.Match[str]) -> str:
        user, colon, _password = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:***@" if colon else f"{match['scheme']}***@"

    return _SECRET_PARAM.sub(lambda m: f"{m['key']}***", _USERINFO.sub(userinfo, url, count=1))

