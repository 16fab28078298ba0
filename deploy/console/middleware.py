"""ASGI layers in front of the console's routes: trusted proxies, allowed Host names, body cap, headers.

Order (outermost first): ForwardedHost and uvicorn's ProxyHeadersMiddleware believe
X-Forwarded-Host / -Proto / -For only from ``server.forwarded_allow_ips`` (so the Origin check
sees ``https://`` behind nginx or Caddy, and login throttling sees the real client address);
Starlette's TrustedHostMiddleware answers 400 to a Host outside ``server.allowed_hosts`` (DNS
rebinding, HTTP and WebSocket alike); BodyLimit answers 413 to a body over
``server.max_body_bytes`` before reading it; SecurityHeaders adds CSP and friends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import PlainTextResponse
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from deploy.console.config import ServerConfig, allowed_hosts

CSP = (
    "default-src 'self'; img-src 'self' data:; connect-src 'self'; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class ForwardedHost:
    """Replace Host by the last X-Forwarded-Host when the peer is a trusted proxy (before the Host check)."""

    def __init__(self, app: Any, trusted: tuple[str, ...]) -> None:
        self.app = app
        self.nets = [ipaddress.ip_network(t, strict=False) for t in trusted]

    def _trusted(self, client: Any) -> bool:
        try:
            ip = ipaddress.ip_address(client[0])
        except (TypeError, ValueError, IndexError):
            return False
        return any(ip in n for n in self.nets)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and self.nets and self._trusted(scope.get("client")):
            fwd = [v for k, v in scope["headers"] if k == b"x-forwarded-host"]
            if fwd:
                host = fwd[-1].split(b",")[-1].strip()  # the value our proxy set is the last one
                headers = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", host)]
                scope = dict(scope, headers=headers)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over ``max_bytes``: by Content-Length before reading, or while it streams in."""

    def __init__(self, app: Any, max_bytes: int, refused: Callable[[], None] = lambda: None) -> None:
        self.app, self.max_bytes, self.refused = app, max_bytes, refused

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        self.refused()
        resp = PlainTextResponse(
            f"request body over {self.max_bytes} bytes", status_code=413, headers={"connection": "close"}
        )
        await resp(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if not any(k == b"transfer-encoding" for k, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        # Chunked: read up to the cap here (bounded memory), then replay it to the route.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class SecurityHeaders:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(app: Starlette, server: ServerConfig, body_refused: Callable[[], None]) -> None:
    """Add the layers above to ``app`` (each add_middleware goes outside the previous one)."""
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, max_bytes=server.max_body_bytes, refused=body_refused)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(server), www_redirect=False)
    app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(server.forwarded_allow_ips))
    app.add_middleware(ForwardedHost, trusted=server.forwarded_allow_ips)
