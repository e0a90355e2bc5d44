"""Pre-registered protocols: what an experiment decides before it runs.

An experiment declares its `Protocol` before any run: the seeds, the split that chooses the
settings the verdict depends on (val), the split it reports (test), how the settings are chosen,
its primary metric and the comparisons the verdict rests on (`Comparison`: arm a against arm b,
with the margin a gain must clear), the gates that make a verdict inconclusive, and the verdict
rule, in words. `write_results` puts it at the top of results.json and results.md, so a reader
sees what was decided before the numbers came. The statistics and the verdict rule itself are in
`statistics`.

Data difficulty (and budget): an experiment declares a ladder of settings (`Protocol.difficulties`,
easiest data first, cheapest budget first within it) and its own rule (`Protocol.difficulty_rule`, an
instance of `DIFFICULTY_RULE`), and `select_first` measures the rungs on val, in order, with the
selection seeds, and takes the first that the rule lets through; every rung tried is recorded with why
it was rejected. When none qualifies, the last rung is run and every verdict is
`inconclusive: no discriminating setting`. An experiment whose data is fixed says why in
`difficulty_rule` and declares no ladder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .statistics import CONFIDENCE

DEFAULT_SEEDS = list(range(10))  # full runs; --quick runs seed 0 only
# seeds of the runs that choose settings on val: apart from the reported seeds, so that the reported runs
# are not the very runs a setting was chosen on
SELECTION_SEEDS = [1000, 1001, 1002]
NO_DISCRIMINATING_SETTING = "no discriminating setting"
DIFFICULTY_RULE = ("the first rung of the declared ladder (easiest data first, cheapest budget first within it) at "
                   "which, on val over the selection seeds (each experiment declares which conditions every seed "
                   "must meet and which hold for the mean), the reference the verdict needs learns what it must "
                   "(the upper bound, the teacher), the arm a method must beat stays at least the declared gap below "
                   "it, and the arms compared sit neither at ceiling (100 %) nor at chance on the primary metric (an "
                   "oracle may reach 100 %); the rungs tried and why each was rejected are reported; none qualifies: "
                   f"the last rung is run and every verdict is 'inconclusive: {NO_DISCRIMINATING_SETTING}'")


def setting_words(difficulty: dict[str, Any] | None, shipped: str) -> str:
    """A rung's data as a protocol names it: None the `shipped` data, else the generator's settings."""
    if difficulty is None:
        return f"the shipped {shipped}"
    return "generated, " + (", ".join(f"{k}={v}" for k, v in difficulty.items()) or "the defaults")


def select_first(ladder: Iterable[dict[str, Any]], measure: Callable[[dict[str, Any]], Any],
                 rejections: Callable[[dict[str, Any], Any], Sequence[str | None]],
                 skip: Callable[[dict[str, Any], list[dict[str, Any]]], str | None] | None = None) -> dict[str, Any]:
    """The pre-registered choice of a setting on val: each rung of `ladder` (a dict naming its setting, in the
    declared order) is measured (`measure(rung)` -> its val scores) and judged (`rejections(rung, scores)` -> the
    reasons it fails the rule; none = it qualifies); the first that qualifies is chosen and no later rung is
    measured. `skip(rung, tried so far)`, given, names why a rung cannot qualify from what earlier rungs showed
    (the protocol declares it); such a rung is not measured and is listed with `"skipped"`. Returns {"chosen":
    that rung (the last one measured when none qualifies), "met": whether one did, "tried": every rung with its
    "val" scores (None when skipped) and the "rejected" reasons}."""
    tried = []
    for rung in ladder:
        reason = skip(rung, tried) if skip else None
        if reason:
            tried.append({**rung, "val": None, "rejected": [reason], "skipped": True})
            continue
        scores = measure(rung)
        rejected = [reason for reason in rejections(rung, scores) if reason]
        tried.append({**rung, "val": scores, "rejected": rejected})
        if not rejected:
            break
    measured = [rung for rung in tried if not rung.get("skipped")]
    if not measured:
        raise ValueError("select_first: no rung measured (declare at least one setting)")
    return {"chosen": measured[-1], "met": not measured[-1]["rejected"], "tried": tried}


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
    # the ladder of settings (data difficulty, budget; easiest first) chosen on val by `difficulty_rule`; [] = none
    difficulties: list[str] = field(default_factory=list)
    # the experiment's instance of DIFFICULTY_RULE, or why its data is fixed (no ladder)
    difficulty_rule: str = ""
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
            *([f"- Difficulty of the data, chosen on val, the ladder (easiest first): {'; '.join(self.difficulties)}. "
               f"Rule: {self.difficulty_rule or DIFFICULTY_RULE}."] if self.difficulties else
              [f"- Difficulty of the data: {self.difficulty_rule}"] if self.difficulty_rule else []),
            *self.ladder_lines(),
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

    def ladder_lines(self) -> list[str]:
        """The rungs the selection tried (`settings["ladder"]`: each with its "setting" in words and the reasons it
        was "rejected"), the chosen one marked."""
        ladder = self.settings.get("ladder") or []
        return [f"- Tried on val: {rung['setting']}: "
                + (f"skipped ({'; '.join(rung['rejected'])})" if rung.get("skipped") else
                   f"rejected ({'; '.join(rung['rejected'])})" if rung["rejected"] else "**chosen**") + "."
                for rung in ladder]


