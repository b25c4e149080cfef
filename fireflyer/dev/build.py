"""Build (or reuse) the control-plane binaries, cached outside the repository by version."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WRAPPER_MODULE = REPO_ROOT / "hack" / "control-plane"

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the go.etcd.io/etcd/server/v3 version that Kubernetes v1.36.3 pins
# kwok and helm need k8s.io/* versions of their own (kwok 0.36.1, helm 0.37.0), so they are built
# from their own modules at a pinned tag instead of inside the wrapper module.
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.22.0"

BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "helm")


class BuildError(RuntimeError):
    """A binary could not be built; the message says which and why."""


@dataclass(frozen=True)
class BuildTarget:
    name: str
    package: str  # a package path inside the wrapper module, or module@version for `go install`
    ldflags: str
    in_wrapper: bool


def _k8s_ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    fields = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{key}={value}" for key, value in fields.items()]
    return "-s -w " + " ".join(flags)


def targets() -> list[BuildTarget]:
    k8s = _k8s_ldflags()
    return [
        BuildTarget(
            "etcd",
            "./cmd/etcd",
            f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA={ETCD_VERSION}",
            True,
        ),
        BuildTarget("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver", k8s, True),
        BuildTarget("kube-controller-manager", "k8s.io/kubernetes/cmd/kube-controller-manager", k8s, True),
        BuildTarget("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler", k8s, True),
        BuildTarget(
            "kwok",
            f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}",
            f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
            False,
        ),
        BuildTarget(
            "helm",
            f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}",
            f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",
            False,
        ),
    ]


def cache_key() -> str:
    """Versions plus the wrapper module's go.mod/go.sum: any change builds a fresh set."""
    digest = hashlib.sha256()
    for path in ("go.mod", "go.sum", "cmd/etcd/main.go"):
        digest.update((WRAPPER_MODULE / path).read_bytes())
    for target in targets():
        digest.update(f"{target.name}|{target.package}|{target.ldflags}".encode())
    versions = f"k8s-{KUBERNETES_VERSION}_etcd-{ETCD_VERSION}_kwok-{KWOK_VERSION}_helm-{HELM_VERSION}"
    return f"{versions}_{digest.hexdigest()[:12]}"


def cache_root() -> Path:
    base = os.environ.get("FIREFLYER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fireflyer"
    )
    return Path(base) / "bin"


def bin_dir() -> Path:
    return cache_root() / cache_key()


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise BuildError(
            "the Go toolchain is not on PATH: install Go 1.26 or newer "
            "(https://go.dev/dl/) to build the local control plane"
        )
    return go


def _progress(name: str, started: float, done: threading.Event) -> None:
    while not done.wait(15.0):
        print(f"  … building {name}: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)


def _build_one(target: BuildTarget, out_dir: Path, go: str) -> None:
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-buildvcs=false")
    if target.in_wrapper:
        cmd = [go, "build", "-ldflags", target.ldflags, "-o", str(out_dir / target.name), target.package]
        cwd = WRAPPER_MODULE
    else:
        env["GOBIN"] = str(out_dir)
        cmd = [go, "install", "-ldflags", target.ldflags, target.package]
        cwd = out_dir
    started = time.monotonic()
    print(f"building {target.name} ({target.package})", file=sys.stderr, flush=True)
    done = threading.Event()
    ticker = threading.Thread(target=_progress, args=(target.name, started, done), daemon=True)
    ticker.start()
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    finally:
        done.set()
    if result.returncode != 0:
        raise BuildError(f"building {target.name} failed:\n{result.stderr[-4000:]}")
    print(f"built {target.name} in {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)


def ensure_binaries() -> Path:
    """Return the directory holding every binary, building the missing ones first."""
    out = bin_dir()
    missing = [t for t in targets() if not (out / t.name).is_file()]
    if not missing:
        return out
    go = _go()
    staging = out.with_name(out.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    total = time.monotonic()
    for target in missing:
        if not (staging / target.name).is_file():
            _build_one(target, staging, go)
    for target in targets():
        src = staging / target.name
        if src.is_file():
            out.mkdir(parents=True, exist_ok=True)
            os.replace(src, out / target.name)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"control-plane binaries ready in {out} ({time.monotonic() - total:.0f}s)", file=sys.stderr)
    return out
