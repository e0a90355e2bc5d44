"""Uni-MoE: the stage table's trainable sets, the modality-experts surgery (each expert is its modality's
stage-2 FFN: with the router forced to it, the model computes what that stage-2 model computed), the
stage-3 round trip, the affinity loss, and export / offloaded generation of the merged model (also through
`edge generate` with audio and video files)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lightning_moe import edge
from lightning_moe.data import DomainMixtureDataModule
from lightning_moe.inference import ExpertStore, GenerationConfig, generate, load_offloaded
from lightning_moe.layers import RouterOutput
from lightning_moe.methods import AffinityLoss, BackboneConfig, ModalityExpertsConfig, UniMoE
from lightning_moe.modalities import modality_names
from lightning_moe.models import MultimodalLM, expert_layers, merge_lora
from tests.conftest import ROOT, TINY_LLM, TINY_WHISPER, TOKENIZER, tiny_encoders
from tests.models.test_audio_video import batch

BACKBONE = dict(llm="tiny-llama", llm_overrides=TINY_LLM, encoders=tiny_encoders(-1, audio=True, video="mean"))


def trainable(method):
    return {n for n, p in method.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stage 1's output and three stage-2 outputs whose MLPs differ (as if trained on their modality)."""
    root = tmp_path_factory.mktemp("unimoe")
    torch.manual_seed(0)
    UniMoE(stage="align", backbone=BackboneConfig(**BACKBONE), tokenizer=TOKENIZER).model.save_pretrained(root / "align")
    for modality in ("image", "audio", "video"):
        method = UniMoE(stage="experts", modality=modality, tokenizer=TOKENIZER,
                        backbone=BackboneConfig(pretrained=str(root / "align")))
        with torch.no_grad():
            for p in method.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        method.model.save_pretrained(root / modality)
    return root


def moe_method(root, **kwargs):
    kwargs.setdefault("moe", ModalityExpertsConfig(experts=["dense", "image", "audio", "video"]))
    return UniMoE(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(pretrained=str(root / "align")),
                  experts={m: str(root / m) for m in ("image", "audio", "video")}, **kwargs)


def test_stage_table_trainable_sets(stages):
    align = UniMoE(stage="align", backbone=BackboneConfig(pretrained=str(stages / "align")), tokenizer=TOKENIZER)
    assert trainable(align) == {n for n, _ in align.model.named_parameters() if n.startswith("connectors.")}
    assert any(n.startswith("connectors.audio.queries") for n in trainable(align))
    experts = UniMoE(stage="experts", modality="audio", tokenizer=TOKENIZER,
                     backbone=BackboneConfig(pretrained=str(stages / "align")))
    assert trainable(experts) == {n for n, _ in experts.model.named_parameters() if n.startswith("llm.") and ".mlp." in n}
    moe = moe_method(stages)
    names = trainable(moe)
    assert {n for n in names if "router" in n} == {f"llm.model.layers.{i}.mlp.moe.router.proj.weight" for i in (0, 1)}
    assert all("lora_" in n or "router" in n for n in names)
    assert any(".mlp.lora_A.gate" in n for n in names) and any("self_attn.o_proj.lora_B" in n for n in names)
    assert not any(n.startswith(("encoders.", "connectors.")) for n in names)
    with pytest.raises(ValueError, match="modality"):
        UniMoE(stage="experts", tokenizer=TOKENIZER)


def test_experts_stage_refuses_another_modalitys_batch(stages, tokenizer):
    method = UniMoE(stage="experts", modality="audio", tokenizer=TOKENIZER,
                    backbone=BackboneConfig(pretrained=str(stages / "align")))
    inputs = batch(tokenizer)
    with pytest.raises(ValueError, match=r"audio data only.*\['image', 'video'\]"):
        method.compute_loss({**inputs, "labels": inputs["input_ids"], "domain": ["a", "b"]})


def forced(slot: int):
    """A router forward hook that sends every token to `slot` with weight 1."""
    def hook(module, args, output: RouterOutput) -> RouterOutput:
        indices = output.indices.clone()
        indices[:, 0], indices[:, 1] = slot, (slot + 1) % output.probs.shape[-1]
        weights = torch.zeros_like(output.weights)
        weights[:, 0] = 1.0
        return RouterOutput(output.logits, output.probs, indices, weights)
    return hook


