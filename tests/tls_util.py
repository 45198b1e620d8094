"""Throw-away certificates for TLS tests: a self-signed CA and per-peer certificates signed by it.

Uses the ``openssl`` command line (no Python dependency); tests skip when it is missing, and fail
under ``CI=true``, where ``.ci/run`` installs it. Keys are
EC P-256 (generated in milliseconds, unlike RSA), certificates are valid for one day, and a peer
certificate carries ``CN = <peer name>`` plus subjectAltNames ``IP:<ip>`` and ``DNS:<peer name>``,
so a client checking host names accepts it at ``https://<ip>:port``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

CertPair = tuple[Path, Path]  # (certificate PEM, private key PEM)

_OPENSSL = shutil.which("openssl")

_CA_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no

[dn]
CN = {cn}

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_CSR_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = {cn}
"""

_LEAF_EXTENSIONS = """\
[v3_leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:{ip}, DNS:{name}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str | Path) -> None:
    if _OPENSSL is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true and the openssl command line is not installed")
        pytest.skip("the openssl command line is not installed")
    result = subprocess.run([_OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({result.returncode}):\n{result.stderr}")


def make_ca(tmp_dir: Path, name: str = "p2pdl-test-ca") -> CertPair:
    """A self-signed CA in ``tmp_dir``: ``<name>.pem`` and ``<name>.key``."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    config = tmp_dir / f"{name}.cnf"
    config.write_text(_CA_CONFIG.format(cn=name))
    cert, key = tmp_dir / f"{name}.pem", tmp_dir / f"{name}.key"
    _openssl("req", "-x509", "-config", config, *_EC_KEY, "-keyout", key, "-out", cert, "-days", "1")
    return cert, key


def make_peer_cert(tmp_dir: Path, ca: CertPair, name: str, ip: str = "127.0.0.1") -> CertPair:
    """A certificate for peer ``name`` at ``ip``, signed by ``ca``: ``<ca>-<name>.pem``/``.key``."""
    ca_cert, ca_key = ca
    tmp_dir.mkdir(parents=True, exist_ok=True)
    stem = tmp_dir / f"{ca_cert.stem}-{name}"
    csr_config = stem.with_suffix(".csr.cnf")
    csr_config.write_text(_CSR_CONFIG.format(cn=name))
    extensions = stem.with_suffix(".ext.cnf")
    extensions.write_text(_LEAF_EXTENSIONS.format(ip=ip, name=name))
    cert, key, csr = stem.with_suffix(".pem"), stem.with_suffix(".key"), stem.with_suffix(".csr")
    _openssl("req", "-new", "-config", csr_config, *_EC_KEY, "-keyout", key, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
        "-set_serial", str(secrets.randbits(63)), "-days", "1",
        "-extfile", extensions, "-extensions", "v3_leaf", "-out", cert,
    )  # fmt: skip
    return cert, key


def encrypt_key(key: Path, out: Path, passphrase: str = "test-passphrase") -> Path:
    """A copy of ``key`` encrypted with ``passphrase`` (PKCS#8, AES-256), to test refusal."""
    _openssl("pkcs8", "-topk8", "-in", key, "-out", out, "-v2", "aes-256-cbc", "-passout", f"pass:{passphrase}")
    return out
