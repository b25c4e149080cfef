"""The first process inside a pod's namespaces: build the pod's file system view, then exec the
container's command.

It runs as pid 1 of a fresh pid namespace, in a private mount namespace and the pod's network
namespace. The root it builds is an overlay whose lower layer is this machine's root (images are
not pulled: the pod runs programs installed here) and whose upper layer is the pod's own, so the
pod can create its mount points and write anywhere without touching this machine's files. The
volumes, /etc/hosts and /etc/resolv.conf are bind-mounted over it, /proc is the pod's own, and
the process chroots into it.

Run: python -m fireflyer.dev.runtime.sandbox SPEC.json
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# Mounts of this machine that the pod sees as they are (the overlay shows only the root file
# system itself, not what is mounted on top of it).
KEEP_HOST_MOUNTS = ("/sys",)
# The pod's /dev is its own tmpfs with these devices of this machine bound in, as a container
# runtime gives it: files a pod creates there (its termination log) stay the pod's.
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def _mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"sandbox: mount {' '.join(args)}: {result.stderr.strip()}")


def _host_submounts() -> list[str]:
    """Mount points of this machine below / other than the kernel file systems handled here."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == "/" or any(
            point == p or point.startswith(p + "/") for p in (*KEEP_HOST_MOUNTS, "/proc", "/dev")
        ):
            continue
        if point.startswith("/run/netns"):
            continue
        points.append(point)
    # Outermost first; nested ones come along with --rbind.
    points.sort(key=len)
    kept: list[str] = []
    for point in points:
        if not any(point.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(point)
    return kept


def _target(root: Path, path: str, is_file: bool) -> Path:
    target = root / path.lstrip("/")
    if is_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.touch()
    else:
        target.mkdir(parents=True, exist_ok=True)
    return target


def build_root(spec: dict[str, Any]) -> Path:
    pod_dir = Path(spec["podDir"])
    upper, work, root = pod_dir / "upper", pod_dir / "work", pod_dir / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    submounts = _host_submounts()  # before the pod's own mounts join the list
    _mount("--make-rprivate", "/")
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/,upperdir={upper},workdir={work}", str(root))
    for point in KEEP_HOST_MOUNTS:
        _mount("--rbind", point, str(_target(root, point, False)))
    _mount("-t", "proc", "proc", str(_target(root, "/proc", False)))
    _mount("-t", "tmpfs", "-o", "mode=755,size=1m", "dev", str(_target(root, "/dev", False)))
    for device in DEVICES:
        _mount("--bind", f"/dev/{device}", str(_target(root, f"/dev/{device}", True)))
    _mount("--rbind", "/dev/pts", str(_target(root, "/dev/pts", False)))
    for name, points_to in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        (root / "dev" / name).symlink_to(points_to)
    _mount("-t", "tmpfs", "-o", "size=64m", "shm", str(_target(root, "/dev/shm", False)))
    for point in submounts:
        source = Path(point)
        if source.exists():
            _mount("--rbind", point, str(_target(root, point, source.is_file())))
    for mount in spec["mounts"]:
        target = _target(root, mount["target"], mount.get("file", False))
        if mount["kind"] == "tmpfs":
            size = mount.get("size")
            _mount("-t", "tmpfs", *(["-o", f"size={size}"] if size else []), "tmpfs", str(target))
        else:
            _mount("--rbind", mount["source"], str(target))
        if mount.get("readOnly"):
            _mount("-o", "remount,bind,ro", str(target))
    for path in shadowed_software([m["target"] for m in spec["mounts"]], software_paths()):
        # A pod volume (an emptyDir at /tmp, say) over the directory the programs run from:
        # the pod must still find them, as it would in its image.
        _mount("--rbind", path, str(_target(root, path, False)))
    return root


def software_paths() -> list[str]:
    """Where the pod's programs come from on this machine: this Python environment and the
    source tree of an editable install."""
    import fireflyer

    return sorted({sys.prefix, str(Path(fireflyer.__file__).resolve().parents[1])})


def shadowed_software(targets: list[str], software: list[str]) -> list[str]:
    """The software paths that a mount at one of `targets` hides (the target is the path or one
    of its parents), outermost first, without paths inside another one returned."""
    hidden = [
        path
        for path in software
        if any(path == t.rstrip("/") or path.startswith(t.rstrip("/") + "/") for t in targets if t != "/")
    ]
    return [p for p in sorted(hidden) if not any(p != q and p.startswith(q + "/") for q in hidden)]


def main(argv: list[str]) -> None:
    spec = json.loads(Path(argv[1]).read_text())
    root = build_root(spec)
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"][:63])
    os.chroot(root)
    cwd = spec.get("workingDir") or "/"
    Path(cwd).mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    command = spec["argv"]
    child = os.fork()
    if child == 0:
        try:
            os.execvpe(command[0], command, spec["env"])
        except OSError as exc:
            print(f"sandbox: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
            os._exit(127)
    raise SystemExit(_init(child))


def _init(child: int) -> int:
    """pid 1's duties, as tini does them: a pid 1 ignores SIGTERM unless it handles it, so the
    command runs as its child, gets the signals pid 1 receives, and orphans are reaped."""
    for signum in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    ):
        signal.signal(signum, lambda received, _frame: os.kill(child, received))
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    main(sys.argv)
