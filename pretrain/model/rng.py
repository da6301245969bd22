"""Explicit randomness for the model: every draw goes through a caller's ``torch.Generator``.

The engine seeds one generator per step from (seed, step, rank), so masks and Gumbel noise are
reproduced exactly after a resume; nothing here touches the global RNG.
"""

from __future__ import annotations

import torch


def as_generator(generator: torch.Generator | int) -> torch.Generator:
    """A generator as given, or a fresh CPU generator seeded with the int."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"expected a torch.Generator or an int seed, got {generator!r}")
    return torch.Generator().manual_seed(generator)


def uniform(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """U[0, 1) float32 of ``shape``, drawn on the generator's device, returned on ``device``.

    Drawing where the generator lives keeps a CPU generator usable with CUDA tensors (one small
    copy), so the same seed gives the same numbers whatever device the model runs on.
    """
    out = torch.rand(shape, generator=generator, device=generator.device)
    return out if device is None else out.to(device)
