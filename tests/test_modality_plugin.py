"""A modality is a plug-in: one spec, registered from the user's own module, and the data side, the tokenizer, the
model and the CLI take it with no edit inside `lightning_moe/`.

What adding a modality takes, counted on "depth" below (a single-channel depth map read from a PNG, repeated to
the three channels of its own tiny CLIP tower):

- files inside lightning_moe/ touched: 0;
- in the user's module (here, this file): a decoder, a transform, and one `register_modality(ModalitySpec(...))`
  call naming its placeholder (`<depth>`), its loader and its tower kind (`VISION`: the image modality's, a tower
  of depth's own); the batch keys (`depth_values`, `depth_counts`), the record field (`depth`) and how its
  tower is saved and rebuilt follow from the spec;
- in the run's config: `backbone.encoders.depth`, and records with a `depth` field and `<depth>` placeholders.

Registration is undone by `unregister_modality`; nothing of it stays in the tokenizer or the sample cache.
Also: the registry refuses clashes, each tower kind's saved record rebuilds the same encoder, and the saved
records and configs of the flat backbone form still read the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from lightning_moe.cli import main
from lightning_moe.data import LlavaDataset
from lightning_moe.methods import BackboneConfig
from lightning_moe.modalities import (ModalitySpec, modality, modality_names, register_modality, split_option,
                                     unregister_modality)
from lightning_moe.modalities.image import VISION, load_image
from lightning_moe.formats import CHECKPOINT_CONFIG_KEY, load_backbone, model_from_checkpoint
from lightning_moe.models import MultimodalLM, build_multimodal
from lightning_moe.models.encoders import EncoderConfig, encoders_from_flat
from lightning_moe.tokens import load_tokenizer
from tests.conftest import ROOT, TINY_LLM, TINY_VISION, TOKENIZER, tiny_encoders


# --------------------------------------------------------------------------- the user's module
def decode_depth(file: Path) -> None:
    """Read every value; a depth map has one channel."""
    with Image.open(file) as image:
        image.load()
        if image.mode not in ("I;16", "I", "F", "L"):
            raise ValueError(f"a depth map has one channel, this image is {image.mode}")


class DepthTransform:
    """A depth map -> (3, size, size): resized, scaled to [0, 1] by its own largest value, the channel repeated
    for an RGB tower."""

    def __init__(self, size: int = 32):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        depth = np.asarray(image.convert("F").resize((self.size, self.size), Image.Resampling.BILINEAR), np.float32)
        depth = torch.from_numpy(depth / max(float(depth.max()), 1e-6))
        return depth[None].expand(3, -1, -1).clone()


DEPTH = ModalitySpec(
    name="depth", placeholder="<depth>", decode=decode_depth, load=load_image,
    transform=lambda options, built: DepthTransform(**options), tower=VISION, feature_layer=-1,
    transform_options=lambda tower: {"size": tower.config.image_size},
)


@pytest.fixture
def depth():
    register_modality(DEPTH)
    yield DEPTH
    if "depth" in modality_names():
        unregister_modality("depth")


def write_depth_data(root: Path, n_train: int = 16, n_val: int = 4) -> None:
    """One domain: is the near object (the smallest depth) on the left or the right of a 16-bit depth map?"""
    rng = np.random.default_rng(0)
    (root / "maps").mkdir(parents=True)
    for split, count in (("train", n_train), ("val", n_val)):
        rows = []
        for i in range(count):
            side = ("left", "right")[i % 2]
            depth = np.full((32, 32), 4000, np.uint16) + rng.integers(0, 200, (32, 32), dtype=np.uint16)
            columns = slice(2, 14) if side == "left" else slice(18, 30)
            depth[8:24, columns] = 800
            name = f"maps/{split}_{i:03d}.png"
            Image.fromarray(depth).save(root / name)
            rows.append({"id": f"{split}-{i}", "depth": name, "conversations": [
                {"from": "human", "value": "<depth>\nIs the object left or right?"}, {"from": "gpt", "value": side}]})
        (root / "side").mkdir(exist_ok=True)
        (root / "side" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_modality_registered_outside_the_package_trains_through_the_cli(depth, tmp_path, monkeypatch):
    write_depth_data(tmp_path / "depth_data")
    monkeypatch.chdir(tmp_path)  # runs/ lands here
    encoders = {"depth": {"tower": "tiny-clip", "overrides": TINY_VISION, "feature_layer": -1}}
    cli = main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                f"--data.init_args.root={tmp_path / 'depth_data'}", "--data.init_args.domains=null",
                f"--data.init_args.tokenizer={TOKENIZER}", '--data.init_args.modality_options={"depth": {"size": 32}}',
                "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
                "--data.init_args.max_train_samples_per_domain=8", "--data.init_args.max_eval_samples_per_domain=4",
                f"--model.init_args.backbone.encoders={json.dumps(encoders)}",
                f"--model.init_args.backbone.llm_overrides={json.dumps(TINY_LLM)}",
                "--model.init_args.pope_domains=[]", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])

    tokenizer = cli.datamodule.tokenizer
    shipped = AutoTokenizer.from_pretrained(TOKENIZER)  # the file: the shipped placeholders keep its ids
    assert [tokenizer.convert_tokens_to_ids(p) for p in ("<image>", "<audio>", "<video>")] == \
           [shipped.convert_tokens_to_ids(p) for p in ("<image>", "<audio>", "<video>")]
    depth_id = tokenizer.convert_tokens_to_ids("<depth>")
    assert depth_id == len(shipped) == len(tokenizer) - 1  # <depth> comes after them
    model = cli.model.model
    assert model.modalities == ["depth"] and model.placeholder_ids == {"depth": depth_id}
    assert cli.trainer.global_step == 2
    assert cli.datamodule.data_report["train"]["side"]["kept"] == 8
    # the last forward pass (validation) spliced depth features in place of the placeholders
    assert (model.last_token_modality == modality_names().index("depth")).sum() == 4 * model.encoders["depth"].num_patches

    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    loaded = load_backbone(checkpoint).eval()  # the tower rebuilt from its saved record by its modality
    batch = next(iter(cli.datamodule.val_dataloader()[0]))
    assert batch["depth_values"].shape == (4, 3, 32, 32) and batch["depth_counts"].tolist() == [1, 1, 1, 1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "depth_values")}
    torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)

    # undone: the registry, the tokenizer and the sample cache forget depth
    unregister_modality("depth")
    assert "depth" not in modality_names() and "<depth>" not in load_tokenizer(TOKENIZER).get_added_vocab()
    root = tmp_path / "depth_data"
    again = LlavaDataset(root / "side" / "val.jsonl", root, tokenizer)  # same files and tokenizer as before
    assert all(sample.media == {} for sample in again.samples)  # not the cached samples with their depth maps


def test_a_registered_modality_is_a_unimoe_experts_stage_modality_and_expert_slot(depth):
    """Uni-MoE's `modality` and expert slots take any registered modality; a name not registered is refused with
    the registered ones, and the depth experts stage refuses a batch with another modality's inputs."""
    from lightning_moe.methods import ModalityExpertsConfig, UniMoE

    backbone = BackboneConfig(llm_overrides=TINY_LLM, encoders={"depth": {"tower": "tiny-clip", "overrides": TINY_VISION}})
    method = UniMoE(stage="experts", modality="depth", tokenizer=TOKENIZER, backbone=backbone,
                    moe=ModalityExpertsConfig(experts=["dense", "depth"]))
    assert method.modality == "depth" and set(method.own_expert) == {"depth_own", "depth_all"}
    assert method.affinity_targets() == {modality_names().index("depth"): [1]}
    with pytest.raises(ValueError, match=r"on depth data only, but a batch carries \['image'\] inputs"):
        method.compute_loss({"pixel_values": torch.zeros(1, 3, 32, 32), "domain": ["shapes"]})
    registered = r"\['image', 'audio', 'video', 'depth'\]"
    with pytest.raises(ValueError, match=rf"modality 'sonar' is not registered; registered modalities: {registered}"):
        UniMoE(stage="experts", modality="sonar", tokenizer=TOKENIZER, backbone=backbone)
    with pytest.raises(ValueError, match=rf"expert slots \['sonar'\] are neither a registered modality {registered}"):
        UniMoE(stage="moe", moe=ModalityExpertsConfig(experts=["depth", "sonar"]), tokenizer=TOKENIZER,
               backbone=backbone)


