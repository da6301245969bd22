"""Motion augmentation of the embedded clips: mirrored and time-warped copies.

A copy is named after its clip and its tags, ``BASE~TAG``: ``walk~mirror`` is the walk reflected
across the world plane y = 0 and performed by the same (unmirrored) body, left and right
exchanged (:func:`data_shards.mocap.mirror`); ``walk~x0.8`` is the walk played at 0.8 x speed,
resampled from the keyframes with slerp (:func:`data_shards.mocap.resample`), 1 / 0.8 as many
frames. The motion is changed before rendering, so the renderer draws the copy's own pose and its
3D joints, 2D projections and pixels agree as for any clip.

:mod:`data_shards.synth` renders copies of the train clips only (``SynthConfig.mirror`` and
``SynthConfig.speeds``): val and test stay exactly as they are, so held-out evaluation does not
move with augmentation. A copy keeps its clip as the action label.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from data_shards import mocap

if TYPE_CHECKING:
    from data_shards.manifest import Manifest

SEP = "~"
"""Joins a clip's name and its augmentation tags: ``walk~mirror``, ``walk~x1.25``."""


def source_clip(name: str) -> str:
    """The clip an augmented copy comes from (``walk~mirror`` -> ``walk``); a plain clip's
    name is its own."""
    return name.split(SEP, 1)[0]


MIN_SPEED, MAX_SPEED = 0.1, 10.0
"""Playback speeds allowed for time-warped copies: beyond them a copy is over ten times longer
than its clip, or a few frames long."""


@dataclass(frozen=True)
class ClipVariant:
    """A clip of :data:`data_shards.mocap.CLIP_NAMES`, or an augmented copy of it."""

    base: str
    """The DeepMimic clip the motion comes from; also the samples' action label."""
    mirror: bool = False
    """Reflected, left and right exchanged (:func:`data_shards.mocap.mirror`)."""
    speed: float = 1.0
    """Playback speed (time warp); 1 = as captured."""

    @property
    def name(self) -> str:
        """``base``, then ``~mirror`` and ``~x<speed>`` (the float's repr: names round-trip)."""
        tags = ["mirror"] * self.mirror + [f"x{float(self.speed)!r}"] * (self.speed != 1)
        return SEP.join([self.base, *tags])

    @property
    def is_copy(self) -> bool:
        return self.mirror or self.speed != 1

    def rng_ids(self) -> tuple[int, ...]:
        """Seed words added to a window's identity: a copy draws its own appearances and body
        height; the clip itself none, so its samples stay what they were before augmentation."""
        return (1 + self.mirror, round(self.speed * 1e6)) if self.is_copy else ()

    @classmethod
    def parse(cls, name: str) -> ClipVariant:
        """The variant named ``name``; ValueError for an unknown clip or a bad tag."""
        base, *tags = name.split(SEP)
        if base not in mocap.CLIP_NAMES:
            raise ValueError(
                f"unknown clip {base!r}; expected one of {', '.join(mocap.CLIP_NAMES)}"
            )
        speed_tags = [tag[1:] for tag in tags if tag != "mirror"]
        try:
            speed = float(speed_tags[0]) if speed_tags else 1.0
        except ValueError:
            speed = 1.0  # refused below: the name does not round-trip
        variant = cls(base, "mirror" in tags, speed)
        if variant.name != name or not MIN_SPEED <= speed <= MAX_SPEED:
            raise ValueError(
                f"clip {name!r}: bad augmentation tag; expected {base}~mirror or "
                f"{base}~x<speed in [{MIN_SPEED:g}, {MAX_SPEED:g}], not 1>"
            )
        return variant

    def motion(self, fps: float) -> mocap.MotionClip:
        """The variant's motion at ``fps``; the clip itself exactly as :func:`mocap.resample`
        gives it (mirroring commutes with interpolation, so it is applied to the keyframes)."""
        keys = mocap.load_clip(self.base)
        if not self.is_copy:
            return mocap.resample(keys, fps)
        keys = mocap.mirror(keys) if self.mirror else keys
        return replace(mocap.resample(keys, fps, self.speed), name=self.name)


def checked_speeds(speeds: object, field: str) -> tuple[float, ...]:
    """``speeds`` as a tuple of floats; a one-line ValueError naming ``field`` unless they are
    distinct numbers in [:data:`MIN_SPEED`, :data:`MAX_SPEED`] other than 1 (the clip itself)."""
    values = list(speeds) if isinstance(speeds, (tuple, list)) else [None]
    good = all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and MIN_SPEED <= v <= MAX_SPEED
        and v != 1 for v in values
    ) and len(set(values)) == len(values)  # fmt: skip
    if not good:
        raise ValueError(f"{field}: need distinct numbers in [{MIN_SPEED:g}, {MAX_SPEED:g}] "
                         f"other than 1, got {speeds!r}")  # fmt: skip
    return tuple(float(v) for v in values)


def with_copies(clips: Sequence[str], mirror: bool, speeds: Sequence[float]) -> tuple[str, ...]:
    """``clips``, each followed by its copies: mirrored if ``mirror``, then one per speed.
    One augmentation per copy (a mirrored copy is not also time-warped)."""
    out = []
    for clip in clips:
        out.append(clip)
        out += [ClipVariant(clip, mirror=True).name] * mirror
        out += [ClipVariant(clip, speed=speed).name for speed in speeds]
    return tuple(out)


def summary(manifest: Manifest) -> str:
    """One line on the augmented copies of a split (its ``source["augmentation"]``), or ""
    when it has none; ``shards synth`` and ``shards stats`` print it."""
    aug = (manifest.source or {}).get("augmentation")
    if not aug:
        return ""
    kinds = ["mirror"] * bool(aug.get("mirror")) + [f"x{v:g}" for v in aug.get("speeds", [])]
    return (f"{manifest.split}: {aug.get('windows', 0)} of {manifest.samples} windows are "
            f"augmented copies ({', '.join(kinds)}) in {len(aug.get('clips', []))} copied "
            f"clips")  # fmt: skip
