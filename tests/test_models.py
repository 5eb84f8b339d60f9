"""mempo.models: the model builder, local checkpoints and their errors."""
import pytest
import torch
from model_dirs import TINY_MODEL

from mempo.checkpoint import export_hf
from mempo.config import ModelConfig
from mempo.models.builder import ModelLoadError, build_model, load_pretrained


def test_build_model_from_config_and_path_errors(tmp_path):
    model = build_model(TINY_MODEL, 100, seed=0)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (32, 2, 1, 100)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(build_model(TINY_MODEL, 100, seed=0).lm_head.weight, model.lm_head.weight)
    with pytest.raises(ModelLoadError, match=str(tmp_path / "nope")):
        build_model(ModelConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_pretrained(str(tmp_path / "empty"))
    export_dir = tmp_path / "export"
    export_hf(model, None, export_dir)
    (export_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=str(export_dir)):
        load_pretrained(str(export_dir))
