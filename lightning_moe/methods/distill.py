"""LLaVA-MoD: distil a (larger) dense teacher into a small student that becomes a sparse MoE
(docs/mod.md).

Stages, each starting from the previous one's output (`backbone.pretrained`):

- `mimic_dense`: KL from the teacher's next-token distributions to the student's (forward KL by
  default, reverse as an option; temperature; response tokens only by default, or every text
  token), plus optionally the student's own LM loss; trains the student LLM and connector.
- `mimic_sparse`: the student is upcycled to sparse MoE by MoE-tuning's own `upcycle` (experts
  are copies of the dense MLP, new routers), the same KL, plus the routing aux loss; trains the
  MoE layers and the connector.
- `preference`: DPO with the teacher as the reference model (`sigmoid`, beta 0.1, or the
  `kto_pair` loss the reference script used) on chosen/rejected pairs (`PreferenceDataModule`),
  log-probabilities summed over the answer tokens, plus the aux loss; logs rewards, margins and
  preference accuracy.

The teacher is loaded when training first needs it (never for test or predict, so a student checkpoint
evaluates without the teacher's files) from a `save_pretrained` directory or a checkpoint (`load_backbone`), frozen,
kept in eval mode, run under no-grad (optionally in bfloat16) and left out of the student's
checkpoints: `model` is always the student, so `SavePretrained`, `load_backbone` and evaluation see
only the student. Evaluation (val/test) is the shared per-domain evaluation of the student.

The losses are plain torch functions at the top of this file, testable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from ..formats import load_backbone
from ..models import MoEConfig, MultimodalLM
from ..safe_load import checkpoint_safe, load_torch_file
from ..tokens import IGNORE_INDEX, load_tokenizer
from .base import MultimodalMethod, Stage, StepOutput, causal_lm_loss
from .from_checkpoint import recorded_model_config

KL_DIRECTIONS = ("forward", "reverse")
KL_TOKENS = ("response", "all")
PREFERENCE_LOSSES = ("sigmoid", "kto_pair")

# Label value of text tokens outside the response: it rides through `MultimodalLM.embed` like a
# label, so after the image features are spliced in we still know which positions are text.
PROMPT_TEXT = -2


# ---------------------------------------------------------------------------- losses (pure torch)
def distillation_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
) -> torch.Tensor:
    """Mean over masked positions of KL(teacher || student) (forward) or KL(student || teacher) (reverse).

    Args:
        student_logits, teacher_logits: (..., V) logits over the same vocabulary at aligned positions.
        mask: (...) bool, the positions that count; None = all.
        temperature: both distributions are softmax(logits / T); the KL is multiplied by T² so the
            gradient's scale does not shrink with T (Hinton et al.). T = 1 is LLaVA-MoD's default.
        direction: forward (mean-seeking, the reference's) or reverse (mode-seeking).

    The forward KL differs from the reference's `-sum p_T log p_S` by the teacher's entropy, a
    constant for the student: same gradient, and 0 when the student matches the teacher.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} are not aligned")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":
        per_position = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # p_T (log p_T - log p_S)
    else:
        per_position = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)  # p_S (log p_S - log p_T)
    if mask is None:
        mask = torch.ones_like(per_position, dtype=torch.bool)
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits and (B, T) labels (not shifted; IGNORE_INDEX off the response) -> (B,) summed log p(label)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t + 1
    trained = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    return (token_logps * trained).sum(-1)


