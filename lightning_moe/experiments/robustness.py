"""Do the verdicts survive another float reduction order? Two reports of the same experiments on the same commit,
one run with `--threads 1` and one with `--threads 2` (torch's kernels sum in other orders with other thread
counts, so every trained weight differs in its last bits and the differences grow over training), side by side,
verdict by verdict.

    python -m lightning_moe.experiments.report --out runs/report --threads 1 --jobs 2
    python -m lightning_moe.experiments.report --out runs/report_t2 --threads 2 --jobs 2
    python -m lightning_moe.experiments.robustness runs/report runs/report_t2 [--only NAME ...] [--docs DOCS_DIR]

For each experiment found in both (DIR/<name>/results.json): every verdict it recorded (`verdict`, `verdicts`,
`claims`, `diagnosis`) in both runs, whether their labels (confirmed / not confirmed / inconclusive, the words
before the reason) agree, and every paired difference with its interval in both. An experiment is robust when
every label agrees; runs of different commits are said to be so (their verdicts may differ for other reasons).
Writes OUT_A/robustness.md (and, with `--docs`, each experiment's page between `<!-- report:NAME-threads begin -->`
markers, with run B's results.json kept in DOCS/results/threads<N>/<name>/ beside run A's in DOCS/results/<name>/,
so that `robustness docs/results docs/results/threads2` redoes it) and returns whether every experiment compared
was robust.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..provenance import provenance_words
from .report import PARTS, write_block
from .statistics import interval_words

VERDICT_KEYS = ("verdict", "verdicts", "claims", "diagnosis")


def verdict_items(results: dict[str, Any]) -> dict[str, str]:
    """Every verdict sentence of a results.json, by a name that is the same in another run of the experiment."""
    items = {}
    for key in VERDICT_KEYS:
        value = results.get(key)
        if isinstance(value, str):
            items[key] = value
        elif isinstance(value, dict):
            items |= {f"{key}: {name}": v for name, v in value.items() if isinstance(v, str)}
    return items


def label(verdict: str) -> str:
    """'inconclusive: the interval straddles the margin' -> 'inconclusive'; a diagnosis without a reason is its
    own label."""
    return verdict.split(":", 1)[0].strip()


def difference_items(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every paired difference (`statistics.paired_difference`) of a results.json by name; nested ones (one per
    metric) as 'name (metric)'."""
    items = {}
    for name, value in (results.get("differences") or {}).items():
        if "mean" in value:
            items[name] = value
        else:
            items |= {f"{name} ({metric})": d for metric, d in value.items() if isinstance(d, dict) and "mean" in d}
    return items


def _threads(results: dict[str, Any]) -> str:
    return str(results.get("environment", {}).get("torch_threads", "?"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The two runs' verdicts and differences side by side: rows (name, a, b, same label?), the differences, and
    whether every verdict found in either agrees (a verdict missing from one run does not agree)."""
    va, vb = verdict_items(a), verdict_items(b)
    rows = [(name, va.get(name), vb.get(name),
             name in va and name in vb and label(va[name]) == label(vb[name])) for name in {**va, **vb}]
    da, db = difference_items(a), difference_items(b)
    differences = [(name, da.get(name), db.get(name)) for name in {**da, **db}]
    commits = (a.get("environment", {}).get("git_commit"), b.get("environment", {}).get("git_commit"))
    return {"rows": rows, "differences": differences, "robust": bool(rows) and all(r[3] for r in rows),
            "same_commit": commits[0] is not None and commits[0] == commits[1]}


def section(name: str, a: dict[str, Any], b: dict[str, Any], where_a: str, where_b: str) -> tuple[str, bool]:
    """The markdown comparing one experiment's two runs, and whether it is robust."""
    found = compare(a, b)
    ta, tb = _threads(a), _threads(b)
    head = [f"### Robustness to the float reduction order ({ta} against {tb} torch threads)", "",
            f"Run A: `{a['environment']['command']}` ({where_a}), {a['environment']['date']}, {ta} torch threads, "
            f"{provenance_words(a['environment'])}.",
            f"Run B: `{b['environment']['command']}` ({where_b}), {b['environment']['date']}, {tb} torch threads, "
            f"{provenance_words(b['environment'])}.", ""]
    if not found["same_commit"]:
        head += ["The two runs are of different commits: a changed verdict may come from the code, not only from "
                 "the thread count.", ""]
    lines = ["| verdict | A | B | same label |", "|---|---|---|---|"]
    lines += [f"| {n} | {x or 'missing'} | {y or 'missing'} | {'yes' if same else '**no**'} |"
              for n, x, y, same in found["rows"]]
    lines += ["", "| paired difference | A | B |", "|---|---|---|"]
    lines += [f"| {n} | {interval_words(x) if x else 'missing'} | {interval_words(y) if y else 'missing'} |"
              for n, x, y in found["differences"]]
    changed = [n for n, _, _, same in found["rows"] if not same]
    summary = ("Every verdict has the same label in both runs: **robust** to the reduction order."
               if found["robust"] else
               "**Not robust**: " + ("no verdict found" if not found["rows"] else
                                     "the label changes for " + ", ".join(changed)) + ".")
    return "\n".join([*head, summary, "", *lines, ""]), found["robust"]


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="one report's output directory (e.g. --threads 1)")
    parser.add_argument("b", type=Path, help="the other's (e.g. --threads 2)")
    parser.add_argument("--only", nargs="+", choices=[p.name for p in PARTS], default=None,
                        help="a subset of the experiments (default: every one found in both)")
    parser.add_argument("--docs", type=Path, default=None, metavar="DOCS_DIR",
                        help="also write each comparison into its experiment's docs page")
    args = parser.parse_args(argv)
    texts, verdicts = [], {}
    for part in PARTS:
        files = [d / part.name / "results.json" for d in (args.a, args.b)]
        if (args.only and part.name not in args.only) or not all(f.is_file() for f in files):
            if args.only and part.name in args.only:
                raise SystemExit(f"robustness: {' or '.join(str(f) for f in files if not f.is_file())} is missing")
            continue
        a, b = (json.loads(f.read_text()) for f in files)
        if "environment" not in a or "environment" not in b:
            continue  # a benchmark: timings, no verdicts
        text, robust = section(part.name, a, b, str(args.a / part.name), str(args.b / part.name))
        texts.append(f"## {part.title}\n\n{text}")
        verdicts[part.name] = robust
        if args.docs:  # run B's results kept beside run A's (DOCS/results/<name>/, from `report --docs`)
            kept = args.docs / "results" / f"threads{_threads(b)}" / part.name
            kept.mkdir(parents=True, exist_ok=True)
            (kept / "results.json").write_text(json.dumps(b, separators=(",", ":")))
            write_block(args.docs / part.page, f"{part.name}-threads", text,
                        "python -m lightning_moe.experiments.robustness --docs")
    if not verdicts:
        raise SystemExit(f"robustness: no experiment with results in both {args.a} and {args.b}")
    overall = ", ".join(f"{name}: {'robust' if ok else 'NOT robust'}" for name, ok in verdicts.items())
    (args.a / "robustness.md").write_text("\n".join(["# Verdicts under another thread count", "", overall, "",
                                                      *texts]))
    print(overall)
    return all(verdicts.values())


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
