"""Pre-registered protocols: what an experiment decides before it runs.

An experiment declares its `Protocol` before any run: the seeds, the split that chooses the
settings the verdict depends on (val), the split it reports (test), how the settings are chosen,
its primary metric and the comparisons the verdict rests on (`Comparison`: arm a against arm b,
with the margin a gain must clear), the gates that make a verdict inconclusive, and the verdict
rule, in words. `write_results` puts it at the top of results.json and results.md, so a reader
sees what was decided before the numbers came. The statistics and the verdict rule itself are in
`statistics`.

Data difficulty: an experiment may name the difficulty settings of its synthetic data
(`Protocol.difficulties`, easiest first) and choose one on val by `DIFFICULTY_RULE`: the first
at which the upper bound (or oracle) reaches its target and the baseline stays at least the margin
below it; when none does, every verdict is `inconclusive: no discriminating setting`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .statistics import CONFIDENCE

DEFAULT_SEEDS = list(range(10))  # full runs; --quick runs seed 0 only
# seeds of the runs that choose settings on val: apart from the reported seeds, so that the reported runs
# are not the very runs a setting was chosen on
SELECTION_SEEDS = [1000, 1001, 1002]
NO_DISCRIMINATING_SETTING = "no discriminating setting"
DIFFICULTY_RULE = ("the first difficulty (easiest first) at which, on val and in every selection seed, the upper "
                   "bound reaches its target and the baseline stays at least the margin below it; none: every "
                   f"verdict is 'inconclusive: {NO_DISCRIMINATING_SETTING}'")


@dataclass
class Comparison:
    """One comparison the verdict rests on, declared before the runs: arm `a` against arm `b` on the
    protocol's primary metric (or on `metric`); `a` beats `b` when the 95 % interval of a - b over seeds
    clears `margin`. A negative margin asks for non-inferiority: a is at most |margin| below b."""

    a: str
    b: str
    margin: float
    claim: str = ""  # what a confirmed comparison would show, in words
    metric: str = ""  # the metric compared, in words; "" = the protocol's primary metric


@dataclass
class Protocol:
    """What an experiment fixes before it runs (written into its results)."""

    question: str
    seeds: list[int]
    selection_split: str  # the split settings are chosen on ("val"), never the reported one
    reported_split: str  # the split every table and verdict reports ("test")
    selection: str  # the procedure that chooses the settings the verdict depends on
    verdict_rule: str
    primary: str = ""  # the primary metric every comparison is on
    comparisons: list[Comparison] = field(default_factory=list)
    gates: list[str] = field(default_factory=list)  # what makes a verdict inconclusive, in words
    # difficulty settings of the data (easiest first) chosen on val by DIFFICULTY_RULE; [] = the shipped data
    difficulties: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # what the selection chose (filled after it)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Protocol:
        """A protocol as results.json holds it."""
        return cls(**{**saved, "comparisons": [Comparison(**c) for c in saved.get("comparisons", [])]})

    def markdown(self) -> str:
        # scalars here; the lists behind them (e.g. every candidate's val scores) are in results.json
        chosen = ", ".join(f"{k} = {v}" for k, v in self.settings.items() if not isinstance(v, (list, dict)))
        chosen = chosen or "none to choose"
        return "\n".join([
            "## Protocol (declared before the runs)", "",
            f"- Question: {self.question}",
            f"- Seeds: {', '.join(map(str, self.seeds))} ({len(self.seeds)}).",
            f"- Settings chosen on the {self.selection_split} split: {self.selection} Chosen: {chosen}.",
            *([f"- Difficulty of the data, chosen on val: {', '.join(self.difficulties)}; rule: {DIFFICULTY_RULE}."]
              if self.difficulties else []),
            f"- Reported: the {self.reported_split} split; tables give the mean over seeds and the range (min-max).",
            *([f"- Primary metric: {self.primary}."] if self.primary else []),
            *[f"- Comparison: {c.a} - {c.b} on {c.metric or 'the primary metric'}, margin {c.margin:+.3f}"
              + (f" ({c.claim})" if c.claim else "") + "." for c in self.comparisons],
            *([f"- Inconclusive when: {'; '.join(self.gates)}."] if self.gates else []),
            f"- Verdict rule: {self.verdict_rule}",
            *([f"- Each comparison: confirmed when the {100 * CONFIDENCE:.0f} % paired t interval of a - b over the "
               "seeds lies at or above its margin, not confirmed when it lies below it, else inconclusive; per-seed "
               "labels (a diagnosis) are reported only when every seed agrees."] if self.comparisons else []),
            "",
        ])


