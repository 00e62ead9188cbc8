"""Depth growth keeps the function exactly (models/training/grow.py, an issue #22 experiment)."""

import pytest

from models.training.grow import grow


@pytest.mark.parametrize("arch", ["transformer", "hybrid"])
def test_grown_model_predicts_exactly_as_the_original(tmp_path, arch):
    from transformers import AutoConfig

    diff = grow(f"models/reference/{arch}", tmp_path / arch)
    assert diff == 0.0
    src, out = AutoConfig.from_pretrained(f"models/reference/{arch}"), AutoConfig.from_pretrained(tmp_path / arch)
    assert out.num_hidden_layers == 2 * src.num_hidden_layers
    assert out.layer_types == [t for t in src.layer_types for _ in range(2)]
