"""`defectscope bundle`: inspect, verify, pack and unpack model bundles."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.bundle.archive import pack, unpack
from runtime.bundle.load import load_bundle, read_manifest
from runtime.bundle.manifest import BundleError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defectscope bundle",
        description="Inspect, verify, pack or unpack a DefectScope model bundle "
        "(a directory with manifest.json and model files, or its .tar.gz archive).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser(
        "verify",
        help="check schema, every sha256, unlisted files, the ONNX graphs and, when "
        "<bundle>.sig exists, that it matches the manifest; exit 1 if bad",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--public-key",
        type=Path,
        action="append",
        dest="public_keys",
        metavar="PEM",
        help="require a valid signature by this Ed25519 key (repeatable)",
    )
    p.add_argument("--signature", type=Path, default=None, metavar="SIG", help="default: <bundle>.sig")
    p = sub.add_parser("inspect", help="print a bundle's manifest summary (or --json for all of it)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p = sub.add_parser("pack", help="verify a bundle directory and write it as a .tar.gz")
    p.add_argument("bundle", type=Path)
    p.add_argument("archive", type=Path)
    p = sub.add_parser(
        "holdout",
        help="add a held-out sample (FP32 references computed here) that gates INT8 engines built on the station",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help=".npy of preprocessed (N,C,H,W) float32 held-out images")
    p.add_argument("--labels", type=Path, default=None, help=".npy of (N,) class indices (optional)")
    p.add_argument("--limit", type=int, default=256, help="images kept (random subset)")
    p = sub.add_parser("unpack", help="extract and verify a bundle archive into a directory")
    p.add_argument("archive", type=Path)
    p.add_argument("dest", type=Path)
    return parser


def _summary(path: Path) -> str:
    m = read_manifest(path)
    lines = [
        f"bundle     {path}",
        f"model      {m.model.name} {m.model.version} ({m.model.task}, {m.model.architecture or '?'})",
        f"classes    {', '.join(m.classes)}  (good: {', '.join(m.good_classes) or '-'})",
        f"input      {m.input.name} (N,{m.input.channels},{m.input.height},{m.input.width}) "
        f"{m.input.color_order}, {m.input.resize_policy} from {m.input.resize_size}",
        "artifacts",
    ]
    if m.model.task == "detection":
        o = m.output
        lines.insert(
            -1,
            f"output     {', '.join(o.names)} ({o.box_format}, up to {o.max_detections or '?'} per image, "
            f"score threshold {o.score_threshold if o.score_threshold is not None else '-'})"
            + (f", letterbox pad {m.input.pad_value}" if m.input.resize_policy == "letterbox" else ""),
        )
    for key, art in m.artifacts.items():
        star = "*" if key == m.default_artifact else " "
        metrics = m.metrics.get(key, {})
        acc = f"  accuracy {metrics['accuracy']:.4f}" if isinstance(metrics.get("accuracy"), (int, float)) else ""
        lines.append(f"  {star} {key:<10} {art.format:<9} {art.precision:<5} {art.file}{acc}")
    return "\n".join(lines)


def _check_signature(args: argparse.Namespace, path: Path) -> str:
    """With keys: verify the signature. Without: a present .sig's recorded manifest digest must still match."""
    import hashlib

    from runtime.bundle.signature import SignatureError, default_signature_path, read_signature, verify_manifest

    sig = args.signature or default_signature_path(args.bundle)
    data = (path / "manifest.json").read_bytes()
    if args.public_keys:
        v = verify_manifest(data, sig, args.public_keys)
        return f", signature ok ({v.key_id})"
    if not sig.is_file():
        return ", no signature"
    doc = read_signature(sig)
    recorded = doc.get("manifest_sha256")
    if recorded != hashlib.sha256(data).hexdigest():
        raise SignatureError(
            "digest",
            f"{sig} records manifest sha256 {str(recorded)[:12]}..., but {path}/manifest.json "
            "is different: the manifest was modified after signing",
        )
    return f", manifest matches {sig.name} (digest only; give --public-key to check the signature)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "verify":
            bundle = load_bundle(args.bundle)
            note = _check_signature(args, bundle.path)
            print(f"OK {bundle.path}: {len(bundle.manifest.files)} file(s) verified{note}")
        elif args.action == "inspect":
            if args.json:
                print(json.dumps(read_manifest(args.bundle).to_dict(), indent=2))
            else:
                print(_summary(args.bundle))
        elif args.action == "pack":
            print(pack(args.bundle, args.archive))
        elif args.action == "holdout":
            import numpy as np

            from runtime.engine.gate import HOLDOUT_FILE, pack_holdout

            labels = np.load(args.labels, allow_pickle=False) if args.labels else None
            b = pack_holdout(args.bundle, np.load(args.data, allow_pickle=False), labels, limit=args.limit)
            print(f"{b.path / HOLDOUT_FILE}: {b.manifest.provenance['holdout']['n']} images")
        elif args.action == "unpack":
            print(unpack(args.archive, args.dest).path)
    except BundleError as exc:
        print(f"defectscope bundle {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0
