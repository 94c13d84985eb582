"""Where the server is: a URL given, else `$ACTDATA_URL`, else http://localhost:8000 (as the original
service's client did)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

URL_ENV = "ACTDATA_URL"
DEFAULT_URL = "http://localhost:8000"


def resolve_url(url: Optional[str] = None) -> str:
    """`url` if given, else `$ACTDATA_URL`, else http://localhost:8000; with a scheme, without a trailing '/'."""
    url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    return url if "://" in url else "http://" + url


def resolve_urls(url_or_urls: Union[None, str, Sequence[str]]) -> list[str]:
    """A list of server URLs from one URL, a list, or None ($ACTDATA_URL, else http://localhost:8000)."""
    urls = [url_or_urls] if url_or_urls is None or isinstance(url_or_urls, str) else list(url_or_urls)
    if not urls:
        raise ValueError("RemoteActivationDataset needs at least one URL")
    return [resolve_url(u) for u in urls]
