"""A pod's volumes as directories on this machine, and the mounts the sandbox makes of them.

ConfigMap, Secret, downward API and projected volumes are written into the pod's directory the
way a kubelet's atomic writer does it, and refreshed while the pod runs (every
VOLUME_SYNC_SECONDS, pod_worker.py): each version of the files goes into a new timestamped
directory, a `..data` symlink is swapped to it with one rename, and the names the pod sees are
symlinks through `..data`. A reader never sees half a file or a mix of two versions in one
directory, and a ConfigMap edit reaches a running pod without a restart, as on a kubelet.
emptyDir is a directory (tmpfs for medium Memory), hostPath is this machine's path, a
PersistentVolumeClaim is the hostPath or local path of the volume bound to it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from fireflyer.dev.runtime.podspec import PodSpecError, decode_secret, field_value

log = logging.getLogger(__name__)

Reader = Callable[[str, str, str], dict[str, Any] | None]
"""(kind, namespace, name) → the object, None when it does not exist."""

DATA_DIR = "..data"
DATA_DIR_TMP = "..data_tmp"
# A kubelet asks for a fresh service-account token once 80% of its hour has passed.
TOKEN_REFRESH_SECONDS = 0.8 * 3600


def _check_paths(files: Mapping[str, str]) -> None:
    """The rules a kubelet applies to volume item paths: relative, no `..` element, no leading
    `..` (those names belong to the writer)."""
    for rel in files:
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or rel.startswith(".."):
            raise PodSpecError(f"volume item path {rel!r} must be relative, without '..'")


def _same_files(data_dir: Path, files: Mapping[str, str], mode: int) -> bool:
    """Whether the version data_dir holds is exactly these files, with this mode."""
    present = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    if present != set(files):
        return False
    for rel, content in files.items():
        path = data_dir / rel
        if path.read_bytes() != content.encode() or path.stat().st_mode & 0o777 != mode:
            return False
    return True


def atomic_write(directory: Path, files: Mapping[str, str], mode: int = 0o644) -> bool:
    """Make directory show exactly these files (relative path → content), as a kubelet's atomic
    writer does; True when anything changed.

    Layout: `..<UTC timestamp>.<random>/` holds one version; `..data` is a symlink to it; each
    top-level name the pod sees is a symlink `name → ..data/name`. A new version is written in
    full into a new timestamped directory and made current by renaming a `..data_tmp` symlink
    over `..data` (atomic), so an open of `directory/name` gets either the old file or the new
    one. Then names that left the payload are removed, and the old version after them."""
    _check_paths(files)
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / DATA_DIR
    old_version = os.readlink(data_link) if data_link.is_symlink() else None
    if (
        old_version is not None
        and (directory / old_version).is_dir()
        and _same_files(directory / old_version, files, mode)
    ):
        return False

    # Go's time format "..2006_01_02_15_04_05." plus a random suffix, as the kubelet names them.
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    version = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    version.chmod(0o755)
    for rel, content in files.items():
        path = version / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode())
        path.chmod(mode)

    wanted = {PurePosixPath(rel).parts[0] for rel in files}
    for name in wanted:
        visible = directory / name
        target = f"{DATA_DIR}/{name}"
        if visible.is_symlink() and os.readlink(visible) == target:
            continue
        if visible.is_dir() and not visible.is_symlink():
            shutil.rmtree(visible)  # something in the way that is not ours
        elif visible.exists() or visible.is_symlink():
            visible.unlink()
        # Dangling until ..data points at a version holding it: an open fails rather than
        # reading anything stale.
        visible.symlink_to(target)

    tmp_link = directory / DATA_DIR_TMP
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(version.name)
    tmp_link.replace(data_link)  # the switch: rename(2) over the old link

    for entry in directory.iterdir():
        if entry.name.startswith("..") or entry.name in wanted:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in directory.iterdir():
        # Every version but the current one: the previous, and any a crash left behind.
        if entry.name.startswith("..") and entry.name not in (DATA_DIR, version.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return True


def _keyed(data: Mapping[str, str], items: list[dict[str, Any]] | None) -> dict[str, str]:
    if not items:
        return dict(data)
    return {item["path"]: data[item["key"]] for item in items if item["key"] in data}


def _source_files(
    pod: Mapping[str, Any], source: Mapping[str, Any], kind: str, read: Reader, token: Callable[[], str]
) -> dict[str, str] | None:
    """The files of one ConfigMap/Secret/downwardAPI/projected source; None while a required
    object is missing (the pod waits, as on a kubelet)."""
    namespace = pod["metadata"]["namespace"]
    if kind in ("configMap", "secret"):
        name = source.get("name") or source.get("secretName", "")
        obj = read("ConfigMap" if kind == "configMap" else "Secret", namespace, name)
        if obj is None:
            return {} if source.get("optional") else None
        data = dict(obj.get("data") or {}) if kind == "configMap" else decode_secret(obj.get("data"))
        return _keyed(data, source.get("items"))
    if kind == "downwardAPI":
        files = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                files[item["path"]] = field_value(pod, item["fieldRef"]["fieldPath"])
        return files
    if kind == "projected":
        files = {}
        for part in source.get("sources") or []:
            for sub_kind in ("configMap", "secret", "downwardAPI"):
                if sub_kind in part:
                    sub = _source_files(pod, part[sub_kind], sub_kind, read, token)
                    if sub is None:
                        return None
                    files.update(sub)
            if "serviceAccountToken" in part:
                files[part["serviceAccountToken"]["path"]] = token()
        return files
    raise PodSpecError(f"volume kind {kind} is not supported by the local runtime")


FILE_KINDS = ("configMap", "secret", "downwardAPI", "projected")


class PodVolumes:
    """The volumes of one pod, under its directory."""

    def __init__(self, pod_dir: Path, read: Reader, token: Callable[[], str]) -> None:
        self.root = pod_dir / "volumes"
        self.read = read
        self.token = token
        self._token_value: str | None = None
        self._token_at = 0.0

    def _cached_token(self) -> str:
        now = time.monotonic()
        if self._token_value is None or now - self._token_at > TOKEN_REFRESH_SECONDS:
            self._token_value, self._token_at = self.token(), now
        return self._token_value

    def sync(self, pod: Mapping[str, Any]) -> list[str]:
        """Write or refresh the file-backed volumes; returns the names still waiting for a
        ConfigMap or Secret."""
        waiting = []
        for volume in pod["spec"].get("volumes") or []:
            kind = next((k for k in FILE_KINDS if k in volume), None)
            if kind is None:
                continue
            source = volume[kind]
            files = _source_files(pod, source, kind, self.read, self._cached_token)
            if files is None:
                waiting.append(volume["name"])
                continue
            mode = int(source.get("defaultMode", 0o644))
            if atomic_write(self.root / volume["name"], files, mode):
                log.debug("volume %s of pod %s updated", volume["name"], pod["metadata"]["name"])
        return waiting

    def mounts(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The sandbox's mount list for one container."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        out = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise PodSpecError(f"volumeMount {mount['name']!r} names no volume of the pod")
            read_only = bool(mount.get("readOnly"))
            entry: dict[str, Any] = {"target": mount["mountPath"], "readOnly": read_only}
            if any(k in volume for k in FILE_KINDS):
                source = self.root / volume["name"]
                sub = mount.get("subPath")
                path = source / sub if sub else source
                entry.update(kind="bind", source=str(path), file=path.is_file())
            elif "emptyDir" in volume:
                empty = volume["emptyDir"] or {}
                if empty.get("medium") == "Memory":
                    entry.update(kind="tmpfs", size=_tmpfs_size(empty.get("sizeLimit")))
                else:
                    path = self.root / volume["name"]
                    path.mkdir(parents=True, exist_ok=True)
                    entry.update(kind="bind", source=str(path))
            elif "hostPath" in volume:
                entry.update(kind="bind", source=_host_path(volume["hostPath"]))
                entry["file"] = Path(entry["source"]).is_file()
            elif "persistentVolumeClaim" in volume:
                entry.update(kind="bind", source=self._claim_path(pod, volume["persistentVolumeClaim"]))
            else:
                kinds = ", ".join(k for k in volume if k != "name")
                raise PodSpecError(
                    f"volume {volume['name']!r} ({kinds}) is not supported by the local runtime"
                )
            out.append(entry)
        return out

    def _claim_path(self, pod: Mapping[str, Any], claim: Mapping[str, Any]) -> str:
        pvc = self.read("PersistentVolumeClaim", pod["metadata"]["namespace"], claim["claimName"])
        volume_name = (pvc or {}).get("spec", {}).get("volumeName")
        pv = self.read("PersistentVolume", "", volume_name) if volume_name else None
        if pv is None:
            raise PodSpecError(f"PersistentVolumeClaim {claim['claimName']} is not bound")
        spec = pv["spec"]
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path:
            raise PodSpecError(f"PersistentVolume {volume_name} is neither hostPath nor local")
        os.makedirs(path, exist_ok=True)
        return str(path)


def _host_path(source: Mapping[str, Any]) -> str:
    path = Path(source["path"])
    kind = source.get("type") or ""
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate" and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    elif kind == "Directory" and not path.is_dir():
        raise PodSpecError(f"hostPath {path} is not a directory on this machine")
    elif kind == "File" and not path.is_file():
        raise PodSpecError(f"hostPath {path} is not a file on this machine")
    elif not path.exists():
        path.mkdir(parents=True, exist_ok=True)  # type "": the kubelet creates nothing, but
        # an absent path would fail the bind mount; an empty directory is what a pod would see.
    return str(path)


def _tmpfs_size(limit: str | None) -> str | None:
    if not limit:
        return None
    units = {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t", "K": "k", "M": "m", "G": "g"}
    for suffix, short in units.items():
        if limit.endswith(suffix):
            return limit[: -len(suffix)] + short
    return limit
