"""Joining a unit: the ranks meet at rank 0's TCPStore, and every later check-in goes through that
store with one key per rank, so whoever is missing can be named (a timed-out collective only says
that something timed out).

`join_unit` returns the store; the engine passes it to `dist.init_process_group(store=...)`, so
preflight and the engine's process group share one rendezvous.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from fireflyer.workloads.preflight.failure import PreflightError

PREFIX = "fireflyer-preflight"  # our keys never meet the process groups' (torch prefixes those)
POLL = 0.02  # seconds between looks at the store while waiting
BEAT = 0.25  # seconds between a rank's heartbeats
SILENCE = 1.5  # a rank whose heartbeat has not moved for this long has stopped answering
HOST_GRACE = 5.0  # how long ranks wait for rank 0's verdict, and rank 0 for them to read it

T = TypeVar("T")


def ranks_text(ranks: Sequence[int]) -> str:
    """Ranks as text, runs collapsed: "rank 3", "ranks 0-2", "ranks 0, 2-4"."""
    ordered = sorted(set(ranks))
    runs: list[str] = []
    start = prev = ordered[0] if ordered else 0
    for r in [*ordered[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return f"{'rank' if len(ordered) == 1 else 'ranks'} {', '.join(runs)}"


def parse_addr(addr: str) -> tuple[str, int]:
    """Host and port of "HOST:PORT" or "[IPv6]:PORT"."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Member:
    name: str  # the pod (or host) name the rank gave
    ip: str  # the address it reaches rank 0 from

    def __str__(self) -> str:
        return f"{self.name}, {self.ip}" if self.ip else self.name


class StoreLost(PreflightError):
    """The unit's store stopped answering: rank 0, whose process holds it, is gone."""


