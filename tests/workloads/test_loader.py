"""Checkpoint loading: a rank reads only the experts it hosts; sharded and single-file
checkpoints load the same weights; a checkpoint that does not match its config is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fireflyer.workloads.model import loader
from fireflyer.workloads.model.init import init_checkpoint
from fireflyer.workloads.model.loader import CheckpointError, load_model
from fireflyer.workloads.model.model import Parallel
from fireflyer.workloads.model.moe import MoE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_checkpoint(tmp_path_factory.mktemp("one") / "tiny", preset="tiny", dtype="fp8", seed=2)


def test_a_rank_reads_and_holds_only_its_experts(checkpoint: Path) -> None:
    whole = load_model(checkpoint)
    half = load_model(checkpoint, parallel=Parallel(expert_rank=1, expert_size=2))
    read = [name for name, _ in loader._read(checkpoint, half, "cpu")]
    experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts_read == set(range(8, 16))
    for full_block, half_block in zip(whole.blocks, half.blocks, strict=True):
        if isinstance(full_block.mlp, MoE):
            assert isinstance(half_block.mlp, MoE)
            assert half_block.mlp.experts.experts == range(8, 16)
            assert torch.equal(
                half_block.mlp.experts.w13.view(torch.uint8), full_block.mlp.experts.w13[8:].view(torch.uint8)
            )
            assert half_block.mlp.experts.w2_scale is not None and full_block.mlp.experts.w2_scale is not None
            assert torch.equal(half_block.mlp.experts.w2_scale, full_block.mlp.experts.w2_scale[8:])


def test_sharded_checkpoint_loads_the_same_weights(tmp_path: Path, checkpoint: Path) -> None:
    sharded = init_checkpoint(
        tmp_path / "sharded", preset="tiny", dtype="fp8", seed=2, max_shard_bytes=1 << 20
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_model(checkpoint), load_model(sharded)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for item in checkpoint.iterdir():
        (wrong / item.name).write_bytes(item.read_bytes())
    config = json.loads((wrong / "config.json").read_text())
    config["num_hidden_layers"] = 4  # one more layer than the weights have
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(wrong)
    config["num_hidden_layers"] = 3
    config["moe_intermediate_size"] = 256
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"layer 1 expert 0 \w+_proj\.weight: checkpoint"):
        load_model(wrong)
