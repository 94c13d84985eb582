"""The ASGI guard in front of every route: header size and the API key (actdata.auth)."""
from __future__ import annotations

from typing import Optional

from fastapi.responses import JSONResponse

from ..auth import CHALLENGE, WRONG_KEY, authorized


class Guard:
    """ASGI middleware in front of every route: requests whose headers exceed `max_header_bytes` get 431
    (the HTTP layer, actdata.serving.httpguard, already closes a connection whose head grows past it while being
    read), and when an API key is set, every route but `GET /` needs `Authorization: Bearer <key>` (401;
    compared in constant time). `GET /` is answered to anyone, with error texts only for key holders."""

    def __init__(self, app, key: Optional[str], max_header_bytes: int = 64 << 10):
        self.app, self.max_header_bytes = app, max_header_bytes
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = None
            ok = authorized(dict(scope["headers"]).get(b"authorization"), self.key)
            scope["actdata.authenticated"] = ok
            if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
                refusal = JSONResponse({"detail": f"request headers exceed {self.max_header_bytes} bytes"},
                                       status_code=431)
            elif not ok and not (scope["path"] == "/" and scope["method"] in ("GET", "HEAD")):
                refusal = JSONResponse({"detail": WRONG_KEY}, status_code=401, headers=CHALLENGE)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

