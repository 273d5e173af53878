"""Bundle signing on the workstation: Ed25519 keys, manifest signature, file hashes.

The device side (edge_agent/verify.py) checks what this writes; the format is in docs/bundle.md.
Only `cryptography` is needed here, so keygen works without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The hash the manifest records is computed by the very function the device checks it with.
from edge_agent.verify import file_sha256  # noqa: F401  (re-exported for export.manifest and tests)

PRIVATE_KEY_NAME = "signing_key.pem"
PUBLIC_KEY_NAME = "signing_key.pub.pem"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"


def generate_keypair(out_dir) -> tuple[Path, Path]:
    """Write `signing_key.pem` (PKCS#8, 0600) and `signing_key.pub.pem` (SubjectPublicKeyInfo) into out_dir.

    Refuses to overwrite an existing private key: losing it would orphan every device that trusts it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / PRIVATE_KEY_NAME, out_dir / PUBLIC_KEY_NAME
    if priv_path.exists():
        raise FileExistsError(f"{priv_path} already exists; refusing to overwrite a signing key")

    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv_pem)
    os.chmod(priv_path, 0o600)  # umask cannot widen it, but be explicit

    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def load_private_key(private_key_path) -> Ed25519PrivateKey:
    data = Path(private_key_path).read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{private_key_path} is not an Ed25519 private key")
    return key


def sign_manifest(bundle_dir, private_key_path) -> Path:
    """Write manifest.sig: raw 64-byte Ed25519 signature over the exact bytes of manifest.json.

    Call this last: any later change to manifest.json invalidates the signature.
    """
    bundle_dir = Path(bundle_dir)
    manifest_bytes = (bundle_dir / MANIFEST_NAME).read_bytes()
    sig = load_private_key(private_key_path).sign(manifest_bytes)
    sig_path = bundle_dir / SIGNATURE_NAME
    sig_path.write_bytes(sig)
    return sig_path
