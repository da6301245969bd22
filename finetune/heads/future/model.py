"""Pose-GPT, a small GPT-2 that forecasts 3D poses frame by frame, and its features.

Per frame, the root-relative joints in metres and the root velocity in m/s (so the model sees
the body travel) -> linear -> ``transformers.GPT2Model`` over ``inputs_embeds`` (causal,
learned absolute positions) -> linear: the change to the next frame's features, added to a
damped velocity pulled back toward the mean seed pose (two learned shares per joint
coordinate). The transformer's output is zero at initialisation, so an untrained model is
that damped, mean-reverting baseline.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from data_shards.configtools import from_dict, to_dict
from data_shards.manifest import atomic_write_bytes, atomic_write_text
from data_shards.skeleton import NUM_JOINTS, ROOT, flip_permutation
from data_shards.untrusted import brief, is_int, is_number
from finetune.heads.future.config import MAX_FRAMES, FutureConfig

FEATURES = NUM_JOINTS * 3 + 3  # root-relative joints (m) + root velocity (m/s)
WEIGHTS, CONFIG = "future_model.safetensors", "future_model.json"
_SAVED = ("config", "max_frames", "fps", "features", "output")
"""The fields of :data:`CONFIG` (the last two describe the model in words)."""


def pose_features(poses: torch.Tensor, fps: float) -> torch.Tensor:
    """(..., T, J, 3) world mm -> (..., T, F) model features: root-relative joints (m) and
    root velocity (m/s; the first frame repeats the second's)."""
    metres = poses / 1000.0
    root = metres[..., ROOT, :]  # (..., T, 3)
    velocity = torch.diff(root, dim=-2) * fps
    velocity = torch.cat([velocity[..., :1, :], velocity], dim=-2)
    relative = metres - metres[..., ROOT : ROOT + 1, :]
    return torch.cat([relative.flatten(-2), velocity], dim=-1)


def feature_pose_mm(features: torch.Tensor) -> torch.Tensor:
    """(..., F) features -> (..., J, 3) root-relative pose in mm."""
    return features[..., : NUM_JOINTS * 3].unflatten(-1, (NUM_JOINTS, 3)) * 1000.0


def augment(x: torch.Tensor, gen: torch.Generator, mirror: bool) -> torch.Tensor:
    """Random rotation about Z (and mirroring x -> -x with the left/right joint swap) of a batch
    of features (B, T, F): every joint and the velocity are 3-vectors in the world frame."""
    B = x.shape[0]
    v = x.unflatten(-1, (NUM_JOINTS + 1, 3))  # (B, T, J+1, 3)
    angle = torch.rand(B, generator=gen) * 2 * math.pi
    c, s, z, o = angle.cos(), angle.sin(), torch.zeros(B), torch.ones(B)
    R = torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).view(B, 1, 3, 3)
    v = v @ R.transpose(-1, -2)
    if mirror:
        flip = torch.rand(B, generator=gen) < 0.5
        perm = torch.cat([torch.from_numpy(flip_permutation()), torch.tensor([NUM_JOINTS])])
        mirrored = v[:, :, perm] * torch.tensor([-1.0, 1.0, 1.0])
        v = torch.where(flip.view(B, 1, 1, 1), mirrored, v)
    return v.flatten(-2)



class PoseGPT(nn.Module):
    """features (B, T, F) -> next-frame features (B, T, F), causal over T.

    Each frame is embedded with its joints' velocity (the step from the frame before, in m/s)
    so that continuing the motion is a per-frame linear map; the attention learns the rest.
    """

    def __init__(self, cfg: FutureConfig, max_frames: int, fps: float):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        if not 1 <= max_frames <= MAX_FRAMES:  # the position table and the cache grow with it
            raise ValueError(f"PoseGPT: {max_frames} positions (the seed and the longest "
                             f"horizon at {fps:g} fps), not 1..{MAX_FRAMES}")  # fmt: skip
        self.max_frames, self.fps = max_frames, fps
        gpt = GPT2Config(n_layer=cfg.layers, n_head=cfg.heads, n_embd=cfg.width,
                         n_positions=max_frames, vocab_size=1, bos_token_id=None,
                         eos_token_id=None, embd_pdrop=0.0, resid_pdrop=0.0,
                         attn_pdrop=0.0)  # fmt: skip
        self.embed = nn.Linear(FEATURES + NUM_JOINTS * 3, cfg.width)
        self.gpt = GPT2Model(gpt)
        self.head = nn.Linear(cfg.width, FEATURES)
        nn.init.zeros_(self.head.weight)  # start as the damped, mean-reverting baseline
        nn.init.zeros_(self.head.bias)
        self.seed_frames = cfg.seed_frames
        self.damping = _share(cfg.damping)
        self.reversion = _share(cfg.reversion)
        self.register_buffer("residual", torch.ones(()))  # the transformer's share (chosen)

    def forward(self, x: torch.Tensor, past=None, prev: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, tuple]:  # fmt: skip
        """Next-frame features for every input frame, and the state to continue from (the
        key/value cache, the running sum of the seed poses, the frames seen); ``prev`` (B, 1,
        F) is the frame before ``x[:, 0]`` (None: the sequence starts here).

        next = x + damping * (last step) + reversion * (seed mean - x) + transformer output,
        the two shares learned per joint coordinate: a damped velocity that saturates instead
        of drifting, pulled back toward the observed poses; the transformer corrects it."""
        kv, total, seen = (None, 0.0, 0) if past is None else past
        before = torch.cat([x[:, :1] if prev is None else prev, x[:, :-1]], dim=1)
        joints = NUM_JOINTS * 3
        pose, step = x[..., :joints], x[..., :joints] - before[..., :joints]  # (B, T, J*3) m
        h = self.embed(torch.cat([x, step * self.fps], dim=-1))  # (B, T, D)
        out = self.gpt(inputs_embeds=h, past_key_values=kv, use_cache=True)
        position = seen + torch.arange(x.shape[1], device=x.device)  # (T,)
        in_seed = (position < self.seed_frames).to(x.dtype)[:, None]
        total = total + (pose * in_seed).cumsum(dim=1)  # (B, T, J*3): sum of seed poses so far
        anchor = total / position.clamp(max=self.seed_frames - 1).add(1)[:, None]
        change = torch.zeros_like(pose)
        if self.damping is not None:
            change = change + torch.sigmoid(self.damping) * step
        if self.reversion is not None:
            change = change + torch.sigmoid(self.reversion) * (anchor - pose)
        nxt = x + self.residual * self.head(out.last_hidden_state)
        nxt = torch.cat([nxt[..., :joints] + change, nxt[..., joints:]], dim=-1)
        return nxt, (out.past_key_values, total[:, -1:], int(position[-1]) + 1)