def test_forced_router_reproduces_each_stage2_model(stages, tokenizer):
    method = moe_method(stages)
    model = method.model.eval()
    inputs = batch(tokenizer)
    sources = {"dense": stages / "align", **{m: stages / m for m in ("image", "audio", "video")}}
    outputs = {}
    for slot, name in enumerate(method.moe_options.experts):
        handles = [moe.router.register_forward_hook(forced(slot)) for _, moe in expert_layers(model)]
        with torch.no_grad():
            got = model(**inputs).logits
        for h in handles:
            h.remove()
        with torch.no_grad():
            expected = MultimodalLM.from_pretrained(sources[name]).eval()(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        outputs[name] = expected
    # the slots really hold different FFNs (each modality's own, not copies of one)
    assert not torch.allclose(outputs["audio"], outputs["video"]) and not torch.allclose(outputs["dense"], outputs["image"])


def test_stage3_output_round_trips(stages, tokenizer, tmp_path):
    method = moe_method(stages)
    with torch.no_grad():
        for n, p in method.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    method.model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path).eval()
    # the structure is logged as an upcycle (one expert per slot): loading it needs none of the stage-2 models
    assert [e["op"] for e in loaded.surgery] == ["upcycle", "adapters"] and loaded.surgery[0]["num_experts"] == 4
    inputs = batch(tokenizer)
    torch.testing.assert_close(loaded(**inputs).logits, method.model.eval()(**inputs).logits)
    # a loaded stage-3 model is not upcycled again, and keeps its adapters
    again = UniMoE(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(pretrained=str(tmp_path)))
    assert [e["op"] for e in again.model.surgery] == ["upcycle", "adapters"]


def test_moe_stage_refuses_a_stage2_model_changed_outside_its_mlps(stages, tmp_path):
    changed = MultimodalLM.from_pretrained(stages / "audio")
    with torch.no_grad():
        changed.connectors["audio"].queries.add_(1.0)
    changed.save_pretrained(tmp_path / "audio")
    with pytest.raises(ValueError, match=r"outside the MLPs.*connectors.audio.queries"):
        UniMoE(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(pretrained=str(stages / "align")),
               experts={"image": str(stages / "image"), "audio": str(tmp_path / "audio"), "video": str(stages / "video")})
    with pytest.raises(ValueError, match=r"need the stage-2 output of \['video'\]"):
        UniMoE(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(pretrained=str(stages / "align")),
               experts={"image": str(stages / "image"), "audio": str(stages / "audio")})


def test_affinity_loss_by_hand(stages):
    method = moe_method(stages, affinity=AffinityLoss(coef=1.0, experts={"image": [1, 2]}))
    assert method.affinity_targets() == {0: [1, 2], 1: [2], 2: [3]}
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0], [1.0, 0, 0, 0]])
    routing = [RouterOutput(probs.log(), probs, probs.topk(2).indices, probs.topk(2).values)]
    modality = torch.tensor([[modality_names().index("image"), modality_names().index("audio"), modality_names().index("audio"), -1]])
    loss = method.affinity_loss(routing, modality, torch.ones(1, 4))
    # image token vs (0, .5, .5, 0): .1+.3+.2+.4 = 1.0; audio vs slot 2: .25+.25+.75+.25 = 1.5 and 0; text not pulled
    torch.testing.assert_close(loss, torch.tensor((1.0 + 1.5 + 0.0) / 3))
    masked = method.affinity_loss(routing, modality, torch.tensor([[1, 0, 1, 1]]))
    torch.testing.assert_close(masked, torch.tensor(0.5))


@pytest.fixture(scope="module")
def exported(stages, tokenizer, tmp_path_factory):
    """A stage-3 model whose adapters moved (as if trained), and the store `edge export` writes from its merged copy."""
    torch.manual_seed(0)
    method = moe_method(stages)
    with torch.no_grad():
        for n, p in method.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        # a random model with tied embeddings repeats the prompt's last token (<|assistant|>), a special token
        # that decodes to nothing: with the special tokens' embeddings zero it answers in words
        method.model.llm.get_input_embeddings().weight[tokenizer.all_special_ids] = 0
    model = method.model.eval()
    merged = copy.deepcopy(model)
    assert merge_lora(merged) == 2 * 4 + 2  # q/k/v/o LoRA and the experts' LoRA of both layers
    root = tmp_path_factory.mktemp("unimoe_edge")
    merged.save_pretrained(root / "model")
    edge.main(["export", "--model", str(root / "model"), "--out", str(root / "store")])
    return model, root / "store"


