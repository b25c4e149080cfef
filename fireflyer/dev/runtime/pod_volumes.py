"""A pod's volumes as directories on this machine, and the mounts the sandbox makes of them.

ConfigMap, Secret, downward API and projected volumes are written into the pod's directory and
refreshed while the pod runs (files are replaced by rename, so a reader never sees half a file,
and a ConfigMap edit reaches a running pod as it does on a kubelet). emptyDir is a directory
(tmpfs for medium Memory), hostPath is this machine's path, a PersistentVolumeClaim is the
hostPath or local path of the volume bound to it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fireflyer.dev.runtime.podspec import PodSpecError, decode_secret, field_value

log = logging.getLogger(__name__)

Reader = Callable[[str, str, str], dict[str, Any] | None]
"""(kind, namespace, name) → the object, None when it does not exist."""


def _write_files(directory: Path, files: Mapping[str, str], mode: int) -> bool:
    """Make directory hold exactly these files; True when anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = False
    for rel, content in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode()
        if path.is_file() and path.read_bytes() == data:
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(path)
        changed = True
    for existing in directory.rglob("*"):
        rel = existing.relative_to(directory).as_posix()
        if existing.is_file() and rel not in files and not existing.name.startswith("."):
            existing.unlink()
            changed = True
    return changed


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

    def _cached_token(self) -> str:
        if self._token_value is None:
            self._token_value = self.token()
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
            _write_files(self.root / volume["name"], files, mode)
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
