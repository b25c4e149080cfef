"""`fireflyer preflight` on CPU: ranks are processes talking gloo over loopback, each unit at a free
port. Process start-up (importing torch) dominates, so few processes run many units."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fireflyer.workloads.preflight import PreflightError, join_unit
from fireflyer.workloads.preflight.launch import RankJob, run_rank
from fireflyer.workloads.preflight.unit import Unit, ranks_text
from tests.ports import free_addr

REPO = Path(__file__).resolve().parents[2]
PODS = ("pod-a", "pod-b", "pod-c")
SUMMARY = re.compile(
    r"preflight passed: (\d+) ranks on cpu; dispatch/combine correct \(portable, normal \+ low_latency;"
    r" [\d.]+ s\); all-to-all of 8 MiB per rank: min ([\d.]+) GB/s \(rank \d, pod-[abc]\),"
    r" median ([\d.]+), max ([\d.]+) GB/s; no floor; [\d.]+ s"
)


def _preflight(addr: str, *flags: str, log: Path | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "fireflyer.cli", "preflight", "--dist-init-addr", addr, *flags]
    if log is not None:
        command += ["--termination-log", str(log)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _failure(err: str) -> str:
    """Our line among torch's own log lines on stderr."""
    lines = [line for line in err.splitlines() if line.startswith("preflight failed:")]
    assert lines, err
    return lines[0]


def test_two_ranks_of_one_pod_pass_and_report_their_bandwidth(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    log.write_text("")
    code, out, err = _finish(
        _preflight(free_addr(), "--gpus-per-node", "2", "--timeout", "30", "--name", "pod-a", log=log)
    )
    assert code == 0, err
    summary = SUMMARY.fullmatch(out.strip())
    assert summary, out
    assert summary[1] == "2"
    low, median, high = (float(summary[i]) for i in (2, 3, 4))
    assert 0 < low <= median <= high
    assert log.read_text() == ""  # a passing unit leaves no termination message


def test_a_rank_that_never_starts_is_named_within_the_timeout(tmp_path: Path) -> None:
    addr = free_addr()
    in_pod = tmp_path / "termination-log"
    in_pod.write_text("")
    not_in_pod = tmp_path / "absent" / "termination-log"
    started = time.monotonic()
    procs = [
        _preflight(addr, "--nnodes", "3", "--node-rank", str(r), "--timeout", "3", "--name", PODS[r], log=log)
        for r, log in enumerate((in_pod, not_in_pod))  # rank 2's pod never comes
    ]
    results = [_finish(p) for p in procs]
    elapsed = time.monotonic() - started
    expected = "preflight failed: rank 2 of 3 did not join within 3 s (ranks 0-1 joined: pod-a, pod-b)"
    for code, out, err in results:
        assert (code, out) == (3, ""), err
        assert _failure(err) == expected
    assert in_pod.read_text() == expected
    assert not not_in_pod.exists()  # outside a pod the file is not ours to create
    assert elapsed < 3 + 30  # the timeout plus process start-up, not an indefinite wait


# -- units run by the launcher's rank body: three processes that stay for several units -----------

SCENARIOS = ("passes", "corrupts", "floor", "hangs", "dies")  # rank 1 dies in the last one
HANG = 4.0  # the timeout of the unit where rank 1 hangs; the others use 30 s


def _rank(rank: int, units: list[tuple[str, str, str]]) -> None:
    """One rank of several units in turn: (address, scenario, where the verdict goes)."""
    from fireflyer.kernels import ep

    original = ep.Dispatcher.dispatch
    for addr, scenario, out in units:
        ep.Dispatcher.dispatch = original  # type: ignore[method-assign]
        if scenario == "corrupts" and rank == 2:

            def corrupts(self: ep.Dispatcher, *args: Any) -> Any:
                received, handle = original(self, *args)
                from_rank_0 = (received.x[:, 0] == 0) & (received.x[:, 1] == 0)  # the sender, in the row
                received.x[from_rank_0, 5] += 1
                return received, handle

            ep.Dispatcher.dispatch = corrupts  # type: ignore[method-assign, assignment]
        if scenario == "dies" and rank == 1:

            def dies(*_: Any, **__: Any) -> Any:
                os._exit(1)  # a rank lost inside a collective, after it joined

            ep.Dispatcher.dispatch = dies  # type: ignore[method-assign]
        if scenario == "hangs" and rank == 1:

            def hangs(*_: Any, **__: Any) -> Any:
                # Alive (heartbeat on) but absent from the collective, past the others' timeout
                # and its own watchdog, then back so that this process can go on to the next unit.
                time.sleep(2 * HANG)
                raise RuntimeError("back")

            ep.Dispatcher.dispatch = hangs  # type: ignore[method-assign]

        def hang(error: PreflightError, out: str = out, scenario: str = scenario) -> None:
            Path(out).write_text(str(error))
            if scenario != "hangs":  # there this process's main thread wakes up by itself
                os._exit(3)

        floor = 100000.0 if scenario == "floor" else None
        job = RankJob(
            addr, rank, 3, 0, 1, PODS[rank], "cpu", floor, HANG if scenario == "hangs" else 30.0, None
        )
        verdict = run_rank(job, hang).text
        if not Path(out).exists():  # the watchdog's verdict comes first
            Path(out).write_text(verdict)


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str | None]]:
    """Each scenario's verdict on ranks 0-2 (None: the rank left none)."""
    tmp = tmp_path_factory.mktemp("units")
    outs = {s: [tmp / f"{s}-{r}.txt" for r in range(3)] for s in SCENARIOS}
    addrs = {s: free_addr() for s in SCENARIOS}
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(r, [(addrs[s], s, str(outs[s][r])) for s in SCENARIOS]))
        for r in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
        assert not p.is_alive()
    return {s: [o.read_text() if o.exists() else None for o in outs[s]] for s in SCENARIOS}


