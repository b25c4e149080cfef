"""Load a Hugging Face DeepSeek-V3 checkpoint directory (config.json + safetensors, one file or
shards with or without model.safetensors.index.json) into `DeepseekV3`. A rank reads only the
routed experts it hosts; multi-token-prediction layers past num_hidden_layers are skipped."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from fireflyer.errors import FireflyerError
from fireflyer.workloads.model.config import ModelConfig
from fireflyer.workloads.model.model import Backends, DeepseekV3, Parallel
from fireflyer.workloads.model.moe import Experts, MoE

EXPERT = re.compile(
    r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$"
)
LAYER = re.compile(r"layers\.(\d+)\.")


class CheckpointError(FireflyerError):
    """A checkpoint that does not match its config (the message names the tensors)."""


def checkpoint_files(model_dir: Path) -> dict[str, list[str]]:
    """safetensors file → the tensor names in it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files: dict[str, list[str]] = defaultdict(list)
        for name, file in json.loads(index.read_text())["weight_map"].items():
            files[file].append(name)
        return dict(files)
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    result = {}
    for path in found:
        with safe_open(str(path), framework="pt") as handle:
            result[path.name] = list(handle.keys())
    return result


class _Target:
    """Where one checkpoint tensor goes in the model, or None when this rank does not need it."""

    def __init__(self, model: DeepseekV3) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.config = model.config

    def resolve(self, name: str) -> Callable[[torch.Tensor], None] | None:
        short = name.removeprefix("model.")
        layer = LAYER.match(short)
        if layer and int(layer.group(1)) >= self.config.num_hidden_layers:
            return None  # the multi-token-prediction module: not used for serving
        if short in ("lm_head.weight",):
            return self._copy_to("lm_head")
        expert = EXPERT.match(short)
        if expert:
            return self._expert(int(expert.group(1)), int(expert.group(2)), expert.group(3), expert.group(4))
        if short.endswith(".inv_freq"):
            return None
        return self._copy_to(short) if short in self.params else self._unknown(name)

    def _unknown(self, name: str) -> Callable[[torch.Tensor], None]:
        raise CheckpointError(f"checkpoint tensor {name} has no place in the model (is config.json right?)")

    def _copy_to(self, param: str) -> Callable[[torch.Tensor], None]:
        target = self.params[param]

        def copy(tensor: torch.Tensor) -> None:
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{param}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}"
                )
            target.data.copy_(tensor.to(target.dtype) if target.dtype != tensor.dtype else tensor)

        return copy

    def _expert(self, layer: int, index: int, proj: str, kind: str) -> Callable[[torch.Tensor], None] | None:
        mlp = self.model.layers[layer].mlp
        if not isinstance(mlp, MoE):
            raise CheckpointError(
                f"layer {layer} has routed experts in the checkpoint but is dense in config.json"
            )
        return expert_target(mlp.experts, layer, index, proj, kind)


def expert_target(
    experts: Experts, layer: int, index: int, proj: str, kind: str
) -> Callable[[torch.Tensor], None] | None:
    """Where checkpoint tensor (expert `index`, `proj`, `kind`) goes in `experts`: every local
    slot holding that expert (an EPLB placement may give one GPU two replicas); None when the
    expert is hosted elsewhere."""
    slots = [slot for slot, held in enumerate(experts.experts) if held == index]
    if not slots:
        return None  # hosted by another rank
    scale = kind == "weight_scale_inv"
    stacked = (
        (experts.w2_scale if scale else experts.w2)
        if proj == "down_proj"
        else (experts.w13_scale if scale else experts.w13)
    )
    if stacked is None:
        raise CheckpointError(
            f"layer {layer} expert {index}: FP8 scales in a checkpoint without quantization_config"
        )
    half = stacked.shape[1] // 2
    rows = {"gate_proj": slice(0, half), "up_proj": slice(half, 2 * half), "down_proj": slice(None)}[proj]
    targets = [stacked.data[slot, rows] for slot in slots]

    def copy(tensor: torch.Tensor) -> None:
        for target in targets:
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"layer {layer} expert {index} {proj}.{kind}: checkpoint {tuple(tensor.shape)},"
                    f" model {tuple(target.shape)}"
                )
            target.copy_(tensor.to(target.dtype) if target.dtype != tensor.dtype else tensor)

    return copy


