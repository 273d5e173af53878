"""Throw-away TLS material for tests: a CA, a server cert for 127.0.0.1/localhost, optional client certs.

EC P-256 keys: generated in milliseconds (RSA would slow every test that needs a broker).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class TlsFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (cert, key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(path, 0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _issue(subject_cn, public_key, issuer_name, issuer_key, *, ca=False, sans=(), eku=None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_ca(out_dir, cn: str = "test-ca"):
    """Returns (cert_path, key_path, cert, key)."""
    out_dir = Path(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(cn, key.public_key(), _name(cn), key, ca=True)
    return _write_cert(cert, out_dir / "ca.crt"), _write_key(key, out_dir / "ca.key"), cert, key


def make_tls_files(
    out_dir, hosts=("127.0.0.1", "localhost"), client_names=(), server_cn: str = "localhost"
) -> TlsFiles:
    """CA + server cert with `hosts` as SANs (IPs become IP SANs) + one client cert per name (CN=name)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path, ca_cert, ca_key = make_ca(out_dir)

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    skey = ec.generate_private_key(ec.SECP256R1())
    scert = _issue(server_cn, skey.public_key(), ca_cert.subject, ca_key, sans=sans,
                   eku=ExtendedKeyUsageOID.SERVER_AUTH)
    files = TlsFiles(
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=_write_cert(scert, out_dir / "server.crt"),
        server_key=_write_key(skey, out_dir / "server.key"),
    )
    for name in client_names:
        ckey = ec.generate_private_key(ec.SECP256R1())
        ccert = _issue(name, ckey.public_key(), ca_cert.subject, ca_key, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
        files.clients[name] = (
            _write_cert(ccert, out_dir / f"client-{name}.crt"),
            _write_key(ckey, out_dir / f"client-{name}.key"),
        )
    return files
