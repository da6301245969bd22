"""3D pose error metrics, named after the Human3.6M evaluation protocols.

Every metric takes a prediction and a target of the same shape (..., J, 3) (MPJVE: (..., T, J, 3))
and answers in the input's units (millimetres for Human3.6M-style data). The names follow
VideoPose3D (Pavllo et al., CVPR 2019) and Martinez et al. (ICCV 2017):

- ``mpjpe``   protocol 1: mean per-joint position error, the mean Euclidean distance between
  predicted and true joints, with no alignment (callers make poses root-relative first when the
  protocol asks for it; see ``root_relative``).
- ``p_mpjpe`` protocol 2: MPJPE after a rigid similarity (Procrustes) alignment of each predicted
  pose to its target: rotation, translation and uniform scale. Reflections are excluded, so a
  mirrored pose keeps its error (the determinant sign fix of Umeyama, TPAMI 1991).
- ``n_mpjpe`` MPJPE after aligning only the scale of each pose (least squares, about the origin),
  as in Rhodin et al. (CVPR 2018); meant for root-relative poses.
- ``mpjve``   mean per-joint velocity error: MPJPE of the first differences along time, i.e. the
  velocity per frame step (VideoPose3D), which shows jitter that MPJPE hides.

Inputs may be numpy arrays or torch tensors; the answer is of the same kind. numpy inputs are
computed in float64; torch inputs keep their dtype (half precision is raised to float32 for the
SVD) and device, and the torch results are differentiable (see ``p_mpjpe`` for its caveat).

``reduce="mean"`` averages over everything and returns a scalar (a 0-dim tensor or numpy
scalar); ``reduce="none"`` keeps one value per pose, shape (...,) (MPJVE: one per frame step,
(..., T-1)), so that callers can aggregate per action or per sequence themselves.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)
Reduce = Literal["mean", "none"]

__all__ = [
    "mpjpe",
    "mpjve",
    "n_mpjpe",
    "p_mpjpe",
    "procrustes_align",
    "root_relative",
]


def root_relative(x: Array, root: int = 0) -> Array:
    """Joints relative to the root joint: ``x - x[..., root, :]``.

    Args:
        x: poses, shape (..., J, 3), numpy or torch.
        root: index of the root joint (the pelvis / hip centre in Human3.6M's 17-joint set).

    Returns:
        Same kind and shape as ``x``, with the root joint at the origin.
    """
    _check_pose_shape(x, "x")
    num_joints = x.shape[-2]
    if not -num_joints <= root < num_joints:
        raise ValueError(f"root joint {root} is out of range for {num_joints} joints")
    root = root % num_joints
    return x - x[..., root : root + 1, :]


def mpjpe(pred: Array, target: Array, reduce: Reduce = "mean") -> Array:
    """MPJPE, protocol 1: the mean Euclidean distance between predicted and true joints.

    Args:
        pred: predicted poses, shape (..., J, 3).
        target: true poses, the same shape.
        reduce: "mean" for one scalar over all poses and joints, "none" for one value per pose.

    Returns:
        A scalar, or shape (...,) with ``reduce="none"``; in the input's units.
    """
    p, t, back = _prepare(pred, target, reduce)
    return back(_reduce(_per_pose_error(p, t), reduce))


def p_mpjpe(pred: Array, target: Array, reduce: Reduce = "mean") -> Array:
    """P-MPJPE, protocol 2: MPJPE after Procrustes alignment of each pose to its target.

    Each predicted pose is moved by the similarity transform (rotation, translation, uniform
    scale) that best fits it to its target in the least-squares sense, then MPJPE is taken.
    Rotations only: a reflection would let a mirrored (left/right swapped) pose score zero, so
    the SVD solution is corrected with the sign of its determinant (Umeyama 1991).

    For torch inputs the result is differentiable through ``torch.linalg.svd``; its gradient is
    ill-conditioned when two singular values of the cross-covariance coincide (for example a
    pose and target that are both symmetric), so prefer ``mpjpe`` as a training loss.

    Arguments and result as :func:`mpjpe`.
    """
    p, t, back = _prepare(pred, target, reduce)
    return back(_reduce(_per_pose_error(_procrustes(p, t), t), reduce))


def n_mpjpe(pred: Array, target: Array, reduce: Reduce = "mean") -> Array:
    """N-MPJPE: MPJPE after scaling each predicted pose by its least-squares optimal factor.

    The scale ``s = <pred, target> / <pred, pred>`` (summed over joints and coordinates of one
    pose) minimises ``|s * pred - target|^2``; no rotation or translation is fitted, so the poses
    should be root-relative (``root_relative``). This forgives a wrong global size only, which is
    what monocular methods cannot know (Rhodin et al. 2018).

    Arguments and result as :func:`mpjpe`.
    """
    p, t, back = _prepare(pred, target, reduce)
    dot = (p * t).sum(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    sq = (p * p).sum(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    # A pose collapsed to the origin has no defined scale; the clamp makes it s = 0.
    scale = dot / sq.clamp_min(torch.finfo(p.dtype).tiny)
    return back(_reduce(_per_pose_error(scale * p, t), reduce))


def mpjve(pred: Array, target: Array, reduce: Reduce = "mean") -> Array:
    """MPJVE: the mean per-joint error of velocities, the first differences along time.

    Velocity is the displacement per frame step, ``x[..., t+1, :, :] - x[..., t, :, :]``, so the
    error is in the input's units per frame (multiply by the frame rate for units per second).
    A constant offset between prediction and target has zero MPJVE.

    Args:
        pred: predicted sequences, shape (..., T, J, 3) with T >= 2.
        target: true sequences, the same shape.
        reduce: "mean" for one scalar, "none" for one value per frame step, shape (..., T-1).

    Returns:
        A scalar, or shape (..., T-1) with ``reduce="none"``; in the input's units per frame.
    """
    p, t, back = _prepare(pred, target, reduce)
    if p.dim() < 3 or p.shape[-3] < 2:
        raise ValueError(
            "mpjve needs sequences shaped (..., T, J, 3) with at least 2 frames, "
            f"got shape {tuple(p.shape)}"
        )
    vel_p = torch.diff(p, dim=-3)  # (..., T-1, J, 3)
    vel_t = torch.diff(t, dim=-3)  # (..., T-1, J, 3)
    return back(_reduce(_per_pose_error(vel_p, vel_t), reduce))


def procrustes_align(pred: Array, target: Array) -> Array:
    """``pred`` moved onto ``target`` by the protocol-2 similarity transform, pose by pose.

    The alignment that ``p_mpjpe`` measures after (rotation without reflection, translation,
    uniform scale); useful to draw the aligned skeletons beside each other.

    Args:
        pred: poses to align, shape (..., J, 3).
        target: poses to align to, the same shape.

    Returns:
        The aligned ``pred``, same kind and shape.
    """
    p, t, back = _prepare(pred, target, "none")
    return back(_procrustes(p, t))


# --- internals: everything below works on torch tensors ---


def _procrustes(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Umeyama (1991) similarity fit of ``p`` to ``t`` per pose; p, t (..., J, 3)."""
    work = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
    p32, t32 = p.to(work), t.to(work)
    mu_p = p32.mean(dim=-2, keepdim=True)  # (..., 1, 3)
    mu_t = t32.mean(dim=-2, keepdim=True)  # (..., 1, 3)
    x, y = p32 - mu_p, t32 - mu_t  # (..., J, 3)
    cov = x.transpose(-1, -2) @ y  # (..., 3, 3)
    u, sing, vh = torch.linalg.svd(cov)
    # Row vectors are rotated as x @ R with R = U V^T; if det(R) = -1 that is a reflection, and the
    # best proper rotation flips the axis of the smallest singular value instead (Umeyama eq. 39).
    sign = torch.sign(torch.linalg.det(u @ vh))  # (...,)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    flip = torch.ones_like(sing)  # (..., 3)
    flip = torch.cat([flip[..., :-1], sign.unsqueeze(-1)], dim=-1)
    rot = u @ (flip.unsqueeze(-1) * vh)  # (..., 3, 3) = U diag(1, 1, sign) V^T
    norm_x = (x * x).sum(dim=(-2, -1))  # (...,)
    # A pose collapsed to one point has no scale to fit; the clamp makes it s = 0 (its centroid).
    scale = (sing * flip).sum(dim=-1) / norm_x.clamp_min(torch.finfo(work).tiny)  # (...,)
    aligned = scale[..., None, None] * (x @ rot) + mu_t  # (..., J, 3)
    return aligned.to(p.dtype)


def _per_pose_error(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean joint distance per pose: (..., J, 3) -> (...,)."""
    return torch.linalg.vector_norm(p - t, dim=-1).mean(dim=-1)


def _reduce(per_pose: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    if reduce == "none":
        return per_pose
    if per_pose.numel() == 0:
        raise ValueError("cannot average an error over zero poses (empty input)")
    # Every pose has the same joint count, so the mean of per-pose means is the mean over all.
    return per_pose.mean()


def _check_pose_shape(x: np.ndarray | torch.Tensor, name: str) -> None:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[-1] != 3 or x.shape[-2] < 1:
        raise ValueError(f"{name} must be shaped (..., J, 3) with J >= 1, got {tuple(x.shape)}")


def _prepare(pred, target, reduce: str):
    """Validate, turn both inputs into torch tensors, and return the way back to the input kind."""
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    _check_pose_shape(pred, "pred")
    _check_pose_shape(target, "target")
    if type(pred) is not type(target):
        raise TypeError(
            "pred and target must be of the same kind (both numpy or both torch), got "
            f"{type(pred).__name__} and {type(target).__name__}"
        )
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if isinstance(pred, np.ndarray):  # read-only inputs (np.broadcast_to, mmap) are copied
        p, t = (torch.from_numpy(_writable(np.asarray(x, np.float64))) for x in (pred, target))
        return p, t, _to_numpy
    dtype = torch.promote_types(pred.dtype, target.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return pred.to(dtype), target.to(dtype=dtype, device=pred.device), _identity


def _writable(x: np.ndarray) -> np.ndarray:
    return x if x.flags.writeable else x.copy()


def _to_numpy(x: torch.Tensor) -> np.ndarray:
    out = x.detach().numpy()
    return out[()] if out.ndim == 0 else out  # a 0-dim result comes back as a numpy scalar


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def score_sequences(preds: list[np.ndarray], targets: list[np.ndarray], actions: list[str]
                    ) -> dict:  # fmt: skip
    """The one scorer of every head: predictions and targets as sequences (N_i, J, 3) in mm
    (root-relative where the protocol asks), each with its action. Returns ``{"all": s,
    "per_action": {action: s}}`` where ``s`` holds MPJPE, P-MPJPE and N-MPJPE over every frame,
    MPJVE over every frame step within a sequence (a sequence of one frame has none; None when
    no sequence has two frames) and ``frames``."""
    if not (len(preds) == len(targets) == len(actions)) or not preds:
        raise ValueError(f"score_sequences: {len(preds)} predictions, {len(targets)} targets "
                         f"and {len(actions)} actions (at least one sequence each)")  # fmt: skip
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        if p.shape != t.shape:
            raise ValueError(f"sequence {i}: prediction {p.shape} does not match {t.shape}")
    frames = {name: np.concatenate([f(p.astype(np.float64), t.astype(np.float64), "none")
                                    for p, t in zip(preds, targets, strict=True)])
              for name, f in (("mpjpe", mpjpe), ("p_mpjpe", p_mpjpe), ("n_mpjpe", n_mpjpe))}
    steps = [mpjve(p.astype(np.float64), t.astype(np.float64), "none") if len(p) > 1
             else np.zeros(0) for p, t in zip(preds, targets, strict=True)]  # fmt: skip
    owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(preds)])
    step_owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(steps)])
    steps_all = np.concatenate(steps)
    labels = np.asarray(actions)

    def summary(chosen: np.ndarray) -> dict:
        rows, step_rows = chosen[owner], chosen[step_owner]
        out = {name: float(v[rows].mean()) for name, v in frames.items()}
        out["mpjve"] = float(steps_all[step_rows].mean()) if step_rows.any() else None
        out["frames"] = int(rows.sum())
        return out

    return {"all": summary(np.ones(len(preds), bool)),
            "per_action": {a: summary(labels == a) for a in sorted(set(actions))}}  # fmt: skip