def load_expert_slots(model_dir: str | Path, layer: int, experts: Experts) -> None:
    """Fill `experts` (the slots of MoE layer `layer` on this rank) from the checkpoint: how an
    EPLB placement gets the experts it moves here."""
    model_dir = Path(model_dir)
    device = str(experts.w13.device)
    wanted: dict[str, Callable[[torch.Tensor], None]] = {}
    for file, names in checkpoint_files(model_dir).items():
        for name in names:
            match = EXPERT.match(name.removeprefix("model."))
            if match and int(match.group(1)) == layer:
                copy = expert_target(experts, layer, int(match.group(2)), match.group(3), match.group(4))
                if copy is not None:
                    wanted[f"{file}\0{name}"] = copy
    loaded: set[int] = set()
    by_file: dict[str, list[str]] = defaultdict(list)
    for key in wanted:
        file, name = key.split("\0", 1)
        by_file[file].append(name)
    for file, names in by_file.items():
        with safe_open(str(model_dir / file), framework="pt", device=device) as handle:
            for name in names:
                wanted[f"{file}\0{name}"](handle.get_tensor(name))
                match = EXPERT.match(name.removeprefix("model."))
                assert match is not None
                loaded.add(int(match.group(2)))
    missing = sorted(set(experts.experts) - loaded)
    if missing:
        raise CheckpointError(f"{model_dir}: layer {layer} experts {missing} are not in the checkpoint")


def load_tensors(model: DeepseekV3, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy (name, tensor) pairs in; returns the names used."""
    target = _Target(model)
    used = set()
    for name, tensor in tensors:
        copy = target.resolve(name)
        if copy is not None:
            copy(tensor)
            used.add(name)
    return used


def _read(model_dir: Path, model: DeepseekV3, device: str) -> Iterator[tuple[str, torch.Tensor]]:
    target = _Target(model)
    for file, names in checkpoint_files(model_dir).items():
        wanted = [n for n in names if target.resolve(n) is not None]
        if not wanted:
            continue
        with safe_open(str(model_dir / file), framework="pt", device=device) as handle:
            for name in wanted:
                yield name, handle.get_tensor(name)


def expected_names(model: DeepseekV3) -> set[str]:
    """The checkpoint names that must be present for this rank."""
    config = model.config
    names = set()
    for param, _ in model.named_parameters():
        if ".experts.w" in param:
            continue
        if param == "lm_head":
            if not config.tie_word_embeddings:
                names.add("lm_head.weight")
            continue
        names.add(f"model.{param}")
    for i, block in enumerate(model.layers):
        if isinstance(block.mlp, MoE):
            suffixes = ["weight", "weight_scale_inv"] if config.fp8_weights else ["weight"]
            for j in block.mlp.experts.experts:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    names.update(f"model.layers.{i}.mlp.experts.{j}.{proj}.{s}" for s in suffixes)
    return names


def load_model(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    parallel: Parallel | None = None,
    backends: Backends | None = None,
) -> DeepseekV3:
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    with torch.device(device):
        model = DeepseekV3(config, device=device, dtype=dtype, parallel=parallel, backends=backends)
    used = load_tensors(model, _read(model_dir, model, str(model.device)))
    missing = expected_names(model) - used
    if config.tie_word_embeddings:
        model.lm_head.data.copy_(model.embed_tokens.weight.data)
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise CheckpointError(
            f"{model_dir}: {len(missing)} tensors missing from the checkpoint, e.g. {shown}"
        )
    model.prepare()
    return model