def test_three_ranks_pass_and_agree_on_the_report(verdicts: dict[str, list[str | None]]) -> None:
    summaries = [SUMMARY.fullmatch(v or "") for v in verdicts["passes"]]
    assert all(summaries), verdicts["passes"]
    assert {s[1] for s in summaries if s} == {"3"}
    # The figures are gathered to every rank, so every rank reports the same ones.
    assert len(set(verdicts["passes"])) == 1


def test_a_link_that_damages_rows_is_named_by_every_rank(verdicts: dict[str, list[str | None]]) -> None:
    # Rank 2 damages what it receives from rank 0: every rank names that link, and only it.
    damaged = verdicts["corrupts"]
    assert re.fullmatch(
        r"preflight failed: the dispatch/combine check \(normal\) over portable gave wrong results on"
        r" 1 link: rank 0 \(pod-a, 127\.0\.0\.1\) → rank 2 \(pod-c, 127\.0\.0\.1\):"
        r" (\d+) of \1 dispatched rows wrong",
        damaged[0] or "",
    ), damaged
    assert damaged == [damaged[0]] * 3


def test_a_bandwidth_floor_above_what_the_ranks_reach_fails_naming_them(
    verdicts: dict[str, list[str | None]],
) -> None:
    message = verdicts["floor"][0] or ""
    figure = r"\(pod-[abc], 127\.0\.0\.1\) [\d.]+ GB/s"
    assert re.fullmatch(
        r"preflight failed: all-to-all bandwidth below the floor of 100000 GB/s on ranks 0-2 of 3:"
        rf" rank 0 {figure}; rank 1 {figure}; rank 2 {figure}",
        message,
    ), message
    assert verdicts["floor"] == [message] * 3


def test_a_rank_absent_from_a_collective_is_named_and_its_watchdog_reports(
    verdicts: dict[str, list[str | None]],
) -> None:
    # Rank 1 is alive but never enters the dispatch: the others' collectives time out and they
    # name it; its own watchdog reports that its collectives never completed.
    stuck = (
        "preflight failed: rank 1 of 3 (pod-b, 127.0.0.1) did not finish the dispatch/combine check"
        " (normal): it is alive but stuck in it"
    )
    own = (
        "preflight failed: rank 1 (pod-b, 127.0.0.1) did not finish the dispatch/combine check (normal)"
        f" within {HANG:g} s: its collectives never completed"
    )
    assert verdicts["hangs"] == [stuck, own, stuck]


def test_a_rank_lost_inside_the_dispatch_is_named_by_the_others(
    verdicts: dict[str, list[str | None]],
) -> None:
    # Rank 1 dies inside the first collective: the others name it rather than time out blindly.
    expected = (
        "preflight failed: rank 1 of 3 (pod-b, 127.0.0.1) did not finish the dispatch/combine check"
        " (normal): it stopped answering"
    )
    assert verdicts["dies"] == [expected, None, expected]


# -- the rendezvous alone, in this process -----------------------------------------------------


def test_a_rank_that_cannot_reach_rank_0_names_it_and_its_address() -> None:
    addr = free_addr()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(PreflightError) as failure:
        join_unit(addr, 1, 2, timeout=1.0, name="pod-b")
    assert time.monotonic() - started < 5
    assert str(failure.value) == (
        f"preflight failed: rank 0 at {addr} did not answer within 1 s"
        " (rank 1 of 2, pod-b, could not reach the unit's store)"
    )


def _join_in_threads(addr: str, world: int, ranks: range, timeout: float) -> dict[int, Unit | Exception]:
    results: dict[int, Unit | Exception] = {}

    def join(rank: int) -> None:
        try:
            results[rank] = join_unit(addr, rank, world, timeout=timeout, name=PODS[rank])
        except Exception as exc:
            results[rank] = exc

    threads = [threading.Thread(target=join, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_joined_ranks_share_names_and_a_store_for_the_process_group() -> None:
    results = _join_in_threads(free_addr(), 2, range(2), timeout=10.0)
    units = [results[r] for r in range(2)]
    assert all(isinstance(u, Unit) for u in units), units
    a, b = (u for u in units if isinstance(u, Unit))
    assert (a.rank, b.rank, a.world) == (0, 1, 2)
    assert a.names == b.names == ("pod-a", "pod-b")
    # The store is the rendezvous the engine's process group is then built on.
    b.store.set("engine-key", "from rank 1")
    assert a.store.get("engine-key") == b"from rank 1"
    for u in (b, a):
        u.close(linger=2.0)


def test_a_missing_rank_fails_the_join_on_every_rank_that_came() -> None:
    results = _join_in_threads(free_addr(), 3, range(2), timeout=1.0)
    expected = "preflight failed: rank 2 of 3 did not join within 1 s (ranks 0-1 joined: pod-a, pod-b)"
    assert [str(results[r]) for r in range(2)] == [expected, expected]
    assert all(isinstance(results[r], PreflightError) for r in range(2))


def test_ranks_are_written_as_runs() -> None:
    assert ranks_text([3]) == "rank 3"
    assert ranks_text([2, 0, 1]) == "ranks 0-2"
    assert ranks_text([0, 2, 3, 4, 7]) == "ranks 0, 2-4, 7"
