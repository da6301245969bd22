"""`posebert shards preview`: a contact sheet of samples with their 2D skeletons drawn on.

One row per sample; the columns are its views at a few window positions. The 2D joints of the
sample are drawn over each frame (left side blue, right side red) and the foreground mask is
outlined, so a glance shows whether labels, crops and masks agree with the pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_shards.manifest import Manifest, find_splits
from data_shards.schema import Sample, decode_sample
from data_shards.skeleton import BONES, LEFT_JOINTS, RIGHT_JOINTS
from data_shards.tario import iter_tar_samples

_SIDE = {j: (60, 140, 255) for j in LEFT_JOINTS} | {j: (255, 70, 60) for j in RIGHT_JOINTS}


def draw_frame(sample: Sample, view: int, time: int, scale: int) -> Image.Image:
    """Frame (view, time) of ``sample`` enlarged ``scale`` times, with skeleton and mask edge."""
    frame = sample.frames[view, time]  # (H, W, 3)
    if sample.masks is not None:
        mask = sample.masks[view, time]
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1)
                        & np.roll(mask, -1, 1))  # fmt: skip
        frame = frame.copy()
        frame[edge] = (255, 255, 0)
    H, W = frame.shape[:2]
    image = Image.fromarray(frame).resize((W * scale, H * scale), Image.NEAREST)
    if sample.pose2d is not None:
        pts = sample.pose2d[view, time] * scale  # (J, 2), continuous pixel coordinates
        draw = ImageDraw.Draw(image)
        for parent, child in BONES:
            colour = _SIDE.get(child, (240, 240, 240))
            draw.line([tuple(pts[parent]), tuple(pts[child])], fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255))
    return image


def contact_sheet(split_dir: str | os.PathLike, samples: int = 4, times: int = 2,
                  scale: int = 2) -> Image.Image:  # fmt: skip
    """The first ``samples`` samples of a split, all views at ``times`` window positions."""
    split_dir = Path(split_dir)
    manifest = Manifest.load(split_dir)
    if not manifest.has.get("frames"):
        raise ValueError(f"{split_dir}: this split has no frames to show")
    picked: list[Sample] = []
    for info in manifest.shards:
        for raw in iter_tar_samples(split_dir / info.name):
            picked.append(decode_sample(raw))
            if len(picked) == samples:
                break
        if len(picked) == samples:
            break
    T = manifest.frames
    positions = np.linspace(0, T - 1, min(times, T)).round().astype(int)
    W, H = manifest.image_size
    cols = manifest.views * len(positions)
    sheet = Image.new("RGB", (cols * W * scale, len(picked) * H * scale))
    for row, sample in enumerate(picked):
        for v in range(manifest.views):
            for k, t in enumerate(positions):
                col = v * len(positions) + k
                sheet.paste(draw_frame(sample, v, int(t), scale), (col * W * scale,
                                                                   row * H * scale))  # fmt: skip
    return sheet


def write_preview(root: str | os.PathLike, out: str | os.PathLike, split: str | None = None,
                  samples: int = 4) -> Path:  # fmt: skip
    """Write the contact sheet of ``split`` (default: the first split under ``root``) as PNG."""
    splits = find_splits(root)
    name = split or next(iter(splits))
    if name not in splits:
        raise ValueError(f"{root}: no split {name!r} (have {', '.join(splits)})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(splits[name], samples=samples).save(out)
    return out
