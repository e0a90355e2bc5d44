"""Pre-registered protocols and the statistics every experiment's verdict rests on.

An experiment declares its `Protocol` before any run: the seeds, the split that chooses the
settings the verdict depends on (val), the split it reports (test), how the settings are chosen
and the verdict rule, in words. `write_results` puts it at the top of results.json and results.md,
so a reader sees what was decided before the numbers came.

Statistics over seeds, used by every table and verdict: `seed_stat` (mean, range, standard error),
`paired_difference` (the mean of per-seed differences and its standard error, with the seeds in
which one side wins) and `agreement` (how many seeds give the majority verdict). A difference
smaller than its standard error is said to be so (`difference_words`), never called a win.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_SEEDS = [0, 1, 2]  # full runs; --quick runs seed 0 only


@dataclass
class Protocol:
    """What an experiment fixes before it runs (written into its results)."""

    question: str
    seeds: list[int]
    selection_split: str  # the split settings are chosen on ("val"), never the reported one
    reported_split: str  # the split every table and verdict reports ("test")
    selection: str  # the procedure that chooses the settings the verdict depends on
    verdict_rule: str
    settings: dict[str, Any] = field(default_factory=dict)  # what the selection chose (filled after it)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        # scalars here; the lists behind them (e.g. every candidate's val scores) are in results.json
        chosen = ", ".join(f"{k} = {v}" for k, v in self.settings.items() if not isinstance(v, (list, dict)))
        chosen = chosen or "none to choose"
        return "\n".join([
            "## Protocol (declared before the runs)", "",
            f"- Question: {self.question}",
            f"- Seeds: {', '.join(map(str, self.seeds))} ({len(self.seeds)}).",
            f"- Settings chosen on the {self.selection_split} split: {self.selection} Chosen: {chosen}.",
            f"- Reported: the {self.reported_split} split; tables give the mean over seeds and the range (min-max).",
            f"- Verdict rule: {self.verdict_rule}", "",
        ])


def seed_stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max, standard error of the mean (None for one value) and the values, over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("seed_stat: no values")
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "sem": sem,
            "values": values, "n": len(values)}


def spread(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    """`mean (min-max)` over several seeds, the value alone for one, blank for none."""
    if stat is None:
        return ""
    fmt = f"{{:.{digits}f}}"
    mean = fmt.format(scale * stat["mean"])
    if len(stat["values"]) == 1:
        return mean
    return f"{mean} ({fmt.format(scale * stat['min'])}-{fmt.format(scale * stat['max'])})"


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a - b seed by seed (the same seeds in the same order): mean difference, its standard error (None for
    one seed), the seeds where a is above / below b, and whether |mean| is smaller than its standard error."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: {len(a)} against {len(b)} values")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    stat = seed_stat(diffs)
    within = stat["sem"] is not None and abs(stat["mean"]) < stat["sem"]
    return {"mean": stat["mean"], "sem": stat["sem"], "n": len(diffs), "above": sum(d > 0 for d in diffs),
            "below": sum(d < 0 for d in diffs), "within_se": within}


def difference_words(diff: dict[str, Any], what: str, scale: float = 1.0, unit: str = "") -> str:
    """`diff` (a `paired_difference`) in words: its size with the standard error, in how many seeds each side
    is ahead, and 'smaller than its standard error' when it is."""
    n, se = diff["n"], diff["sem"]
    size = f"{scale * diff['mean']:+.3f}{unit}" + ("" if se is None else f" ± {scale * se:.3f}{unit} (standard error)")
    seeds = f"higher in {diff['above']} of {n} seeds, lower in {diff['below']}"
    note = ("; smaller than its standard error, so no difference is shown" if diff["within_se"]
            else "; one seed, no standard error" if se is None else "")
    return f"{what} {size}, {seeds}{note}"


def agreement(verdicts: Sequence[str]) -> tuple[str, int, int]:
    """(the most frequent verdict, how many seeds give it, how many seeds); ties go to the verdict seen first."""
    if not verdicts:
        raise ValueError("agreement: no verdicts")
    counts = Counter(verdicts)
    best = max(counts.values())
    verdict = next(v for v in verdicts if counts[v] == best)
    return verdict, best, len(verdicts)


def agreement_words(verdicts: Sequence[str]) -> str:
    """'**verdict** (k of n seeds agree)' or, with several verdicts, each with its seeds."""
    verdict, count, n = agreement(verdicts)
    if count == n:
        return f"**{verdict}** ({n} of {n} seeds agree)"
    others = ", ".join(f"{v}: {c}" for v, c in Counter(verdicts).items() if v != verdict)
    return f"**{verdict}** in {count} of {n} seeds (others: {others})"
