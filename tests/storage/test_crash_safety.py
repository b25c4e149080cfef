"""A checkpoint writer killed at random moments never leaves a checkpoint that loads wrong."""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

from fireflyer.storage import checkpoint
from tests.storage.states import assert_same_state, training_state

KILLS = 30


def _writer(directory: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    loaded = checkpoint.load_latest(directory)
    step = loaded[0] + 1 if loaded else 1
    ready.set()
    while True:
        state = training_state(step, scale=16)  # ~5 MiB per checkpoint
        if step % 2:
            checkpoint.save(directory, state, step, keep_last=2)
        else:
            checkpoint.save_async(directory, state, step, keep_last=2).wait()
        step += 1


def test_killed_writer_leaves_latest_or_previous_checkpoint(tmp_path: Path) -> None:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "fireflyer.storage.checkpoint", "tests.storage.states"])
    chooser = random.Random(20261122)
    verified = 0
    progressed = 0
    interrupted = 0  # kills that left a save half done
    for _ in range(KILLS):
        ready = context.Event()
        writer = context.Process(target=_writer, args=(str(tmp_path), ready))
        writer.start()
        assert ready.wait(60), "writer never started"
        time.sleep(chooser.uniform(0.0, 0.4))
        writer.kill()
        writer.join()
        interrupted += any(
            not (checkpoint.step_dir(tmp_path, s) / checkpoint.MANIFEST).exists()
            or any(p.name.startswith(".") for p in checkpoint.step_dir(tmp_path, s).iterdir())
            for s in checkpoint.list_steps(tmp_path)
        )
        loaded = checkpoint.load_latest(tmp_path)
        if loaded is None:
            assert verified == 0, "a verified checkpoint disappeared"
            continue
        step, state = loaded
        assert step >= verified, f"went back from step {verified} to {step}"
        assert_same_state(state, training_state(step, scale=16))
        progressed += step > verified
        verified = step
    assert verified > KILLS // 2, f"writers reached only step {verified}"
    assert progressed > KILLS // 2
    assert interrupted >= KILLS // 3, f"only {interrupted} kills landed inside a save"
