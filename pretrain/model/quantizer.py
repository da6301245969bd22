"""Gumbel-softmax product quantizer for the contrastive targets (wav2vec2, Baevski et al. 2020).

G groups of V learned entries; each frame picks one entry per group and the picks are
concatenated. Training uses the straight-through Gumbel-softmax (hard one-hot forward, soft
gradient backward) with a temperature annealed by :func:`gumbel_temperature`; evaluation takes
the argmax. The diversity loss ``(GV - perplexity) / GV`` pushes the batch's average soft
assignment towards using every entry.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.rng import uniform


@dataclasses.dataclass
class QuantizerConfig:
    """Product quantizer of the targets; off by default."""

    enabled: bool = False
    """Quantize the targets (True) or use the unmasked latents as they are (False)."""
    groups: int = 2
    """G: codebooks, one entry picked from each (at most 64)."""
    entries: int = 320
    """V: entries per codebook (at most 16384; wav2vec 2.0: 320)."""
    dim: int = 256
    """Width of a quantized vector (all groups concatenated; each group gets dim / G; at most
    4096): the codebooks hold ``entries * dim`` values."""
    temperature: tuple[float, float, float] = (2.0, 0.5, 0.999995)
    """Gumbel temperature (start, end, decay per step): ``max(start * decay**step, end)``."""
    logit_init: str = "wav2vec2"
    """Initial scale of the projection from a latent to the G x V logits. ``wav2vec2``: unit
    normal weights, as wav2vec 2.0 (on layer-normed latents of width D the logits start with a
    standard deviation of about sqrt(D), 11 at D = 128, so the Gumbel softmax is one-hot from
    the first step); ``unit``: normal weights of standard deviation 1/sqrt(D), logits of about
    unit variance, so the early assignments are soft and spread over the entries."""

    def __post_init__(self) -> None:
        self.temperature = tuple(float(t) for t in self.temperature)
        schedule_ok = len(self.temperature) == 3
        if schedule_ok:
            start, end, decay = self.temperature
            schedule_ok = 0 < end <= start and 0 < decay <= 1
        checks = {
            "groups": 1 <= self.groups <= 64,
            "entries": 2 <= self.entries <= 16384,
            "dim": 1 <= self.dim <= 4096 and self.dim % max(self.groups, 1) == 0,
            "temperature": schedule_ok,
            "logit_init": self.logit_init in LOGIT_INITS,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"QuantizerConfig.{name}: invalid value {getattr(self, name)!r}")


LOGIT_INITS = ("wav2vec2", "unit")
"""Choices of :attr:`QuantizerConfig.logit_init`."""


def gumbel_temperature(step: int, cfg: QuantizerConfig) -> float:
    """The Gumbel-softmax temperature at optimizer step ``step`` (a pure function of it)."""
    start, end, decay = cfg.temperature
    return max(start * decay ** max(step, 0), end)


class QuantizerOutput(NamedTuple):
    """What :class:`GumbelProductQuantizer` returns."""

    quantized: torch.Tensor
    """(..., dim) the picked entries, concatenated over groups."""
    codes: torch.Tensor
    """(..., G) int64 index of the entry picked in each group."""
    stats: dict[str, torch.Tensor]
    """Detached scalars: perplexity (soft, 1..GV), code_perplexity (of the picks),
    usage (share of the GV entries picked at least once in this batch), dead_codes (count
    never picked in this batch), temperature."""
    diversity_loss: torch.Tensor
    """(GV - perplexity) / GV in [0, 1), with gradient."""


class GumbelProductQuantizer(nn.Module):
    """x (..., input_dim) -> :class:`QuantizerOutput`."""

    def __init__(self, input_dim: int, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        G, V = cfg.groups, cfg.entries
        self.logits = nn.Linear(input_dim, G * V)
        # wav2vec2's initialisation: unit-normal logit projection, uniform entries; or logits of
        # unit variance on unit-variance inputs (QuantizerConfig.logit_init)
        std = 1.0 if cfg.logit_init == "wav2vec2" else input_dim**-0.5
        nn.init.normal_(self.logits.weight, 0.0, std)
        nn.init.zeros_(self.logits.bias)
        self.codebook = nn.Parameter(torch.empty(G, V, cfg.dim // G).uniform_())

    def forward(
        self,
        x: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        valid: torch.Tensor | None = None,
    ) -> QuantizerOutput:
        """Training draws Gumbel noise from ``generator`` (required); eval takes the argmax.
        ``valid`` (...) bool selects the frames the statistics are computed over (all: None)."""
        G, V = self.cfg.groups, self.cfg.entries
        lead = x.shape[:-1]
        logits = self.logits(x).float().reshape(-1, G, V)  # (N, G, V), float32 for stability
        if self.training:
            if generator is None:
                raise ValueError("the quantizer needs a torch.Generator in training mode")
            u = uniform(tuple(logits.shape), generator, logits.device)
            exponential = -torch.log(u.clamp_min(1e-10))  # Exp(1), > 0 since u < 1
            gumbel = -torch.log(exponential)
            soft_noisy = ((logits + gumbel) / temperature).softmax(-1)
            codes = soft_noisy.argmax(-1)  # (N, G)
            hard = F.one_hot(codes, V).to(soft_noisy.dtype)
            weights = hard - soft_noisy.detach() + soft_noisy  # straight-through
        else:
            codes = logits.argmax(-1)
            weights = F.one_hot(codes, V).to(logits.dtype)
        codebook = self.codebook
        quantized = torch.einsum("ngv,gvc->ngc", weights.to(codebook.dtype), codebook)
        quantized = quantized.reshape(*lead, self.cfg.dim)  # (..., G * dim / G)

        probs, picked = logits.softmax(-1), codes
        if valid is not None:
            keep = valid.reshape(-1)
            probs, picked = probs[keep], picked[keep]
        perplexity = _perplexity(probs.mean(0))  # (G, V) average soft assignment
        counts = F.one_hot(picked, V).sum(0)  # (G, V)
        stats = {
            "perplexity": perplexity.detach(),
            "code_perplexity": _perplexity(counts.float() / max(len(picked), 1)),
            "usage": (counts > 0).float().mean(),
            "dead_codes": (counts == 0).sum(),
            "temperature": torch.tensor(float(temperature), device=logits.device),
        }
        diversity = (G * V - perplexity) / (G * V)
        return QuantizerOutput(quantized.to(x.dtype), codes.reshape(*lead, G), stats, diversity)


def _perplexity(marginal: torch.Tensor) -> torch.Tensor:
    """Sum over groups of exp(entropy) of each group's distribution (G, V): in [G, GV]. The
    gradient stays finite where a probability underflows to exactly 0 (log p's would be -inf:
    a sharpening codebook turned every step non-finite)."""
    entropy = -torch.special.xlogy(marginal, marginal.clamp_min(1e-30)).sum(-1)  # 0 log 0 = 0
    return entropy.exp().sum()
