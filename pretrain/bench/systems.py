"""One full training step of each system: forward, backward, optimizer step, zero_grad.

* ``ours``: ``build_model`` + ``build_optimizer`` (LAMB by default, as training), the sparse MLM
  head at ``masked_lm_positions``; bf16 autocast on CUDA with fp32 weights (as the peer); LAMB
  clips by global norm itself (max_grad_norm 1.0), AdamW gets ``clip_grad_norm_``.  With the
  ``deepspeed`` switch the step goes through the training engine (``pretrain.engine.Engine``:
  DeepSpeed bf16/ZeRO, the non-finite-loss check with its one host sync per step).
* ``peer``: what users would pick instead: transformers ``BertForPreTraining`` with SDPA
  attention, dense MLM logits over every token (labels -100 elsewhere), bf16 autocast on CUDA,
  ``torch.optim.AdamW(fused=True)`` with HF Trainer's decay groups, ``clip_grad_norm_(1.0)``.

A :class:`Variant` switches one thing at a time in ``ours``; names combine with ``+``
(``compile+packing``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from pretrain.config import KernelsConfig, ModelConfig, OptimizerConfig

MODELS = {
    # tests only
    "tiny": dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    # the CPU comparison of docs/benchmarks.md (L4 H256 A4, I1024, V8192)
    "mini": dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


def model_config(name: str) -> ModelConfig:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    return ModelConfig(max_position_embeddings=512, **MODELS[name])


@dataclass(frozen=True)
class Variant:
    """What ``ours`` runs; the default is the training configuration (torch kernels, LAMB)."""
    kernels: str = "torch"      # torch: SDPA + torch LayerNorm + reference LAMB; ops: pretrain.ops kernels
    optimizer: str = "lamb"     # lamb | adamw
    packing: bool = False       # the training loop's packing (pretrain.packing): the micro batch in fewer rows
    unpad: bool = False         # kernels.unpad: token-wise work on real tokens only
    mlm_head: str = "sparse"    # sparse: masked positions only; dense: every token (as HF)
    compile: bool = False       # torch.compile the model
    cudagraphs: bool = False    # torch.compile mode="reduce-overhead" (CUDA graphs of forward/backward)
    deepspeed: bool = False     # through the training engine (DeepSpeed)

    @property
    def name(self) -> str:
        parts = [token for token, field_value, default in _TOKENS if getattr(self, field_value) != default]
        return "+".join(parts) or "default"


# token, field, the default the token departs from (the token sets the other value)
_TOKENS = [("ops", "kernels", "torch"), ("adamw", "optimizer", "lamb"), ("packing", "packing", False),
           ("unpad", "unpad", False), ("dense", "mlm_head", "sparse"), ("compile", "compile", False),
           ("cudagraphs", "cudagraphs", False), ("deepspeed", "deepspeed", False)]
_SET = {"ops": ("kernels", "ops"), "adamw": ("optimizer", "adamw"), "packing": ("packing", True),
        "unpad": ("unpad", True),
        "dense": ("mlm_head", "dense"), "compile": ("compile", True), "cudagraphs": ("cudagraphs", True),
        "deepspeed": ("deepspeed", True)}


def parse_variant(text: str) -> Variant:
    """``default`` or tokens joined by ``+``: ops, adamw, packing, unpad, dense, compile, cudagraphs,
    deepspeed."""
    fields = {}
    for token in text.split("+"):
        token = token.strip()
        if token in ("", "default"):
            continue
        if token not in _SET:
            raise ValueError(f"unknown variant {token!r}: expected default or a '+' combination of "
                             f"{', '.join(_SET)}")
        key, value = _SET[token]
        fields[key] = value
    variant = Variant(**fields)
    if variant.packing and variant.mlm_head == "dense":
        raise ValueError("variant packing+dense is not supported (the dense head has no packed labels)")
    return variant


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class OursStep:
    """Our model and optimizer; ``__call__(batch)`` runs one training step."""

    def __init__(self, model_cfg: ModelConfig, variant: Variant, precision: str, device: torch.device):
        from pretrain.model import build_model
        from pretrain.optim import build_optimizer

        ops = variant.kernels == "ops"
        self.kernels = KernelsConfig(attention="fused_softmax" if ops else "sdpa",
                                     layer_norm="fused" if ops else "torch",
                                     lamb="fused" if ops else "reference",
                                     unpad=variant.unpad, compile=variant.compile or variant.cudagraphs)
        self.variant, self.precision, self.device = variant, precision, device
        self.model = build_model(model_cfg, self.kernels).to(device).train()
        opt_cfg = OptimizerConfig(name=variant.optimizer, lr=1e-3 if variant.optimizer == "lamb" else 1e-4)
        if variant.deepspeed:
            self._init_engine(model_cfg, opt_cfg)
            return
        self.optimizer = build_optimizer(self.model, opt_cfg, self.kernels.lamb, clips_itself=True)
        self.forward = self.model
        if variant.compile or variant.cudagraphs:
            self.forward = torch.compile(self.model, mode="reduce-overhead" if variant.cudagraphs else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _init_engine(self, model_cfg: ModelConfig, opt_cfg: OptimizerConfig) -> None:
        from pretrain.config import Config, TrainingConfig, ZeroConfig
        from pretrain.engine import Engine, init_distributed
        from pretrain.optim import build_optimizer, build_scheduler

        # The entry point (pretrain/commands/bench.py) has exported RANK, WORLD_SIZE, MASTER_*.
        cfg = Config(model=model_cfg, optimizer=opt_cfg, kernels=self.kernels, zero=ZeroConfig(stage=1),
                     training=TrainingConfig(micro_batch_size=1, global_batch_size=1, max_steps=10**6,
                                             precision="bf16" if self.precision == "bf16" else "fp32"))
        init_distributed("nccl" if self.device.type == "cuda" else "gloo", cfg.training.collective_timeout_s)
        optimizer = build_optimizer(self.model, opt_cfg, self.kernels.lamb)
        scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.max_steps)
        if self.variant.compile or self.variant.cudagraphs:   # in place, so the engine wraps the compiled module
            self.model.compile(mode="reduce-overhead" if self.variant.cudagraphs else None)
        self.engine = Engine(cfg, self.model, optimizer, scheduler, 1)
        self.steps = 0

    def __call__(self, batch: dict) -> None:
        if self.variant.deepspeed:
            self.steps += 1
            self.engine.step(lambda: batch, self.steps)
            return
        with autocast(self.device, self.precision):
            out = self.forward(**batch)
        out.loss.backward()
        if self.variant.optimizer == "adamw":
            torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class PeerStep:
    """HF transformers BertForPreTraining (SDPA, dense MLM head) + fused torch AdamW."""

    def __init__(self, model_cfg: ModelConfig, precision: str, device: torch.device):
        import transformers

        from pretrain.hf import hf_config

        hf_cfg = hf_config(dataclasses.replace(model_cfg, sentence_head="nsp", layer_norm_position="post"))
        self.model = transformers.BertForPreTraining._from_config(hf_cfg, attn_implementation="sdpa")
        if self.model.config._attn_implementation != "sdpa":
            raise RuntimeError(f"HF attention is {self.model.config._attn_implementation!r}, expected 'sdpa'")
        self.model.to(device).train()
        decay = [p for n, p in self.model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
        no_decay = [p for n, p in self.model.named_parameters() if "bias" in n or "LayerNorm" in n]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, fused=True)
        self.params = decay + no_decay
        self.precision, self.device = precision, device

    def __call__(self, batch: dict) -> None:
        with autocast(self.device, self.precision):
            out = self.model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def ours_batch(batch_set, i: int, variant: Variant) -> dict:
    """Our input for step i: padded (sparse head), packed, or dense labels for the dense head."""
    if variant.packing:
        return batch_set.packed[i % len(batch_set.packed)]
    padded = batch_set.padded[i % len(batch_set.padded)]
    if variant.mlm_head == "dense":
        return {k: v for k, v in padded.items() if k != "masked_lm_positions"} | \
            {"masked_lm_labels": batch_set.peer[i % len(batch_set.peer)]["labels"]}
    return padded


def to_device(batches: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def build_system(system: str, model_cfg: ModelConfig, variant: Variant, precision: str,
                 device: torch.device) -> Callable[[dict], None]:
    if system == "ours":
        return OursStep(model_cfg, variant, precision, device)
    if system == "peer":
        return PeerStep(model_cfg, precision, device)
    raise ValueError(f"unknown system {system!r}")
