"""Throw-away TLS certificates for tests, made with the ``openssl`` command (no network).

`make_pki(dir)` writes a self-signed CA, a server certificate for 127.0.0.1/localhost and a
client certificate signed by it, and a second, unrelated CA (for "wrong CA" tests).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["Pki", "make_pki", "openssl"]

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl() -> Optional[str]:
    """Path of the openssl command, or None."""
    return shutil.which("openssl")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path


def _run(*args: str, cwd: Path) -> None:
    command = [openssl() or "openssl", *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def _ca(name: str, cwd: Path) -> None:
    _run("req", "-x509", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt",
         "-days", "2", "-subj", f"/CN=mutexowner test {name}", cwd=cwd)  # fmt: skip


def _signed(name: str, cwd: Path, extensions: str) -> None:
    _run("req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
         "-subj", f"/CN=mutexowner test {name}", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
         "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


def make_pki(directory: Path) -> Pki:
    """Write the certificates into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", directory)
    _ca("wrong-ca", directory)
    _signed("server", directory, "subjectAltName=IP:127.0.0.1,DNS:localhost")
    _signed("client", directory, "extendedKeyUsage=clientAuth")
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        wrong_ca=directory / "wrong-ca.crt",
    )
