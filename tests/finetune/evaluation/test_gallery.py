"""The retrieval gallery picks the best, median and worst queries by top-1 MPJPE."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.evaluation.gallery import pick_queries


def test_best_median_and_worst_by_top1_mpjpe():
    errors = np.array([50.0, 10.0, np.inf, 90.0, 30.0, 70.0, 20.0, 60.0, 40.0, 80.0])
    picks = pick_queries(errors, per_group=2)
    # found, sorted by error: rows 1 (10), 6, 4, 8, 0 (50), 7, 5, 9, 3 (90); row 2 has none
    assert picks == [("best", 1), ("best", 6), ("median", 8), ("median", 0),
                     ("worst", 3), ("worst", 9)]  # fmt: skip
    assert [g for g, _ in pick_queries(errors, per_group=1)] == ["best", "median", "worst"]


def test_a_few_queries_are_each_shown_once():
    picks = pick_queries(np.array([30.0, 10.0, 20.0]), per_group=2)
    assert sorted(row for _, row in picks) == [0, 1, 2]
    assert picks[0] == ("best", 1) and picks[-1][0] in ("median", "worst")
    assert pick_queries(np.array([5.0]), per_group=3) == [("best", 0)]


def test_no_retrieved_neighbour_at_all_is_an_error():
    with pytest.raises(ValueError, match="no query has a retrieved neighbour"):
        pick_queries(np.array([np.inf, np.inf]))
