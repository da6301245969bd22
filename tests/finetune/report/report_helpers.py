"""Helpers of the report tests: synthetic skeletons to draw, and Debian's Chromium to open the
page in (a module, not a conftest.py: tests/conftest.py is imported as ``conftest`` by other
tests)."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np

STANDING_MM = np.array([
    [0, 0, 0], [-120, 0, 0], [-120, 0, -420], [-120, 0, -840], [120, 0, 0], [120, 0, -420],
    [120, 0, -840], [0, 0, 230], [0, 0, 480], [0, 60, 560], [0, 0, 680], [170, 0, 450],
    [170, 0, 200], [170, 0, -30], [-170, 0, 450], [-170, 0, 200], [-170, 0, -30],
], dtype=np.float32)
"""A standing figure, 17 joints in data_shards.skeleton order, root-relative world mm (Z up)."""


def world_poses(n: int, seed: int = 0, noise: float = 30.0) -> np.ndarray:
    """(n, 17, 3) standing figures with seeded joint noise, world mm (Z up)."""
    rng = np.random.default_rng(seed)
    return STANDING_MM + rng.normal(0, noise, (n, 17, 3)).astype(np.float32)


def world_to_camera(poses: np.ndarray) -> np.ndarray:
    """World (Z up) -> OpenCV camera axes of a camera looking along +y (x right, y down)."""
    return np.stack([poses[..., 0], -poses[..., 2], poses[..., 1]], axis=-1)


def pose_arrays(n: int = 3) -> dict:
    true = world_to_camera(world_poses(n, seed=1, noise=0))
    return {"pred": true + np.float32(40), "true": true, "label": "pretrained full 100%",
            "action": np.array(["walk", "run", "jump"][:n] + ["kick"] * max(0, n - 3))}


def future_arrays(n: int = 2, seed_frames: int = 10, horizon: int = 50) -> dict:
    """Seed, truth and forecast of a figure walking forward (+y) with swinging arms."""
    t = np.arange(seed_frames + horizon, dtype=np.float32)
    motion = np.repeat(STANDING_MM[None], len(t), axis=0).copy()
    motion[:, 13, 1] += 200 * np.sin(t / 8)
    motion[:, 16, 1] -= 200 * np.sin(t / 8)
    clip = np.repeat(motion[None], n, axis=0)
    drift = np.linspace(0, 150, horizon, dtype=np.float32)[None, :, None, None]
    return {"seed": clip[:, :seed_frames], "true": clip[:, seed_frames:],
            "pred": clip[:, seed_frames:] + drift, "fps": 50.0}


# ------------------------------------------------------------- a real headless Chromium

CHROMIUM_PACKAGES = ("chromium", "fonts-liberation")
"""Debian's Chromium and a font for its text (installed without the other recommends)."""
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync")  # fmt: skip
"""Root needs --no-sandbox; the rest keep Chromium off the (closed) network at start-up."""


def install_chromium(timeout_s: float = 900) -> str:
    """Path of Debian's ``chromium``, installed with apt when missing; ``RuntimeError`` naming
    the reason when it cannot be (not root, no apt-get, apt failed)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("no chromium; installing it with apt needs root")
    if shutil.which("apt-get") is None:
        raise RuntimeError("no chromium and no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt (the Slurm fixture's) may hold it
    for cmd in (["apt-get", *wait, "update"],
                ["apt-get", *wait, "install", "-y", "--no-install-recommends",
                 *CHROMIUM_PACKAGES]):  # fmt: skip
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd)} took over {timeout_s:.0f} s") from None
        if r.returncode != 0:
            tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-6:])
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {tail}")
    found = shutil.which("chromium")
    if not found:
        raise RuntimeError(f"apt installed {' '.join(CHROMIUM_PACKAGES)} but no chromium on PATH")
    return found

