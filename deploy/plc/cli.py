"""`defectscope plc --config plc.toml`: alarm and per-part reject signals to a Modbus TCP or OPC UA PLC.

Needs the ``plc`` extra (pymodbus, asyncua). HTTP: ``POST /alarms`` (the console's webhook,
HMAC-signed), ``GET /healthz`` (outputs, reject counts, write errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

PROG = "defectscope plc"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="write console alarms and per-part rejects from the "
        "stations' streams to the line PLC (Modbus TCP coils/registers or OPC UA nodes); "
        "config keys in docs/contracts.md, 'PLC bridge'",
    )
    p.add_argument("--config", required=True, help="plc.toml (deploy/plc/examples/plc.toml)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def create_app(bridge):  # noqa: ANN001, ANN201 - starlette types stay local to this optional extra
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from deploy.console.webhook import SIGNATURE
    from deploy.plc.bridge import MAX_BODY

    async def alarms(request: Request) -> Response:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY:
            return Response("body too large\n", 413)
        why = bridge.accept_post(await request.body(), request.headers.get(SIGNATURE))
        bridge.posts["refused" if why else "accepted"] += 1
        if why:
            return Response(why + "\n", 403 if "signature" in why else 400)
        await bridge.write_levels()
        return Response(status_code=204)

    async def healthz(request: Request) -> Response:
        return JSONResponse(bridge.health())

    return Starlette(routes=[Route("/alarms", alarms, methods=["POST"]), Route("/healthz", healthz)])


async def run(cfg) -> None:  # noqa: ANN001
    import uvicorn
    import zmq.asyncio

    from deploy.plc.bridge import Bridge

    bridge = Bridge(cfg)
    ctx = zmq.asyncio.Context()
    tasks = [asyncio.create_task(bridge.levels()), asyncio.create_task(bridge.subscribe(ctx))]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(bridge),
            host=cfg.listen.host,
            port=cfg.listen.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
    )

    def died(task: asyncio.Task) -> None:  # a dead loop must not leave the PLC with frozen signals
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger("defectscope.plc").error("%s stopped: %r; exiting", task.get_name(), task.exception())
            server.should_exit = True

    for t in tasks:
        t.add_done_callback(died)
    try:
        await server.serve()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        bridge.last_post = None
        await bridge.write_levels()  # console_ok false: the PLC knows alarms are no longer forwarded
        await bridge.writer.close()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import asyncua  # noqa: F401
        import pymodbus  # noqa: F401
    except ImportError as exc:
        print(f"{PROG}: {exc.name} is not installed: pip install 'defectscope[plc]'", file=sys.stderr)
        return 2
    from deploy.plc.config import PlcConfigError, load
    from runtime.serving.curve_keys import CurveKeyError, client_keys

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load(args.config)
        if cfg.listen.secret_file is not None:
            cfg.listen.secret_file.read_bytes()
        for i, st in enumerate(cfg.stations):  # a bad key file stops the start, not the subscriber task later
            if st.curve is not None:
                client_keys(st.curve.server_public_key, st.curve.client_secret_key, f"stations[{i}].curve")
    except (PlcConfigError, CurveKeyError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: {args.config}: key 'listen.secret_file': {exc.strerror}", file=sys.stderr)
        return 2
    asyncio.run(run(cfg))
    return 0