class Keys:
    """Our keys on the unit's store. The store lives in rank 0's process: when it stops answering,
    every operation raises StoreLost, which names rank 0."""

    def __init__(self, store: dist.Store, lost: Callable[[Exception], StoreLost]) -> None:
        self.store = dist.PrefixStore(PREFIX, store)
        self.lost = lost

    def _call(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except (dist.DistError, RuntimeError) as exc:
            raise self.lost(exc) from exc

    def set(self, key: str, value: str) -> None:
        self._call(lambda: self.store.set(key, value))

    def get(self, key: str) -> str:
        return self._call(lambda: self.store.get(key)).decode()

    def add(self, key: str, amount: int) -> int:
        return int(self._call(lambda: self.store.add(key, amount)))

    def has(self, key: str) -> bool:
        return bool(self._call(lambda: self.store.check([key])))

    def get_all(self, keys: Sequence[str]) -> list[str]:
        return [v.decode() for v in self._call(lambda: self.store.multi_get(list(keys)))] if keys else []

    def set_once(self, key: str, value: str) -> str:
        """Sets the key unless it is set; returns what it holds."""
        return self._call(lambda: self.store.compare_set(key, "", value)).decode()


class Roll:
    """Check-ins of every rank under one key: a barrier that knows who did not come, whether they
    are still alive (heartbeats), where they are and whether they reported a failure."""

    def __init__(self, store: dist.Store, rank: int, world: int, members: Sequence[Member] = ()) -> None:
        self.store = store
        self.keys = Keys(store, self._lost)
        self.rank = rank
        self.world = world
        self.members = tuple(members)

    def clone(self) -> Roll:
        """The same roll over its own connection, for another thread."""
        return Roll(self.store.clone(), self.rank, self.world, self.members)

    def who(self, rank: int) -> str:
        member = self.members[rank] if rank < len(self.members) else None
        return f"rank {rank} ({member})" if member else f"rank {rank}"

    def _lost(self, exc: Exception) -> StoreLost:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreLost(
            f"{self.who(0)}, which hosts the unit's store, stopped answering"
            f" (seen from {self.who(self.rank)}: {first})"
        )

    def at(self, where: str) -> None:
        """Where this rank is, for others' messages should it stop there."""
        self.keys.set(f"at/{self.rank}", where)

    def exchange(self, key: str, value: str, *, timeout: float, what: str) -> list[str]:
        """Every rank's value once all have given theirs; PreflightError naming the ranks that did
        not reach `what` within `timeout` seconds."""
        self.keys.set(f"{key}/{self.rank}", value)
        self.keys.add(f"{key}/count", 1)
        deadline = time.monotonic() + timeout
        while self.keys.add(f"{key}/count", 0) < self.world:
            if time.monotonic() > deadline:
                missing = self.missing(key)
                raise PreflightError(self.explain(missing, f"did not reach {what} within {timeout:g} s"))
            time.sleep(POLL)
        keys = [f"{key}/{r}" for r in range(self.world)]
        return self.keys.get_all(keys)

    def missing(self, key: str) -> list[int]:
        return [r for r in range(self.world) if not self.keys.has(f"{key}/{r}")]

    def silent(self, ranks: Sequence[int]) -> list[int]:
        """Those of `ranks` whose heartbeat does not move over SILENCE seconds."""
        keys = [f"beat/{r}" for r in ranks]
        before = [self.keys.add(k, 0) for k in keys]
        time.sleep(SILENCE)
        after = [self.keys.add(k, 0) for k in keys]
        return [r for r, b, a in zip(ranks, before, after, strict=True) if a == b]

    def report_failure(self, message: str) -> None:
        """Best effort: others that find this rank gone can quote why."""
        with contextlib.suppress(StoreLost):
            self.keys.set(f"failed/{self.rank}", message)

    def explain(
        self,
        missing: Sequence[int],
        what: str,
        *,
        silent: Collection[int] | None = None,
        here: str | None = None,
    ) -> str:
        """A line such as "rank 2 of 3 (pod-c, 10.0.0.3) did not reach …: it stopped answering",
        for one or more ranks, each with its reason. `silent`: those already found silent;
        `here`: where the ranks were expected, so that one found there is called stuck in it."""
        if silent is None:
            others = [r for r in missing if r != self.rank]
            silent = self.silent(others) if others else []
        reasons = []
        for r in missing:
            if self.keys.has(f"failed/{r}"):
                text = self.keys.get(f"failed/{r}")
                reasons.append(f"failed: {text.removeprefix('preflight failed: ')}")
            elif r in silent:
                reasons.append("stopped answering")
            else:
                place = self.keys.get(f"at/{r}") if self.keys.has(f"at/{r}") else "joining"
                reasons.append("is alive but stuck in it" if place == here else f"is still {place}")
        if len(missing) == 1:
            member = self.members[missing[0]] if missing[0] < len(self.members) else None
            named = f"rank {missing[0]} of {self.world}" + (f" ({member})" if member else "")
            return f"{named} {what}: it {reasons[0]}"
        detail = "; ".join(f"{self.who(r)} {reason}" for r, reason in zip(missing, reasons, strict=True))
        return f"{ranks_text(missing)} of {self.world} {what}: {detail}"


class Heartbeat(threading.Thread):
    """Counts up a per-rank key a few times a second over its own connection, so a rank that died
    (or whose host did) can be told apart from one that is merely slow."""

    def __init__(self, roll: Roll) -> None:
        super().__init__(name=f"preflight-heartbeat-{roll.rank}", daemon=True)
        self.keys = dist.PrefixStore(PREFIX, roll.store.clone())
        self.key = f"beat/{roll.rank}"
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.keys.add(self.key, 1)
            except (dist.DistError, RuntimeError):
                return  # the store is gone: rank 0 ended; those waiting will say so
            self.stopped.wait(BEAT)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


@dataclass
class Unit:
    """A joined unit. Pass `store` to `dist.init_process_group(backend, store=unit.store,
    rank=unit.rank, world_size=unit.world)` to build the process group on the same rendezvous."""

    store: dist.Store
    rank: int
    world: int
    members: tuple[Member, ...]  # per rank
    addr: str
    join_seconds: float
    heartbeat: Heartbeat | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def roll(self) -> Roll:
        return Roll(self.store, self.rank, self.world, self.members)

    def exchange(self, key: str, value: str, *, timeout: float, what: str) -> list[str]:
        """Every rank's `value` once all gave theirs (through the store, no process group needed);
        PreflightError naming who did not reach `what` in time. Each exchange needs its own key."""
        return self.roll().exchange(f"user/{key}", value, timeout=timeout, what=what)

    def close(self, linger: float = 0.0) -> None:
        """Stops the heartbeat and says this rank is done with the store. Rank 0's process holds
        the store, so it waits up to `linger` seconds for the others to be done with it too (or to
        have stopped answering) before its process may end."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        roll = self.roll()
        with contextlib.suppress(StoreLost):  # rank 0 is gone already: nothing to wait for
            roll.keys.set(f"left/{self.rank}", "")
            roll.keys.add("left", 1)
            deadline = time.monotonic() + linger
            look = time.monotonic() + SILENCE
            while self.rank == 0 and roll.keys.add("left", 0) < self.world and time.monotonic() < deadline:
                if time.monotonic() > look:
                    staying = [r for r in range(self.world) if not roll.keys.has(f"left/{r}")]
                    if set(roll.silent(staying)) == set(staying):
                        return
                    look = time.monotonic() + SILENCE
                time.sleep(POLL)


def _local_ip(host: str, port: int) -> str:
    """The address this host reaches rank 0 from (a UDP connect sends nothing)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except OSError:
        return ""


def _connect(addr: str, rank: int, world: int, name: str, timeout: float) -> dist.Store:
    """A client of rank 0's store. A plain TCP probe first: the store's own connect overshoots its
    timeout, and rank 0's name may not resolve until its pod exists."""
    host, port = parse_addr(addr)
    deadline = time.monotonic() + timeout
    unreachable = PreflightError(
        f"rank 0 at {addr} did not answer within {timeout:g} s"
        f" (rank {rank} of {world}, {name}, could not reach the unit's store)"
    )
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise unreachable from None
            time.sleep(0.2)
    remaining = max(deadline - time.monotonic(), 1.0)
    try:
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=remaining))
    except (dist.DistError, RuntimeError) as exc:
        raise unreachable from exc
    store.set_timeout(datetime.timedelta(seconds=timeout))
    return store


