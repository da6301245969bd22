"""A warning line when the contrastive task collapses (issue 3).

Three signs, read from one step's metrics (those of :func:`contrastive_loss`, merged with the
quantizer's when it is on):

- codebook collapse: the quantizer's perplexity near 1 (one code used for every frame);
- a trivial task: the contrastive loss near 0 with accuracy at 1 (the negatives are too easy
  to tell apart, e.g. by clothing or clip, not by pose; GUIDE section 6);
- no usable negatives: every distractor was filtered out (e.g. all targets above the cosine
  cut-off because they collapsed to one vector).

:func:`collapse_warning` judges one step; :class:`CollapseMonitor` waits for a sign to persist
("stuck") before warning, and repeats the warning every ``patience`` steps while it lasts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class CollapseConfig:
    """Thresholds of the collapse signs."""

    perplexity_key: str = "perplexity"
    """Metric holding the quantizer's perplexity per codebook group (exp of the entropy of the
    batch's average code distribution, averaged over groups): 1 = one code used, V = all used
    evenly. Absent when the quantizer is off."""

    perplexity_min: float = 1.5
    """Warn when that perplexity is at or below this."""

    loss_max: float = 0.01
    """Warn when ``loss_contrastive`` is at or below this while ``accuracy`` >= accuracy_min.
    With 100 negatives at tau = 0.1, a positive at cosine 1 against negatives at cosine 0 gives
    0.0045: the task is solved."""

    accuracy_min: float = 0.999
    """Accuracy counted as "stuck at 1"."""

    patience: int = 50
    """:class:`CollapseMonitor`: consecutive steps a sign must last before a warning."""

    def __post_init__(self) -> None:
        if not self.perplexity_min >= 1:
            raise ValueError(f"perplexity_min must be >= 1, got {self.perplexity_min!r}")
        if not self.loss_max >= 0:
            raise ValueError(f"loss_max must be >= 0, got {self.loss_max!r}")
        if not 0 < self.accuracy_min <= 1:
            raise ValueError(f"accuracy_min must be in (0, 1], got {self.accuracy_min!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise ValueError(f"patience must be an int, got {self.patience!r}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience!r}")


def collapse_warning(
    metrics: Mapping[str, float], config: CollapseConfig | None = None
) -> str | None:
    """One line naming the collapse signs in ``metrics``, or None when there are none."""
    config = config or CollapseConfig()
    signs = []
    perplexity = metrics.get(config.perplexity_key)
    if perplexity is not None and perplexity <= config.perplexity_min:
        signs.append(
            f"codebook perplexity {perplexity:.3g} <= {config.perplexity_min:g} "
            "(the quantizer uses about one code)"
        )
    loss, accuracy = metrics.get("loss_contrastive"), metrics.get("accuracy")
    if loss is not None and accuracy is not None and metrics.get("num_masked", 1) > 0:
        if loss <= config.loss_max and accuracy >= config.accuracy_min:
            signs.append(
                f"loss_contrastive {loss:.3g} with accuracy {accuracy:.3f} "
                "(negatives too easy: the task no longer needs pose)"
            )
    if metrics.get("num_masked", 0) > 0 and metrics.get("negatives_per_anchor", 1) == 0:
        signs.append("no usable negatives (all filtered out: targets may have collapsed)")
    return "collapse: " + "; ".join(signs) if signs else None


class CollapseMonitor:
    """Warns when collapse signs last ``config.patience`` consecutive steps."""

    def __init__(self, config: CollapseConfig | None = None) -> None:
        self.config = config or CollapseConfig()
        self.streak = 0

    def update(self, metrics: Mapping[str, float]) -> str | None:
        """Feed one step's metrics; a warning line on the step a sign becomes stuck (and every
        ``patience`` steps after while it stays), else None."""
        line = collapse_warning(metrics, self.config)
        self.streak = self.streak + 1 if line else 0
        if line and self.streak % self.config.patience == 0:
            return f"{line} for {self.streak} steps"
        return None
