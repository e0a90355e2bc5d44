"""Statistics over seeds and the one verdict rule every experiment uses.

A comparison is declared before the runs (`protocol.Comparison`: arm a against arm b on the primary
metric, with a margin: the smallest gain that counts). After the runs, `paired_difference` takes a - b
seed by seed and gives the mean difference with its 95 % interval (paired t, or a seeded paired
bootstrap), and `decide` turns it into the verdict (a negative margin asks for non-inferiority, "a
matches or beats b": a is at most |margin| below b, under the same rule):

- `confirmed`: the whole interval lies at or above the margin;
- `not confirmed`: the whole interval lies below the margin (any gain is smaller than the one declared);
- `inconclusive: ...` otherwise (the interval straddles the margin; one seed gives no interval), and
  whenever a gate fails: an arm at ceiling or at chance on the primary metric (`at_ceiling_or_chance`),
  an oracle or upper bound that misses its target on val, or no setting that discriminates.

Over seeds, tables give the mean and range (`seed_stat`, `spread`); a per-seed label (a diagnosis) is
reported only when every seed gives it (`agreement`): ties and mixed seeds are inconclusive.

Student's t quantiles come from a table (no scipy at run time): exact to 3 decimals for 1 to 30
degrees of freedom, and the Cornish-Fisher expansion beyond, whose error there is under 0.001.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

CONFIDENCE = 0.95
CONFIRMED, NOT_CONFIRMED, INCONCLUSIVE = "confirmed", "not confirmed", "inconclusive"
# accuracies are counts / samples: a difference of exactly the margin must count despite float rounding
TOLERANCE = 1e-9
# two-sided 95 % quantiles t(0.975, df) of Student's t for df = 1 .. 30
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z_975 = 1.959964
BOOTSTRAP_RESAMPLES = 10_000


def t_quantile(df: int) -> float:
    """t(0.975, df): the half-width of a 95 % t interval in standard errors."""
    if df < 1:
        raise ValueError(f"t_quantile: {df} degrees of freedom (a t interval needs at least two seeds)")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def seed_stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max, standard error of the mean (None for one value), the 95 % t interval of the mean
    (None for one value) and the values, over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_stat: no values")
    n, mean = len(values), statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    half = None if sem is None else t_quantile(n - 1) * sem
    return {"mean": mean, "min": min(values), "max": max(values), "sem": sem, "values": values, "n": n,
            "low": None if half is None else mean - half, "high": None if half is None else mean + half}


def spread(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    """`mean (min-max)` over several seeds, the value alone for one, blank for none."""
    if stat is None:
        return ""
    fmt = f"{{:.{digits}f}}"
    mean = fmt.format(scale * stat["mean"])
    if len(stat["values"]) == 1:
        return mean
    return f"{mean} ({fmt.format(scale * stat['min'])}-{fmt.format(scale * stat['max'])})"


def curve_stat(curves: Sequence[Sequence[Sequence[float]]], scale: float = 1.0) -> list[list[float]]:
    """A learning curve over seeds: from each seed's [(step, value)], the [x, mean, low, high] at every step
    that all seeds logged (x = step * `scale`, e.g. training samples per domain a step is worth); low and
    high are the 95 % t interval of the mean (the mean itself for one seed)."""
    if not curves:
        return []
    by_seed = [{int(step): value for step, value in curve} for curve in curves]
    steps = sorted(set.intersection(*(set(c) for c in by_seed)))
    points = []
    for step in steps:
        stat = seed_stat([c[step] for c in by_seed])
        low = stat["mean"] if stat["low"] is None else stat["low"]
        high = stat["mean"] if stat["high"] is None else stat["high"]
        points.append([step * scale, stat["mean"], low, high])
    return points


def bootstrap_interval(diffs: Sequence[float], seed: int = 0,
                       resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """The 95 % percentile interval of the mean of `diffs` over `resamples` resamplings of the seeds with
    replacement, drawn from `random.Random(seed)` (the same numbers give the same interval)."""
    if len(diffs) < 2:
        raise ValueError("bootstrap_interval: a bootstrap over seeds needs at least two seeds")
    rng, n = random.Random(seed), len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(resamples))
    tail = (1 - CONFIDENCE) / 2
    return means[int(math.floor(tail * (resamples - 1)))], means[int(math.ceil((1 - tail) * (resamples - 1)))]


def paired_difference(a: Sequence[float], b: Sequence[float], method: str = "t", seed: int = 0) -> dict[str, Any]:
    """a - b seed by seed (the same seeds in the same order): the mean difference, its standard error and 95 %
    interval (`method` "t": paired t; "bootstrap": `bootstrap_interval` with `seed`; None for one seed), the
    seeds where a is above / below / equal to b, and the per-seed differences."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: {len(a)} against {len(b)} values")
    if method not in ("t", "bootstrap"):
        raise ValueError(f"paired_difference: method must be 't' or 'bootstrap', got {method!r}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    stat = seed_stat(diffs)
    low, high = stat["low"], stat["high"]
    if method == "bootstrap" and len(diffs) > 1:
        low, high = bootstrap_interval(diffs, seed)
    return {"mean": stat["mean"], "sem": stat["sem"], "low": low, "high": high, "method": method,
            "n": len(diffs), "above": sum(d > 0 for d in diffs), "below": sum(d < 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs), "values": diffs}


def decide(diff: dict[str, Any], margin: float, failed_gates: Sequence[str | None] = ()) -> str:
    """The verdict on "a beats b by at least `margin`" (a negative margin: "a is at most |margin| below b",
    non-inferiority) from `diff` (a `paired_difference`): the first failed
    gate (a reason, None = passed) makes it `inconclusive: <reason>`; else `confirmed` when the interval lies
    at or above the margin, `not confirmed` when it lies below, `inconclusive: ...` when it straddles it or
    there is no interval (one seed)."""
    reasons = [reason for reason in failed_gates if reason]
    if reasons:
        return f"{INCONCLUSIVE}: {reasons[0]}"
    if diff["low"] is None:
        return f"{INCONCLUSIVE}: one seed, no interval"
    if diff["low"] >= margin - TOLERANCE:
        return CONFIRMED
    if diff["high"] < margin - TOLERANCE:
        return NOT_CONFIRMED
    return f"{INCONCLUSIVE}: the interval straddles the margin"


# the share of the seeds in which an oracle or upper bound may miss its target (`learnt_over_seeds`): one of ten
LATE_SEEDS_SHARE = 0.1


def _reaches(gain: float, margin: float) -> bool:
    return math.isfinite(gain) and gain >= margin - TOLERANCE  # a gain that is not a number misses


def learnt_over_seeds(gains: Sequence[float], margin: float, late_share: float = LATE_SEEDS_SHARE) -> bool:
    """Whether an oracle or upper bound reaches its target over the seeds: its gain over chance (accuracy minus the
    majority answer) reaches `margin` in every seed but at most `late_share` of them (one of ten; none of fewer
    than ten). Seed by seed, ten seeds would fail whenever one takes the sudden step of learning late; on the mean
    or its interval, a target reached in half of the seeds would pass (five near-ceiling seeds of ten put the
    interval's lower end above 5 points)."""
    missed = sum(not _reaches(g, margin) for g in gains)
    return missed <= math.floor(late_share * len(gains) + TOLERANCE)


def learnt_words(gains: Sequence[float], margin: float) -> str:
    """How many seeds reached `margin` above chance, for a gate's reason."""
    return f"learnt in {sum(_reaches(g, margin) for g in gains)} of {len(gains)} seeds"


def at_ceiling_or_chance(name: str, values: Sequence[float], chance: float, ceiling: float = 1.0,
                         tolerance: float = 0.01) -> str | None:
    """The gate on an arm's primary metric over seeds: a reason when its mean is within `tolerance` of the
    ceiling (no room to differ) or of chance (nothing learnt to compare), else None."""
    mean = statistics.fmean(values)
    if mean >= ceiling - tolerance - TOLERANCE:
        return f"{name} at ceiling ({100 * mean:.1f} %)"
    if mean <= chance + tolerance + TOLERANCE:
        return f"{name} at or below chance ({100 * mean:.1f} %, chance {100 * chance:.1f} %)"
    return None


def interval_words(diff: dict[str, Any], scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    """'+0.050 [0.010, 0.090] (95 % paired t, 10 seeds: higher in 8, lower in 1, equal in 1)'."""
    fmt = f"{{:+.{digits}f}}"
    size = fmt.format(scale * diff["mean"]) + unit
    if diff["low"] is None:
        interval = " (one seed, no interval)"
    else:
        how = "paired t" if diff["method"] == "t" else "paired bootstrap"
        interval = (f" [{fmt.format(scale * diff['low'])}, {fmt.format(scale * diff['high'])}]{unit} "
                    f"(95 % {how}, {diff['n']} seeds: higher in {diff['above']}, lower in {diff['below']}, "
                    f"equal in {diff['ties']})")
    return size + interval


def difference_words(diff: dict[str, Any], what: str, scale: float = 1.0, unit: str = "",
                     margin: float | None = None) -> str:
    """`what` with its difference and interval (`interval_words`) and, given the margin, the verdict."""
    words = f"{what} {interval_words(diff, scale, unit)}"
    if margin is not None:
        words += f"; margin {scale * margin:+.3f}{unit}: **{decide(diff, margin)}**"
    return words


def agreement(labels: Sequence[str]) -> tuple[str, int, int]:
    """(the label every seed gives, or `inconclusive` when the seeds disagree; how many seeds give the most
    frequent label; how many seeds). A tie or a split is never reported as a majority."""
    if not labels:
        raise ValueError("agreement: no labels")
    counts = Counter(labels)
    if len(counts) == 1:
        return labels[0], len(labels), len(labels)
    return INCONCLUSIVE, max(counts.values()), len(labels)


def agreement_words(labels: Sequence[str]) -> str:
    """'**label** (n of n seeds agree)' or '**inconclusive** (seeds disagree: a in 2, b in 1)'."""
    label, _, n = agreement(labels)
    if label != INCONCLUSIVE or Counter(labels) == Counter({INCONCLUSIVE: n}):
        return f"**{label}** ({n} of {n} seeds agree)"
    split = ", ".join(f"{v} in {c}" for v, c in Counter(labels).most_common())
    return f"**{INCONCLUSIVE}** (seeds disagree: {split})"
