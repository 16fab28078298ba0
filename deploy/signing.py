"""Signing bundles and making keys (the workstation side of ``runtime.bundle.signature``).

What is signed and how a station verifies it is described in ``runtime/bundle/signature.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.config import DeployError
from runtime.bundle.signature import (  # noqa: F401  (re-exported: one verifier, station side)
    ALGORITHM,
    CONTEXT,
    SIGNATURE_SCHEMA,
    SignatureError,
    VerifiedSignature,
    _crypto,
    _message,
    default_signature_path,
    key_id,
    load_public_key,
    read_signature,
    verify_manifest,
)
from runtime.fsio import atomic_write_text


def generate_keypair(
    private_path: Path, public_path: Path | None = None, overwrite: bool = False
) -> tuple[Path, Path, str]:
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
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
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


def write_signature(doc: dict[str, Any], path: Path) -> Path:
    """Write a signature document atomically."""
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
