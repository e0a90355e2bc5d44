"""Uni-MoE learns audio and video: after the three shipped stages (align, one experts run per modality, moe),
every audio and video domain is well above chance on held-out validation data.

About 6 minutes of one core (600 stage-1 steps of batch 64: fewer learn no video domain), so it is opt-in:
`make test-learning` (or `pytest -m learning`), not part of `make test` (docs/testing.md)."""

from __future__ import annotations

import pytest

from lightning_moe.cli import main
from tests.conftest import ROOT
from tests.test_cli import UNIMOE, workdir  # noqa: F401  (fixture)

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=64", "--data.init_args.eval_batch_size=200",
         "--data.init_args.max_eval_samples_per_domain=200", "--data.init_args.defer_train_decoding=true",
         "--seed_everything=0"]
# answers per domain: chance is 1 / answers (balanced splits, data/media/README.md)
CHANCE = {"beeps": 0.25, "pitch": 0.5, "longer": 0.5, "frames": 0.25, "motion": 0.5}


def fit(config: str, steps: int, *extra: str):
    return main(["fit", "--config", str(ROOT / config), *QUIET, f"--trainer.max_steps={steps}",
                 f"--trainer.val_check_interval={steps}", *extra])


@pytest.mark.learning
def test_audio_and_video_domains_are_learnt_after_the_three_stages(workdir):
    fit(UNIMOE[0], 600)  # align: connectors, towers and the tiny LLM
    for config in UNIMOE[1:-1]:  # one dense FFN per modality, on its modality's domains only
        fit(config, 60, "--trainer.limit_val_batches=0")
    cli = fit(UNIMOE[-1], 120)  # modality experts, a new router and LoRA, on the mixture; validates at the end
    scores = {d: float(cli.trainer.callback_metrics[f"val/{d}/exact_match"]) for d in CHANCE}
    # well above chance on the 200 held-out samples of each domain: at least 0.3 over it (two answers: >= 0.8)
    for domain, chance in CHANCE.items():
        assert scores[domain] >= chance + 0.3, scores