def test_merged_unimoe_exports_and_generates_with_offloaded_experts(exported, tokenizer):
    model, store = exported
    inputs = batch(tokenizer)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    reference = generate(model, ids, mask, GenerationConfig(max_new_tokens=4), **inputs)
    assert len(ExpertStore(store).entries) == 2 * 4
    offloaded, offloader = load_offloaded(store)
    out = generate(offloaded.eval(), ids, mask, GenerationConfig(max_new_tokens=4), **inputs)
    assert torch.equal(out.tokens, reference.tokens)


MEDIA = ROOT / "data" / "media"
CLIP = "audio/beeps/test/020.flac"  # 1 s (data/media/beeps/test.jsonl)
FRAMES = [f"videos/pool/circle_yellow_18_{i}.png" for i in range(4)]  # data/media/motion/test.jsonl's first video
MOVE = "Which way does the shape move?"


def test_generate_command_reads_audio_and_video_as_the_data_module_does(exported, tokenizer, tmp_path, capsys,
                                                                        monkeypatch):
    model, store = exported
    # the oracle's inputs: the data module's collate for the same record (audio, then video, as records write them)
    record = {"id": "av", "audio": CLIP, "video": FRAMES, "conversations": [
        {"from": "human", "value": f"<audio>\n<video>\n{MOVE}"}, {"from": "gpt", "value": "right"}]}
    (tmp_path / "av.jsonl").write_text(json.dumps(record) + "\n")
    window = 2 * TINY_WHISPER["max_source_positions"] / 100  # the stored tower's window: 0.4 s
    data = DomainMixtureDataModule(domains={"av": {"test": str(tmp_path / "av.jsonl")}}, root=str(MEDIA),
                                   tokenizer=TOKENIZER, audio_chunk_seconds=window, audio_max_chunks=3, video_num_frames=4)
    data.setup("test")
    expected = next(iter(data.test_dataloader()[0]))
    assert expected["audio_chunk_mask"].tolist() == [[True, True, True]]  # 1 s in 0.4 s windows
    keys = ("audio_values", "audio_chunk_mask", "video_values", "video_frame_mask")

    seen = {}

    def spy(model, input_ids, attention_mask, config, generator, **inputs):
        seen.update(input_ids=input_ids, **inputs)
        return generate(model, input_ids, attention_mask, config, generator, **inputs)

    monkeypatch.setattr(edge, "generate", spy)
    args = ["generate", "--store", str(store), "--tokenizer", TOKENIZER, "--prompt", MOVE, "--max-new-tokens", "4"]
    edge.main([*args, "--audio", str(MEDIA / CLIP), "--audio-max-chunks", "3",
               "--video", *(str(MEDIA / f) for f in FRAMES)])
    out, err = capsys.readouterr()
    assert torch.equal(seen.pop("input_ids"), expected["prompt_input_ids"])
    assert sorted(seen) == sorted(keys) and all(torch.equal(seen[k], expected[k]) for k in keys)
    # the in-memory (unmerged) model's own greedy generate, experts resident, on the collated tensors
    tokens = model.generate(expected["prompt_input_ids"], expected["prompt_attention_mask"], max_new_tokens=4,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **{k: expected[k] for k in keys})
    answer = tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
    assert answer and out.strip() == answer
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["misses"] > 0 and stats["peak_expert_bytes"] > 0

    # a missing or an undecodable file: one line that names it
    with pytest.raises(SystemExit, match=r"^[^\n]*audio file '[^']*missing\.flac' not found"):
        edge.main([*args, "--audio", str(tmp_path / "missing.flac")])
    (tmp_path / "bad.flac").write_bytes(b"not audio")
    with pytest.raises(SystemExit, match=r"^[^\n]*cannot decode [^ ]*bad\.flac: "):
        edge.main([*args, "--audio", str(tmp_path / "bad.flac")])
    with pytest.raises(SystemExit, match=r"video frame '[^']*videos' is not a file"):
        edge.main([*args, "--video", str(MEDIA / "videos"), str(MEDIA / FRAMES[0])])
