"""LLaVA checkpoints in and out (formats/llava_hf.py, formats/llava_original.py), against transformers' own `LlavaForConditionalGeneration`
and a hand-written original-LLaVA forward as oracles: same logits (max |Δ| ≤ 1e-5), same greedy answers."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from lightning_moe.formats import NotExportable, detect_format, export_multimodal, load_backbone
from lightning_moe.formats.llava_original import load_original_llava
from lightning_moe.models import MultimodalLM
from lightning_moe.modalities import IMAGE_TOKEN
from lightning_moe.tokens import load_tokenizer
from tests.conftest import TOKENIZER

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
# initializer_range 0.2: decisive logits, so greedy answers do not hinge on float noise between implementations
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, initializer_range=0.2)
PATCHES = (32 // 8) ** 2


def tiny_llava_hf(directory: Path, tokenizer, strategy: str = "default", tie: bool = True) -> LlavaForConditionalGeneration:
    """A random tiny llava-hf checkpoint saved with its tokenizer (vocabulary padded past the tokenizer, as llava-hf's)."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION).to_dict(),
        text_config=LlamaConfig(**TEXT, vocab_size=len(tokenizer) + 5, tie_word_embeddings=tie,
                                pad_token_id=tokenizer.pad_token_id).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
        vision_feature_select_strategy=strategy, image_seq_length=PATCHES + (strategy == "full"),
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def prompt(tokenizer, n_image_tokens: int) -> torch.Tensor:
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha())[:5]  # get_vocab's order varies
    ids = tokenizer.convert_tokens_to_ids(words[:2]) + [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * n_image_tokens
    return torch.tensor([ids + tokenizer.convert_tokens_to_ids(words[2:])])


def assert_parity(ours: MultimodalLM, hf_logits_fn, hf_generate_fn, tokenizer, n_hf_image_tokens: int) -> None:
    ours.eval()
    pixels = torch.randn(1, 3, 32, 32)
    ids = prompt(tokenizer, 1)
    with torch.no_grad():
        got = ours(ids, torch.ones_like(ids), pixel_values=pixels).logits
        want = hf_logits_fn(prompt(tokenizer, n_hf_image_tokens), pixels)
    assert got.shape[1] == want.shape[1]
    vocab = want.shape[-1]
    assert (got[..., :vocab] - want).abs().max().item() <= 1e-5
    stop = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    answer = ours.generate(ids, torch.ones_like(ids), max_new_tokens=6, pixel_values=pixels, **stop)
    assert answer[0].tolist() == hf_generate_fn(prompt(tokenizer, n_hf_image_tokens), pixels, **stop)


def hf_oracle(hf: LlavaForConditionalGeneration):
    def logits(ids, pixels):
        return hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits

    def generate(ids, pixels, **stop):
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=6,
                          do_sample=False, **stop)
        return out[0, ids.shape[1]:].tolist()

    return logits, generate


@pytest.mark.parametrize("strategy,tie", [("default", True), ("full", False)])
def test_llava_hf_directory_is_a_backbone_with_its_logits_and_answers(tmp_path, tokenizer, strategy, tie):
    hf = tiny_llava_hf(tmp_path / "llava", tokenizer, strategy, tie)
    assert detect_format(tmp_path / "llava").name == "llava-hf"
    loaded_tokenizer = load_tokenizer(tmp_path / "llava")
    # the image token is mapped, not duplicated
    assert len(loaded_tokenizer) == len(tokenizer)
    ours = load_backbone(tmp_path / "llava", tokenizer=loaded_tokenizer)
    assert ours.placeholder_ids["image"] == hf.config.image_token_index
    assert ours.encoders["image"].select_strategy == ("patch" if strategy == "default" else "full")
    assert_parity(ours, *hf_oracle(hf), tokenizer, PATCHES + (strategy == "full"))