# --------------------------------------------------------------------------- the registry
def test_the_registry_refuses_a_taken_name_placeholder_or_batch_key(depth):
    with pytest.raises(ValueError, match="modality 'depth' is already registered"):
        register_modality(ModalitySpec(name="depth", placeholder="<depth2>", decode=decode_depth, load=load_image,
                                       transform=DEPTH.transform, tower=VISION))
    register_modality(DEPTH)  # the same spec again: nothing to refuse
    with pytest.raises(ValueError, match="placeholder '<image>' is taken by modality 'image'"):
        register_modality(ModalitySpec(name="sketch", placeholder="<image>", decode=decode_depth, load=load_image,
                                       transform=DEPTH.transform, tower=VISION))
    with pytest.raises(ValueError, match=r"batch keys \['pixel_values'\] are taken by modality 'image'"):
        register_modality(ModalitySpec(name="sketch", placeholder="<sketch>", decode=decode_depth, load=load_image,
                                       transform=DEPTH.transform, tower=VISION, values_key="pixel_values"))
    with pytest.raises(ValueError, match="encoder_of='sonar' must name a registered modality"):
        register_modality(ModalitySpec(name="sketch", placeholder="<sketch>", decode=decode_depth, load=load_image,
                                       transform=DEPTH.transform, encoder_of="sonar"))
    with pytest.raises(ValueError, match="is the encoder of \\['video'\\]"):
        unregister_modality("image")
    assert "sketch" not in modality_names()
    assert list(modality_names()) == ["image", "audio", "video", "depth"]


