"""Next-token choice per sequence: greedy, or temperature with top-k and top-p, drawn from the
request's own generator when it set a seed (so a seeded request is reproducible in any batch)."""

from __future__ import annotations

import torch

from fireflyer.workloads.serve.types import SamplingParams

# Below this a temperature only sharpens the distribution onto its top token (and dividing by it
# could overflow): such requests are served greedily.
MIN_TEMPERATURE = 1e-5


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits [S, V] fp32 → one token id per row."""
    if not len(params):
        return []
    greedy = logits.argmax(dim=-1)
    chosen = greedy.tolist()
    for row, p in enumerate(params):
        if p.temperature >= MIN_TEMPERATURE:
            chosen[row] = _draw(logits[row], p, generators[row])
    return chosen


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    scaled = (logits - logits.max()) / p.temperature  # ≤ 0 everywhere: no overflow
    if 0 < p.top_k < scaled.shape[-1]:
        cutoff = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= p.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
