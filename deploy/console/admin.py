"""User management routes: the admin page, /api/users (admin role) and /api/me/password (anyone logged in).

Changes land in the database at once; no restart. Setting a user's password, role or disabling
them ends their sessions (their open pages go to the login page).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from deploy.console.users import UserError

if TYPE_CHECKING:
    from deploy.console.app import Console


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "expected a JSON body") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "expected a JSON object")
    return body


def routes(c: Console) -> list[Route]:
    from deploy.console.app import STATIC, json_response

    async def page(request: Request) -> Response:
        if c.who(request) is None:
            return RedirectResponse("/login", 303)
        c.need(request, "admin")
        return FileResponse(STATIC / "admin.html")

    async def account(request: Request) -> Response:
        s = c.who(request)
        if s is None or not s.token_hash:
            return RedirectResponse("/login", 303)
        return FileResponse(STATIC / "admin.html")

    async def list_users(request: Request) -> Response:
        c.need(request, "admin")
        return json_response(await asyncio.to_thread(c.users.public))

    async def add_user(request: Request) -> Response:
        c.need_change(request, "admin", request.headers.get("x-csrf-token"))
        b = await _body(request)
        name, role, password = (b.get(k) for k in ("name", "role", "password"))
        if not (isinstance(name, str) and isinstance(role, str) and isinstance(password, str)):
            raise HTTPException(400, "keys 'name', 'role', 'password': expected strings")
        try:
            await asyncio.to_thread(c.users.add, name, role, password)
        except UserError as exc:
            raise HTTPException(400, str(exc)) from None
        return json_response({"name": name, "role": role}, 201)

    async def change_user(request: Request) -> Response:
        s = c.need_change(request, "admin", request.headers.get("x-csrf-token"))
        name = request.path_params["name"]
        b = await _body(request)
        if name == s.user and (b.get("disabled") is True or b.get("role", "admin") != "admin"):
            raise HTTPException(400, "an admin cannot disable or demote themselves (ask another admin)")
        try:
            if "role" in b:
                await asyncio.to_thread(c.users.set_role, name, str(b["role"]))
            if "password" in b:
                await asyncio.to_thread(c.users.set_password, name, str(b["password"]))
            if "disabled" in b:
                if not isinstance(b["disabled"], bool):
                    raise HTTPException(400, "key 'disabled': expected true or false")
                await asyncio.to_thread(c.users.set_disabled, name, b["disabled"])
        except UserError as exc:
            raise HTTPException(400 if "no user" not in str(exc) else 404, str(exc)) from None
        c.sessions.forget()
        return json_response({"name": name})

    async def my_password(request: Request) -> Response:
        s = c.need_change(request, "view", request.headers.get("x-csrf-token"))
        if not s.token_hash:
            raise HTTPException(403, "the kiosk has no password")
        b = await _body(request)
        current, new = b.get("current"), b.get("new")
        if not isinstance(current, str) or not isinstance(new, str):
            raise HTTPException(400, "keys 'current', 'new': expected strings")
        got = await c.gate.login(s.user, current[:1024], request.client.host if request.client else "-")
        if isinstance(got, int):
            raise HTTPException(429, f"too many attempts: try again in {got} s")
        if got is None:
            raise HTTPException(403, "the current password is wrong")
        c.sessions.logout(got[0])  # the check made a session of its own: drop it
        try:
            await asyncio.to_thread(c.users.set_password, s.user, new, s.token_hash)
        except UserError as exc:
            raise HTTPException(400, str(exc)) from None
        c.sessions.forget()
        return json_response({"name": s.user})

    return [
        Route("/admin", page),
        Route("/account", account),
        Route("/api/users", list_users, methods=["GET"]),
        Route("/api/users", add_user, methods=["POST"]),
        Route("/api/users/{name:str}", change_user, methods=["POST"]),
        Route("/api/me/password", my_password, methods=["POST"]),
    ]
