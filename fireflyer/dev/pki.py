"""A throwaway PKI for the local control plane, made with the openssl command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# Client identities: (file stem, common name, organisation). system:masters gives the admin and
# kwok full access; the controller manager and scheduler get their built-in RBAC roles.
CLIENTS = (
    ("admin", "fireflyer-admin", "system:masters"),
    ("controller-manager", "system:kube-controller-manager", ""),
    ("scheduler", "system:kube-scheduler", ""),
    ("kwok", "kwok-controller", "system:masters"),
)


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is required to generate the dev cluster's certificates")
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True)


def generate(pki: Path) -> None:
    """CA, apiserver serving cert for loopback, client certs and the service-account key pair."""
    if (pki / "ca.crt").exists() and all((pki / f"{c[0]}.crt").exists() for c in CLIENTS):
        return
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("genrsa", "-out", "ca.key", "2048", cwd=pki)
    _openssl(
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-key",
        "ca.key",
        "-sha256",
        "-days",
        "3650",
        "-subj",
        "/CN=fireflyer-dev-ca",
        "-out",
        "ca.crt",
        cwd=pki,
    )
    (pki / "apiserver.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,"
        "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
    )
    (pki / "client.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    _sign(pki, "apiserver", "/CN=kube-apiserver", "apiserver.ext")
    for stem, cn, org in CLIENTS:
        subject = f"/CN={cn}" + (f"/O={org}" if org else "")
        _sign(pki, stem, subject, "client.ext")
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _sign(pki: Path, stem: str, subject: str, ext: str) -> None:
    _openssl("genrsa", "-out", f"{stem}.key", "2048", cwd=pki)
    _openssl("req", "-new", "-key", f"{stem}.key", "-subj", subject, "-out", f"{stem}.csr", cwd=pki)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{stem}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{stem}.crt",
        "-days",
        "3650",
        "-sha256",
        "-extfile",
        ext,
        cwd=pki,
    )


def kubeconfig(server: str, pki: Path, client: str) -> str:
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: fireflyer-dev\n  cluster:\n    server: {server}\n"
        f"    certificate-authority: {pki / 'ca.crt'}\n"
        f"users:\n- name: {client}\n  user:\n"
        f"    client-certificate: {pki / (client + '.crt')}\n"
        f"    client-key: {pki / (client + '.key')}\n"
        f"contexts:\n- name: fireflyer-dev\n  context:\n    cluster: fireflyer-dev\n    user: {client}\n"
        "current-context: fireflyer-dev\n"
    )
