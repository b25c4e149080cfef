"""The Gluon (warp-specialised, TMA) MLA decode kernel against the torch reference on a Hopper GPU
(skipped elsewhere)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import mla  # noqa: E402
from fireflyer.kernels.fp8 import calc_diff  # noqa: E402
from fireflyer.kernels.mla_gluon import CONFIGS, HAVE_GLUON, mla_decode_gluon  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (HOPPER and HAVE_GLUON), reason="needs a Hopper GPU and Triton's Gluon"),
]
SCALE = 192**-0.5


def _inputs(b: int, s_q: int, h_q: int, seqlens: list[int], seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator(device="cuda").manual_seed(seed)
    max_pages = max(math.ceil(n / mla.PAGE) for n in seqlens)
    num_blocks = b * max_pages
    q = torch.randn(b, s_q, h_q, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    kv = torch.randn(num_blocks, mla.PAGE, 1, mla.D_QK, device="cuda", dtype=torch.bfloat16, generator=g)
    table = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32).view(b, max_pages)
    lens = torch.tensor(seqlens, dtype=torch.int32, device="cuda")
    return q, kv, table, lens


def _assert_matches_reference(q, kv, table, lens, out, lse) -> None:  # type: ignore[no-untyped-def]
    ref_out, ref_lse = mla.mla_decode_reference(q, kv, table, lens, SCALE)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    # P enters the P·V product in BF16 (as in the Triton kernel): with a handful of visible keys
    # the output is a few cache rows of magnitude ~3, where one BF16 unit is 2^-7 of the value.
    torch.testing.assert_close(out.float(), ref_out.float(), atol=8e-3, rtol=2**-7)
    assert calc_diff(out, ref_out) <= 5e-6
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    "b,s_q,h_q,seqlens",
    [
        (2, 1, 16, [1, 64]),
        (3, 1, 32, [63, 65, 700]),
        (4, 1, 64, [4096, 1, 333, 2048]),
        (3, 2, 16, [1, 2, 129]),  # the first sequence is shorter than s_q: one query sees nothing
        (2, 2, 32, [129, 4095]),
        (2, 2, 64, [100, 1]),
        (3, 2, 128, [63, 65, 700]),
        (4, 1, 128, [4096, 1, 333, 2048]),
        (8, 1, 128, [8192] * 8),  # DeepSeek-V3 decode shape
    ],
)
@pytest.mark.parametrize("config", [None, "w64s2"])
def test_mla_gluon_matches_reference(
    b: int, s_q: int, h_q: int, seqlens: list[int], config: str | None
) -> None:
    q, kv, table, lens = _inputs(b, s_q, h_q, seqlens)
    out, lse = mla_decode_gluon(q, kv, table, lens, SCALE, config=CONFIGS[config] if config else None)
    _assert_matches_reference(q, kv, table, lens, out, lse)


def test_a_query_with_no_visible_key_gives_zeros_and_minus_infinity() -> None:
    q, kv, table, lens = _inputs(1, 2, 16, [1])
    out, lse = mla_decode_gluon(q, kv, table, lens, SCALE)
    assert bool((out[0, 0] == 0).all())
    assert bool(torch.isneginf(lse[0, :, 0]).all())
    assert bool(torch.isfinite(lse[0, :, 1]).all())


@pytest.mark.parametrize("splits", [None, 1, 16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_matches_reference(name: str, splits: int | None) -> None:
    # With 16 splits the 31-token sequence leaves most splits without a KV tile.
    q, kv, table, lens = _inputs(3, 2, 64, [95, 1000, 31], seed=1)
    out, lse = mla_decode_gluon(q, kv, table, lens, SCALE, splits=splits, config=CONFIGS[name])
    _assert_matches_reference(q, kv, table, lens, out, lse)


def test_the_launch_cache_serves_other_shapes_and_unaligned_queries() -> None:
    # The second call reuses the first call's binary (same constexprs): other batch, lengths and
    # block-table width. The third passes queries that start 2 bytes into their storage.
    for b, seqlens in [(3, [95, 1000, 31]), (5, [4000, 1, 64, 65, 2222])]:
        q, kv, table, lens = _inputs(b, 1, 32, seqlens, seed=b)
        out, lse = mla_decode_gluon(q, kv, table, lens, SCALE, splits=1)
        _assert_matches_reference(q, kv, table, lens, out, lse)
    storage = torch.randn(q.numel() + 1, device="cuda", dtype=torch.bfloat16)
    shifted = storage[1:].view_as(q).copy_(q)
    assert shifted.data_ptr() % 16 != 0
    out, lse = mla_decode_gluon(shifted, kv, table, lens, SCALE, splits=1)
    _assert_matches_reference(q, kv, table, lens, out, lse)


def test_split_count_does_not_change_the_result() -> None:
    q, kv, table, lens = _inputs(2, 2, 128, [1000, 3000], seed=3)
    one, lse_one = mla_decode_gluon(q, kv, table, lens, SCALE, splits=1)
    many, lse_many = mla_decode_gluon(q, kv, table, lens, SCALE, splits=16)
    assert calc_diff(one, many) < 5e-6
    torch.testing.assert_close(lse_one, lse_many, atol=1e-4, rtol=1e-5)


def test_unsupported_inputs_raise_value_error() -> None:
    q, kv, table, lens = _inputs(1, 1, 16, [64])
    with pytest.raises(ValueError):
        mla_decode_gluon(q.float(), kv, table, lens, SCALE)
    with pytest.raises(ValueError):
        mla_decode_gluon(q, kv.view(torch.uint8)[..., :656], table, lens, SCALE)
    with pytest.raises(ValueError):
        mla_decode_gluon(q, kv, table, lens, SCALE, config={"BLOCK_N": 48})


@pytest.mark.parametrize("name", ["n64s2", "n32s4"])
@pytest.mark.parametrize("parts", [3, 132])
def test_balanced_runs_match_the_reference(name: str, parts: int) -> None:
    from fireflyer.kernels.mla_schedule import balanced_schedule

    # A long sequence among short ones and an empty one: runs that end, cover and start
    # sequences (3 runs), and runs with nothing to do (132 runs, fewer tiles than that for some).
    seqlens = [9000, 0, 1, 700, 65, *[129] * 6]
    q, kv, table, lens = _inputs(len(seqlens), 2, 64, seqlens, seed=4)
    config = CONFIGS[name]
    schedule = balanced_schedule(lens, parts, config["BLOCK_N"])
    out, lse = mla_decode_gluon(q, kv, table, lens, SCALE, config=config, schedule=schedule)
    ref_out, ref_lse = mla.mla_decode_reference(q, kv, table, lens, SCALE)
    finite = ref_lse.isfinite()
    assert torch.equal(finite, lse.isfinite())
    assert calc_diff(out, ref_out) <= 5e-6
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="tiles of these"):
        mla_decode_gluon(q, kv, table, lens, SCALE, config=CONFIGS["w32s4"], schedule=schedule)


def test_mla_decode_attends_a_steps_shared_balanced_schedule() -> None:
    from fireflyer.kernels.mla_gluon import CONFIG, balanced_parts
    from fireflyer.kernels.mla_schedule import StepSchedules

    q, kv, table, lens = _inputs(6, 2, 64, [9000, 1, 700, 65, 129, 3000], seed=12)
    schedules = StepSchedules(lens)
    out, lse = mla.mla_decode(q, kv, table, lens, SCALE, backend="gluon", schedules=schedules)
    assert list(schedules.made) == [(balanced_parts(q), CONFIG["BLOCK_N"])]
    _assert_matches_reference(q, kv, table, lens, out, lse)
