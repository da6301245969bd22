"""Negative samplers: which frames a masked frame must be told apart from (issue 3).

Conventions used by the whole package:

- Frames are flattened in (B, V, T) order: local row ``n = (b * V + v) * T + t``, N = B * V * T.
- A pool gathered from R ranks stacks the ranks' flattened frames in rank order: row
  ``r * N + n`` is frame ``n`` of rank ``r``. Every rank has the same (B, V, T), as an all-gather
  requires.
- An *instant* is (rank, b, t). All views of an instant show the same pose, so they are positives
  of each other and never negatives, whatever the sampler.
- Poses are compared by root-relative MPJPE in mm (protocol 1 of Human3.6M, root joint 0).

Samplers return, per anchor (masked frame), ``num`` rows of the pool and a validity mask: slots
beyond the number of available candidates are invalid (their index is 0 and must be ignored).
They draw without replacement; all randomness comes from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from data_shards.skeleton import ROOT
from data_shards.untrusted import brief

GatherFn = Callable[[Tensor], Tensor]
"""Concatenates a tensor from every rank along dim 0, in rank order, keeping the gradient of the
local part (the engine's all-gather). The identity is the single-process case."""

KINDS = ("uniform", "gt_pose", "cosine")
MAX_NEGATIVES = 4096
"""Most distractors per masked frame: every step gathers an (anchors, K, P) tensor of their
targets (and (anchors, K, J, 3) poses for ``gt_pose``), so K is bounded like the sizes of the
model."""
MAX_POSE_THRESHOLD_MM = 10_000.0
"""10 m: two root-relative poses of one body are never that far apart, so a larger threshold
would leave ``gt_pose`` without a single candidate."""


def identity_gather(x: Tensor) -> Tensor:
    """The single-process gather: this rank's tensor is the whole pool."""
    return x


@dataclass(frozen=True)
class NegativeConfig:
    """How the K distractors of each masked frame are chosen."""

    kind: Literal["uniform", "gt_pose", "cosine"] = "uniform"
    """``uniform``: other masked frames of the same sequence (same b and view), as in wav2vec 2.0
    (Baevski et al. 2020). ``gt_pose``: frames of the whole pool (all ranks) whose ground-truth
    pose is farther than ``pose_threshold_mm`` from the anchor's: no false negatives; needs
    pose3d. ``cosine``: the frames of the whole pool whose targets are most similar to the
    anchor's target (hard negatives), skipping those above ``cosine_cutoff``."""

    num: int = 100
    """K, distractors per masked frame (wav2vec 2.0 uses 100; at most :data:`MAX_NEGATIVES`,
    4096). Fewer when the pool runs out."""

    pose_threshold_mm: float = 50.0
    """Root-relative MPJPE (mm) at or below which two poses count as the same pose: ``gt_pose``
    takes only candidates strictly beyond it, and ``negative_purity`` is measured with it for
    every sampler. 50 mm is about a third of the MPJPE between two random Human3.6M poses.
    In (0, 10000] (:data:`MAX_POSE_THRESHOLD_MM`)."""

    hardest: bool = False
    """``gt_pose`` only: take the K candidates closest in pose beyond the threshold instead of K
    uniformly random ones."""

    cosine_cutoff: float = 0.9
    """``cosine`` only: candidates whose target has a cosine similarity above this with the
    anchor's target are skipped as probably the same pose; the K most similar of the rest are
    taken. In (-1, 1]; 1 skips only exact duplicates."""

    same_window: float = 0.0
    """Share of the K distractors drawn from the anchor's own window (any of its views: the
    same clothing, background, body and clip, other instants), beyond ``pose_threshold_mm``
    when the batch has poses; the rest are drawn by ``kind`` from the other windows. Such
    distractors differ from the anchor in pose alone, so appearance cannot tell them apart.
    1: only same-window distractors. Needs kind ``gt_pose`` or ``cosine``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.same_window <= 1.0:
            raise ValueError(f"same_window must be in [0, 1], got {self.same_window!r}")
        if self.same_window > 0 and self.kind == "uniform":
            raise ValueError("same_window needs kind 'gt_pose' or 'cosine' (uniform negatives "
                             "already come from the anchor's own sequence)")  # fmt: skip
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if (isinstance(self.num, bool) or not isinstance(self.num, int)
                or not 1 <= self.num <= MAX_NEGATIVES):  # fmt: skip
            raise ValueError(f"num must be an int >= 1 and <= {MAX_NEGATIVES}, "
                             f"got {brief(self.num)}")  # fmt: skip
        if not 0 < self.pose_threshold_mm <= MAX_POSE_THRESHOLD_MM:
            raise ValueError(f"pose_threshold_mm must be in (0, {MAX_POSE_THRESHOLD_MM:g}], "
                             f"got {brief(self.pose_threshold_mm)}")  # fmt: skip
        if not -1.0 < self.cosine_cutoff <= 1.0:
            raise ValueError(f"cosine_cutoff must be in (-1, 1], got {self.cosine_cutoff!r}")
        if self.hardest and self.kind != "gt_pose":
            raise ValueError(
                f"hardest applies to kind='gt_pose' only (kind={self.kind!r}); "
                "'cosine' always takes the most similar candidates below its cut-off"
            )

    @property
    def needs_pose3d(self) -> bool:
        """True when the sampler cannot run without 3D poses in the batch."""
        return self.kind == "gt_pose"

    @property
    def gathers(self) -> bool:
        """True when candidates come from every rank (``uniform`` stays within a sequence)."""
        return self.kind != "uniform"


def check_pose_labels(config: NegativeConfig, has_pose3d: bool, source: str = "the data") -> None:
    """Fail at start, not mid-run, when ``gt_pose`` negatives meet data without 3D poses."""
    if config.needs_pose3d and not has_pose3d:
        raise ValueError(
            f"negatives.kind='gt_pose' needs 3D poses (pose3d) but {source} has none; "
            "use negatives.kind='uniform' or 'cosine'"
        )


@dataclass
class CandidatePool:
    """Every frame negatives may be drawn from, flattened (see the module conventions)."""

    targets: Tensor
    """(M, P) the frames' targets; M = R * N."""
    masked: Tensor
    """(M,) bool, True = masked frame."""
    instant: Tensor
    """(M,) long, one id per instant (rank, b, t); it is also the instant's row in ``pose3d``."""
    sequence: Tensor
    """(M,) long, one id per sequence (rank, b, v)."""
    window: Tensor
    """(M,) long, one id per window (rank, b): every view of one sample."""
    pose3d: Tensor | None
    """(R * B * T, J, 3) root-relative pose of each instant, or None without labels."""
    anchors: Tensor
    """(A,) long, pool rows of this rank's masked frames, in (B, V, T) order."""
    offset: int
    """Pool row of this rank's first frame (rank * N)."""


class NegativeSample(NamedTuple):
    """Per anchor, ``num`` pool rows and which of them are real candidates."""

    index: Tensor
    """(A, K) long, rows of the pool (0 where not valid)."""
    valid: Tensor
    """(A, K) bool."""


def _gather_checked(local: Tensor, gather: GatherFn, rank: int, what: str) -> Tensor:
    """Gather ``local`` and check the gather's contract: rank order, local rows unchanged."""
    out = gather(local)
    n = local.shape[0]
    if out.ndim != local.ndim or out.shape[1:] != local.shape[1:] or out.shape[0] % max(n, 1):
        raise ValueError(f"gather({what}): expected (R*{n}, ...) rows, got {tuple(out.shape)}")
    ranks = out.shape[0] // n if n else 1
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} out of range for a pool gathered from {ranks} ranks")
    mine = out[rank * n : (rank + 1) * n]
    # NaN-tolerant equality: a diverged step must reach the loss (and be skipped), not fail here.
    if not bool(((mine == local) | (mine.isnan() & local.isnan())).all()):
        raise ValueError(
            f"gather({what}): rows of rank {rank} differ from the local tensor; the gather must "
            "concatenate the ranks in rank order"
        )
    if local.requires_grad and not out.requires_grad:
        raise ValueError(f"gather({what}) dropped the gradient of the local part")
    return out


