"""The checks a joined unit runs before it serves.

1. dispatch/combine through the expert-parallel Dispatcher (the transport the engine will use),
   in normal and low-latency mode: every rank routes tokens with known contents to experts on
   every rank; each receiver verifies the rows it got, each sender the combined result, and a
   wrong result names the link (sender → receiver).
2. all-to-all bandwidth: a timed `all_to_all_single` of a large buffer, each rank's figure shared
   with all; a rank below the floor fails the unit.

Each step starts and ends with a check-in on the store, and a watchdog thread covers the
collectives in between, so a rank that dies or hangs is named rather than left to a timeout that
names no one.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fireflyer.kernels.ep import Dispatcher, Mode
from fireflyer.workloads.preflight.failure import PreflightError, exit_failed
from fireflyer.workloads.preflight.unit import Member, Roll, ranks_text

T = TypeVar("T")
LOCAL_EXPERTS = 2  # per rank; each token picks two experts
WEIGHTS = (0.75, 0.25)  # exact in BF16, unequal so that a swapped pair shows
MODES: tuple[Mode, ...] = ("normal", "low_latency")
MIB = 1 << 20


@dataclass(frozen=True)
class PreflightReport:
    """What every rank measured, as seen from `rank` (the figures are gathered to all ranks)."""

    rank: int
    world: int
    members: tuple[Member, ...]
    device: str  # "cuda" or "cpu"
    transport: str  # the Dispatcher's: portable, nvlink or official
    dispatch_seconds: tuple[float, ...]  # per rank: both dispatch/combine rounds
    bandwidth_bytes: int  # each rank's all-to-all buffer
    gbps: tuple[float, ...]  # per rank: bytes sent to other ranks per second (10⁹); empty with one rank
    bandwidth_seconds: tuple[float, ...]  # per rank: the timed all-to-all loop
    min_gbps: float | None
    seconds: tuple[float, ...]  # per rank: the whole check

    def summary(self) -> str:
        """One line for the log."""
        parts = [
            f"preflight passed: {self.world} rank{'s' if self.world > 1 else ''} on {self.device}",
            f"dispatch/combine correct ({self.transport}, {' + '.join(MODES)};"
            f" {max(self.dispatch_seconds):.2f} s)",
        ]
        if self.gbps:
            slowest = min(range(self.world), key=lambda r: self.gbps[r])
            floor = f"floor {self.min_gbps:g} GB/s" if self.min_gbps is not None else "no floor"
            parts.append(
                f"all-to-all of {self.bandwidth_bytes / MIB:g} MiB per rank: min {self.gbps[slowest]:.2f}"
                f" GB/s (rank {slowest}, {self.members[slowest].name}),"
                f" median {statistics.median(self.gbps):.2f}, max {max(self.gbps):.2f} GB/s; {floor}"
            )
        else:
            parts.append("all-to-all: one rank, nothing to measure")
        parts.append(f"{max(self.seconds):.1f} s")
        return "; ".join(parts)


class Watchdog(threading.Thread):
    """Fires when a step's collectives outlive their deadline. The main thread is then blocked
    inside a collective (NCCL waits without end on a dead peer) and cannot be interrupted, so the
    failure is reported from here, through `on_hang`, which must end the process."""

    def __init__(self, roll: Roll, timeout: float, on_hang: Callable[[PreflightError], None]) -> None:
        super().__init__(name=f"preflight-watchdog-{roll.rank}", daemon=True)
        self.roll = roll.clone()
        self.timeout = timeout
        self.slack = min(10.0, max(2.0, timeout / 10))  # the main thread's own deadlines go first
        self.on_hang = on_hang
        self.lock = threading.Lock()
        self.armed: tuple[str, str, float] | None = None
        self.stopped = threading.Event()

    def arm(self, key: str, title: str) -> None:
        with self.lock:
            self.armed = (key, title, time.monotonic() + self.timeout + self.slack)

    def disarm(self) -> None:
        with self.lock:
            self.armed = None

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            with self.lock:
                armed = self.armed
            if armed is None or time.monotonic() < armed[2]:
                continue
            key, title, _ = armed
            what = f"did not finish {title} within {self.timeout:g} s"
            try:
                stuck = [r for r in _unfinished(self.roll, key) if r != self.roll.rank]
                # Others stuck too: name them. None: this rank's own collectives (or device) hang.
                detail = (
                    self.roll.explain(stuck, what, here=f"in {title}")
                    if stuck
                    else f"{self.roll.who(self.roll.rank)} {what}: its collectives never completed"
                )
            except PreflightError as exc:
                detail = str(exc)
            with self.lock:
                if self.armed is not armed:  # the step ended while we looked
                    continue
            error = PreflightError(detail)
            self.roll.report_failure(str(error))
            self.on_hang(error)
            return


def _unfinished(roll: Roll, key: str) -> list[int]:
    """Ranks that neither finished step `key` nor saw its collectives fail."""
    return [
        r
        for r in range(roll.world)
        if not roll.keys.has(f"{key}/done/{r}") and not roll.keys.has(f"{key}/broke/{r}")
    ]


def _routing(source: int, world: int, tokens: int, device: torch.device) -> torch.Tensor:
    """Token t of `source` goes to rank d = (source + t) mod world: to both of d's experts, or
    (every other round of ranks) to one on d and one on d + 1. The first kind pins a wrong result
    to one link; the second exercises combine's sum over ranks."""
    t = torch.arange(tokens, device=device)
    dest = (source + t) % world
    split = (t // world) % 2 == 1
    second = torch.where(split, ((dest + 1) % world) * LOCAL_EXPERTS + 1, dest * LOCAL_EXPERTS + 1)
    return torch.stack([dest * LOCAL_EXPERTS, second], dim=1)


def _scale(expert: torch.Tensor) -> torch.Tensor:
    """What expert e does to a row: multiply it by 1 + e mod 3 (exact in BF16)."""
    return 1.0 + (expert % 3).float()


def _payload(source: torch.Tensor, token: torch.Tensor, hidden: int) -> torch.Tensor:
    """Rows that say where they come from: columns 0-3 hold source and token in base 64, the rest a
    pattern of both; every value is exact in BF16."""
    cols = torch.arange(hidden, device=source.device)
    rows = (((source * 31 + token * 17).unsqueeze(1) + cols * 5) % 15 - 7).float() * 0.125
    rows[:, 0], rows[:, 1] = (source // 64).float(), (source % 64).float()
    rows[:, 2], rows[:, 3] = (token // 64).float(), (token % 64).float()
    return rows


def _check_received(
    rank: int, world: int, tokens: int, x: torch.Tensor, counts: list[int]
) -> tuple[dict[int, list[int]], int]:
    """Per sender: [rows wrong or missing, rows expected]; and rows from no known sender."""
    x = x.float().cpu()
    expected: list[list[tuple[int, int]]] = [[] for _ in range(LOCAL_EXPERTS)]
    for sender in range(world):
        idx = _routing(sender, world, tokens, torch.device("cpu"))
        for t, experts in enumerate(idx.tolist()):
            for e in experts:
                if e // LOCAL_EXPERTS == rank:
                    expected[e % LOCAL_EXPERTS].append((sender, t))
    per_sender = {s: [0, 0] for s in range(world)}
    unreadable = 0
    start = 0
    for local, count in enumerate(counts):
        rows = x[start : start + count]
        start += count
        source = (rows[:, 0] * 64 + rows[:, 1]).round().long()
        token = (rows[:, 2] * 64 + rows[:, 3]).round().long()
        known = (source >= 0) & (source < world) & (token >= 0) & (token < tokens)
        pattern = _payload(source.clamp(0, world - 1), token.clamp(0, tokens - 1), x.shape[1])
        exact = known & (rows == pattern).all(1)
        unreadable += int((~exact).sum())
        got = Counter(zip(source[exact].tolist(), token[exact].tolist(), strict=True))
        for s, t in expected[local]:
            per_sender[s][1] += 1
            if got[(s, t)] > 0:
                got[(s, t)] -= 1
            else:
                per_sender[s][0] += 1
        for (s, _), extra in got.items():  # duplicates, or rows meant for another expert
            per_sender[s][0] += extra
    # A damaged row also leaves its own row missing, which names its sender; only the excess
    # cannot be placed.
    missing = sum(bad for bad, _ in per_sender.values())
    return per_sender, max(0, unreadable - missing)


def _check_combined(
    world: int, x: torch.Tensor, out: torch.Tensor, topk_idx: torch.Tensor
) -> tuple[dict[int, list[int]], int]:
    """Per receiving rank: [tokens sent only there whose combined result is wrong, tokens sent only
    there]; and wrong tokens that went to two ranks (which of the two failed is not known)."""
    weights = torch.tensor(WEIGHTS, device=x.device)
    factor = (_scale(topk_idx) * weights).sum(1, keepdim=True)
    expected = (x.float() * factor).to(torch.bfloat16).float()
    wrong = ~torch.isclose(out.float(), expected, rtol=2e-2, atol=2e-2).all(1)
    per_dest = {d: [0, 0] for d in range(world)}
    split_wrong = 0
    for experts, bad in zip(topk_idx.tolist(), wrong.tolist(), strict=True):
        dests = {e // LOCAL_EXPERTS for e in experts}
        if len(dests) == 1:
            (d,) = dests
            per_dest[d][1] += 1
            per_dest[d][0] += int(bad)
        else:
            split_wrong += int(bad)
    return per_dest, split_wrong


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wait(work: Any, deadline: float, what: str) -> None:
    """Polls rather than blocks, so a peer that never answers ends in a named failure."""
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not complete")
        time.sleep(1e-4)
    work.wait()  # raises what the collective raised


class _Checks:
    def __init__(
        self,
        group: Any,
        roll: Roll,
        device: torch.device,
        timeout: float,
        on_hang: Callable[[PreflightError], None],
    ) -> None:
        self.group = group
        self.roll = roll
        # Every rank counts its own calls, so the ranks agree on fresh keys for each run.
        self.scope = f"check-{roll.keys.add(f'checks/{roll.rank}', 1)}"
        self.rank, self.world = roll.rank, roll.world
        self.device = device
        self.timeout = timeout
        self.watchdog = Watchdog(roll, timeout, on_hang)

    def step(self, key: str, title: str, body: Callable[[], T]) -> T:
        """Everyone in, `body` (collectives, under the watchdog), and a failure named."""
        self.roll.at(f"in {title}")
        self.roll.exchange(f"{key}/enter", "", timeout=self.timeout, what=title)
        self.watchdog.arm(key, title)
        try:
            return body()
        except PreflightError:
            raise
        except Exception as exc:
            self.watchdog.disarm()
            raise self.failed(key, title, exc) from exc
        finally:
            self.watchdog.disarm()

    def failed(self, key: str, title: str, exc: Exception) -> PreflightError:
        """A collective raised here. Usually a peer went away or stopped taking part, and then it
        is that peer we name; the peers that saw the same failure say so under `broke`."""
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.roll.keys.set(f"{key}/broke/{self.rank}", first)
        others = [r for r in range(self.world) if r != self.roll.rank]
        silent = self.roll.silent(others) if others else []  # also the time the others need to break
        stuck = [r for r in _unfinished(self.roll, key) if r != self.roll.rank]
        if stuck:
            return PreflightError(
                self.roll.explain(stuck, f"did not finish {title}", silent=silent, here=f"in {title}")
            )
        return PreflightError(f"{title} failed on {self.roll.who(self.rank)}: {first}")

    def dispatch_round(self, mode: Mode, hidden: int, tokens: int) -> tuple[str, float]:
        title = f"the dispatch/combine check ({mode})"

        def body() -> tuple[str, str, float]:
            started = time.perf_counter()
            dispatcher = Dispatcher(
                self.group,
                hidden,
                tokens,
                self.world * LOCAL_EXPERTS,
                mode=mode,
                transport="auto",
                device=self.device,
            )
            topk_idx = _routing(self.rank, self.world, tokens, self.device)
            weights = torch.tensor(WEIGHTS, device=self.device).expand(tokens, -1).contiguous()
            sources = torch.full((tokens,), self.rank, device=self.device)
            x = _payload(sources, torch.arange(tokens, device=self.device), hidden).to(torch.bfloat16)
            received, handle = dispatcher.dispatch(x, topk_idx, weights)
            counts = [int(c) for c in received.tokens_per_expert.tolist()]
            valid = sum(counts)
            local = torch.arange(LOCAL_EXPERTS, device=self.device) + self.rank * LOCAL_EXPERTS
            row_scale = torch.zeros(received.x.shape[0], device=self.device)
            row_scale[:valid] = torch.repeat_interleave(
                _scale(local), torch.tensor(counts, device=self.device)
            )
            expert_out = (received.x.float() * row_scale.unsqueeze(1)).to(torch.bfloat16)
            out = dispatcher.combine(expert_out, handle)
            _sync(self.device)
            elapsed = time.perf_counter() - started
            sent, stray = _check_received(self.rank, self.world, tokens, received.x[:valid], counts)
            back, split_wrong = _check_combined(self.world, x, out, topk_idx)
            verdict = json.dumps({"dispatch": sent, "stray": stray, "combine": back, "split": split_wrong})
            return verdict, dispatcher.transport, elapsed

        key = f"{self.scope}/dispatch-{mode}"
        verdict, transport, elapsed = self.step(key, title, body)
        verdicts = self.roll.exchange(f"{key}/done", verdict, timeout=self.timeout, what=title)
        self.judge_dispatch(title, transport, [json.loads(v) for v in verdicts])
        return transport, elapsed

    def judge_dispatch(self, title: str, transport: str, verdicts: list[dict[str, Any]]) -> None:
        wrong_dispatch = {
            (int(source), dest): f"{bad} of {total} dispatched rows wrong"
            for dest, verdict in enumerate(verdicts)
            for source, (bad, total) in verdict["dispatch"].items()
            if bad
        }
        # A wrong dispatch spoils its combine too: name only combines whose dispatch was right.
        wrong_combine = {
            (int(dest), source): f"{bad} of {total} combined tokens wrong"
            for source, verdict in enumerate(verdicts)
            for dest, (bad, total) in verdict["combine"].items()
            if bad and (source, int(dest)) not in wrong_dispatch
        }
        stray = [r for r, v in enumerate(verdicts) if v["stray"]]
        # Tokens combined from two ranks only count when nothing more precise explains them.
        split = [r for r, v in enumerate(verdicts) if v["split"]] if not wrong_dispatch else []
        if not wrong_dispatch and not wrong_combine and not stray and not split:
            return
        links = sorted({*wrong_dispatch, *wrong_combine})
        parts = [
            f"{self.roll.who(s)} → {self.roll.who(d)}: "
            + ", ".join(w[(s, d)] for w in (wrong_dispatch, wrong_combine) if (s, d) in w)
            for s, d in links
        ]
        parts += [f"{self.roll.who(r)} received {verdicts[r]['stray']} rows from no rank" for r in stray]
        parts += [
            f"{self.roll.who(r)} got {verdicts[r]['split']} tokens combined from two ranks wrong"
            for r in split
        ]
        count = f"{len(links)} link{'s' if len(links) != 1 else ''}" if links else "a rank"
        raise PreflightError(f"{title} over {transport} gave wrong results on {count}: {'; '.join(parts)}")

    def bandwidth(self, nbytes: int, iterations: int) -> list[dict[str, Any]]:
        """Every rank's {"gbps", "seconds"}."""
        title = "the all-to-all bandwidth check"
        elements = max(nbytes // 4 // self.world, 1) * self.world

        def body() -> tuple[str, float, float]:
            send = torch.full((elements,), float(self.rank), device=self.device)
            recv = torch.empty_like(send)
            deadline = time.monotonic() + self.timeout
            # The first round also sets up the communicators, lines the ranks up, and checks data.
            first = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
            _wait(first, deadline, "the first all-to-all")
            _sync(self.device)
            chunks = recv.view(self.world, -1)
            expected = torch.arange(self.world, device=self.device, dtype=recv.dtype).unsqueeze(1)
            wrong = [int(r) for r in torch.nonzero(~(chunks == expected).all(1)).flatten().tolist()]
            started = time.perf_counter()
            work = None
            for _ in range(iterations):
                work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)
            _wait(work, deadline, "the timed all-to-all")
            _sync(self.device)
            elapsed = time.perf_counter() - started
            moved = elements * 4 * (self.world - 1) / self.world * iterations
            return json.dumps(wrong), moved / elapsed / 1e9, elapsed

        key = f"{self.scope}/bandwidth"
        wrong, gbps, elapsed = self.step(key, title, body)
        value = json.dumps({"wrong": json.loads(wrong), "gbps": gbps, "seconds": elapsed})
        exchanged = self.roll.exchange(f"{key}/done", value, timeout=self.timeout, what=title)
        results = [json.loads(v) for v in exchanged]
        broken = [(s, d) for d, res in enumerate(results) for s in res["wrong"]]
        if broken:
            links = "; ".join(f"{self.roll.who(s)} → {self.roll.who(d)}" for s, d in broken)
            raise PreflightError(f"{title} delivered wrong data on {len(broken)} link(s): {links}")
        return results


def check_unit(
    group: Any,
    rank: int,
    world: int,
    *,
    store: dist.Store,
    device: torch.device | str,
    hidden: int = 1024,
    tokens: int = 128,
    min_gbps: float | None = None,
    timeout: float = 300.0,
    bandwidth_bytes: int | None = None,
    iterations: int | None = None,
    on_hang: Callable[[PreflightError], None] | None = None,
) -> PreflightReport:
    """Runs the checks on every rank of `group` (a process group built on `store`, the one
    `join_unit` returned) and returns the same report on each; raises PreflightError naming the
    ranks and links that failed. `timeout` bounds each step. Should a rank hang inside a collective,
    `on_hang` is called from a watchdog thread and must end the process (default: report the
    failure on stderr and in the termination message, exit 3).

    `hidden` and `tokens`: the width and the tokens per rank of the dispatch round (at least
    2 × world tokens are sent). `bandwidth_bytes` defaults to 256 MiB per rank on CUDA, 8 MiB on
    CPU; `iterations` to 20 on CUDA, 3 on CPU. The same store may serve several runs.
    """
    device = torch.device(device)
    if dist.get_world_size(group) != world or dist.get_rank(group) != rank:
        raise ValueError(
            f"the group is rank {dist.get_rank(group)} of {dist.get_world_size(group)}, not {rank} of {world}"
        )
    if hidden < 8 or tokens < 1:
        raise ValueError(f"hidden must be at least 8 and tokens at least 1 (got {hidden}, {tokens})")
    tokens = max(tokens, 2 * world)  # so that every link carries tokens sent to it alone
    on_cuda = device.type == "cuda"
    nbytes = bandwidth_bytes or (256 * MIB if on_cuda else 8 * MIB)
    rounds = iterations or (20 if on_cuda else 3)
    started = time.perf_counter()
    base = Roll(store, rank, world)
    keys = [f"join/{r}" for r in range(world)]
    records = [json.loads(v) for v in base.keys.get_all(keys)]
    roll = Roll(store, rank, world, [Member(r["name"], r["ip"]) for r in records])
    checks = _Checks(group, roll, device, timeout, on_hang or (lambda error: exit_failed(str(error))))
    checks.watchdog.start()
    try:
        dispatch_seconds = 0.0
        transport = "portable"
        for mode in MODES:
            transport, elapsed = checks.dispatch_round(mode, hidden, tokens)
            dispatch_seconds += elapsed
        gbps: list[float] = []
        loop: list[float] = []
        if world > 1:
            results = checks.bandwidth(nbytes, rounds)
            gbps = [float(r["gbps"]) for r in results]
            loop = [float(r["seconds"]) for r in results]
            slow = [r for r in range(world) if min_gbps is not None and gbps[r] < min_gbps]
            if slow:
                figures = "; ".join(f"{roll.who(r)} {gbps[r]:.2f} GB/s" for r in slow)
                raise PreflightError(
                    f"all-to-all bandwidth below the floor of {min_gbps:g} GB/s on {ranks_text(slow)}"
                    f" of {world}: {figures}"
                )
        roll.at("finishing")
        mine = json.dumps({"dispatch": dispatch_seconds, "total": time.perf_counter() - started})
        ends = roll.exchange(f"{checks.scope}/finish", mine, timeout=timeout, what="the end of preflight")
        totals = [json.loads(v) for v in ends]
    except PreflightError as error:
        roll.report_failure(str(error))
        raise
    finally:
        checks.watchdog.stop()
    return PreflightReport(
        rank=rank,
        world=world,
        members=roll.members,
        device=device.type,
        transport=transport,
        dispatch_seconds=tuple(float(t["dispatch"]) for t in totals),
        bandwidth_bytes=nbytes if world > 1 else 0,
        gbps=tuple(gbps),
        bandwidth_seconds=tuple(loop),
        min_gbps=min_gbps,
        seconds=tuple(float(t["total"]) for t in totals),
    )
