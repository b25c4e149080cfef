"""A training checkpoint's weights under their Hugging Face names, for serving.

A training checkpoint (state.py) keeps the model's own parameter names, with the routed experts
stacked per layer (`layers.L.mlp.experts.w13` = [gate; up] of every expert, `...w2` = down).
Loaded with world 1 (`checkpoint.load(D, step)`) it holds every expert whatever expert-parallel
size saved it; `serving_tensors` names its tensors as a Hugging Face DeepSeek-V3 checkpoint does, so
`fireflyer.workloads.model.loader.load_tensors` fills a serving model — each rank keeping only the
experts it hosts — or `checkpoint_writer` writes them out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

STACKED = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(w13|w2)$")


def serving_tensors(weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for every weight of a training checkpoint's `model` tree."""
    for name, tensor in weights.items():
        stacked = STACKED.match(name)
        if name == "lm_head":
            yield "lm_head.weight", tensor
        elif stacked is None:
            yield f"model.{name}", tensor
        elif stacked.group(2) == "w2":
            for expert, down in enumerate(tensor):
                yield f"model.{stacked.group(1)}.{expert}.down_proj.weight", down
        else:
            for expert, both in enumerate(tensor):
                gate, up = both.chunk(2, dim=0)
                yield f"model.{stacked.group(1)}.{expert}.gate_proj.weight", gate
                yield f"model.{stacked.group(1)}.{expert}.up_proj.weight", up
