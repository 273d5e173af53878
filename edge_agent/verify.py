"""Bundle verification on the device: signature first, then every file hash, then nothing extra.

Format contract: docs/bundle.md. Torch-free: stdlib + `cryptography` (imported only when a signature
is actually checked). A bundle that fails here must never be loaded, so every failure is a BundleError
whose message names the file or field at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath

from .errors import BundleError

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SUPPORTED_FORMAT_VERSIONS = (1,)
REQUIRED_FIELDS = (
    "format_version", "model_version", "task_kind", "feature_names", "input_shape",
    "max_support", "state_size", "files",
)
_SIG_LEN = 64  # Ed25519 raw signature


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_bundle(bundle_dir, public_key_path=None, allow_unsigned: bool = False, isolate_signature: bool = False) -> dict:
    """Return the parsed manifest of a bundle that passes every check, else raise BundleError.

    Without `allow_unsigned`, a signature and a public key are both mandatory. With it, an unsigned
    bundle is accepted (hashes still checked); a signed one is still checked if a key is given.
    `isolate_signature` (the daemon): the signature is checked by a short-lived child process.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle directory {bundle} does not exist or is not a directory")
    manifest_path = bundle / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"missing {MANIFEST_NAME} in bundle {bundle}")
    manifest_bytes = manifest_path.read_bytes()

    # Signature before anything else looks at the manifest: until then its contents are untrusted.
    sig_path = bundle / SIGNATURE_NAME
    if sig_path.exists():
        if public_key_path is not None:
            check = _check_signature_in_child if isolate_signature else _check_signature
            check(manifest_bytes, sig_path, Path(public_key_path))
        elif not allow_unsigned:
            raise BundleError(
                f"bundle {bundle} is signed but no public key was given to check {SIGNATURE_NAME}"
            )
    elif not allow_unsigned:
        raise BundleError(
            f"missing {SIGNATURE_NAME} in bundle {bundle}: unsigned bundles are refused "
            "(use --allow-unsigned only for development)"
        )
    elif public_key_path is not None:
        # A key was configured, so the operator expects signed bundles; unsigned is still allowed
        # explicitly, but say so loudly.
        # Logged, not printed: under the agent it becomes a <4> line like every other (journald levels).
        import logging

        logging.getLogger(__name__).warning("bundle %s is unsigned; accepted because of allow_unsigned", bundle)

    manifest = _parse_manifest(manifest_bytes)
    files = manifest["files"]
    _check_listing(bundle, files)
    for name, expected in files.items():
        actual = file_sha256(bundle / name)
        if actual != expected.lower():
            raise BundleError(f"{name}: sha256 mismatch (manifest says {expected}, file is {actual})")
    return manifest


