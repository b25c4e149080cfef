"""Pipeline sizes without any rank running: which rank holds which stages and sums with whom, how
layers are cut, and the flags and checkpoint directories a pipeline run refuses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from fireflyer.workloads.train.config import TrainConfig, TrainError
from fireflyer.workloads.train.layout import Layout, check_checkpoint_layout, split_layers, stage_dir


def test_1f1b_ranks_hold_one_stage_and_sum_with_their_data_parallel_replicas() -> None:
    layout = Layout(world=8, pipeline=4, schedule="1f1b")
    assert layout.data == 2
    assert [layout.position(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [layout.replica(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.stages(2) == (2,)
    assert layout.replica_group(1) == (1, 5)
    assert layout.replica_groups() == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_dualpipe_ranks_hold_mirrored_stages_and_sum_with_the_mirror() -> None:
    layout = Layout(world=8, pipeline=4, schedule="dualpipe")
    assert [layout.stages(p) for p in range(4)] == [(0, 3), (1, 2), (2, 1), (3, 0)]
    # Ranks 0 and 3 hold stages 0 and 3, in both replicas.
    assert layout.replica_group(3) == (0, 3, 4, 7)
    assert layout.replica_groups() == [(0, 3, 4, 7), (1, 2, 5, 6)]
    one = Layout(world=2, pipeline=1, schedule="dualpipe")  # one stage: nothing to mirror
    assert one.stages(0) == (0,) and one.replica_group(1) == (0, 1)


def test_the_pipeline_must_divide_the_world() -> None:
    with pytest.raises(TrainError, match="--pipeline 4 does not divide the 6 ranks"):
        Layout(world=6, pipeline=4, schedule="1f1b")


def test_layers_split_evenly_and_every_stage_gets_one() -> None:
    assert split_layers(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert split_layers(61, 4) == [range(0, 15), range(15, 30), range(30, 45), range(45, 61)]
    assert split_layers(3, 1) == [range(0, 3)]
    with pytest.raises(TrainError, match="--pipeline 8: the model has 3 layers"):
        split_layers(3, 8)


BASE = TrainConfig(model=Path("m"), data=Path("d"), steps=1, micro_batches=8, pipeline=4, schedule="dualpipe")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schedule": "none"}, "--pipeline 4 needs a --schedule: 1f1b or dualpipe"),
        ({"pipeline": 3, "micro_batches": 6}, "--schedule dualpipe needs an even --pipeline, not 3"),
        ({"micro_batches": 6}, "needs an even --micro-batches ≥ 8, not 6"),
        ({"micro_batches": 9}, "needs an even --micro-batches ≥ 8, not 9"),
        ({"pipeline": 0}, "--pipeline must be ≥ 1"),
    ],
)
def test_impossible_pipeline_flags_are_refused(changes: dict[str, object], message: str) -> None:
    BASE.validate()
    replace(BASE, schedule="1f1b", micro_batches=1).validate()  # 1F1B runs any number
    replace(BASE, pipeline=1, schedule="none").validate()
    with pytest.raises(TrainError, match=message):
        replace(BASE, **changes).validate()  # type: ignore[arg-type]


def test_a_checkpoint_directory_of_another_pipeline_is_refused(tmp_path: Path) -> None:
    check_checkpoint_layout(tmp_path / "absent", 4)
    one = tmp_path / "one"
    (one / "step-000000000010").mkdir(parents=True)
    check_checkpoint_layout(one, 1)
    with pytest.raises(TrainError, match="holds a run of --pipeline 1; resume it with --pipeline 1"):
        check_checkpoint_layout(one, 2)
    four = tmp_path / "four"
    stage_dir(four, 3, 4).mkdir(parents=True)
    check_checkpoint_layout(four, 4)
    with pytest.raises(TrainError, match="holds a run of --pipeline 4"):
        check_checkpoint_layout(four, 2)
    with pytest.raises(TrainError, match="holds a run of --pipeline 4"):
        check_checkpoint_layout(four, 1)
