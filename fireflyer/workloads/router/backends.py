"""The units behind the router: which they are (flags, plus a JSON file re-read when it changes),
whether they pass their health checks, whether they drain, and how many requests this router has
open on each.

A draining unit (`"draining": true` in the file: the operator is about to remove it) gets no new
request; the requests already on it, streams included, finish there."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from fireflyer.workloads.router.metrics import RouterMetrics
from fireflyer.workloads.router.policies import Candidate, Role

log = logging.getLogger("fireflyer.router")

FILE_KEYS: dict[str, Role] = {"prefill": "prefill", "decode": "decode", "backends": "any"}
MAX_REVISION_CHARS = 128


class Listed(NamedTuple):
    """One unit as the flags or the backends file name it."""

    url: str
    role: Role
    revision: str | None = None  # None: not said, which pairs only with units that say none
    draining: bool = False


def normalize_url(url: str) -> str:
    """`http(s)://host:port` without a trailing slash; ValueError for anything else."""
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


def parse_revision(value: Any) -> str | None:
    """A unit's pairing revision (compared, never parsed), or None when not said."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REVISION_CHARS or value != value.strip():
        raise ValueError(
            f"revision {value!r}: expected 1 to {MAX_REVISION_CHARS} characters, no surrounding spaces"
        )
    return value


def parse_unit_flag(value: str) -> tuple[str, str | None]:
    """`URL` or `URL#REVISION` (a unit's base URL has no use for a fragment)."""
    url, sep, rev = value.partition("#")
    return normalize_url(url), parse_revision(rev) if sep else None


