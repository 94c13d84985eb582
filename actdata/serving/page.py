"""The status page (status.html, package data): who gets it, and the file with its headers.

`GET /` answers a browser (an `Accept` header whose first media type is text/html) with the page, and
every other caller (curl's `*/*`, the clients, the seed's calls) with the JSON health as before. The
page is one self-contained file (inline script and style, nothing fetched from elsewhere) that polls
the JSON routes of the server or directory that served it; the cluster directory serves it too.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Optional, Union

MEDIA_TYPE = "text/html; charset=utf-8"
# the page talks only to where it came from; its script and style are inline
HEADERS = {"Cache-Control": "no-store", "Vary": "Accept", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                      "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                                      "frame-ancestors 'none'"}


def wants_page(accept: Union[str, bytes, None]) -> bool:
    """Whether an `Accept` header asks for HTML first (a browser navigating to the URL)."""
    if isinstance(accept, bytes):
        accept = accept.decode("latin-1")
    first = (accept or "").split(",", 1)[0].split(";", 1)[0].strip().lower()
    return first == "text/html"


@lru_cache(maxsize=1)
def page() -> bytes:
    """The page's bytes (read once per process)."""
    return resources.files("actdata.serving").joinpath("status.html").read_bytes()


def page_headers(extra: Optional[dict] = None) -> dict:
    return {**HEADERS, **(extra or {})}