def test_an_option_key_splits_at_the_longest_registered_modality_name(depth):
    """`<modality>_<option>` keys (data module arguments, edge flags): a modality name may contain "_"."""
    spec = ModalitySpec(name="depth_hd", placeholder="<depth_hd>", decode=decode_depth, load=load_image,
                        transform=DEPTH.transform, encoder_of="depth")
    register_modality(spec)
    try:
        assert split_option("image_size") == ("image", "size")
        assert split_option("audio_chunk_seconds") == ("audio", "chunk_seconds")
        assert split_option("depth_size") == ("depth", "size")
        assert split_option("depth_hd_size") == ("depth_hd", "size")
        with pytest.raises(ValueError, match="'sonar_size' is not <modality>_<option> for a registered modality"):
            split_option("sonar_size")
        with pytest.raises(ValueError, match="'image_' is not <modality>_<option>"):
            split_option("image_")
    finally:
        unregister_modality("depth_hd")


def test_a_spec_needs_a_tower_or_another_modalitys_and_pooling_exactly_with_slots():
    with pytest.raises(ValueError, match="exactly one of `tower`"):
        ModalitySpec(name="x", placeholder="<x>", decode=decode_depth, load=load_image, transform=DEPTH.transform)
    with pytest.raises(ValueError, match="items with slots need `pooling`"):
        ModalitySpec(name="x", placeholder="<x>", decode=decode_depth, load=load_image, transform=DEPTH.transform,
                     tower=VISION, slots="frame")
    with pytest.raises(ValueError, match="must be an identifier"):
        ModalitySpec(name="x-ray", placeholder="<x>", decode=decode_depth, load=load_image, transform=DEPTH.transform,
                     tower=VISION)


@pytest.mark.parametrize("name, config", [
    ("image", EncoderConfig(tower="tiny-clip", overrides=TINY_VISION, feature_layer=-1)),
    ("audio", EncoderConfig(tower="tiny-whisper")),
    ("depth", EncoderConfig(tower="tiny-siglip", overrides=TINY_VISION)),
])
def test_a_towers_saved_record_rebuilds_the_same_encoder(depth, name, config):
    spec = modality(name)
    feature_layer = spec.feature_layer if config.feature_layer is None else config.feature_layer
    tower = spec.tower.build(config.tower, config.overrides, feature_layer=feature_layer, trust_remote_code=False,
                             allow_unsafe=False).eval()
    record = json.loads(json.dumps(spec.tower.to_config(tower)))  # as multimodal_config.json holds it
    rebuilt = spec.tower.from_config(record).eval()
    rebuilt.load_state_dict(tower.state_dict())
    inputs = torch.randn(2, 80, 100) if name == "audio" else torch.randn(2, 3, 32, 32)
    assert type(rebuilt) is type(tower) and rebuilt.feature_layer == tower.feature_layer
    torch.testing.assert_close(rebuilt(inputs), tower(inputs), rtol=0, atol=0)


