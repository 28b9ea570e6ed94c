"""The BERT-family model: ``build_model(model_cfg, kernels_cfg, activation_checkpointing)`` -> BertForPretraining.

Plain torch; it knows nothing of DeepSpeed, launchers or config files.  See docs/model.md.
"""
from __future__ import annotations

from pretrain.config import KernelsConfig, ModelConfig
from pretrain.model.attention import build_attention_mask, positions_from_segments
from pretrain.model.bert import (IGNORE_INDEX, BertForPretraining, PretrainOutput, flops_per_sequence,
                                 pad_vocab, padded_vocab_size, trim_vocab)


def build_model(model_cfg: ModelConfig, kernels_cfg: KernelsConfig | None = None,
                activation_checkpointing: bool = False) -> BertForPretraining:
    """A freshly initialized model (BERT init, fp32, on CPU); the engine moves and wraps it.
    ``activation_checkpointing``: training.activation_checkpointing (see bert.Encoder)."""
    model = BertForPretraining(model_cfg, kernels_cfg)
    model.encoder.activation_checkpointing = activation_checkpointing
    return model


__all__ = ["BertForPretraining", "IGNORE_INDEX", "PretrainOutput", "build_attention_mask", "build_model",
           "flops_per_sequence", "pad_vocab", "padded_vocab_size",
           "positions_from_segments", "trim_vocab"]