def read_backends_file(path: Path) -> list[Listed]:
    """The units a backends file names: {"prefill": [...], "decode": [...]} (and "backends" for
    role-less units), each entry a URL or {"url": URL, "revision": REVISION, "draining": BOOL}
    (revision and draining optional)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object {"prefill": [units], "decode": [units]}')
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected {sorted(FILE_KEYS)}")
    entries: list[Listed] = []
    for key, role in FILE_KEYS.items():
        units = data.get(key) or []
        if not isinstance(units, list):
            raise ValueError(f"{key!r} must be a list of units")
        entries += [_file_entry(key, unit, role) for unit in units]
    return entries


def _file_entry(key: str, unit: Any, role: Role) -> Listed:
    if isinstance(unit, str):
        return Listed(normalize_url(unit), role)
    if (
        isinstance(unit, dict)
        and isinstance(unit.get("url"), str)
        and set(unit) <= {"url", "revision", "draining"}
        and isinstance(unit.get("draining", False), bool)
    ):
        draining = bool(unit.get("draining", False))
        return Listed(normalize_url(unit["url"]), role, parse_revision(unit.get("revision")), draining)
    raise ValueError(
        f'{key!r}: {unit!r} is neither a URL nor {{"url": URL, "revision": REVISION, "draining": BOOL}}'
    )


@dataclass(eq=False)
class Backend:
    """One unit, by the URL of its leader."""

    url: str
    role: Role
    revision: str | None = None
    healthy: bool = False  # unknown counts as unhealthy until the first check passes
    problem: str = "not checked yet"
    in_flight: int = 0
    active: bool = True  # False once removed from the set (requests already on it finish)
    draining: bool = False  # listed, but no new request goes to it

    def candidate(self) -> Candidate:
        return Candidate(self.url, self.role, self.in_flight, self.revision)


class BackendSet:
    def __init__(
        self, static: Iterable[tuple[str, Role] | Listed], file: Path | None, metrics: RouterMetrics
    ) -> None:
        self.metrics = metrics
        self._static = [Listed(*entry) for entry in static]
        self._file = file
        self._file_stamp: tuple[int, int, int] | None = None
        self._file_missing = False
        self._backends: dict[str, Backend] = {}
        self._apply(self._static)

    @property
    def all(self) -> list[Backend]:
        return list(self._backends.values())

    def healthy(self, exclude: Sequence[Backend] = ()) -> list[Backend]:
        return [b for b in self._backends.values() if b.healthy and b not in exclude]

    def routable(self, exclude: Sequence[Backend] = ()) -> list[Backend]:
        """The units a new request may go to: healthy and not draining."""
        return [b for b in self.healthy(exclude) if not b.draining]

    def get(self, url: str) -> Backend | None:
        return self._backends.get(url)

    # -- membership ----------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the backends file if it changed (modification time, size or inode: a ConfigMap
        volume swaps a symlink). A missing or malformed file keeps the units last read from it, so
        a half-written file never empties the router. True when the set changed."""
        if self._file is None:
            return False
        try:
            st = os.stat(self._file)
        except OSError as exc:
            if not self._file_missing:
                log.warning("backends file %s: %s; keeping the units read before", self._file, exc)
            self._file_missing = True
            return False
        self._file_missing = False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._file_stamp:
            return False
        self._file_stamp = stamp
        try:
            entries = read_backends_file(self._file)
        except (OSError, ValueError) as exc:
            log.warning("backends file %s: %s; keeping the units read before", self._file, exc)
            return False
        return self._apply(self._static + entries)

    def _apply(self, entries: Iterable[Listed]) -> bool:
        wanted: dict[str, Listed] = {}
        for entry in entries:
            wanted.setdefault(entry.url, entry)  # the flags come first and win
        changed = False
        for url in [u for u in self._backends if u not in wanted]:
            gone = self._backends.pop(url)
            gone.active = False
            self.metrics.forget(url, gone.role)
            log.info("unit %s removed", url)
            changed = True
        for url, role, revision, draining in wanted.values():
            backend = self._backends.get(url)
            if backend is not None and backend.draining != draining:
                # Only the flag changes: requests already open on it stay counted.
                log.info("unit %s %s", url, "draining: no new requests" if draining else "no longer draining")
                backend.draining = draining
                changed = True
            if backend is not None and (backend.role, backend.revision) == (role, revision):
                continue
            if backend is None:
                backend = self._backends[url] = Backend(url, role, revision, draining=draining)
                log.info("unit %s (%s, revision %s) added", url, role, revision)
            else:
                # A unit recreated by a rollout keeps its URL: it pairs by its new revision at once.
                log.info("unit %s is now %s, revision %s", url, role, revision)
                self.metrics.forget(url, backend.role)
                backend.role, backend.revision = role, revision
            self._export(backend)
            changed = True
        return changed

    # -- health --------------------------------------------------------------------------------

    async def check(self, client: httpx.AsyncClient) -> None:
        """GET /health on every unit at once; 200 is healthy, anything else is not."""
        backends = self.all
        problems = await asyncio.gather(*(_probe(client, b.url) for b in backends))
        for backend, problem in zip(backends, problems, strict=True):
            self.set_health(backend, problem)

    def set_health(self, backend: Backend, problem: str | None) -> None:
        """Record a check's result, or (from the proxy) a unit that stopped answering."""
        healthy = problem is None
        if healthy != backend.healthy and backend.active:
            if healthy:
                log.info("unit %s is healthy", backend.url)
            else:
                log.warning("unit %s is unhealthy: %s", backend.url, problem)
        backend.healthy = healthy
        backend.problem = problem or ""
        self._export(backend)

    async def watch(self, client: httpx.AsyncClient, interval: float) -> None:
        """Forever: every `interval` seconds, re-read the file and check every unit."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload()
                await self.check(client)
            except Exception:  # the watch must outlive any one bad round
                log.exception("health check round failed")

    # -- load ----------------------------------------------------------------------------------

    def begin(self, backend: Backend) -> None:
        backend.in_flight += 1
        self._export(backend)

    def end(self, backend: Backend) -> None:
        backend.in_flight -= 1
        self._export(backend)

    def _export(self, backend: Backend) -> None:
        if backend.active:  # a removed unit's series are gone and stay gone
            self.metrics.in_flight.labels(backend.url).set(backend.in_flight)
            self.metrics.healthy.labels(backend.url, backend.role).set(1 if backend.healthy else 0)


async def _probe(client: httpx.AsyncClient, url: str) -> str | None:
    """None when the unit is healthy, else what is wrong."""
    try:
        response = await client.get(url + "/health")
    except httpx.HTTPError as exc:
        return describe(exc)
    return None if response.status_code == 200 else f"/health answered {response.status_code}"


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
