"""The optional extras: what each installs, and the one line a command gives without it.

The core (reading shards, pretraining, evaluation, fine-tuning, Slurm submission) installs on
Python 3.10-3.13. Two parts need packages that have no wheel for every one of them:

- ``render``: pybullet 3.2.7 (cp310/cp311 wheels only), which ships the DeepMimic motion clips
  and draws them: ``shards synth``, ``shards render-video``, ``demo``, ``ablation``;
- ``video``: the 2D detector, mediapipe 0.10.14 (wheels up to cp312), installed with
  ``--no-deps`` beside the extra's own packages (see pyproject.toml): ``shards detect``,
  ``shards video --detect``, ``predict``, ``demo``.

Every import of pybullet, pybullet_data or mediapipe goes through :func:`import_extra` inside
the function that needs it, so every module imports without them; a command checks its extras
with :func:`require` before it starts, and ``posebert`` prints :meth:`MissingExtra.line`.
``python -m data_shards.extras`` says which extras this interpreter lacks (``make install``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class Extra:
    """One optional extra of the distribution."""

    name: str
    """Its name in ``posebert[NAME]``."""
    packages: str
    """What it brings, as a person reads it."""
    pythons: tuple[int, ...]
    """Minor versions of Python 3 its packages have wheels for."""
    modules: tuple[str, ...]
    """Import names that must all be found."""
    install: str
    """The pip command that installs it."""
    commands: str
    """The ``posebert`` commands that need it."""

    def where(self) -> str:
        """``Python 3.10/3.11``, and which Python this is when it is not one of them."""
        first, last = self.pythons[0], self.pythons[-1]
        text = f"Python 3.{first}/3.{last}" if last == first + 1 else f"Python 3.{first}-3.{last}"
        major, minor = sys.version_info[:2]
        if major != 3 or minor not in self.pythons:
            text += f"; this is Python {major}.{minor}"
        return text


EXTRAS = {
    "render": Extra(
        "render", "pybullet", (10, 11), ("pybullet", "pybullet_data"),
        "pip install 'posebert[render]'",
        "shards synth, shards render-video, demo, ablation"),
    "video": Extra(
        "video", "mediapipe 0.10.14", (10, 11, 12),
        ("mediapipe", "cv2", "absl", "attr", "flatbuffers", "google.protobuf"),
        "pip install 'posebert[video]' && pip install --no-deps mediapipe==0.10.14",
        "shards detect, shards video --detect, predict, demo"),
}  # fmt: skip


class MissingExtra(ImportError):
    """A command needs an extra that is not installed (``detail``: the import that failed)."""

    def __init__(self, extra: str, detail: str = "") -> None:
        self.extra, self.detail = extra, detail
        super().__init__(self.line("this"))

    def __reduce__(self) -> tuple:  # raised in a worker process, it must unpickle in the parent
        return type(self), (self.extra, self.detail)

    def line(self, command: str) -> str:
        """``COMMAND needs the 'render' extra (pybullet, Python 3.10/3.11): pip install ...``"""
        e = EXTRAS[self.extra]
        line = f"{command} needs the '{e.name}' extra ({e.packages}, {e.where()}): {e.install}"
        return line + (f" ({self.detail})" if self.detail else "")


def missing(name: str) -> bool:
    """True if a module of extra ``name`` cannot be found (nothing is imported but parents)."""
    for module in EXTRAS[name].modules:
        try:
            if importlib.util.find_spec(module) is None:
                return True
        except (ImportError, ValueError):
            return True
    return False


def require(*names: str) -> None:
    """Raise :class:`MissingExtra` for the first of extras ``names`` that is not installed."""
    for name in names:
        if missing(name):
            raise MissingExtra(name)


def import_extra(name: str, module: str) -> types.ModuleType:
    """``import module`` (a module of extra ``name``); :class:`MissingExtra` if it fails."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(name, str(e)) from None


def main() -> int:
    """Print one line per extra this interpreter lacks (``make install`` runs it)."""
    for name, e in EXTRAS.items():
        if missing(name):
            print(f"posebert: left out the '{name}' extra ({e.packages}, {e.where()}); "
                  f"{e.commands} need it")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
