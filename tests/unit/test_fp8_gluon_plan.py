"""The Gluon FP8 GEMMs' host-side plan: tile configs, their shared memory, the default per M (no GPU
needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from fireflyer.kernels import fp8_gluon as fg

HOPPER_SHARED = 227 * 1024


@pytest.mark.parametrize("name", sorted(fg.CONFIGS))
def test_every_config_fits_hopper_shared_memory(name: str) -> None:
    assert fg.shared_bytes(fg.CONFIGS[name]) <= HOPPER_SHARED


def test_a_two_step_stage_holds_twice_the_operands() -> None:
    one = fg.GluonConfig(64, 128, "m", 3)
    two = fg.GluonConfig(64, 128, "m", 3, k_per_stage=2)
    ring = 3 * (128 + 128) * fg.GROUP
    assert fg.shared_bytes(two) - fg.shared_bytes(one) == ring
    assert two.name == "128x128/m/s3/k2" and one.name == "128x128/m/s3"
    assert fg.CONFIGS["128x128k2pl"].name == "128x128/m/s3/k2/p/l"


def test_the_default_streams_the_weight_with_more_ctas_for_few_rows() -> None:
    for m in (1, 64, 128):
        cfg = fg.default_config(m)
        assert (cfg.block_m, cfg.block_n, cfg.k_per_stage) == (64, 128, 2)
    for m in (129, 4096):
        cfg = fg.default_config(m)
        assert (cfg.block_m, cfg.block_n, cfg.k_per_stage) == (128, 128, 2)


def test_the_defaults_load_scales_ahead() -> None:
    # Measured on an H200: loading each K step's scales two steps ahead gained 3-5 % at M = 64, 128
    # and 4096 (docs/benchmarks.md).
    assert fg.default_config(64).prefetch_scales and fg.default_config(4096).prefetch_scales
