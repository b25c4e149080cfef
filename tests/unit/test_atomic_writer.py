"""The local runtime's volume writer: what a pod reading its ConfigMap/Secret files sees while the
objects change (fireflyer.dev.runtime.pod_volumes)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from fireflyer.dev.runtime.pod_volumes import DATA_DIR, PodVolumes, atomic_write
from fireflyer.dev.runtime.podspec import PodSpecError


def _versions(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith("..") and p.is_dir() and not p.is_symlink()
    )


def _visible(directory: Path) -> dict[str, str]:
    """What a pod listing and reading the directory gets (the writer's own names hidden)."""
    out = {}
    for root, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith("..")]
        for name in names:
            path = Path(root, name)
            if not name.startswith(".."):
                out[path.relative_to(directory).as_posix()] = path.read_text()
    return out


def test_files_are_links_through_data_to_one_timestamped_version(tmp_path: Path) -> None:
    volume = tmp_path / "cfg"
    assert atomic_write(volume, {"placement.json": "{}", "conf/a.yaml": "a: 1"}, 0o640)
    assert _visible(volume) == {"placement.json": "{}", "conf/a.yaml": "a: 1"}
    [version] = _versions(volume)
    assert version.startswith("..") and version != DATA_DIR
    assert os.readlink(volume / DATA_DIR) == version
    # The pod's names go through ..data, so one rename switches all of them.
    assert os.readlink(volume / "placement.json") == f"{DATA_DIR}/placement.json"
    assert os.readlink(volume / "conf") == f"{DATA_DIR}/conf"
    assert (volume / "placement.json").stat().st_mode & 0o777 == 0o640


def test_an_update_replaces_the_version_keeps_the_directory_and_drops_removed_keys(tmp_path: Path) -> None:
    volume = tmp_path / "cfg"
    atomic_write(volume, {"placement.json": "{}", "old": "x"})
    inode = volume.stat().st_ino  # what a bind mount of the volume holds on to
    [first] = _versions(volume)
    assert atomic_write(volume, {"placement.json": '{"generation": 1}', "new": "y"})
    assert _visible(volume) == {"placement.json": '{"generation": 1}', "new": "y"}
    assert not (volume / "old").is_symlink() and not (volume / "old").exists()
    [second] = _versions(volume)
    assert second != first, "the previous version is gone once the new one is current"
    assert volume.stat().st_ino == inode


def test_the_same_content_is_not_rewritten(tmp_path: Path) -> None:
    volume = tmp_path / "cfg"
    atomic_write(volume, {"k": "v"})
    [version] = _versions(volume)
    assert not atomic_write(volume, {"k": "v"})
    assert _versions(volume) == [version]
    # A new mode is a change, as for a kubelet.
    assert atomic_write(volume, {"k": "v"}, 0o600)
    assert (volume / "k").stat().st_mode & 0o777 == 0o600


def test_a_plain_file_in_the_way_is_replaced_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    volume = tmp_path / "cfg"
    volume.mkdir()
    (volume / "k").write_text("written by an earlier layout")
    (volume / "..2020_01_01_00_00_00.stale").mkdir()  # a version a crash left behind
    assert atomic_write(volume, {"k": "v"})
    assert (volume / "k").is_symlink() and (volume / "k").read_text() == "v"
    assert len(_versions(volume)) == 1


def test_paths_a_kubelet_refuses_are_refused(tmp_path: Path) -> None:
    for bad in ("/etc/passwd", "../escape", "a/../../b", "..data"):
        with pytest.raises(PodSpecError):
            atomic_write(tmp_path / "cfg", {bad: "x"})


def test_a_reader_sees_only_whole_versions_while_the_writer_updates(tmp_path: Path) -> None:
    """Readers of the pod's names see one complete version of each file, and a reader that
    resolves ..data once sees the files of one version together."""
    volume = tmp_path / "cfg"
    size = 256 * 1024  # large enough that a write in place could be caught half done

    def payload(n: int) -> dict[str, str]:
        return {"a": str(n % 10) * size, "b": str(n % 10) * size}

    atomic_write(volume, payload(0))
    stop = threading.Event()
    seen: list[str] = []
    problems: list[str] = []

    def read() -> None:
        while not stop.is_set():
            try:
                a = (volume / "a").read_text()
                version = volume / os.readlink(volume / DATA_DIR)
                pair = ((version / "a").read_text(), (version / "b").read_text())
            except FileNotFoundError:
                continue  # the version was retired between readlink and open: read again
            if len(a) != size or len(set(a)) != 1:
                problems.append(f"a half-written file ({len(a)} bytes, {len(set(a))} values)")
            if pair[0] != pair[1]:
                problems.append("a and b of two versions in one directory")
            seen.append(a[0])

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        for n in range(1, 40):
            assert atomic_write(volume, payload(n))
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not problems, problems[:3]
    assert len(set(seen)) > 1, "the readers saw the updates"
    assert (volume / "a").read_text() == "9" * size


def _pod(labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": labels},
        "spec": {
            "volumes": [
                {"name": "placement", "configMap": {"name": "cm"}},
                {
                    "name": "info",
                    "downwardAPI": {
                        "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
                    },
                },
                {"name": "later", "configMap": {"name": "missing"}},
            ]
        },
    }


def test_pod_volumes_follow_their_objects(tmp_path: Path) -> None:
    objects: dict[tuple[str, str], dict[str, Any]] = {("ConfigMap", "cm"): {"data": {"placement.json": "{}"}}}
    volumes = PodVolumes(tmp_path, lambda kind, _ns, name: objects.get((kind, name)), lambda: "")
    assert volumes.sync(_pod({"app": "x"})) == ["later"]
    placement = tmp_path / "volumes" / "placement" / "placement.json"
    labels = tmp_path / "volumes" / "info" / "labels"
    assert placement.read_text() == "{}"
    assert labels.read_text() == 'app="x"'

    objects[("ConfigMap", "cm")] = {"data": {"placement.json": '{"generation":1}'}}
    objects[("ConfigMap", "missing")] = {"data": {"k": "v"}}
    assert volumes.sync(_pod({"app": "y"})) == []
    assert placement.read_text() == '{"generation":1}'
    assert labels.read_text() == 'app="y"'
    assert (tmp_path / "volumes" / "later" / "k").read_text() == "v"