def _check_signature(manifest_bytes: bytes, sig_path: Path, key_path: Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key_bytes = key_path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read public key {key_path}: {e.strerror or e}") from None
    try:
        key = load_pem_public_key(key_bytes)
    except (ValueError, TypeError) as e:
        raise BundleError(f"public key {key_path} is not a valid PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {key_path} is not an Ed25519 key")

    sig = sig_path.read_bytes()
    if len(sig) != _SIG_LEN:
        raise BundleError(f"{SIGNATURE_NAME} is {len(sig)} bytes, expected a raw {_SIG_LEN}-byte Ed25519 signature")
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise BundleError(
            f"signature invalid: {SIGNATURE_NAME} does not match {MANIFEST_NAME} under public key {key_path} "
            "(manifest tampered with, or signed with a different key)"
        ) from None


def _check_signature_in_child(manifest_bytes: bytes, sig_path: Path, key_path: Path) -> None:
    """`_check_signature` in a child process, for the long-running daemon.

    `cryptography` maps its own OpenSSL: ~6 MiB of RSS for the rest of the process's life, for a check
    that takes milliseconds at start and at bundle swaps. The child checks exactly the bytes this
    process read and will parse (sent on stdin), so a manifest replaced in between cannot slip through.
    """
    cmd = [sys.executable, "-m", "edge_agent.verify", "--check-signature", str(sig_path), str(key_path)]
    try:
        proc = subprocess.run(cmd, input=manifest_bytes, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BundleError(f"signature check could not run ({type(e).__name__}: {e})") from None
    if proc.returncode == 0:
        return
    lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode == BundleError.exit_code and lines:
        raise BundleError(lines[-1])
    detail = lines[-1] if lines else "no output"
    raise BundleError(f"signature check process failed with exit code {proc.returncode}: {detail}")


def _signature_child(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "--check-signature":
        print("usage: python -m edge_agent.verify --check-signature SIG KEY < manifest", file=sys.stderr)
        return 2
    try:
        _check_signature(sys.stdin.buffer.read(), Path(argv[1]), Path(argv[2]))
    except BundleError as e:
        print(str(e).replace("\n", " "), file=sys.stderr)
        return e.exit_code
    return 0


def _reject_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            # Two parsers could pick different values for a duplicated key; refuse the ambiguity.
            raise BundleError(f"{MANIFEST_NAME} has duplicate key {k!r}")
        d[k] = v
    return d


def _parse_manifest(manifest_bytes: bytes) -> dict:
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except UnicodeDecodeError as e:
        raise BundleError(f"{MANIFEST_NAME} is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{MANIFEST_NAME} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_NAME} must be a JSON object, got {type(manifest).__name__}")

    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise BundleError(f"{MANIFEST_NAME} is missing required field(s): {', '.join(missing)}")
    version = manifest["format_version"]
    if isinstance(version, bool) or version not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{MANIFEST_NAME} has unsupported format_version {version!r} "
            f"(this agent supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))})"
        )

    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{MANIFEST_NAME} field 'files' must be a non-empty object of name -> sha256")
    for name, digest in files.items():
        _check_name(name)
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)):
            raise BundleError(f"{MANIFEST_NAME} files[{name!r}] is not a sha256 hex digest: {digest!r}")
    return manifest


def _check_name(name: str) -> None:
    """File names are relative POSIX paths that stay inside the bundle directory."""
    bad = (
        not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise BundleError(f"{MANIFEST_NAME} lists unsafe file name {name!r} (path traversal or malformed path)")
    if name in (MANIFEST_NAME, SIGNATURE_NAME):
        raise BundleError(f"{MANIFEST_NAME} must not list {name} in 'files'")


def _check_listing(bundle: Path, files: dict) -> None:
    for name in files:
        path = bundle / PurePosixPath(name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise BundleError(f"{name}: listed in {MANIFEST_NAME} but missing from the bundle") from None
        # Symlinks could point anywhere and change after the check; a bundle holds plain files only.
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{name}: not a regular file (symlinks and special files are refused)")

    listed = set(files)
    extra = []
    for root, dirs, names in os.walk(bundle):
        rel_root = Path(root).relative_to(bundle)
        for n in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = (rel_root / n).as_posix()
            if rel not in listed and rel not in (MANIFEST_NAME, SIGNATURE_NAME):
                extra.append(rel)
    if extra:
        raise BundleError(f"unlisted file(s) in bundle, not in {MANIFEST_NAME}: {', '.join(sorted(extra))}")


def main_verify(bundle_dir, public_key=None, allow_unsigned: bool = False) -> int:
    """CLI body of `edge-agent verify`: one line on stdout (OK) or stderr (error), exit code."""
    try:
        manifest = verify_bundle(bundle_dir, public_key, allow_unsigned)
    except BundleError as e:
        print(f"FAILED {bundle_dir}: {e}", file=sys.stderr)
        return e.exit_code
    signed = "signed" if public_key is not None and (Path(bundle_dir) / SIGNATURE_NAME).exists() else "UNSIGNED/unchecked"
    print(f"OK {bundle_dir}: model_version {manifest.get('model_version')} ({signed}, {len(manifest['files'])} files)")
    return 0


if __name__ == "__main__":
    sys.exit(_signature_child(sys.argv[1:]))
