"""Ed25519 bundle signatures (detached ``<bundle>.sig`` JSON files).

The signature covers the bytes of ``manifest.json``. The manifest lists the sha256
of every model file, so a valid signature plus passing checksums authenticates
the whole bundle, and the signature survives ``bundle pack``/``unpack`` (which copy
the manifest byte for byte). A station configured with public keys refuses a
bundle whose signature is missing, made with an unknown key, or does not match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.config import DeployError

SIGNATURE_SCHEMA = 1
ALGORITHM = "ed25519"
# Domain separation: a signature over a bundle manifest can never be replayed as
# a signature over anything else made with the same key.
CONTEXT = b"defectscope-bundle-manifest-v1\x00"


class SignatureError(DeployError):
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
        raise DeployError("bundle signing needs the 'cryptography' package: pip install 'defectscope[deploy]'") from None
    return serialization, ed25519, InvalidSignature


def key_id(public_key: Any) -> str:
    """Short fingerprint of a public key: sha256 of its raw 32 bytes, first 16 hex digits."""
    serialization, _, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path | None = None, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair as PEM (private key mode 0600); returns paths and key id."""
    serialization, ed25519, _ = _crypto()
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise DeployError(f"{p}: already exists; refusing to overwrite a key (use --force)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, key_id(key.public_key())


def load_private_key(path: Path) -> Any:
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise DeployError(f"{path}: not a readable unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DeployError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Any:
    serialization, ed25519, _ = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise DeployError(f"{path}: not a readable PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise DeployError(f"{path}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def _message(manifest_bytes: bytes) -> bytes:
    return CONTEXT + hashlib.sha256(manifest_bytes).digest()


def sign_manifest(manifest_bytes: bytes, private_key: Any) -> dict[str, Any]:
    """The signature document for a manifest (JSON-serialisable)."""
    manifest = json.loads(manifest_bytes)
    model = manifest.get("model", {}) if isinstance(manifest, dict) else {}
    return {
        "schema_version": SIGNATURE_SCHEMA,
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signed_file": "manifest.json",
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "model": {"name": model.get("name"), "version": model.get("version")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "signature": base64.b64encode(private_key.sign(_message(manifest_bytes))).decode("ascii"),
    }


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
        raise SignatureError("missing", f"no signature file {path}; this station only installs signed bundles") from None
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


def write_signature(doc: dict[str, Any], path: Path) -> Path:
    """Write a signature document atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
