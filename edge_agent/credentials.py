"""Files the config points at that hold or guard secrets: the MQTT password file and the TLS files.

Errors name the config key and the file, never the contents (they reach the journal and, on a
refused reload, the `errors` topic).
"""

from __future__ import annotations

import os

from .errors import ConfigError


def read_password_file(path: str, key: str = "broker.password_file") -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # from None: the exception would quote the undecodable bytes (part of the secret).
        raise ConfigError(f"{key}: {path} is not UTF-8 text (contents not shown)") from None
    password = text.rstrip("\r\n")
    if not password:
        raise ConfigError(f"{key}: {path} is empty")
    if "\n" in password or "\r" in password:
        raise ConfigError(f"{key}: {path} holds more than one line; it must hold only the password")
    return password


def check_tls_files(ca: str | None, cert: str | None, key: str | None) -> None:
    """Each configured TLS file exists and is readable, or a ConfigError names it (ssl's own errors
    do not say which file, and a missing one surfaces as a bare 'No such file or directory')."""
    for name, path in (("broker.tls.ca", ca), ("broker.tls.cert", cert), ("broker.tls.key", key)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{name}: cannot read {path}: {e.strerror}") from None
