"""Verifying Ed25519 bundle signatures (detached ``<bundle>.sig`` JSON files); station code.

The signed message is ``CONTEXT + sha256(manifest.json bytes)``. The manifest lists the
sha256 of every file of the bundle and a station refuses any file it does not list, so a
valid signature plus passing checksums authenticates everything installed. The signature
survives ``bundle pack``/``unpack`` (which copy the manifest byte for byte). Signing and key
generation (workstation side) live in ``deploy.signing``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle.manifest import BundleError

SIGNATURE_SCHEMA = 1
ALGORITHM = "ed25519"
# Domain separation: a signature over a bundle manifest can never be replayed as
# a signature over anything else made with the same key.
CONTEXT = b"defectscope-bundle-manifest-v1\x00"


class SignatureError(BundleError):
    """A signature check failed; ``check`` names which one (missing / key / signature / format)."""

    def __init__(self, check: str, message: str):
        super().__init__(f"signature check '{check}' failed: {message}")
        self.check = check


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is in the deploy extra
        raise BundleError(
            "bundle signing needs the 'cryptography' package: pip install 'defectscope[deploy]'"
        ) from None
    return serialization, ed25519, InvalidSignature


def key_id(public_key: Any) -> str:
    """Short fingerprint of a public key: sha256 of its raw 32 bytes, first 16 hex digits."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Any:
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def _message(manifest_bytes: bytes) -> bytes:
    return CONTEXT + hashlib.sha256(manifest_bytes).digest()


def default_signature_path(bundle: Path) -> Path:
    """``<bundle dir or archive>.sig``, beside it."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.name.rstrip("/") + ".sig")


@dataclass(frozen=True)
class VerifiedSignature:
    key_id: str
    key_path: str
    created: str


def read_signature(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SignatureError(
            "missing", f"no signature file {path}; this station only installs signed bundles"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError("format", f"{path}: not a readable signature file: {exc}") from None
    if not isinstance(doc, dict):
        raise SignatureError("format", f"{path}: expected a JSON object")
    for key, kind in (("schema_version", int), ("algorithm", str), ("key_id", str), ("signature", str)):
        if not isinstance(doc.get(key), kind):
            raise SignatureError("format", f"{path}: key {key!r}: expected {kind.__name__}, got {doc.get(key)!r:.60}")
    if doc["schema_version"] != SIGNATURE_SCHEMA or doc["algorithm"] != ALGORITHM:
        raise SignatureError(
            "format",
            f"{path}: unsupported signature (schema {doc['schema_version']}, {doc['algorithm']}); "
            f"this station reads schema {SIGNATURE_SCHEMA} {ALGORITHM}",
        )
    return doc


def verify_manifest(manifest_bytes: bytes, signature_path: Path, public_key_paths: list[Path]) -> VerifiedSignature:
    """Check ``signature_path`` against the manifest bytes with one of the trusted keys.

    Raises SignatureError with ``check`` = missing | format | key | signature.
    """
    _, _, InvalidSignature = _crypto()
    doc = read_signature(signature_path)
    trusted = {}
    for path in public_key_paths:
        key = load_public_key(path)
        trusted[key_id(key)] = (key, path)
    if doc["key_id"] not in trusted:
        raise SignatureError(
            "key",
            f"{signature_path} was made with key {doc['key_id']}, which this station does not trust "
            f"(trusted: {', '.join(f'{k} ({p})' for k, (_, p) in trusted.items())})",
        )
    key, key_path = trusted[doc["key_id"]]
    try:
        raw = base64.b64decode(doc["signature"], validate=True)
    except ValueError:
        raise SignatureError("format", f"{signature_path}: key 'signature' is not base64") from None
    try:
        key.verify(raw, _message(manifest_bytes))
    except InvalidSignature:
        raise SignatureError(
            "signature",
            f"{signature_path} does not match this bundle's manifest.json (sha256 "
            f"{hashlib.sha256(manifest_bytes).hexdigest()[:12]}..., signed "
            f"{str(doc.get('manifest_sha256', '?'))[:12]}...): the manifest was modified after signing",
        ) from None
    return VerifiedSignature(key_id=doc["key_id"], key_path=str(key_path), created=str(doc.get("created", "")))
