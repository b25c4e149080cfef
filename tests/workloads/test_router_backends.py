"""The units behind the router as the flags and the backends file name them: URLs, roles and the
pairing revisions that decide which prefill and decode units may be paired."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fireflyer.cli import build_parser
from fireflyer.workloads.router.backends import BackendSet, Listed, read_backends_file
from fireflyer.workloads.router.metrics import RouterMetrics
from fireflyer.workloads.router.server import config_from_args


def write(path: Path, data: Any) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    st = path.stat()  # a new mtime, as a ConfigMap update gives
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_the_backends_file_lists_urls_or_units_with_revisions(tmp_path: Path) -> None:
    path = tmp_path / "backends.json"
    write(
        path,
        {
            "prefill": [{"url": "http://p0:30000/", "revision": "3f2a9c1b0d"}, "http://p1:30000"],
            "decode": [{"url": "http://d0:30000", "revision": "3f2a9c1b0d"}, {"url": "http://d1:30000"}],
            "backends": ["https://a0:443"],
        },
    )
    assert read_backends_file(path) == [
        Listed("http://p0:30000", "prefill", "3f2a9c1b0d"),
        Listed("http://p1:30000", "prefill", None),
        Listed("http://d0:30000", "decode", "3f2a9c1b0d"),
        Listed("http://d1:30000", "decode", None),
        Listed("https://a0:443", "any", None),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"decode": [{"revision": "r"}]}, "neither a URL nor"),
        ({"decode": [{"url": "http://d:1", "rev": "r"}]}, "neither a URL nor"),
        ({"decode": [{"url": "http://d:1", "revision": 7}]}, "revision 7"),
        ({"decode": [{"url": "http://d:1", "revision": ""}]}, "revision ''"),
        ({"decode": [{"url": "http://d:1", "revision": "x" * 129}]}, "1 to 128 characters"),
        ({"decode": [{"url": "ftp://d:1", "revision": "r"}]}, "not an http"),
        ({"decode": "http://d:1"}, "must be a list"),
        ({"decoders": []}, "unknown keys"),
    ],
)
def test_a_malformed_backends_file_is_refused(tmp_path: Path, data: Any, message: str) -> None:
    path = tmp_path / "backends.json"
    write(path, data)
    with pytest.raises(ValueError, match=message):
        read_backends_file(path)


def test_unit_flags_take_a_revision_after_a_hash() -> None:
    args = build_parser().parse_args(
        [
            "router",
            "--prefill",
            "http://p:30000#r1",
            "--decode",
            "http://d:30000/",
            "--backends",
            "http://a:1#r1",
        ]
    )
    assert list(config_from_args(args).backends) == [
        Listed("http://p:30000", "prefill", "r1"),
        Listed("http://d:30000", "decode", None),
        Listed("http://a:1", "any", "r1"),
    ]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["router", "--decode", "http://d:30000#"])


def test_a_unit_recreated_with_a_new_revision_keeps_its_place(tmp_path: Path) -> None:
    path = tmp_path / "backends.json"
    write(path, {"decode": [{"url": "http://d:1", "revision": "old"}]})
    units = BackendSet([Listed("http://p:1", "prefill", "new")], path, RouterMetrics())
    assert units.reload()
    backend = units.get("http://d:1")
    assert backend is not None and backend.candidate().revision == "old"
    backend.in_flight = 2  # requests already on it finish where they are
    write(path, {"decode": [{"url": "http://d:1", "revision": "new"}]})
    assert units.reload()
    assert units.get("http://d:1") is backend and backend.candidate().revision == "new"
    assert backend.in_flight == 2
    write(path, {"decode": [{"url": "http://d:1", "revision": "new"}], "prefill": ["http://x:1"]})
    assert units.reload() and sorted(b.url for b in units.all) == ["http://d:1", "http://p:1", "http://x:1"]
    # The flags win over the file for a URL both name.
    write(path, {"prefill": [{"url": "http://p:1", "revision": "other"}]})
    units.reload()
    p = units.get("http://p:1")
    assert p is not None and p.revision == "new"