def _share(initial: float) -> nn.Parameter | None:
    """A learned share per joint coordinate (its logit), starting at ``initial``; None if 0."""
    if initial == 0:
        return None
    return nn.Parameter(torch.full((NUM_JOINTS * 3,), math.log(initial / (1 - initial))))


@torch.no_grad()
def forecast(model: PoseGPT, seed: torch.Tensor, horizon: int) -> torch.Tensor:
    """Autoregressive forecast without gradients (:func:`rollout`)."""
    return rollout(model, seed, horizon)


def rollout(model: PoseGPT, seed: torch.Tensor, horizon: int) -> torch.Tensor:
    """Autoregressive forecast: seed features (B, S, F) -> the next ``horizon`` frames
    (B, horizon, F). After the seed only the model's own outputs are fed back (cached keys
    and values: one new frame per step); differentiable, so training can score rollouts."""
    if seed.shape[1] + horizon - 1 > model.max_frames:
        raise ValueError(f"seed {seed.shape[1]} + horizon {horizon} exceed the model's "
                         f"{model.max_frames} positions")  # fmt: skip
    pred, past = model(seed)
    frames, prev = [pred[:, -1:]], seed[:, -1:]
    for _ in range(horizon - 1):
        pred, past = model(frames[-1], past, prev)
        prev = frames[-1]
        frames.append(pred)
    return torch.cat(frames, dim=1)


def save_model(model: PoseGPT, config: FutureConfig, fps: float, out: Path) -> None:
    """Weights as safetensors and the config needed to rebuild :class:`PoseGPT`."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS, save(state))
    meta = {"config": to_dict(config), "max_frames": model.max_frames, "fps": fps,
            "features": "root-relative joints (m, 17 x 3) + root velocity (m/s)",
            "output": "next-frame features (damped, mean-reverting residual)"}  # fmt: skip
    atomic_write_text(out / CONFIG, json.dumps(meta, indent=1) + "\n")


def load_model(out: str | os.PathLike) -> PoseGPT:
    """The model :func:`save_model` wrote to ``out`` (eval mode). The files are input from
    elsewhere: every field of :data:`CONFIG` is checked (the config within the bounds
    documented beside its fields, ``max_frames`` at most :data:`MAX_FRAMES`) before the model
    is built, and the weights must be finite and fit it; each failure is one
    :class:`pretrain.export.EncoderError` line (a ValueError) naming the file."""
    from pretrain.export import EncoderError, check_fields, fit, read_json, read_weights

    out = Path(out)
    file, weights_file = out / CONFIG, out / WEIGHTS
    for p in (file, weights_file):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; not a saved Pose-GPT (posebert finetune "
                                    "future writes one)")  # fmt: skip
    meta = check_fields(read_json(file), _SAVED, _SAVED[:3], file, "a saved Pose-GPT")
    if not isinstance(meta["config"], dict):
        raise EncoderError(f"{file}: config is {brief(meta['config'])}, not a mapping")
    try:
        cfg = from_dict(FutureConfig, meta["config"], "config")
    except ValueError as e:
        raise EncoderError(f"{file}: {str(e).splitlines()[0][:300]}") from None
    frames, fps = meta["max_frames"], meta["fps"]
    if not (is_int(frames) and cfg.seed_frames < frames <= MAX_FRAMES):
        least = cfg.seed_frames + 1  # the seed and a horizon of one frame at least
        raise EncoderError(f"{file}: max_frames {brief(frames)} is not {least}..{MAX_FRAMES}")
    if not (is_number(fps) and 0 < fps < math.inf):
        raise EncoderError(f"{file}: fps {brief(fps)} is not a positive number")
    weights = read_weights(weights_file)  # finite, or one line naming it
    model = PoseGPT(cfg, int(frames), float(fps))
    fit(model, weights, weights_file)  # missing, unexpected or mis-shaped tensors
    return model.eval()
