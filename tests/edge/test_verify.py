"""Bundle verification: every way a bundle can be wrong is refused with a message naming the problem."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.errors import BundleError
from edge_agent.verify import main_verify, verify_bundle
from export.signing import file_sha256, generate_keypair, sign_manifest

REPO = Path(__file__).resolve().parents[2]

FILES = {"adapt.onnx": b"adapt-graph", "predict.onnx": b"predict-graph", "init_state.npy": b"\x93NUMPY..."}


def _manifest(files: dict) -> dict:
    return {
        "format_version": 1,
        "model_version": "0123456789abcdef",
        "task_kind": "regression",
        "feature_names": ["temperature", "pressure"],
        "input_shape": [2],
        "class_names": None,
        "max_support": 64,
        "state_size": 3,
        "files": files,
    }


def _write_bundle(d: Path, manifest: dict | None = None, files: dict = FILES) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    if manifest is None:
        manifest = _manifest({n: file_sha256(d / n) for n in files})
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return d


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def bundle(tmp_path, keys):
    b = _write_bundle(tmp_path / "bundle")
    sign_manifest(b, keys[0])
    return b


def _refused(bundle, pub, *words, allow_unsigned=False):
    with pytest.raises(BundleError) as e:
        verify_bundle(bundle, pub, allow_unsigned=allow_unsigned)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_keypair_files(keys):
    priv, pub = keys
    assert priv.name == "signing_key.pem" and pub.name == "signing_key.pub.pem"
    assert os.stat(priv).st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in priv.read_bytes()  # PKCS#8
    assert b"BEGIN PUBLIC KEY" in pub.read_bytes()  # SubjectPublicKeyInfo
    with pytest.raises(FileExistsError):
        generate_keypair(priv.parent)


def test_valid_bundle_passes(bundle, keys):
    m = verify_bundle(bundle, keys[1])
    assert m["model_version"] == "0123456789abcdef"
    assert len((bundle / "manifest.sig").read_bytes()) == 64


def test_tampered_file(bundle, keys):
    (bundle / "predict.onnx").write_bytes(b"evil-graph")
    _refused(bundle, keys[1], "predict.onnx", "sha256 mismatch")


def test_wrong_key(bundle, tmp_path):
    _, other_pub = generate_keypair(tmp_path / "other")
    _refused(bundle, other_pub, "signature invalid")


def test_missing_signature(bundle, keys):
    (bundle / "manifest.sig").unlink()
    _refused(bundle, keys[1], "missing manifest.sig")


def test_signed_but_no_key_given(bundle):
    _refused(bundle, None, "no public key")


def test_tampered_manifest(bundle, keys):
    m = json.loads((bundle / "manifest.json").read_text())
    m["max_support"] = 10_000
    (bundle / "manifest.json").write_text(json.dumps(m))
    _refused(bundle, keys[1], "signature invalid", "manifest")


def test_truncated_signature(bundle, keys):
    (bundle / "manifest.sig").write_bytes(b"\x00" * 10)
    _refused(bundle, keys[1], "manifest.sig", "64")


def test_signature_checked_before_hashes(bundle, keys, tmp_path):
    (bundle / "adapt.onnx").write_bytes(b"tampered")
    _, other_pub = generate_keypair(tmp_path / "other")
    _refused(bundle, other_pub, "signature invalid")


def test_extra_file(bundle, keys):
    (bundle / "backdoor.py").write_bytes(b"print('hi')")
    _refused(bundle, keys[1], "unlisted", "backdoor.py")


def test_extra_file_in_subdir(bundle, keys):
    (bundle / "sub").mkdir()
    (bundle / "sub" / "x.bin").write_bytes(b"x")
    _refused(bundle, keys[1], "unlisted", "sub/x.bin")


def test_missing_file(bundle, keys):
    (bundle / "init_state.npy").unlink()
    _refused(bundle, keys[1], "init_state.npy", "missing")


def test_symlinked_file_refused(tmp_path, keys):
    b = _write_bundle(tmp_path / "b")
    target = tmp_path / "outside.bin"
    target.write_bytes(FILES["adapt.onnx"])
    (b / "adapt.onnx").unlink()
    (b / "adapt.onnx").symlink_to(target)
    sign_manifest(b, keys[0])
    _refused(b, keys[1], "adapt.onnx", "not a regular file")


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/passwd", "a/../../x", "a\\b", "./x", ""])
def test_path_traversal(tmp_path, keys, name):
    b = _write_bundle(tmp_path / "b", _manifest({name: "0" * 64}), files={})
    sign_manifest(b, keys[0])
    _refused(b, keys[1], "unsafe file name")


def test_missing_manifest(tmp_path, keys):
    (tmp_path / "b").mkdir()
    _refused(tmp_path / "b", keys[1], "missing manifest.json")


def test_not_a_directory(tmp_path, keys):
    _refused(tmp_path / "nope", keys[1], "does not exist")


@pytest.mark.parametrize(
    "text,words",
    [
        ("{not json", ("not valid JSON",)),
        ("[1, 2]", ("JSON object",)),
        ('{"format_version": 1}', ("missing required field", "model_version", "files")),
        ('{"a": 1, "a": 2}', ("duplicate key",)),
    ],
)
def test_bad_manifest(tmp_path, keys, text, words):
    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text(text)
    sign_manifest(b, keys[0])  # signed, so it is the content check that fires
    _refused(b, keys[1], *words)


def test_unsupported_format_version(tmp_path, keys):
    m = _manifest({})
    m["format_version"] = 2
    b = _write_bundle(tmp_path / "b", m, files={})
    sign_manifest(b, keys[0])
    _refused(b, keys[1], "unsupported format_version", "2")


def test_bad_public_key_file(bundle, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    _refused(bundle, bad, "bad.pem", "not a valid PEM")
    _refused(bundle, tmp_path / "absent.pem", "cannot read public key")


def test_allow_unsigned(tmp_path, keys):
    b = _write_bundle(tmp_path / "b")
    assert verify_bundle(b, None, allow_unsigned=True)["model_version"] == "0123456789abcdef"
    assert verify_bundle(b, keys[1], allow_unsigned=True)["model_version"] == "0123456789abcdef"
    _refused(b, None, "missing manifest.sig")
    # --allow-unsigned does not switch off hashes
    (b / "adapt.onnx").write_bytes(b"tampered")
    _refused(b, None, "adapt.onnx", "sha256 mismatch", allow_unsigned=True)


def test_allow_unsigned_still_checks_a_present_signature(bundle, tmp_path):
    _, other_pub = generate_keypair(tmp_path / "other")
    _refused(bundle, other_pub, "signature invalid", allow_unsigned=True)


def test_main_verify_exit_codes(bundle, keys, capsys):
    assert main_verify(bundle, keys[1]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "0123456789abcdef" in out and out.count("\n") == 1

    (bundle / "predict.onnx").write_bytes(b"evil")
    assert main_verify(bundle, keys[1]) == BundleError.exit_code == 3
    err = capsys.readouterr().err
    assert "predict.onnx" in err and err.count("\n") == 1


def test_main_verify_unsigned(tmp_path, capsys):
    b = _write_bundle(tmp_path / "b")
    assert main_verify(b, None) == 3
    assert "manifest.sig" in capsys.readouterr().err
    assert main_verify(b, None, allow_unsigned=True) == 0


def test_verify_does_not_import_torch(bundle, keys):
    code = (
        "import sys; import edge_agent.verify as v; "
        f"v.verify_bundle({str(bundle)!r}, {str(keys[1])!r}); "
        "bad = [m for m in ('torch', 'meta_train', 'export') if m in sys.modules]; "
        "assert not bad, bad; print('clean')"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "clean" in r.stdout


def _outcome(bundle, pub, isolate):
    try:
        return "ok", verify_bundle(bundle, pub, isolate_signature=isolate)["model_version"]
    except BundleError as e:
        return "refused", str(e)


def test_isolated_signature_check_agrees_with_in_process(bundle, keys, tmp_path):
    """The daemon's child-process check gives the same verdict and message as the in-process one."""
    other = generate_keypair(tmp_path / "other")[1]
    not_a_key = tmp_path / "junk.pem"
    not_a_key.write_text("not a key")
    assert _outcome(bundle, keys[1], True) == _outcome(bundle, keys[1], False) == ("ok", "0123456789abcdef")
    for pub in (other, not_a_key, tmp_path / "missing.pem"):
        isolated, direct = _outcome(bundle, pub, True), _outcome(bundle, pub, False)
        assert isolated[0] == "refused" and isolated == direct
    (bundle / "manifest.sig").write_bytes(b"\0" * 10)
    isolated = _outcome(bundle, keys[1], True)
    assert isolated[0] == "refused" and "10 bytes" in isolated[1] and isolated == _outcome(bundle, keys[1], False)


def test_isolated_check_verifies_the_bytes_the_daemon_read(bundle, keys):
    """The child checks the manifest sent on stdin, not the file: a swap after the read cannot pass."""
    from edge_agent.verify import _check_signature_in_child

    good = (bundle / "manifest.json").read_bytes()
    _check_signature_in_child(good, bundle / "manifest.sig", keys[1])
    with pytest.raises(BundleError, match="signature invalid"):
        _check_signature_in_child(good.replace(b"temperature", b"temperatura"), bundle / "manifest.sig", keys[1])


def test_daemon_verification_keeps_cryptography_out_of_the_process(bundle, keys):
    code = (
        "import sys; from edge_agent.model import load_manifest; "
        f"m = load_manifest({str(bundle)!r}, {str(keys[1])!r}, False); "
        "assert 'cryptography' not in sys.modules; print(m['model_version'])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0123456789abcdef"