@checkpoint_safe
@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar
    rewards_chosen: torch.Tensor  # (B,) beta (pi_c - ref_c), detached
    rewards_rejected: torch.Tensor  # (B,) beta (pi_r - ref_r), detached

    @property
    def margins(self) -> torch.Tensor:
        return self.rewards_chosen - self.rewards_rejected

    @property
    def accuracy(self) -> torch.Tensor:
        """Fraction of pairs whose chosen answer earns the larger implicit reward."""
        return (self.rewards_chosen > self.rewards_rejected).float().mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """DPO (sigmoid): mean over pairs of -log σ(β[(π_c - π_r) - (ref_c - ref_r)]); inputs are (B,) summed log-probs."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    return PreferenceLoss(loss, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach())


def kto_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """`kto_pair` (the LLaVA-MoD script's choice, TRL's formula), mean over the 2B terms:

    KL_c = mean(π_c - ref_c).clamp(min=0), KL_r likewise;
    chosen: 1 - σ(β((π_c - ref_c) - KL_r)), rejected: 1 - σ(β(KL_c - (π_r - ref_r))).
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    chosen_kl, rejected_kl = chosen_ratio.mean().clamp(min=0), rejected_ratio.mean().clamp(min=0)
    losses = torch.cat([1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)),
                        1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))])
    return PreferenceLoss(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


PREFERENCE_LOSS_FUNCTIONS = {"sigmoid": dpo_loss, "kto_pair": kto_pair_loss}


# ---------------------------------------------------------------------------- teacher
def check_same_vocabulary(student: Any, teacher: Any) -> None:
    """Distillation compares distributions token by token: both tokenizers must map tokens to the same ids."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    differ = sorted(t for t in set(s_vocab) | set(t_vocab) if s_vocab.get(t) != t_vocab.get(t))
    examples = ", ".join(f"{t!r}: student {s_vocab.get(t)} / teacher {t_vocab.get(t)}" for t in differ[:5])
    raise ValueError(
        f"the teacher's tokenizer differs from the student's ({len(differ)} tokens map to other ids, e.g. {examples}); "
        "LLaVA-MoD distils between models of one family that share a tokenizer"
    )


def teacher_tokenizer_path(teacher: str | Path, allow_unsafe: bool = False) -> str | None:
    """Where the teacher's tokenizer is recorded: its save_pretrained directory, or its checkpoint's hparams
    (read without executing code from the file; `allow_unsafe` is the trusted-file opt-in)."""
    path = Path(teacher)
    if path.is_dir():
        return str(path) if (path / "tokenizer_config.json").is_file() else None
    if path.is_file():
        checkpoint = load_torch_file(path, allow_unsafe=allow_unsafe, what="teacher checkpoint")
        return checkpoint.get("hyper_parameters", {}).get("tokenizer")
    return None


@checkpoint_safe
@dataclass
class MimicConfig:
    """Mimic distillation (the two mimic stages)."""

    direction: str = "forward"  # forward KL(teacher || student), the reference's; reverse = KL(student || teacher)
    temperature: float = 1.0
    tokens: str = "response"  # response (answer tokens only, the reference's) | all (every text token)
    kd_weight: float = 1.0
    lm_weight: float = 0.0  # > 0 adds the student's own LM loss on the response (the reference's `kd_lm`)


@checkpoint_safe
@dataclass
class PreferenceConfig:
    """Preference distillation: DPO with the teacher as the reference model."""

    loss: str = "sigmoid"  # sigmoid (DPO) | kto_pair (what the LLaVA-MoD script ran)
    beta: float = 0.1


class MoDDistillation(MultimodalMethod):
    # LLaVA-MoD: whole LLM + projector, then (upcycled by MoE-tuning's own `upcycle`) MoE + router
    STAGES = {
        "mimic_dense": Stage(train=["connector", "llm"]),
        "mimic_sparse": Stage(train=["moe", "connector"], upcycle=True),
        "preference": Stage(train=["moe", "connector"]),  # starts from mimic_sparse's (sparse) student
    }

    def __init__(
        self,
        teacher: str,
        stage: Literal["mimic_dense", "mimic_sparse", "preference"] = "mimic_dense",
        mimic: MimicConfig | None = None,
        preference: PreferenceConfig | None = None,
        moe: MoEConfig | None = None,
        teacher_dtype: str | None = None,
        teacher_tokenizer: str | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            teacher: the teacher's `save_pretrained` directory or `.ckpt` (e.g. configs/mod/teacher.yaml's output).
            stage: mimic_dense | mimic_sparse | preference.
            mimic: KL direction, temperature, which tokens, loss weights (mimic stages).
            preference: sigmoid (DPO) or kto_pair, and beta (preference stage).
            moe: experts, top-k, which layers; used to upcycle a dense student in mimic_sparse.
            teacher_dtype: e.g. "bfloat16" to hold the teacher in half the memory (logits are compared in float32).
            teacher_tokenizer: the teacher's tokenizer; default: the one saved beside it (or named in its
                checkpoint), else the student's. Must map tokens to the same ids as the student's.
            **kwargs: MultimodalMethod's arguments (backbone = the student, trainable, optimizer, aux_loss, ...).
        """
        self.moe_config = moe or MoEConfig()
        self.mimic, self.preference = mimic or MimicConfig(), preference or PreferenceConfig()
        if self.mimic.direction not in KL_DIRECTIONS:
            raise ValueError(f"mimic.direction must be one of {KL_DIRECTIONS}, got {self.mimic.direction!r}")
        if self.mimic.tokens not in KL_TOKENS:
            raise ValueError(f"mimic.tokens must be one of {KL_TOKENS}, got {self.mimic.tokens!r}")
        if self.preference.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"preference.loss must be one of {PREFERENCE_LOSSES}, got {self.preference.loss!r}")
        super().__init__(stage=stage, **kwargs)
        self._teacher_source = (teacher, teacher_dtype, teacher_tokenizer)
        self._teacher_tokenizer_checked = False
        if recorded_model_config() is None and Path(teacher).exists():
            # a training configuration: a mismatched teacher fails now, not when training reaches it
            self.check_teacher_tokenizer(teacher, teacher_tokenizer)

    # ------------------------------------------------------------------ student and teacher
    @property
    def teacher(self) -> MultimodalLM:
        """The frozen teacher, loaded on first use: training needs it, test and predict never load it, so a
        checkpoint evaluates without the teacher's files. Kept as the submodule `teacher` once loaded."""
        if "teacher" not in self._modules:
            # set in _modules directly: `add_module` would look the name up and land in this property again
            self._modules["teacher"] = self.load_teacher(*self._teacher_source).to(self.device)
        return self._modules["teacher"]

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before Lightning moves the module to its device and restores a checkpoint into it
            self.teacher  # noqa: B018  (loads it)

    def load_teacher(self, path: str, dtype: str | None, tokenizer: str | None) -> MultimodalLM:
        # the backbone's opt-in covers the teacher too: one switch for the files a run trusts
        unsafe = self.backbone.allow_unsafe_checkpoint
        teacher = load_backbone(path, allow_unsafe=unsafe)
        if not self._teacher_tokenizer_checked:
            self.check_teacher_tokenizer(path, tokenizer)
        # compared on the shared slice of the vocabulary: padded embedding rows beyond it are never a token
        self.shared_vocab = min(teacher.llm.get_output_embeddings().out_features,
                                self.model.llm.get_output_embeddings().out_features)
        if self.shared_vocab < len(self.tokenizer):
            raise ValueError(f"the teacher or student predicts {self.shared_vocab} tokens, fewer than the "
                             f"tokenizer's {len(self.tokenizer)}")
        if dtype:
            teacher.to(getattr(torch, dtype))
        teacher.requires_grad_(False)
        return teacher.eval()

    def check_teacher_tokenizer(self, path: str, tokenizer: str | None) -> None:
        """The teacher's tokenizer (given, saved beside it or named in its checkpoint) maps tokens as the student's."""
        tokenizer = tokenizer or teacher_tokenizer_path(path, allow_unsafe=self.backbone.allow_unsafe_checkpoint)
        if tokenizer is None:
            rank_zero_info(f"no tokenizer recorded with the teacher {path}: assuming the student's")
        else:
            check_same_vocabulary(self.tokenizer, load_tokenizer(tokenizer))
        self._teacher_tokenizer_checked = True

    def train(self, mode: bool = True) -> "MoDDistillation":
        # Lightning puts the whole module in train mode each epoch; the teacher stays in eval mode
        # (no dropout, eval capacity of a sparse teacher).
        super().train(mode)
        if "teacher" in self._modules:  # a teacher not loaded yet is not loaded for this
            self._modules["teacher"].eval()
        return self

    @torch.no_grad()
    def teacher_forward(self, batch: dict[str, Any], labels: torch.Tensor):
        inputs = self.model_inputs(batch)
        return self.teacher(**inputs, labels=labels)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # the teacher is an input of the run, not a result: the student's checkpoint stays the student's size
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resuming from a student checkpoint: the teacher (loaded for training, from `teacher`) is not in it;
        # testing or predicting never loads one
        if "teacher" in self._modules:
            teacher = self._modules["teacher"].state_dict()
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in teacher.items()})

    # ------------------------------------------------------------------ losses
    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        # evaluation is the shared per-domain evaluation of the student (LM loss, generation)
        if not self.training:
            return super().compute_loss(batch)
        if self.stage == "preference":
            if "num_pairs" not in batch:
                raise ValueError("the preference stage trains on chosen/rejected pairs: use "
                                 "lightning_moe.data.PreferenceDataModule (batches carry 'num_pairs')")
            return self.preference_step(batch)
        return self.mimic_step(batch)

    def mimic_step(self, batch: dict[str, Any]) -> StepOutput:
        cfg = self.mimic
        labels = batch["labels"]
        if cfg.tokens == "all":  # tag the prompt's text tokens so they survive the splice (PROMPT_TEXT)
            labels = labels.masked_fill((labels == IGNORE_INDEX) & batch["attention_mask"].bool(), PROMPT_TEXT)
        out = self.model(**self.model_inputs(batch), labels=labels)
        teacher_out = self.teacher_forward(batch, labels)
        v = self.shared_vocab
        student_logits = out.logits[:, :-1, :v][out.labels[:, 1:] != IGNORE_INDEX]  # (N, V): positions predicting a distilled token
        teacher_logits = teacher_out.logits[:, :-1, :v][teacher_out.labels[:, 1:] != IGNORE_INDEX]
        if student_logits.shape[0] != teacher_logits.shape[0]:
            raise ValueError(f"the student distils {student_logits.shape[0]} positions but the teacher has "
                             f"{teacher_logits.shape[0]}: the batches do not align")
        kd = distillation_kl(student_logits, teacher_logits, None, cfg.temperature, cfg.direction)
        response_labels = out.labels.masked_fill(out.labels == PROMPT_TEXT, IGNORE_INDEX)
        lm_loss, per_sample, counts = causal_lm_loss(out.logits, response_labels)
        logs = {"kd_loss": kd, "lm_loss": lm_loss}
        routing, routing_loss = self.routing_losses(out.attention_mask, logs)
        loss = cfg.kd_weight * kd + routing_loss
        if cfg.lm_weight:
            loss = loss + cfg.lm_weight * lm_loss
        logs["loss"] = loss
        return StepOutput(loss, logs, out.attention_mask, routing, per_sample / counts.clamp(min=1), counts)

    def preference_step(self, batch: dict[str, Any]) -> StepOutput:
        n = batch["num_pairs"]  # rows [0, n) chosen, [n, 2n) rejected (collate_preference)
        out = self.model(**self.model_inputs(batch), labels=batch["labels"])
        teacher_out = self.teacher_forward(batch, batch["labels"])
        v = self.shared_vocab
        policy = sequence_logprobs(out.logits[..., :v], out.labels)  # (2n,)
        reference = sequence_logprobs(teacher_out.logits[..., :v], teacher_out.labels)
        pref = PREFERENCE_LOSS_FUNCTIONS[self.preference.loss](policy[:n], policy[n:], reference[:n], reference[n:],
                                                               self.preference.beta)
        logs = {
            "preference_loss": pref.loss,
            "rewards/chosen": pref.rewards_chosen.mean(),
            "rewards/rejected": pref.rewards_rejected.mean(),
            "rewards/margin": pref.margins.mean(),
            "rewards/accuracy": pref.accuracy,
            "logps/chosen": policy[:n].detach().mean(),
            "logps/rejected": policy[n:].detach().mean(),
        }
        routing, routing_loss = self.routing_losses(out.attention_mask, logs)
        logs["loss"] = loss = pref.loss + routing_loss
        return StepOutput(loss, logs, out.attention_mask, routing)