def join_unit(addr: str, rank: int, world: int, *, timeout: float, name: str) -> Unit:
    """Meet the unit's other ranks at `addr` ("HOST:PORT"; rank 0 hosts the store there).

    Every rank records its name and address. Rank 0 waits up to `timeout` seconds for all of them
    and otherwise fails naming the ranks that never came; the others fail with rank 0's verdict, or
    naming rank 0 when its store cannot be reached. A heartbeat runs until `Unit.close()`.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a unit of {world}")
    host, port = parse_addr(addr)
    started = time.monotonic()
    if rank == 0:
        try:
            store: dist.Store = dist.TCPStore(
                host,
                port,
                is_master=True,
                wait_for_workers=False,
                timeout=datetime.timedelta(seconds=timeout),
            )
        except (dist.DistError, RuntimeError) as exc:
            raise PreflightError(
                f"rank 0 ({name}) cannot listen on {addr}: {str(exc).splitlines()[0]}"
            ) from exc
    else:
        store = _connect(addr, rank, world, name, timeout)
    roll = Roll(store, rank, world)
    record = json.dumps({"name": name, "ip": _local_ip(host, port)})
    taken = roll.keys.set_once(f"join/{rank}", record)
    if taken != record and json.loads(taken)["name"] != name:  # the same pod restarted may rejoin
        raise PreflightError(
            f"rank {rank} of {world} joined twice: {json.loads(taken)['name']} and {name}"
            " (do two pods have the same node rank?)"
        )
    if taken == record:
        roll.keys.add("join/count", 1)
    heartbeat = Heartbeat(roll)
    heartbeat.start()
    try:
        if rank == 0:
            _host_waits(roll, timeout, started)
        else:
            _member_waits(roll, timeout, started, addr, name)
        keys = [f"join/{r}" for r in range(world)]
        records = [json.loads(v) for v in roll.keys.get_all(keys)]
        members = tuple(Member(r["name"], r["ip"]) for r in records)
        Roll(store, rank, world, members).at("between joining and the checks")
    except BaseException:
        heartbeat.stop()
        raise
    return Unit(store, rank, world, members, addr, time.monotonic() - started, heartbeat)


def _joined(roll: Roll) -> tuple[list[int], list[str]]:
    ranks = [r for r in range(roll.world) if roll.keys.has(f"join/{r}")]
    keys = [f"join/{r}" for r in ranks]
    names = [json.loads(v)["name"] for v in roll.keys.get_all(keys)]
    return ranks, names


def _host_waits(roll: Roll, timeout: float, started: float) -> None:
    while roll.keys.add("join/count", 0) < roll.world:
        if time.monotonic() - started > timeout:
            ranks, names = _joined(roll)
            missing = [r for r in range(roll.world) if r not in ranks]
            message = (
                f"preflight failed: {ranks_text(missing)} of {roll.world} did not join within"
                f" {timeout:g} s ({ranks_text(ranks)} joined: {', '.join(names)})"
            )
            roll.keys.set("join/failed", message)
            # The others read the verdict from this process's store: give them a moment.
            deadline = time.monotonic() + HOST_GRACE
            while roll.keys.add("join/seen", 0) < len(ranks) - 1 and time.monotonic() < deadline:
                time.sleep(POLL)
            raise PreflightError(message)
        time.sleep(POLL)


def _member_waits(roll: Roll, timeout: float, started: float, addr: str, name: str) -> None:
    try:
        while roll.keys.add("join/count", 0) < roll.world:
            if roll.keys.has("join/failed"):
                message = roll.keys.get("join/failed")
                roll.keys.add("join/seen", 1)
                raise PreflightError(message)
            if time.monotonic() - started > timeout + HOST_GRACE:  # rank 0 gave no verdict
                ranks, names = _joined(roll)
                missing = [r for r in range(roll.world) if r not in ranks]
                raise PreflightError(
                    f"{ranks_text(missing)} of {roll.world} did not join within {timeout:g} s"
                    f" ({ranks_text(ranks)} joined: {', '.join(names)})"
                )
            time.sleep(POLL)
    except StoreLost as exc:
        raise PreflightError(
            f"rank 0 at {addr} stopped answering while rank {roll.rank} of {roll.world} ({name})"
            " waited for the others to join"
        ) from exc