def make_pool(
    targets: Tensor,
    mask: Tensor,
    pose3d: Tensor | None = None,
    *,
    gather: GatherFn = identity_gather,
    rank: int = 0,
) -> CandidatePool:
    """Flatten this rank's frames, gather them from every rank and label instants/sequences.

    Args:
        targets: (B, V, T, P) targets of every frame.
        mask: (B, V, T) bool, True = masked frame (the anchors).
        pose3d: (B, T, J, 3) poses in mm (the same for every view), or None.
        gather: concatenates a tensor from every rank along dim 0 in rank order.
        rank: this rank's position in the gathered pool.
    """
    B, V, T, P = targets.shape
    N = B * V * T
    pool_targets = _gather_checked(targets.reshape(N, P), gather, rank, "targets")  # (R*N, P)
    masked = _gather_checked(mask.reshape(N).to(torch.uint8), gather, rank, "mask").bool()
    poses = None
    if pose3d is not None:
        rel = pose3d.float() - pose3d[..., ROOT : ROOT + 1, :].float()
        poses = _gather_checked(rel.reshape(B * T, *rel.shape[2:]), gather, rank, "pose3d")
    rows = torch.arange(pool_targets.shape[0], device=targets.device)
    r, n = rows // N, rows % N
    instant = r * (B * T) + (n // (V * T)) * T + n % T
    anchors = rank * N + mask.reshape(N).nonzero().squeeze(1)
    return CandidatePool(pool_targets, masked, instant, rows // T, rows // (V * T), poses,
                         anchors, rank * N)  # fmt: skip


def mpjpe_root_relative(a: Tensor, b: Tensor) -> Tensor:
    """Root-relative MPJPE (mm) between poses, broadcasting: (..., J, 3) x (..., J, 3) -> (...)."""
    return mpjpe(a - a[..., ROOT : ROOT + 1, :], b - b[..., ROOT : ROOT + 1, :])


def mpjpe(a: Tensor, b: Tensor) -> Tensor:
    """MPJPE (mean per-joint position error) of poses already aligned (e.g. root-relative),
    broadcasting: (..., J, 3) x (..., J, 3) -> (...).

    Elementwise operations only, in a fixed order, so a pair gets the same bits in any broadcast
    shape: the sampler's threshold test and the purity metric can never disagree.
    """
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    total = torch.zeros(shape, dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    for j in range(a.shape[-2]):
        d = a[..., j, :] - b[..., j, :]
        squared = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2]
        total = total + squared.sqrt()
    return total / a.shape[-2]


def _take_top(score: Tensor, candidate: Tensor, num: int) -> NegativeSample:
    """The ``num`` highest-scoring candidates of each row, padded with invalid slots."""
    k = min(num, score.shape[1])
    top = score.masked_fill(~candidate, float("-inf")).topk(k, dim=1).indices
    valid = candidate.gather(1, top)
    top = top.masked_fill(~valid, 0)
    if k < num:
        pad = num - k
        top = torch.cat([top, top.new_zeros(top.shape[0], pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], dim=1)
    return NegativeSample(top, valid)


def _random_scores(shape: tuple[int, int], generator: torch.Generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _pose_distance(pool: CandidatePool, anchors: Tensor) -> Tensor:
    """(c, M) root-relative MPJPE (mm) from each anchor's pose to every pool row's."""
    poses = pool.pose3d
    per_instant = mpjpe(poses[pool.instant[anchors]][:, None], poses[None])  # (c, I)
    return per_instant[:, pool.instant]


def _sample_chunk(
    config: NegativeConfig, pool: CandidatePool, anchors: Tensor, generator: torch.Generator
) -> NegativeSample:
    """Negatives for one chunk of anchors: build (c, M) candidate masks and scores, take top K
    (the same-window share first, then the kind's from the other windows)."""
    shape = (anchors.shape[0], pool.instant.shape[0])
    candidate = pool.instant[None, :] != pool.instant[anchors, None]  # never the same instant
    dist = None
    if config.kind == "gt_pose" or (config.same_window > 0 and pool.pose3d is not None):
        dist = _pose_distance(pool, anchors)
    own = None
    if config.same_window > 0:
        same = pool.window[None, :] == pool.window[anchors, None]
        own_candidate = candidate & same
        if dist is not None:
            own_candidate &= dist > config.pose_threshold_mm
        k_own = round(config.num * config.same_window)
        own = _take_top(_random_scores(shape, generator, candidate.device), own_candidate, k_own)
        candidate &= ~same
    num = config.num - (own.index.shape[1] if own is not None else 0)
    if config.kind == "uniform":
        candidate &= pool.masked[None, :] & (pool.sequence[None, :] == pool.sequence[anchors, None])
        score = _random_scores(shape, generator, candidate.device)
    elif config.kind == "gt_pose":
        candidate &= dist > config.pose_threshold_mm
        score = -dist if config.hardest else _random_scores(shape, generator, candidate.device)
    else:  # cosine
        unit = torch.nn.functional.normalize(pool.targets.detach().float(), dim=-1)
        sim = unit[anchors] @ unit.T  # (c, M)
        candidate &= sim <= config.cosine_cutoff
        score = sim
    rest = _take_top(score, candidate, num)
    if own is None:
        return rest
    return NegativeSample(torch.cat([own.index, rest.index], dim=1),
                          torch.cat([own.valid, rest.valid], dim=1))  # fmt: skip


@torch.no_grad()
def sample_negatives(
    config: NegativeConfig,
    pool: CandidatePool,
    generator: torch.Generator,
    *,
    chunk_size: int = 512,
) -> NegativeSample:
    """K negatives for every anchor of ``pool`` (see :class:`NegativeConfig` for the kinds).

    Anchors are processed ``chunk_size`` at a time, so memory is O(chunk_size x pool size).
    The generator may live on the CPU or on the pool's device (faster for large pools).
    """
    if config.needs_pose3d and pool.pose3d is None:
        check_pose_labels(config, False, "the batch")
    chunks = [
        _sample_chunk(config, pool, pool.anchors[s : s + chunk_size], generator)
        for s in range(0, pool.anchors.shape[0], chunk_size)
    ]
    if not chunks:
        empty = pool.anchors.new_zeros((0, config.num))
        return NegativeSample(empty, empty.bool())
    return NegativeSample(
        torch.cat([c.index for c in chunks]), torch.cat([c.valid for c in chunks])
    )
