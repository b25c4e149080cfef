"""The Gluon MLA decode kernel's host-side plan: split counts and what it refuses (no GPU needed)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fireflyer.kernels import mla  # noqa: E402
from fireflyer.kernels.mla_gluon import CONFIGS, mla_decode_gluon, one_wave_splits  # noqa: E402


def test_a_full_batch_runs_unsplit_in_one_wave() -> None:
    assert one_wave_splits(programs=128, num_sms=132, max_tiles=256) == 1
    assert one_wave_splits(programs=256, num_sms=132, max_tiles=256) == 1


def test_a_small_batch_is_split_to_fill_the_gpu_once() -> None:
    splits = one_wave_splits(programs=16, num_sms=132, max_tiles=1000)
    assert splits == 8 and 16 * splits <= 132


def test_splits_never_exceed_the_tiles_nor_64() -> None:
    assert one_wave_splits(programs=1, num_sms=132, max_tiles=3) == 3
    assert one_wave_splits(programs=1, num_sms=132, max_tiles=10_000) == 64
    assert one_wave_splits(programs=0, num_sms=132, max_tiles=0) == 1


def test_every_config_fits_hopper_shared_memory() -> None:
    q_bytes = 64 * mla.D_QK * 2
    for cfg in CONFIGS.values():
        assert mla.PAGE % cfg["BLOCK_N"] == 0
        # The seesaw also hands a tile's P and three row statistics between its warpgroups.
        handover = (64 * cfg["BLOCK_N"] * 2 + 3 * 64 * 4) if cfg.get("SEESAW") else 0
        assert q_bytes + cfg["STAGES"] * cfg["BLOCK_N"] * mla.D_QK * 2 + handover <= 227 * 1024


def test_cpu_inputs_are_refused_with_value_error() -> None:
    q = torch.zeros(1, 1, 16, mla.D_QK, dtype=torch.bfloat16)
    kv = torch.zeros(1, mla.PAGE, 1, mla.D_QK, dtype=torch.bfloat16)
    table = torch.zeros(1, 1, dtype=torch.int32)
    lens = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="mla_decode_gluon"):
        mla_decode_gluon(q, kv, table, lens, 0.1)