def test_llava_hf_image_token_that_disagrees_with_the_tokenizer_is_an_error(tmp_path, tokenizer):
    tiny_llava_hf(tmp_path / "llava", tokenizer)
    config = json.loads((tmp_path / "llava" / "config.json").read_text())
    config["image_token_index"] = 3
    (tmp_path / "llava" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_token_index is 3"):
        load_backbone(tmp_path / "llava", tokenizer=tokenizer)


def test_llava_hf_with_trust_remote_code_names_the_directory_it_trusts(tmp_path, tokenizer):
    """The opt-in is named for a llava-hf backbone too, as for every model the project loads; without it, nothing."""
    tiny_llava_hf(tmp_path / "llava", tokenizer)
    with pytest.warns(UserWarning, match=f"loading llava-hf model {tmp_path / 'llava'} with backbone.trust_remote_code"):
        load_backbone(tmp_path / "llava", tokenizer=tokenizer, trust_remote_code=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_backbone(tmp_path / "llava", tokenizer=tokenizer)
    assert not [w for w in record if "trust_remote_code" in str(w.message)]


# ---------------------------------------------------------------------------- original LLaVA
class OriginalLlava(nn.Module):
    """LLaVA's own forward (llava_arch.py, prepare_inputs_labels_for_multimodal) on its own key layout: the
    image is spliced at id -200, CLIP's penultimate layer without CLS, mm_projector = Linear, GELU, Linear."""

    IMAGE_TOKEN_INDEX = -200

    def __init__(self, llm: LlamaForCausalLM, tower: CLIPVisionModel, projector: nn.Sequential):
        super().__init__()
        self.llm, self.tower, self.projector = llm, tower, projector

    def embeds(self, ids, pixels):
        features = self.projector(self.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
        at = (ids[0] == self.IMAGE_TOKEN_INDEX).nonzero().item()
        text = self.llm.get_input_embeddings()
        return torch.cat([text(ids[:, :at]), features[None], text(ids[:, at + 1:])], 1)

    def logits(self, ids, pixels):
        return self.llm(inputs_embeds=self.embeds(ids, pixels)).logits

    def generate(self, ids, pixels, **stop):
        embeds = self.embeds(ids, pixels)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, **stop)[0].tolist()


class DeepSpeedTop2MoE(nn.Module):
    """MoE-LLaVA's layer in evaluation, written out: DeepSpeed's top2gating (softmax in float32, the best expert,
    then the best of the rest, weights renormalised over the two), no token dropped; experts are dense MLPs."""

    def __init__(self, wg: torch.Tensor, experts: list[nn.Module]):
        super().__init__()
        self.wg, self.experts = wg, nn.ModuleList(experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        gates = torch.softmax(flat.float() @ self.wg.float().T, dim=-1)
        first = gates.argmax(-1)
        second = gates.masked_fill(nn.functional.one_hot(first, gates.shape[-1]).bool(), -1).argmax(-1)
        g1, g2 = gates.gather(1, first[:, None]), gates.gather(1, second[:, None])
        w1, w2 = g1 / (g1 + g2), g2 / (g1 + g2)
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            out[t] = w1[t] * self.experts[first[t]](flat[t]) + w2[t] * self.experts[second[t]](flat[t])
        return out.reshape(x.shape)


def tiny_original_llava(directory: Path, base_tokenizer_dir: Path, with_tower: bool,
                        moe_layer: int | None = None) -> OriginalLlava:
    """An original-LLaVA checkpoint: Llama config + mm_* keys, weights model.* / lm_head / model.mm_projector.*,
    the tower saved apart (mm_vision_tower) and, if `with_tower`, also inside the checkpoint."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    torch.manual_seed(1)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    tower_dir = directory.parent / "clip"
    tower.save_pretrained(tower_dir)
    if with_tower:  # a different tower in the checkpoint: the test sees which one is used
        tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    llm_config = LlamaConfig(**TEXT, vocab_size=len(base), tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_config).eval()
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    state = {k: v for k, v in llm.state_dict().items()}
    moe_block = {}
    if moe_layer is not None:  # MoE-LLaVA stage 3: 3 distinct experts and a router in DeepSpeed's layout
        from transformers.models.llama.modeling_llama import LlamaMLP

        experts = [LlamaMLP(llm_config) for _ in range(3)]
        wg = torch.randn(3, 64)
        prefix = f"model.layers.{moe_layer}.mlp."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state[prefix + "deepspeed_moe.gate.wg.weight"] = wg
        for e, expert in enumerate(experts):
            state.update({f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.{k}": v
                          for k, v in expert.state_dict().items()})
        llm.model.layers[moe_layer].mlp = DeepSpeedTop2MoE(wg, experts)
        moe_block = {"moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [moe_layer],
                             "num_experts": [3], "top_k_experts": 2, "capacity_factor": 1.5,
                             "eval_capacity_factor": 2.0, "min_capacity": 0, "use_residual": False,
                             "router_aux_loss_coef": 0.01, "ep_size": 1}}
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if with_tower:
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in tower.state_dict().items()})
    directory.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config = {**llm_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": str(tower_dir), "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
              "mm_use_im_patch_token": False, "image_aspect_ratio": "pad", "use_mm_proj": True, **moe_block}
    (directory / "config.json").write_text(json.dumps(config))
    base.save_pretrained(directory)
    return OriginalLlava(llm, tower, projector)


@pytest.mark.parametrize("with_tower,moe_layer", [(False, None), (True, None), (False, 1)],
                         ids=["tower_apart", "tower_inside", "moe_llava_stage3"])
def test_original_llava_layout_is_a_backbone_with_its_logits_and_answers(tmp_path, with_tower, moe_layer):
    reference = tiny_original_llava(tmp_path / "llava_orig", Path(TOKENIZER), with_tower, moe_layer)
    assert detect_format(tmp_path / "llava_orig").name == "llava-original"
    tokenizer = load_tokenizer(tmp_path / "llava_orig")
    ours = load_original_llava(tmp_path / "llava_orig", tokenizer=tokenizer)
    image_id = ours.placeholder_ids["image"]
    assert image_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def logits(ids, pixels):
        return reference.logits(ids.masked_fill(ids == image_id, OriginalLlava.IMAGE_TOKEN_INDEX)[:, :ids.shape[1]], pixels)

    def generate(ids, pixels, **stop):
        return reference.generate(ids.masked_fill(ids == image_id, OriginalLlava.IMAGE_TOKEN_INDEX), pixels, **stop)

    with torch.no_grad():
        assert_parity(ours, logits, generate, tokenizer, 1)
    if moe_layer is not None:  # the experts are the project's SparseMoE, replayed from the log
        assert [e["op"] for e in ours.surgery] == ["upcycle"] and ours.surgery[0]["layers"] == [moe_layer]
        ours.save_pretrained(tmp_path / "saved")
        again = MultimodalLM.from_pretrained(tmp_path / "saved")
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_a_path_that_does_not_exist_is_named(tmp_path):
    from lightning_moe.paths import could_be_hub_id

    assert could_be_hub_id("llava-hf/llava-1.5-7b-hf") and could_be_hub_id("gpt2")
    # a typo under an existing directory, deeper paths and checkpoints are never sent to the Hub
    assert not any(map(could_be_hub_id, ["data/tokenzier", "runs/a/model", "./x", "model.ckpt", str(tmp_path)]))
    missing = tmp_path / "no" / "such_model"
    with pytest.raises(FileNotFoundError, match="neither a local directory.*such_model"):
        load_backbone(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer .*such_model.*neither a local directory"):
        load_tokenizer(missing)


# ---------------------------------------------------------------------------- out
def test_export_gives_a_llava_hf_directory_with_the_same_logits_and_round_trips(tmp_path, tokenizer):
    from lightning_moe.models import build_multimodal

    torch.manual_seed(0)
    ours = build_multimodal(tokenizer, "tiny-llama", {**TEXT}, {"image": {"tower": "tiny-clip", "overrides": VISION}}).eval()
    export_multimodal(ours, tmp_path / "export", tokenizer)
    assert not (tmp_path / "export" / "multimodal_config.json").exists()
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    assert_parity(ours, *hf_oracle(hf), tokenizer, PATCHES)
    # the processor expands the placeholder to the tower's patch count and normalises as the data pipeline does
    from PIL import Image

    from lightning_moe.modalities import NormalizeImage

    processor = AutoProcessor.from_pretrained(tmp_path / "export")
    image = Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy())
    batch = processor(text=f"a {IMAGE_TOKEN} b", images=image, return_tensors="pt")
    assert (batch["input_ids"] == ours.placeholder_ids["image"]).sum() == PATCHES
    torch.testing.assert_close(batch["pixel_values"][0], NormalizeImage(32)(image), atol=1e-5, rtol=0)
    # round trip: project -> transformers -> project is bit-identical
    back = load_backbone(tmp_path / "export", tokenizer=tokenizer)
    want = ours.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_export_refuses_what_llava_hf_cannot_hold(tokenizer, tmp_path):
    from lightning_moe.models import build_multimodal

    text_only = build_multimodal(tokenizer, "tiny-llama", TEXT, encoders={})
    with pytest.raises(NotExportable, match="AutoModelForCausalLM"):
        export_multimodal(text_only, tmp_path / "a", tokenizer)
    linear = build_multimodal(tokenizer, "tiny-llama", TEXT,
                              {"image": {"tower": "tiny-clip", "overrides": VISION, "connector": "linear"}})
    with pytest.raises(NotExportable, match="mlp2x_gelu"):
        export_multimodal(linear, tmp_path / "b", tokenizer)
