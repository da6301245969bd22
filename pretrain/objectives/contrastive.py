"""The contrastive task of PoseBERT: pick the true target of a masked frame among distractors.

InfoNCE (van den Oord et al. 2018) on cosine similarity over a temperature, as in wav2vec 2.0
(Baevski et al. 2020, eq. 3): for a masked frame with context ``c``, positive target ``q`` and
distractors ``q~``,

    L = -log( exp(cos(c, q) / tau) / (exp(cos(c, q) / tau) + sum_n exp(cos(c, q~_n) / tau)) ).

With multi-view positives the targets of the same instant in the other views are positives too
(issue 3). Two multi-positive forms are offered (Khosla et al. 2020, "Supervised Contrastive
Learning", eq. 2-3, their L_out and L_in):

- ``mean`` (default): the average over positives p of the single-positive loss above, each
  positive against the same distractors (the other positives are not in its denominator, so
  the views never push each other apart). Its gradient reaches every view, so the context has
  to match all of them: the view invariance multi-view positives are meant to teach. Khosla et
  al. found this "outside the log" form trains better.
- ``sum``: -log(sum_p exp(s_p) / (sum_p exp(s_p) + sum_n exp(s_n))). Satisfied as soon as one
  positive (in practice the frame's own view) wins, so the other views add little pressure.

Both reduce to the single-positive loss with one view or ``multiview_positives=False``.

An optional second term acts on the frames themselves rather than on masked predictions
(``frame_weight``): the multi-view time-contrastive loss of Sermanet et al. 2018 ("Time-
Contrastive Networks"). Every frame's target is an anchor; its positives are the targets of the
same instant in the other views (other cameras, and other appearances with appearance-swapped
shards); its distractors are drawn by the same sampler from every frame of the pool (with
``same_window``, the other instants of its own window: the same clothing and background in
another pose). Each of the B x V x T frames then gets a gradient, not only the ~30% masked.

Shapes: context, targets (B, V, T, P); mask (B, V, T), True = masked; pose3d (B, T, J, 3) mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.objectives.negatives import (
    CandidatePool,
    GatherFn,
    NegativeConfig,
    NegativeSample,
    check_pose_labels,
    identity_gather,
    make_pool,
    mpjpe,
    sample_negatives,
)

MAX_DIVERSITY_WEIGHT = 100.0
"""A thousand times wav2vec 2.0's 0.1: beyond it the diversity term is the whole loss (and an
infinite weight makes every step non-finite)."""

FRAME_TERM_WITH_CODES = ("objective.frame_weight compares continuous targets; it cannot be used "
                         "with the quantizer (model.quantizer.enabled)")  # fmt: skip
"""The one-line refusal of the frame term over quantizer codes."""

_MASKED_LOGIT = -1e9
"""Logit of an unusable distractor slot: exp() is exactly 0 in float32 and, unlike -inf, a row
with no usable distractor still has a finite gradient."""


@dataclass(frozen=True)
class ContrastiveConfig:
    """The contrastive objective (and the weight of the quantizer's diversity term)."""

    temperature: float = 0.1
    """tau: cosine similarities are divided by it (wav2vec 2.0 uses 0.1); in (0, 10]."""

    negatives: NegativeConfig = field(default_factory=NegativeConfig)
    """How the distractors are sampled."""

    multiview_positives: bool = True
    """The targets of the same instant in the other views are positives too."""

    multi_positive: Literal["mean", "sum"] = "mean"
    """Form of the loss with several positives: ``mean`` averages the single-positive loss over
    positives, ``sum`` sums the positives inside the log (see the module docstring)."""

    diversity_weight: float = 0.1
    """alpha: total = contrastive + alpha * diversity, when a quantizer supplies a diversity loss
    (wav2vec 2.0 uses 0.1); in [0, 100] (:data:`MAX_DIVERSITY_WEIGHT`)."""

    frame_weight: float = 0.0
    """beta: total += beta * the frame-level multi-view term (see the module docstring; 0: off).
    Needs two or more views per sample and continuous targets (no quantizer); in [0, 100]."""

    def __post_init__(self) -> None:
        if not isinstance(self.negatives, NegativeConfig):
            raise ValueError(f"negatives must be a NegativeConfig, got {self.negatives!r}")
        if not 0 < self.temperature <= 10:
            raise ValueError(f"temperature must be in (0, 10], got {self.temperature!r}")
        if self.multi_positive not in ("mean", "sum"):
            raise ValueError(f"multi_positive must be 'mean' or 'sum', got {self.multi_positive!r}")
        if not 0 <= self.frame_weight <= MAX_DIVERSITY_WEIGHT:
            raise ValueError(f"frame_weight must be in [0, {MAX_DIVERSITY_WEIGHT:g}], "
                             f"got {self.frame_weight!r}")  # fmt: skip
        if not 0 <= self.diversity_weight <= MAX_DIVERSITY_WEIGHT:
            raise ValueError(f"diversity_weight must be in [0, {MAX_DIVERSITY_WEIGHT:g}], "
                             f"got {self.diversity_weight!r}")  # fmt: skip


def _check_shapes(context: Tensor, targets: Tensor, mask: Tensor, pose3d: Tensor | None) -> None:
    if context.ndim != 4 or context.shape != targets.shape:
        raise ValueError(
            f"context and targets must both be (B, V, T, P), got {tuple(context.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape != context.shape[:3]:
        want = tuple(context.shape[:3])
        raise ValueError(f"mask must be bool {want}, got {mask.dtype} {tuple(mask.shape)}")
    B, _, T, _ = context.shape
    if pose3d is not None and (
        pose3d.ndim != 4 or pose3d.shape[:2] != (B, T) or pose3d.shape[-1] != 3
    ):
        raise ValueError(f"pose3d must be (B={B}, T={T}, J, 3), got {tuple(pose3d.shape)}")


def _positive_rows(mask: Tensor, multiview: bool, own: bool = True) -> Tensor:
    """(A, Vp) local rows of each anchor's positives, its own view first (``own=False``: the
    other views only)."""
    B, V, T = mask.shape
    b, v, t = mask.nonzero().unbind(1)  # anchors in (B, V, T) order, as in make_pool
    first = 0 if own else 1
    shifts = torch.arange(first, V if multiview else 1, device=mask.device)
    views = (v[:, None] + shifts) % V
    return (b[:, None] * V + views) * T + t[:, None]


def _info_nce(pos: Tensor, neg: Tensor, form: str) -> Tensor:
    """(A,) loss per anchor from (A, Vp) positive and (A, K) distractor logits."""
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # (A, 1)
    if form == "mean":
        return (torch.logaddexp(pos, neg_lse) - pos).mean(dim=1)
    pos_lse = torch.logsumexp(pos, dim=1)
    return torch.logaddexp(pos_lse, neg_lse[:, 0]) - pos_lse


def _purity(pool: CandidatePool, sample: NegativeSample, used: Tensor, threshold: float) -> Tensor:
    """Share of the distractors used whose pose is within ``threshold`` of the anchor's pose."""
    anchor_pose = pool.pose3d[pool.instant[pool.anchors]]  # (A, J, 3)
    neg_pose = pool.pose3d[pool.instant[sample.index]]  # (A, K, J, 3)
    close = mpjpe(anchor_pose[:, None], neg_pose) <= threshold
    return (close & used).sum() / used.sum().clamp(min=1)


class _Scores(NamedTuple):
    """What the metrics need from the loss computation."""

    pos_sim: Tensor  # (A, Vp) cosine similarities, own view first
    neg_sim: Tensor  # (A, K)
    pos_logit: Tensor  # (A, Vp)
    neg_logit: Tensor  # (A, K), unusable slots at _MASKED_LOGIT
    used: Tensor  # (A, K) bool, distractors that entered the loss


def contrastive_loss(
    context: Tensor,
    targets: Tensor,
    mask: Tensor,
    config: ContrastiveConfig,
    *,
    generator: torch.Generator,
    pose3d: Tensor | None = None,
    diversity: Tensor | None = None,
    gather: GatherFn = identity_gather,
    rank: int = 0,
    quantized: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Contrastive loss of a batch and its metrics.

    Args:
        context: (B, V, T, P) projected transformer outputs.
        targets: (B, V, T, P) projected unmasked frame latents, or quantized codes.
        mask: (B, V, T) bool, True = masked frame; every masked frame is an anchor.
        config: the objective.
        generator: the only source of randomness (negative sampling).
        pose3d: (B, T, J, 3) ground-truth poses, mm; needed by ``gt_pose``, and gives
            ``negative_purity`` for every sampler.
        diversity: the quantizer's diversity loss (scalar), when it is on.
        gather: concatenates a tensor from every rank along dim 0 in rank order, keeping the
            local part's gradient; the identity in a single process. Used by the samplers that
            draw from the whole pool (``gt_pose``, ``cosine``).
        rank: this rank's position in the gathered pool.
        quantized: the targets are quantizer codes. A distractor identical to the target is
            then still a distractor: dropping it (wav2vec 2.0's rule for duplicated frames)
            makes a codebook collapsed to one code a zero-loss solution, which a CPU-length
            run found within 24 steps.

    Returns:
        (total loss, metrics): ``loss``, ``loss_contrastive``, ``loss_diversity``, ``accuracy``
        (share of anchors whose own-view target beats every distractor), ``negative_purity``
        (with pose3d), ``num_masked``, ``sim_positive`` / ``sim_negative`` (mean cosine of the
        own-view target / of the distractors used) and ``negatives_per_anchor``. Metrics are this
        rank's: the engine averages them across ranks.
    """
    _check_shapes(context, targets, mask, pose3d)
    check_pose_labels(config.negatives, pose3d is not None, "the batch")
    P = context.shape[-1]
    neg_cfg = config.negatives
    if not neg_cfg.gathers:  # uniform negatives stay within a sequence: no other rank needed
        gather, rank = identity_gather, 0
    pool = make_pool(targets, mask, pose3d, gather=gather, rank=rank)
    sample = sample_negatives(neg_cfg, pool, generator)

    anchors = pool.anchors - pool.offset  # (A,) local rows
    ctx = F.normalize(context.reshape(-1, P)[anchors].float(), dim=-1)  # (A, P)
    unit = F.normalize(pool.targets.float(), dim=-1)  # (M, P), normalized once before indexing
    pos_unit = unit[pool.offset + _positive_rows(mask, config.multiview_positives)]  # (A, Vp, P)
    neg_unit = unit[sample.index]  # (A, K, P)
    # wav2vec 2.0: a distractor identical to the target (a duplicated frame) is no negative;
    # not for codes (see ``quantized``)
    used = sample.valid
    if not quantized:
        used = used & ~(neg_unit == pos_unit[:, :1]).all(dim=-1)
    scores = _score(ctx, pos_unit, neg_unit, used, config.temperature)

    num_masked = anchors.shape[0]
    if num_masked:
        loss_c = _info_nce(scores.pos_logit, scores.neg_logit, config.multi_positive).mean()
    else:  # nothing masked: a zero that keeps the graph connected
        loss_c = (context.sum() + targets.sum()).float() * 0.0
    loss_d = diversity.float() if diversity is not None else loss_c.new_zeros(())
    total = loss_c + config.diversity_weight * loss_d
    frame: dict[str, Tensor] = {}
    if config.frame_weight > 0:
        if quantized:
            raise ValueError(FRAME_TERM_WITH_CODES)
        frame = _frame_term(targets, pose3d, config, generator, gather, rank)
        total = total + config.frame_weight * frame["loss_frame"]
    metrics = _metrics((total, loss_c, loss_d), scores, pool, sample, neg_cfg.pose_threshold_mm,
                       frame)  # fmt: skip
    return total, metrics


def _score(anchor: Tensor, pos_unit: Tensor, neg_unit: Tensor, used: Tensor,
           temperature: float) -> _Scores:  # fmt: skip
    """Cosine similarities and logits of (A, P) unit anchors against their (A, Vp, P) positives
    and (A, K, P) distractors; distractors not ``used`` get :data:`_MASKED_LOGIT`."""
    pos_sim = torch.einsum("ap,avp->av", anchor, pos_unit)  # (A, Vp)
    neg_sim = torch.einsum("ap,akp->ak", anchor, neg_unit)  # (A, K)
    neg_logit = (neg_sim / temperature).masked_fill(~used, _MASKED_LOGIT)
    return _Scores(pos_sim, neg_sim, pos_sim / temperature, neg_logit, used)


def _frame_term(
    targets: Tensor,
    pose3d: Tensor | None,
    config: ContrastiveConfig,
    generator: torch.Generator,
    gather: GatherFn,
    rank: int,
) -> dict[str, Tensor]:
    """The frame-level multi-view term: ``loss_frame`` (with gradient) and ``frame_accuracy``
    (share of frames whose nearest other-view target beats every distractor)."""
    B, V, T, _ = targets.shape
    if V < 2:
        raise ValueError(f"objective.frame_weight needs 2 or more views per sample, the batch "
                         f"has {V}")  # fmt: skip
    every = torch.ones(B, V, T, dtype=torch.bool, device=targets.device)
    pool = make_pool(targets, every, pose3d, gather=gather, rank=rank)
    sample = sample_negatives(config.negatives, pool, generator)
    unit = F.normalize(pool.targets.float(), dim=-1)  # (M, P)
    anchor = unit[pool.anchors]  # (A, P)
    pos_unit = unit[pool.offset + _positive_rows(every, True, own=False)]  # (A, V - 1, P)
    neg_unit = unit[sample.index]  # (A, K, P)
    used = sample.valid & ~(neg_unit == anchor[:, None]).all(dim=-1)
    scores = _score(anchor, pos_unit, neg_unit, used, config.temperature)
    loss = _info_nce(scores.pos_logit, scores.neg_logit, config.multi_positive).mean()
    beats = scores.pos_logit.max(dim=1).values > scores.neg_logit.max(dim=1).values
    return {"loss_frame": loss, "frame_accuracy": beats.float().mean()}


@torch.no_grad()
def _metrics(
    losses: tuple[Tensor, Tensor, Tensor],
    scores: _Scores,
    pool: CandidatePool,
    sample: NegativeSample,
    threshold: float,
    extra: dict[str, Tensor],
) -> dict[str, float]:
    """Metrics as floats, read back from the device in one transfer (``extra``: more scalars,
    e.g. the frame term's)."""
    total, loss_c, loss_d = (x.detach().float() for x in losses)
    used = scores.used
    zero = total.new_zeros(())
    num = scores.pos_sim.shape[0]
    beats = scores.pos_logit[:, 0] > scores.neg_logit.max(dim=1).values  # own view beats all
    values = {
        "loss": total,
        "loss_contrastive": loss_c,
        "loss_diversity": loss_d,
        "accuracy": beats.float().mean() if num else zero,
        "num_masked": total.new_tensor(float(num)),
        "sim_positive": scores.pos_sim[:, 0].mean() if num else zero,
        "sim_negative": (scores.neg_sim * used).sum() / used.sum().clamp(min=1),
        "negatives_per_anchor": used.sum(dim=1).float().mean() if num else zero,
    }
    if pool.pose3d is not None:
        values["negative_purity"] = _purity(pool, sample, used, threshold)
    values.update({k: v.detach() for k, v in extra.items()})
    stacked = torch.stack([v.float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, stacked, strict=True))