# --------------------------------------------------------------------------- the flat form
def test_flat_backbone_keys_warn_once_and_give_the_mapping():
    with pytest.warns(FutureWarning) as caught:
        config = BackboneConfig(vision_feature_layer=-1, audio_tower="tiny-whisper", video_pooling="concat")
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1 and "vision_feature_layer, audio_tower, video_pooling are deprecated" in messages[0]
    assert "encoders: {image: {tower: tiny-clip, feature_layer: -1, connector: mlp2x_gelu}, audio: {tower: " \
           "tiny-whisper, connector: query}, video: {pooling: concat}}" in messages[0]
    assert config.encoders == {"image": EncoderConfig("tiny-clip", {}, -1, "mlp2x_gelu"),
                               "audio": EncoderConfig("tiny-whisper", connector="query"),
                               "video": EncoderConfig(pooling="concat")}
    # vision_tower None is a model without images (said as `encoders: {}`), and the default has the tiny CLIP tower
    with pytest.warns(FutureWarning, match=r"vision_tower is deprecated; write `encoders: \{\}`"):
        assert BackboneConfig(vision_tower=None).encoders == {} == encoders_from_flat({"vision_tower": None})
    assert BackboneConfig().encoders == {"image": EncoderConfig("tiny-clip", {}, -2, "mlp2x_gelu")}


def test_the_saved_record_of_the_shipped_modalities_keeps_its_form(tokenizer, tmp_path):
    """`multimodal_config.json` of the shipped modalities has one form whichever version wrote it (expert stores
    fingerprint it): `video_pooling` at the top, the towers' kinds; a record without the image kind loads too."""
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1, audio=True, video="concat"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "multimodal_config.json").read_text())
    assert set(config) == {"llm", "encoders", "connectors", "video_pooling", "placeholder_ids", "surgery"}
    assert config["video_pooling"] == "concat"
    assert [e["kind"] for e in config["encoders"].values()] == ["vision", "audio"]
    del config["encoders"]["image"]["kind"]
    (tmp_path / "multimodal_config.json").write_text(json.dumps(config))
    loaded = MultimodalLM.from_pretrained(tmp_path)
    assert loaded.pooling == model.pooling == {"audio": "concat", "video": "concat"}
    assert loaded.modalities == ["image", "audio", "video"]
    values = torch.randn(1, 2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode("video", values), model.encode("video", values))


def test_a_saved_model_of_a_modality_not_registered_names_its_file_and_how_to_register_it(depth, tmp_path):
    model = build_multimodal(load_tokenizer(TOKENIZER), "tiny-llama", TINY_LLM,
                             {"depth": {"tower": "tiny-clip", "overrides": dict(TINY_VISION)}})
    model.save_pretrained(tmp_path / "model")
    record = model.config_dict()
    unregister_modality("depth")
    hint = "modality 'depth' is not registered.* importing the module that calls register_modality"
    config_file = re.escape(str(tmp_path / "model" / "multimodal_config.json"))
    with pytest.raises(ValueError, match=rf"^{config_file}: {hint}"):
        MultimodalLM.from_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'run.ckpt'))}: {hint}"):
        model_from_checkpoint({CHECKPOINT_CONFIG_KEY: record, "state_dict": {}}, tmp_path / "run.ckpt")


def test_a_record_with_an_encoder_under_a_modality_read_through_another_is_refused(tokenizer, tmp_path):
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(video="mean"))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "multimodal_config.json"
    config = json.loads(config_file.read_text())
    config["encoders"]["video"] = config["encoders"].pop("image")
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(config_file))}: the record has an encoder under 'video', "
                                         r"a modality without a tower of its own \(its items go through the image "
                                         r"encoder, recorded under 'image'\)"):
        MultimodalLM.from_pretrained(tmp_path)


def test_edge_generate_takes_any_registered_modality_as_input(depth):
    from lightning_moe.edge import build_parser, prompt_media

    def media(*flags: str) -> dict:
        return prompt_media(build_parser().parse_args(["generate", "--store", "s", "--prompt", "p", *flags]))

    shipped = media("--image", "a.png", "--audio", "b.flac", "c.flac", "--video", "frames")
    assert shipped == media("--input", "image=a.png", "--input", "audio=b.flac", "--input", "audio=c.flac",
                            "--input", "video=frames")
    assert shipped["image"] == [str(Path("a.png").absolute())] and len(shipped["audio"]) == 2
    assert media("--input", "depth=d.png") == {"depth": [str(Path("d.png").absolute())]}
    with pytest.raises(SystemExit, match="--input 'sonar=x.wav': write MODALITY=PATH, MODALITY one of"):
        media("--input", "sonar=x.wav")
