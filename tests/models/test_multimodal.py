"""MultimodalLM: placeholder splicing, generation with padding, save/load, real checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from lightning_moe.models import MoEConfig, MultimodalLM, build_multimodal, upcycle
from lightning_moe.modalities import IMAGE_TOKEN
from lightning_moe.tokens import IGNORE_INDEX
from tests.conftest import TINY_LLM, TINY_VISION, tiny_encoders


@pytest.fixture
def model(tokenizer):
    return build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()


def _batch(tokenizer, texts, padding_side="right"):
    enc = [tokenizer.convert_tokens_to_ids(t.split()) for t in texts]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        sl = slice(0, len(e)) if padding_side == "right" else slice(width - len(e), width)
        ids[i, sl], mask[i, sl] = torch.tensor(e), 1
    return ids, mask


def test_placeholder_becomes_projected_patch_features(model, tokenizer):
    words = [w for w in tokenizer.get_vocab() if w.isalpha()][:3]
    ids, mask = _batch(tokenizer, [f"{words[0]} {IMAGE_TOKEN} {words[1]}", f"{words[2]}"])
    labels = ids.clone()
    pixels = torch.randn(1, 3, 32, 32)
    embeds, out_mask, out_labels = model.embed(ids, mask, labels, pixel_values=pixels)
    n = model.encoders["image"].num_patches  # 16 for 32x32 / patch 8
    assert embeds.shape[:2] == (2, 2 + n)
    expected = model.encode("image", pixels)[0]
    torch.testing.assert_close(embeds[0, 1:1 + n], expected)
    text = model.llm.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[0, 0], text[0, 0])
    torch.testing.assert_close(embeds[0, 1 + n], text[0, 2])
    assert (out_labels[0, 1:1 + n] == IGNORE_INDEX).all()
    assert out_labels[0, 0] == labels[0, 0] and out_labels[0, 1 + n] == labels[0, 2]
    assert out_mask[0].tolist() == [1] * (2 + n)
    assert out_mask[1].tolist() == [1] + [0] * (1 + n)  # right-padded: the short sample ends early


def test_left_padded_prompts_end_together(model, tokenizer):
    w = [w for w in tokenizer.get_vocab() if w.isalpha()][:2]
    ids, mask = _batch(tokenizer, [f"{IMAGE_TOKEN} {w[0]}", f"{w[1]}"], padding_side="left")
    embeds, out_mask, _ = model.embed(ids, mask, padding_side="left", pixel_values=torch.randn(1, 3, 32, 32))
    n = model.encoders["image"].num_patches
    assert out_mask[0].tolist() == [1] * (n + 1)
    assert out_mask[1].tolist() == [0] * n + [1]


def test_placeholder_count_mismatch_is_an_error(model, tokenizer):
    ids, mask = _batch(tokenizer, [f"{IMAGE_TOKEN} {IMAGE_TOKEN}"])
    with pytest.raises(ValueError, match="placeholder tokens"):
        model.embed(ids, mask, pixel_values=torch.randn(1, 3, 32, 32))


def test_batched_left_padded_generation_equals_one_by_one(model, tokenizer):
    w = [w for w in tokenizer.get_vocab() if w.isalpha()][:4]
    texts = [f"{IMAGE_TOKEN} {w[0]} {w[1]} {w[2]}", f"{IMAGE_TOKEN} {w[3]}"]
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = _batch(tokenizer, texts, padding_side="left")
    batched = model.generate(ids, mask, max_new_tokens=4, pixel_values=pixels, eos_token_id=None)
    for i, text in enumerate(texts):
        ids_i, mask_i = _batch(tokenizer, [text])
        single = model.generate(ids_i, mask_i, max_new_tokens=4, pixel_values=pixels[i:i + 1], eos_token_id=None)
        assert batched[i].tolist() == single[0].tolist()


@pytest.mark.parametrize("llm", ["tiny-llama", "tiny-phi"])
def test_save_pretrained_round_trips_an_upcycled_model(tmp_path, tokenizer, llm):
    model = build_multimodal(tokenizer, llm, TINY_LLM, tiny_encoders()).eval()
    upcycle(model, MoEConfig(num_experts=3, top_k=2, layers=[1]))
    with torch.no_grad():  # perturb the experts so a silent re-copy from the dense MLP would show
        for p in model.llm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    loaded = MultimodalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.surgery == model.surgery
    ids, mask = _batch(tokenizer, [f"{IMAGE_TOKEN} " + " ".join(sorted(w for w in tokenizer.get_vocab() if w.isalpha())[:5])])
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, mask, pixel_values=pixels).logits, model(ids, mask, pixel_values=pixels).logits,
                               rtol=0, atol=0)


def test_loading_keeps_the_random_stream_of_a_fresh_build_and_the_export_draws_nothing(tmp_path, tokenizer,
                                                                                      monkeypatch):
    """A saved model and a checkpoint's record load with their random initialisation, so the random stream after
    a load (where a seeded run draws its new routers and adapters) is a fresh build's; the transformers export
    builds on the meta device and draws nothing (seconds for a 135M LLM). All three give the saved logits."""
    from safetensors.torch import load_file, save_file

    from lightning_moe.formats.hf_causal_lm import to_hf_causal_lm
    from lightning_moe.formats.project import CHECKPOINT_CONFIG_KEY, model_from_checkpoint

    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()
    upcycle(model, MoEConfig(num_experts=3, top_k=2, layers="all"))
    model.save_pretrained(tmp_path / "m")
    checkpoint = {CHECKPOINT_CONFIG_KEY: model.config_dict(),
                  "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}

    def stream_after(build):
        torch.manual_seed(0)
        built = build()
        return built, torch.rand(4)

    _, fresh = stream_after(lambda: MultimodalLM.from_config_dict(model.config_dict()))
    loaded, after_load = stream_after(lambda: MultimodalLM.from_pretrained(tmp_path / "m"))
    from_checkpoint, after_checkpoint = stream_after(lambda: model_from_checkpoint(checkpoint))
    torch.testing.assert_close(after_load, fresh, rtol=0, atol=0)
    torch.testing.assert_close(after_checkpoint, fresh, rtol=0, atol=0)

    draws = []
    for name in ("normal_", "uniform_"):
        def drawing(tensor, *args, _draw=getattr(torch.Tensor, name), _name=name, **kwargs):
            if not tensor.is_meta:
                draws.append((_name, tuple(tensor.shape)))
            return _draw(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, drawing)
    hf = to_hf_causal_lm(model).eval()
    assert draws == []
    MultimodalLM.from_config_dict(model.config_dict())
    assert draws  # the counter sees a build's initialisation
    monkeypatch.undo()

    ids, mask = _batch(tokenizer, [f"{IMAGE_TOKEN} " + " ".join(sorted(w for w in tokenizer.get_vocab() if w.isalpha())[:5])])
    pixels = torch.randn(1, 3, 32, 32)
    expected = model(ids, mask, pixel_values=pixels).logits
    for other in (loaded.eval(), from_checkpoint.eval()):
        torch.testing.assert_close(other(ids, mask, pixel_values=pixels).logits, expected, rtol=0, atol=0)
    torch.testing.assert_close(hf(input_ids=ids[:, 1:]).logits, model.llm(input_ids=ids[:, 1:]).logits)

    # a weights file that lacks a tensor of the recorded model is an error naming the file and the tensor
    weights = tmp_path / "m" / "model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(RuntimeError, match=f"model.safetensors does not match the recorded model: missing .*{dropped}"):
        MultimodalLM.from_pretrained(tmp_path / "m")


def test_from_pretrained_directory_is_required(tmp_path):
    with pytest.raises(FileNotFoundError, match="multimodal_config.json"):
        MultimodalLM.from_pretrained(tmp_path)


def test_real_checkpoints_load_by_path(tmp_path, tokenizer):
    """Hugging Face checkpoints named by path (as real ones are by hub name) load with their weights."""
    llm = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=2, num_attention_heads=4))
    llm.save_pretrained(tmp_path / "llm")
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **TINY_VISION, num_attention_heads=4))
    tower.save_pretrained(tmp_path / "clip")
    model = build_multimodal(tokenizer, str(tmp_path / "llm"), None, {"image": {"tower": str(tmp_path / "clip")}})
    torch.testing.assert_close(model.llm.lm_head.weight, llm.lm_head.weight)
    loaded = model.encoders["image"].model.state_dict()
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(loaded[name], value)


def test_build_multimodal_takes_its_encoders_as_one_mapping(tokenizer):
    """`encoders` None is the default image tower, {} a text-only model; anything but a mapping is refused."""
    assert build_multimodal(tokenizer, "tiny-llama", TINY_LLM).modalities == ["image"]
    assert build_multimodal(tokenizer, "tiny-llama", TINY_LLM, {}).modalities == []
    with pytest.raises(TypeError, match="encoders must map each modality to its encoder"):
        build_multimodal(tokenizer, "tiny-llama", TINY_LLM, "tiny-clip")
