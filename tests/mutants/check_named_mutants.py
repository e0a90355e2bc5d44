"""The named mutants (docs/testing.md): each, applied to a temporary copy of the repository, must make the tests that
guard it fail. A mutant the tests let through is a hole in the suite.

    python tests/mutants/check_named_mutants.py [--only NAME ...] [--keep]

For each mutant the script copies the working tree (without .git, mutants/, runs/), finds the one file that
holds the mutant's original text (so it keeps working when a function moves to another module), replaces
it, and runs pytest on the guarding tests inside the copy. It prints one line per mutant (killed or
SURVIVED, with the first failing test) and exits non-zero if any survived or could not be applied.
Not part of the test suite: it runs the guarding tests once per mutant (a few minutes in all).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SEARCHED = ("lightning_moe", "benchmarks")  # where the mutated code lives
IGNORED = shutil.ignore_patterns(".git", "mutants", "runs", "lightning_logs", "__pycache__", ".pytest_cache", ".venv")


@dataclass
class Mutant:
    name: str
    original: str  # exact text, must occur exactly once in the searched files
    mutated: str
    tests: list[str]  # pytest arguments: the tests that guard this code


MUTANTS = [
    Mutant("ExactMatch.compute returns 1.0",
           "return self.correct / self.total.clamp(min=1)",
           "return torch.tensor(1.0)",
           ["tests/metrics"]),
    Mutant("POPE precision and recall swapped",
           '"pope_precision": precision,\n            "pope_recall": recall,',
           '"pope_precision": recall,\n            "pope_recall": precision,',
           ["tests/metrics"]),
    Mutant("chosen/rejected swapped in the DPO loss",
           "logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)",
           "logits = (policy_rejected - policy_chosen) - (ref_rejected - ref_chosen)",
           ["tests/methods/test_distill.py"]),
    Mutant("chosen/rejected swapped in the kto_pair loss",
           "chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected",
           "rejected_ratio, chosen_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected",
           ["tests/methods/test_distill.py"]),
    Mutant("chosen/rejected rows swapped where the preference step calls the loss",
           "(policy[:n], policy[n:], reference[:n], reference[n:],",
           "(policy[n:], policy[:n], reference[n:], reference[:n],",
           ["tests/methods/test_distill.py"]),
    Mutant("the policy used as its own reference",
           "reference = sequence_logprobs(teacher_out.logits[..., :v], teacher_out.labels)",
           "reference = sequence_logprobs(out.logits[..., :v], out.labels).detach()",
           ["tests/methods/test_distill.py"]),
    Mutant("student and teacher swapped in mimic_step",
           "kd = distillation_kl(student_logits, teacher_logits, None,",
           "kd = distillation_kl(teacher_logits, student_logits, None,",
           ["tests/methods/test_distill.py"]),
    Mutant("an in-place merge before the MoLE refusal",
           "    if unmergeable:\n        raise ValueError(\n            \"cannot merge routed adapters",
           "    for _, merged in adapters:  # mutant: merges the plain LoRAs in place, then refuses\n"
           "        if isinstance(merged, LoRALinear):\n"
           "            merged.merge(exact=False)\n"
           "    if unmergeable:\n        raise ValueError(\n            \"cannot merge routed adapters",
           ["tests/models/test_adapters.py", "-k", "mole_cannot_be_merged"]),
    Mutant("an EdgeMoE benchmark row that keeps every expert in memory",
           '"EdgeMoE": (planned, {"dequantize_on_load": True, "policy": "lru", **edge}),',
           '"EdgeMoE": (planned, None),',
           ["tests/test_benchmarks.py", "-k", "speed_table"]),
    Mutant("the retention answers' NLL averaged per answer instead of per token",
           "return -self.answer_logprobs.sum().item() / self.answer_tokens.sum().item()",
           "return -self.answer_logprobs.sum().item() / len(self.answer_tokens)",
           ["tests/test_retention.py"]),
    Mutant("a verdict confirmed on the mean difference instead of its whole interval",
           'if diff["low"] >= margin - TOLERANCE:',
           'if diff["mean"] >= margin - TOLERANCE:',
           ["tests/experiments/test_statistics.py", "tests/experiments/test_verdicts.py"]),
    Mutant("the conflict's primary metric scored on the conflicting pair only",
           "primary_test = {name: primary(acc[name], domains) for name in arms}",
           "primary_test = {name: primary(acc[name], plan.pair) for name in arms}",
           ["tests/experiments/test_verdicts.py", "tests/experiments/test_conflict.py", "-k", "not quick"]),
    Mutant("the conflict's oracle gate left out",
           "if mixture and oracle and statistics.fmean(oracle) - statistics.fmean(mixture) < margin - TOLERANCE:",
           "if False:",
           ["tests/experiments/test_verdicts.py"]),
    Mutant("the selection climbs the whole ladder and keeps its last rung instead of the first qualifying one",
           "        if not rejected:\n            break",
           "        if not rejected:\n            continue",
           ["tests/experiments/test_statistics.py", "tests/experiments/test_conflict.py", "-k", "not quick"]),
    Mutant("the conflict selection lets the mixture at ceiling or chance through",
           'reasons.append(at_ceiling_or_chance("plain LoRA on the mixture", mixture, primary(majority, domains)))',
           "pass",
           ["tests/experiments/test_conflict.py", "-k", "not quick"]),
    Mutant("the conflict selection asks the mixture's gap of every seed, not of the mean over the seeds",
           "    if upper - statistics.fmean(mixture) < gap - TOLERANCE:",
           "    if any(primary(s[\"alone\"], domains) - primary(s[\"mixture\"], domains) < gap - TOLERANCE\n"
           "           for s in scores.values()):",
           ["tests/experiments/test_conflict.py", "-k", "not quick"]),
    Mutant("the conflict selection's gap at the verdict margin (3 points) instead of 10",
           "DIFFICULTY_GAP = 0.10",
           "DIFFICULTY_GAP = 0.03",
           ["tests/experiments/test_conflict.py", "-k", "not quick"]),
    Mutant("the distill selection lets a teacher at ceiling through",
           'reasons = [at_ceiling_or_chance("the teacher", [teacher], scores["chance"])]',
           "reasons = []",
           ["tests/experiments/test_verdicts.py"]),
    Mutant("the unimoe selection rejects a rung at ceiling on half the domains (not most)",
           "if 2 * len(at_ceiling) > len(val):",
           "if 2 * len(at_ceiling) >= len(val):",
           ["tests/experiments/test_verdicts.py"]),
    # hostile input: a checkpoint of another plan, an edited store manifest, a config value of the wrong type
    Mutant("--ckpt_path accepts a checkpoint of another surgery or trainable set",
           "    if other_class or differences:",
           "    if other_class:",
           ["tests/test_hostile_checkpoints.py", "-k", "runs_only_its_own_method and (surgery or trainable)"]),
    Mutant("a store manifest's sections not compared with their checksums",
           "if k not in sections or recorded.get(k) != _section_sha256(sections[k]))",
           "if k not in sections)",
           ["tests/inference/test_store_checks.py", "-k", "edited_model_config_fails_verify"]),
    Mutant("the wrong-type line names only the innermost key",
           "return f\"{'.'.join(keys)}: expected {expected}, got {value}\"",
           "return f\"{keys[-1]}: expected {expected}, got {value}\"",
           ["tests/test_one_line_errors.py", "-k", "every_kind_of_key"]),
    Mutant("MoEConfig lets top_k above num_experts through to the model build",
           "        if self.top_k > self.num_experts:",
           "        if False:",
           ["tests/test_one_line_errors.py", "-k", "impossible_moe_value"]),
    # a store's resident tensors all loaded; a resumed run's data order
    Mutant("a store's meta buffers left unloaded",
           "            if buffer is not None and buffer.is_meta:",
           "            if False:",
           ["tests/inference/test_commands.py", "-k", "healthy_store"]),
    Mutant("a resumed sampler follows Lightning's epoch number",
           "            self.epoch_offset = epoch - self._resume[0]",
           "            self.epoch_offset = 0",
           ["tests/data/test_data_sampler.py", "-k", "trainer_resumed_mid_epoch"]),
    Mutant("a continual run stopped by max_steps resumes with Lightning's epoch-end loop state",
           "            resume_after_epoch_end(fit_loop)",
           "            pass",
           ["tests/methods/test_continual_resume.py", "-k", "max_steps_resumes_exactly"]),
    Mutant("a continual run resumed into a new epoch starts no task at its first batch",
           "        super().on_train_batch_start(batch, batch_idx)\n        self.task_loop.train_epoch_start()",
           "        super().on_train_batch_start(batch, batch_idx)",
           ["tests/methods/test_continual_resume.py", "-k", "max_steps_resumes_exactly"]),
]


def apply(mutant: Mutant, tree: Path) -> Path:
    """Replace the mutant's original text in the one file of `tree` that holds it; return that file."""
    holders = [p for d in SEARCHED for p in (tree / d).rglob("*.py") if mutant.original in p.read_text()]
    if len(holders) != 1:
        raise LookupError(f"{mutant.name!r}: its original text occurs in {len(holders)} files "
                          f"({[str(p.relative_to(tree)) for p in holders]}), expected exactly 1: update the mutant")
    text = holders[0].read_text()
    if text.count(mutant.original) != 1:
        raise LookupError(f"{mutant.name!r}: original text occurs {text.count(mutant.original)} times in {holders[0]}")
    holders[0].write_text(text.replace(mutant.original, mutant.mutated))
    return holders[0]


def first_failure(output: str) -> str:
    found = re.search(r"^(FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(2) if found else output.strip().splitlines()[-1] if output.strip() else "(no output)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="substrings of the mutant names to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (to inspect a survivor)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("PYTHONPATH", None)  # the copy's package must be the one imported (pytest's pythonpath = ".")
    problems = 0
    for mutant in chosen:
        tree = Path(tempfile.mkdtemp(prefix="mutant_"))
        try:
            shutil.copytree(ROOT, tree / "repo", ignore=IGNORED)
            repo = tree / "repo"
            try:
                path = apply(mutant, repo)
            except LookupError as error:
                print(f"NOT APPLIED  {mutant.name}: {error}", flush=True)
                problems += 1
                continue
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
                                  cwd=repo, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            where = path.relative_to(repo)
            if done.returncode == 0:
                print(f"SURVIVED     {mutant.name} ({where}): {' '.join(mutant.tests)} passed ({seconds:.0f}s)", flush=True)
                problems += 1
            else:
                print(f"killed       {mutant.name} ({where}): {first_failure(done.stdout)} ({seconds:.0f}s)", flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
    print(f"{len(chosen) - problems} of {len(chosen)} named mutants killed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
