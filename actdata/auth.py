"""The API key, defined once: where it comes from, how a client sends it, how a server checks it.

A key set on a server (`server.api_key`, or `$ACTDATA_API_KEY`) is required on every route but `GET /`,
as `Authorization: Bearer <key>`; servers and the cluster directory compare it in constant time.
"""
from __future__ import annotations

import hmac
import os
from typing import Optional, Union

API_KEY_ENV = "ACTDATA_API_KEY"
WRONG_KEY = "missing or wrong API key: send 'Authorization: Bearer <key>'"
CHALLENGE = {"WWW-Authenticate": "Bearer"}  # headers of a 401


def resolve_api_key(api_key: Optional[str] = None) -> Optional[str]:
    """`api_key` if given, else `$ACTDATA_API_KEY`, else None."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def bearer(api_key: Optional[str]) -> dict[str, str]:
    """The request headers that carry `api_key` (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def authorized(header: Union[str, bytes, None], api_key: Optional[str]) -> bool:
    """Whether an `Authorization` header value carries `api_key` (always, when no key is set)."""
    if not api_key:
        return True
    got = header.encode() if isinstance(header, str) else (header or b"")
    return hmac.compare_digest(got, f"Bearer {api_key}".encode())
