"""The stream-K plan of the persistent FP8 GEMM (fp8_stream_k): which K steps each CTA computes,
where partial tiles go, and the fix-up that completes them (no GPU needed)."""

from __future__ import annotations

from collections import Counter

import pytest

from fireflyer.kernels.fp8_stream_k import MIN_RUN_STEPS, contributors, fragments, plan_stream_k
from tests.unit.interpreted import run_interpreted

# (tiles, K steps, SMs): DeepSeek-V3's N = 2112, 4096 and 7168 at M = 64 (64×128 tiles) on 132 SMs,
# runs shorter than a tile, runs spanning several tiles, a single tile.
CASES = [
    (17, 56, 132),
    (32, 56, 132),
    (56, 128, 132),
    (56, 16, 132),
    (3, 40, 8),
    (1, 9, 2),
    (5, 7, 16),
]


@pytest.mark.parametrize("tiles,k_steps,sms", CASES)
def test_every_k_step_of_every_stream_k_tile_is_computed_exactly_once(
    tiles: int, k_steps: int, sms: int
) -> None:
    plan = plan_stream_k(tiles, k_steps, sms)
    programs = plan.programs
    assert plan.sk_steps > 0 and plan.dp_tiles == 0 and tiles < programs <= sms
    assert plan.sk_steps // programs >= MIN_RUN_STEPS
    done: Counter[tuple[int, int]] = Counter()
    by_tile: dict[int, set[tuple[int, int]]] = {}
    for program in range(programs):
        frags = fragments(plan, program)
        assert frags, "every CTA has a run"
        slots = [f.slot for f in frags if f.slot is not None]
        assert len(set(slots)) == len(slots) and set(slots) <= {2 * program, 2 * program + 1}
        for f in frags:
            done.update((f.tile, step) for step in range(f.k_begin, f.k_end))
            if f.slot is not None:
                by_tile.setdefault(f.tile, set()).add((program, f.slot))
            else:
                assert (f.k_begin, f.k_end) == (0, k_steps)
    assert done == Counter((t, s) for t in range(plan.sk_tiles) for s in range(k_steps))
    # The fix-up reads exactly the slots that the CTAs wrote, and nothing for whole tiles.
    for tile in range(plan.sk_tiles):
        assert set(contributors(plan, tile)) == by_tile.get(tile, set())


def test_a_decode_gemm_streams_its_weight_through_every_sm() -> None:
    """N = 2112, K = 7168 at M = 64: 17 tiles of 56 K steps. One CTA per tile keeps 115 of 132 SMs
    idle and walks 56 steps; stream-K gives every SM a run of at most 8."""
    plan = plan_stream_k(17, 56, 132)
    assert (plan.programs, plan.dp_tiles, plan.sk_steps) == (132, 0, 17 * 56)
    assert max(sum(f.k_end - f.k_begin for f in fragments(plan, p)) for p in range(132)) == 8


@pytest.mark.parametrize(
    "tiles,k_steps,sms",
    [(132, 56, 132), (544, 56, 132), (56, 4, 132), (3, 1, 132)],
    ids=["a-full-wave", "several-waves", "runs-too-short", "one-step-tiles"],
)
def test_stream_k_stays_off_where_the_tiles_fill_the_sms_or_runs_would_be_too_short(
    tiles: int, k_steps: int, sms: int
) -> None:
    plan = plan_stream_k(tiles, k_steps, sms)
    assert (plan.programs, plan.dp_tiles, plan.sk_steps) == (min(tiles, sms), tiles, 0)
    assert fragments(plan, 0) == []


def test_fix_up_kernel_in_the_interpreter_completes_the_product() -> None:
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    result = run_interpreted("tests.unit.fp8_stream_k_interpreted")
    assert result["split_tiles"] >= 4
    # fp32 fragments summed in another order, rounded once to BF16: within BF16's rounding.
    assert result["max_error"] <= 1e-2, result
