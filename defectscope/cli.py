"""The one `defectscope` command.

Each subcommand's parser and ``main(argv) -> int`` live in its own package; this
module only maps names to ``"module:function"`` strings and imports the target
when the subcommand runs, so ``defectscope serve`` on a station never imports
torch, and ``defectscope --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# name -> (target "module:function", one-line help, pip extra that provides it)
COMMANDS: dict[str, tuple[str, str, str | None]] = {}


def command(name: str, target: str, help: str, extra: str | None = None) -> None:
    """Register a subcommand; refuses duplicates."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} registered twice")
    COMMANDS[name] = (target, help, extra)


command(
    "demo", "defectscope.demo:main", "end-to-end demo: ELPV -> train -> export -> INT8 -> serve over ZeroMQ", "train"
)
command("train", "defectscope.tasks:train", "fine-tune a defect classifier or Faster R-CNN detector", "train")
command(
    "evaluate",
    "defectscope.tasks:evaluate",
    "evaluate a classifier or detector checkpoint on a data split (optionally with TTA)",
    "train",
)
command(
    "extend",
    "defectscope.tasks:extend",
    "extend a model (classifier or detector) to a new line / new classes with EWC",
    "train",
)
command("export", "defectscope.tasks:export", "export a checkpoint to an ONNX model bundle", "train")
command(
    "calibrate",
    "defectscope.tasks:calibrate",
    "INT8-quantize a bundle with a calibration set and an accuracy gate",
    "train",
)
command("build-engine", "calibration.engine_cli:main", "build a TensorRT engine into a bundle (on the device)", None)
command("bundle", "runtime.bundle.cli:main", "inspect / verify / pack a model bundle", None)
command("serve", "runtime.serving.serve_cli:main", "run the inspection daemon for one station config", None)
command("reload", "runtime.serving.reload_cli:main", "ask a running daemon to reload its model bundle", None)
command(
    "doctor",
    "runtime.tools.doctor_cli:main",
    "report this station's OpenCV/GStreamer/ONNX Runtime/TensorRT/CUDA and the features they enable",
    None,
)
command("watch", "runtime.tools.viewer:main", "live terminal view of a station's verdict stream", None)
command("deploy", "deploy.cli:main", "install / rollback / status / prune bundles and units on a station", None)
command("console", "deploy.console.cli:main", "web console for line operators: live tiles, history, review", "console")
command("dataset", "deploy.console.dataset:main", "export reviewed console snapshots as a training dataset", "console")
command(
    "plc",
    "deploy.plc.cli:main",
    "write console alarms and per-part rejects to the line PLC (Modbus TCP / OPC UA)",
    "plc",
)


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: defectscope <command> [options]",
        "",
        "DefectScope: open edge inspection for factory lines.",
        "",
        "commands:",
    ]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h, _) in COMMANDS.items()]
    lines += ["", "Run `defectscope <command> --help` for a command's options."]
    return "\n".join(lines)


def resolve(name: str) -> Callable[[list[str]], int]:
    """Import and return a subcommand's ``main``; a missing extra is a clear error."""
    target, _, extra = COMMANDS[name]
    return load(target, name, extra)


def load(target: str, name: str, extra: str | None = "train") -> Callable[[list[str]], int]:
    """Import ``"module:function"`` for the command ``name``; a missing extra is a clear error."""
    module_name, func = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top in {"defectscope", "training", "calibration", "runtime", "deploy"}:
            raise
        hint = f"pip install 'defectscope[{extra}]'" if extra else "pip install defectscope"
        raise SystemExit(
            f"defectscope {name}: needs the Python package {exc.name!r}, which is not installed here.\n"
            f"Install it with: {hint}"
        ) from None
    main: Callable[[list[str]], int] = getattr(module, func)
    return main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from defectscope import __version__

        print(f"defectscope {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"defectscope: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(resolve(name)(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
