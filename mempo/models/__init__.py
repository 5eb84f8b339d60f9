"""Hugging Face glue: the model builder, decoder / LM-head access, and the attention backends
mempo registers in transformers ("mempo_segment" for training; the rollout's cached attention
lives with its KV cache in mempo.rollout)."""
from .builder import ModelLoadError, build_model, count_parameters, load_pretrained, tiny_qwen2_config
from .hf import attention_implementation, decoder_of, lm_head_weight

__all__ = ["ModelLoadError", "attention_implementation", "build_model", "count_parameters", "decoder_of",
           "lm_head_weight", "load_pretrained", "tiny_qwen2_config"]
