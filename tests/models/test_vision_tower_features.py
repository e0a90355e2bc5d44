"""`VisionTower` computes exactly Hugging Face's `hidden_states[feature_layer]` while running only the layers
it needs, and every parameter it keeps gets a gradient (what DDP requires); the unused parts stay in the
state dict as buffers."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from lightning_moe.modalities.image import VisionTower

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


@pytest.mark.parametrize("model_class, config_class", [(CLIPVisionModel, CLIPVisionConfig), (SiglipVisionModel, SiglipVisionConfig)])
@pytest.mark.parametrize("feature_layer", [-1, -2, 1])
def test_features_equal_hugging_face_hidden_states_and_every_parameter_gets_a_gradient(model_class, config_class, feature_layer):
    reference = model_class(config_class(**SIZES)).eval()
    tower = model_class(config_class(**SIZES)).eval()
    tower.load_state_dict(reference.state_dict())
    wrapped = VisionTower(tower, feature_layer)
    assert wrapped.model.state_dict().keys() == reference.state_dict().keys()  # nothing dropped from checkpoints
    pixels = torch.randn(2, 3, 32, 32)
    expected = reference(pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:] \
        if model_class is CLIPVisionModel else reference(pixels, output_hidden_states=True).hidden_states[feature_layer]
    features = wrapped(pixels)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    features.sum().backward()
    assert [n for n, p in wrapped.named_parameters() if p.grad is None] == []
    assert "post_layernorm.weight" not in dict(wrapped.model.named_parameters())
