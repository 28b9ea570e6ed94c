"""BERT / ALBERT / RoBERTa / DistilBERT encoder with MLM and NSP/SOP heads, in plain torch.

Layout (parameter names in brackets):

    embeddings     word [V_pad, E], position, token_type (not DistilBERT), norm (post-LN only),
                   projection E -> H (ALBERT with embedding_size set)
    encoder        layers.{i}: attention.qkv [3H, H], attention.out, attention_norm,
                   ffn.up [I, H], ffn.down [H, I], ffn_norm;  final_norm (pre-LN only)
                   (share_layers: a single layers.0 applied num_layers times)
    mlm_head       dense H -> E, norm, decoder_bias [V_pad]; decoder weight tied to embeddings.word
    pooler, sentence_head   dense + tanh on [CLS], then H -> 2 (absent for sentence_head=none)

Post-LN (original BERT): h = LN(h + sublayer(h)), with LN on the embeddings.
Pre-LN (Megatron-BERT): h = h + sublayer(LN(h)), no LN on the embeddings, a final LN after the
encoder.  RoBERTa is the post-LN layout with its position ids (from 2; padding slots at 1); DistilBERT
the post-LN layout without token types and without dropout on the attention output (its MLM head,
vocab_transform, activation, vocab_layer_norm, vocab_projector, is our mlm_head).  The vocabulary
is padded to a multiple of ``pad_vocab_multiple`` rows for fast matmuls; padded rows start at zero and
the padded logit columns are sliced off before any loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data_prep.masking import IGNORE_INDEX
from pretrain.config import KernelsConfig, ModelConfig, position_offset
from pretrain.model.attention import ATTENTION_IMPLS, build_attention_mask, positions_from_segments


def padded_vocab_size(cfg: ModelConfig) -> int:
    """Rows of the embedding/decoder inside the model: vocab_size rounded up to pad_vocab_multiple."""
    multiple = cfg.pad_vocab_multiple
    return (cfg.vocab_size + multiple - 1) // multiple * multiple


def embedding_size(cfg: ModelConfig) -> int:
    return cfg.embedding_size or cfg.hidden_size


def has_projection(cfg: ModelConfig) -> bool:
    """ALBERT with embedding_size set has the E -> H projection (even when E == H, as HF ALBERT)."""
    return cfg.arch == "albert" and cfg.embedding_size is not None


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"model.hidden_act: got {name!r}, expected 'gelu' or 'gelu_tanh'")


class LayerNorm(nn.Module):
    """LayerNorm of ``x + residual``; ``impl`` is kernels.layer_norm: torch, fused or reference.

    ``return_sum`` also returns ``x + residual`` (the pre-LN residual stream), which the fused
    kernel produces in the same pass.
    """

    def __init__(self, size: int, eps: float, impl: str = "torch"):
        super().__init__()
        if impl not in ("torch", "fused", "reference"):
            raise ValueError(f"kernels.layer_norm: got {impl!r}, expected 'torch', 'fused' or 'reference'")
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.eps, self.impl = eps, impl

    def forward(self, x, residual=None, return_sum: bool = False):
        if self.impl != "torch":
            from pretrain import ops  # imported only when a non-torch path is selected
            if residual is not None and residual.dtype != x.dtype:  # e.g. autocast: add in the wider dtype
                wide = torch.promote_types(x.dtype, residual.dtype)
                x, residual = x.to(wide), residual.to(wide)
            return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual,
                                  return_sum=return_sum, impl="auto" if self.impl == "fused" else "reference")
        total = x if residual is None else x + residual
        out = F.layer_norm(total, self.weight.shape, self.weight, self.bias, self.eps)
        return (out, total) if return_sum else out


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_impl: str):
        super().__init__()
        size = embedding_size(cfg)
        self.word = nn.Embedding(padded_vocab_size(cfg), size)
        self.position = nn.Embedding(cfg.max_position_embeddings, size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, size) if cfg.arch != "distilbert" else None
        # Pre-LN normalizes inside every layer, so (as in Megatron-BERT) the embeddings are not.
        post = cfg.layer_norm_position == "post"
        self.norm = LayerNorm(size, cfg.layer_norm_eps, norm_impl) if post else None
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.projection = nn.Linear(size, cfg.hidden_size) if has_projection(cfg) else None

    def forward(self, input_ids, token_type_ids, position_ids):
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:     # DistilBERT has no token types: its segment ids are ignored
            x = x + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        x = self.dropout(x)
        return x if self.projection is None else self.projection(x)


class Unpadded:
    """Where the real tokens of a padded [B, S] batch lie, to skip the padding (``kernels.unpad``).

    Token-wise work (every matmul but attention's two, LayerNorm, dropout, GELU) then runs on the
    T real tokens only, [T, ...]; attention pads its q/k/v back to [B, S] (zeros at padding, which
    the key mask hides) and unpads its output.  ``nonzero`` gives T: a host sync on CUDA, none on CPU.
    """

    def __init__(self, real: torch.Tensor):
        self.batch, self.seq = real.shape
        self.index = real.reshape(-1).nonzero().squeeze(1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]"""
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], zeros at the padding."""
        out = x.new_zeros((self.batch * self.seq,) + x.shape[1:]).index_copy(0, self.index, x)
        return out.view(self.batch, self.seq, *x.shape[1:])


class Jagged:
    """Attention over the runs of packed rows without an S x S mask (``kernels.attention: sdpa`` with
    packed batches on CUDA): the flattened [R*S] slots cut at ``cu_seqlens`` (every instance, and each
    row's padding) into a nested jagged tensor, which SDPA runs through its flash / memory-efficient
    kernels, one sequence per run.  The outputs are those of the block-diagonal mask.

    The shortest and longest run are read once per forward (one host sync on CUDA) and handed to
    every layer's nested tensors, which would otherwise each compute them (three syncs a layer)."""

    def __init__(self, cu_seqlens: torch.Tensor):
        self.offsets = cu_seqlens
        lengths = cu_seqlens.diff()
        self.min_seqlen, self.max_seqlen = (int(x) for x in torch.stack([lengths.min(), lengths.max()]).tolist())

    def attention(self, qkv: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """qkv [T, 3, heads, d] -> context [T, heads * d]."""
        q, k, v = (torch.nested.nested_tensor_from_jagged(qkv[:, i].contiguous(), self.offsets,
                                                          min_seqlen=self.min_seqlen,
                                                          max_seqlen=self.max_seqlen).transpose(1, 2)
                   for i in range(3))
        context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return context.transpose(1, 2).values().flatten(1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV matmul; rows of qkv are [query; key; value]."""

    def __init__(self, cfg: ModelConfig, impl: str):
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"kernels.attention: got {impl!r}, expected one of {', '.join(ATTENTION_IMPLS)}")
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.num_heads, self.dropout_p = cfg.num_heads, cfg.attention_dropout
        self.core = ATTENTION_IMPLS[impl]

    def forward(self, x, keep, tokens: Unpadded | None = None):
        qkv = self.qkv(x)
        if tokens is not None:
            qkv = tokens.pad(qkv)
        batch, seq = qkv.shape[:2]
        dropout_p = self.dropout_p if self.training else 0.0
        if isinstance(keep, Jagged):
            context = keep.attention(qkv.view(batch * seq, 3, self.num_heads, -1), dropout_p).view(batch, seq, -1)
        else:
            q, k, v = qkv.view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            context = self.core(q, k, v, keep, dropout_p).transpose(1, 2).reshape(batch, seq, -1)
        return self.out(context if tokens is None else tokens.unpad(context))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig):
        super().__init__()
        self.attention = SelfAttention(cfg, kernels.attention)
        self.attention_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, kernels.layer_norm)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, kernels.layer_norm)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        # DistilBERT drops out the FFN's output only: no dropout follows its attention's out_lin.
        self.attention_dropout = nn.Identity() if cfg.arch == "distilbert" else self.dropout
        self.pre_ln = cfg.layer_norm_position == "pre"

    def forward(self, h, keep, tokens: Unpadded | None = None):
        if self.pre_ln:
            return self.forward_pre_ln(h, keep, tokens)
        h = self.attention_norm(self.attention_dropout(self.attention(h, keep, tokens)), residual=h)
        return self.ffn_norm(self.dropout(self.ffn(h)), residual=h)

    def forward_pre_ln(self, h, keep, tokens: Unpadded | None = None):
        # The second LN also hands back the residual sum, so a fused kernel does both in one pass.
        x = self.attention_norm(h)
        x, h = self.ffn_norm(self.attention_dropout(self.attention(x, keep, tokens)), residual=h, return_sum=True)
        return h + self.dropout(self.ffn(x))


class Encoder(nn.Module):
    activation_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the layer's activations there
    (``training.activation_checkpointing``; torch.utils.checkpoint, non-reentrant, which replays the
    dropout draws from the saved RNG state): the same losses and gradients, for one more encoder forward
    a step.  Applies only while gradients are recorded; evaluation runs the layers plainly."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig):
        super().__init__()
        unique_layers = 1 if cfg.share_layers else cfg.num_layers
        self.layers = nn.ModuleList(Layer(cfg, kernels) for _ in range(unique_layers))
        self.num_layers = cfg.num_layers
        pre = cfg.layer_norm_position == "pre"
        self.final_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, kernels.layer_norm) if pre else None

    def forward(self, h, keep, tokens: Unpadded | None = None):
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        # The recomputation compares the shapes of what it saves again with the first pass's; jagged
        # attention saves (strided) nested tensors, which have no shape to read, so it goes unchecked.
        check = "none" if isinstance(keep, Jagged) else "default"
        for i in range(self.num_layers):
            layer = self.layers[i % len(self.layers)]
            if recompute:
                h = checkpoint(layer, h, keep, tokens, use_reentrant=False, determinism_check=check)
            else:
                h = layer(h, keep, tokens)
        return h if self.final_norm is None else self.final_norm(h)


class MaskedLMHead(nn.Module):
    """dense H -> E, activation, LayerNorm, then the decoder tied to the word embeddings."""

    def __init__(self, cfg: ModelConfig, norm_impl: str):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, embedding_size(cfg))
        self.act = activation(cfg.hidden_act)
        self.norm = LayerNorm(embedding_size(cfg), cfg.layer_norm_eps, norm_impl)
        self.decoder_bias = nn.Parameter(torch.zeros(padded_vocab_size(cfg)))
        self.vocab_size = cfg.vocab_size

    def forward(self, x, word_embeddings):
        x = self.norm(self.act(self.dense(x)))
        # Multiply by all padded rows (aligned matmul), then drop the padded columns so they can
        # never win an argmax or take softmax mass.
        return F.linear(x, word_embeddings, self.decoder_bias)[:, :self.vocab_size]


@dataclass
class PretrainOutput:
    """Losses, logits and detached metric counts of one forward (0-dim tensors, no host sync).

    ``mlm_logits`` has one row per entry of ``masked_lm_positions`` ([B*P, vocab_size], row-major
    over [B, P]; packed: [M, vocab_size]); rows whose label is -100 are padding entries.  Fields are None when the labels
    (or the sentence head) they need are absent.
    """
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    sentence_loss: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    sentence_logits: torch.Tensor | None = None
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    sentence_correct: torch.Tensor | None = None
    sentence_count: torch.Tensor | None = None


def loss_and_accuracy(logits, labels):
    """Mean cross-entropy over labels != -100 (0 when there are none), #correct and #counted."""
    labels = labels.reshape(-1)
    counted = labels != IGNORE_INDEX
    count = counted.sum()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(dim=-1) == labels) & counted).sum()
    return loss / count.clamp(min=1), correct.detach(), count.detach()


def gather_positions(hidden, positions):
    """hidden [B, S, H] at positions [B, P] -> [B*P, H]; a fixed shape, whatever the labels."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    return hidden.gather(1, index).flatten(0, 1)


class BertForPretraining(nn.Module):
    unpad: bool = False
    """Skip the padding: run token-wise work on real tokens only (see :class:`Unpadded`).  The
    outputs are those of the padded computation; the dropout draws and the summation order differ.
    Off by default: its ``nonzero`` is a host sync on CUDA (packed rows spend no FLOPs on padding
    either, with the block mask and no sync, or with jagged attention and one sync a forward); on CPU
    it costs nothing.  ``kernels.unpad`` turns it on."""
    jagged: bool | None = None
    """Packed batches (with ``cu_seqlens``): attention over jagged sequences (:class:`Jagged`) instead of
    the block-diagonal mask.  None: on CUDA with ``kernels.attention: sdpa`` (no S x S mask there); the
    block mask elsewhere.  The tests set it to compare the two."""

    def __init__(self, cfg: ModelConfig, kernels: KernelsConfig | None = None):
        super().__init__()
        kernels = kernels or KernelsConfig()
        self.config, self.kernels = cfg, kernels
        self.unpad = kernels.unpad
        self.embeddings = Embeddings(cfg, kernels.layer_norm)
        self.encoder = Encoder(cfg, kernels)
        self.mlm_head = MaskedLMHead(cfg, kernels.layer_norm)
        has_sentence_head = cfg.sentence_head != "none"
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if has_sentence_head else None
        self.sentence_head = nn.Linear(cfg.hidden_size, 2) if has_sentence_head else None
        self.apply(self._init_weights)
        with torch.no_grad():
            self.embeddings.word.weight[cfg.vocab_size:].zero_()  # padded rows: never used as input

    def _init_weights(self, module):
        """BERT initialization: weights N(0, initializer_range), biases 0, LayerNorm 1 / 0."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, segment_ids=None, position_ids=None,
               cu_seqlens=None):
        """Final hidden states [B, S, H].  With segment_ids, positions restart at every document
        (``cu_seqlens``: its runs in the flattened slots, see pretrain.packing).  Positions count from 0
        here; RoBERTa's offset (config.position_offset) is added inside."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None and segment_ids is not None:
            position_ids = positions_from_segments(segment_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        if cu_seqlens is not None and segment_ids is not None and self._jagged(input_ids.device):
            keep = Jagged(cu_seqlens)
        else:
            keep = build_attention_mask(attention_mask, segment_ids)
        real = segment_ids > 0 if segment_ids is not None else attention_mask
        offset = position_offset(self.config)
        if offset:   # RoBERTa: positions from 2; padding slots at its padding index 1, as transformers has them
            position_ids = position_ids + offset
            if real is not None:
                position_ids = torch.where(real.bool(), position_ids, offset - 1)
        if not self.unpad or real is None:
            return self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), keep)
        tokens = Unpadded(real.bool())
        ids, types, positions = (tokens.unpad(t) for t in (input_ids, token_type_ids, position_ids))
        return tokens.pad(self.encoder(self.embeddings(ids, types, positions), keep, tokens))

    def _jagged(self, device: torch.device) -> bool:
        if self.jagged is not None:
            return self.jagged
        return device.type == "cuda" and self.kernels.attention == "sdpa"

    def mlm_logits(self, hidden, masked_lm_positions=None, packed: bool = False):
        """[B*P, vocab_size] logits at masked_lm_positions, or [B*S, vocab_size] at every position.
        ``packed``: masked_lm_positions [M] index the flattened [B*S] slots (pretrain.packing)."""
        if masked_lm_positions is None:
            selected = hidden.flatten(0, 1)
        elif packed:
            selected = hidden.flatten(0, 1).index_select(0, masked_lm_positions.reshape(-1))
        else:
            selected = gather_positions(hidden, masked_lm_positions)
        return self.mlm_head(selected, self.embeddings.word.weight)

    def sentence_logits(self, hidden, cls_positions=None):
        """[B, 2] NSP/SOP logits from the pooled [CLS] state (dense + tanh) of every row, or [N, 2] of
        every packed instance (``cls_positions`` [N] into the flattened [B*S] slots)."""
        cls = hidden[:, 0] if cls_positions is None else hidden.flatten(0, 1).index_select(0, cls_positions)
        return self.sentence_head(torch.tanh(self.pooler(cls)))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, masked_lm_positions=None,
                masked_lm_labels=None, sentence_labels=None, segment_ids=None,
                position_ids=None, cls_positions=None, cu_seqlens=None) -> PretrainOutput:
        """A padded batch (one instance per row) or a packed one (``cls_positions`` given: N instances in
        the rows, positions and labels per instance; see pretrain.packing): the same losses either way."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, segment_ids, position_ids, cu_seqlens)
        packed = cls_positions is not None
        out = PretrainOutput(mlm_logits=self.mlm_logits(hidden, masked_lm_positions, packed=packed))
        if self.sentence_head is not None:
            out.sentence_logits = self.sentence_logits(hidden, cls_positions)
        if masked_lm_labels is not None:
            out.mlm_loss, out.mlm_correct, out.mlm_count = loss_and_accuracy(out.mlm_logits, masked_lm_labels)
        if sentence_labels is not None and out.sentence_logits is not None:   # no head: NSP/SOP shards' labels unused
            out.sentence_loss, out.sentence_correct, out.sentence_count = loss_and_accuracy(
                out.sentence_logits, sentence_labels)
        losses = [x for x in (out.mlm_loss, out.sentence_loss) if x is not None]
        out.loss = sum(losses) if losses else None
        return out

    # ---- the consolidated weights format (vocabulary rows trimmed), see pretrain/weights.py ----
    def consolidated_state_dict(self) -> dict:
        """fp32 CPU copy of the state dict with the vocabulary padding removed."""
        return trim_vocab(self.state_dict(), self.config)

    def load_consolidated_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a consolidated state dict, re-padding the vocabulary rows with zeros."""
        return self.load_state_dict(pad_vocab(state_dict, self.config), strict=strict)


VOCAB_KEYS = ("embeddings.word.weight", "mlm_head.decoder_bias")


def trim_vocab(state_dict: dict, cfg: ModelConfig) -> dict:
    """fp32 CPU copies, vocabulary rows cut to vocab_size (accepts padded or already trimmed)."""
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().float().cpu()
        if key in VOCAB_KEYS:
            _check_vocab_rows(key, tensor, cfg, (cfg.vocab_size, padded_vocab_size(cfg)))
            tensor = tensor[:cfg.vocab_size]
        out[key] = tensor.clone()  # a clone, so torch.save never writes a whole padded storage
    return out


def pad_vocab(state_dict: dict, cfg: ModelConfig) -> dict:
    """Inverse of trim_vocab: zero rows appended up to padded_vocab_size(cfg)."""
    out = dict(state_dict)
    for key in VOCAB_KEYS:
        if key in out:
            tensor = out[key]
            _check_vocab_rows(key, tensor, cfg, (cfg.vocab_size, padded_vocab_size(cfg)))
            extra = padded_vocab_size(cfg) - tensor.size(0)
            out[key] = F.pad(tensor, (0, 0) * (tensor.ndim - 1) + (0, extra))
    return out


def _check_vocab_rows(key, tensor, cfg, allowed):
    if tensor.size(0) not in allowed:
        raise ValueError(f"{key}: has {tensor.size(0)} rows, expected model.vocab_size={cfg.vocab_size} "
                         f"(or {padded_vocab_size(cfg)} padded to pad_vocab_multiple={cfg.pad_vocab_multiple})")


def flops_per_sequence(cfg: ModelConfig, seq_len: int, masked_fraction: float = 0.15) -> float:
    """Training FLOPs (forward + backward = 3x forward) of one sequence of seq_len tokens.

    Per token: 72 L H^2 (QKV/out/FFN matmuls, with I = 4H) + 12 L H S (scores and context)
    + masked_fraction * 6 (H^2 + H V) (MLM head, computed only at masked positions).  The general
    form below uses the real I and, for ALBERT, E (head H*E + E*V, projection E*H); it equals
    the formula above for BERT.  Embedding lookups and the pooler are negligible and left out.
    """
    L, H, I, V, S = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, seq_len
    E = embedding_size(cfg)
    layers = 6 * L * (4 * H * H + 2 * H * I) + 12 * L * H * S
    head = masked_fraction * 6 * (H * E + E * V)
    projection = 6 * E * H if has_projection(cfg) else 0
    return float((layers + head + projection) * S)
