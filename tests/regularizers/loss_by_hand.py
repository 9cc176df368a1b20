"""Hand computations shared by the loss tests (plain Python floats, no torch)."""

from __future__ import annotations

import math


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def kl_by_hand(t_rows: list[list[float]], s_rows: list[list[float]], temp: float) -> float:
    """Mean over rows of KL(softmax(t / T) || softmax(s / T))."""
    total = 0.0
    for t, s in zip(t_rows, s_rows):
        pt = softmax([v / temp for v in t])
        ps = softmax([v / temp for v in s])
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return total / len(t_rows)
