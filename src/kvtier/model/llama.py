"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameter names follow the HF checkpoints exactly, so a safetensors state dict loads as it is.

Two paths compute the same function. The reference path is plain torch (the CPU path and the
oracle). The fused path (``CausalLM.use_fused_kernels``, on CUDA) runs one projection for q/k/v and
one for gate/up, and Triton kernels for add+RMSNorm, rotary (in place, from a cos/sin table) and
SwiGLU: about 10 launches a layer instead of ~45, which is what a batch-1 decode step is made of.
Both carry the residual stream separately (``x`` and ``residual``), so their roundings agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from kvtier.model.attention import (
    AttentionBackend,
    AttentionMetadata,
    TorchReferenceAttention,
    TritonPagedAttention,
)
from kvtier.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary
from kvtier.model.registry import ModelConfig


@dataclass
class Rope:
    """Per-token cos/sin (reference path), or whole tables indexed by ``positions`` (fused path)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    tables: bool


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_weight: torch.Tensor | None = None  # fused path: q, k, v weights in one tensor
        self.qkv_bias: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None  # fp8 pool: [2, kv_heads] float32
        self.gemv = (0, False)  # fused path: (max rows, auto) of kernels/gemv.linear; 0 rows: F.linear

    def fuse(self) -> None:
        """One [q; k; v] weight; the three Linear weights become views of it (no extra memory)."""
        self.qkv_weight = _fuse_linears([self.q_proj, self.k_proj, self.v_proj], "weight")
        if self.q_proj.bias is not None:
            self.qkv_bias = _fuse_linears([self.q_proj, self.k_proj, self.v_proj], "bias")

    def _qkv(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t, hq, hk = x.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_weight is None:
            q = self.q_proj(x).view(t, hq, self.head_dim)
            k = self.k_proj(x).view(t, hk, self.head_dim)
            v = self.v_proj(x).view(t, hk, self.head_dim)
        else:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(t, hq + 2 * hk, self.head_dim)
            q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if not rope.tables:
            return apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin), v
        from kvtier.model.kernels.elementwise import rotary_

        rotary_(q, rope.positions, rope.cos, rope.sin)
        rotary_(k, rope.positions, rope.cos, rope.sin)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        if self.qkv_weight is not None and self.q_norm is None:
            return self._fused_forward(x, rope, kv_layer, meta, cast(TritonPagedAttention, backend))
        q, k, v = self._qkv(x, rope)
        o = backend.forward(q, k, v, kv_layer, meta, self.scale, self.sliding_window, self.kv_scales)
        return self.o_proj(o.reshape(x.shape[0], self.num_heads * self.head_dim))

    def _fused_forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        backend: TritonPagedAttention,
    ) -> torch.Tensor:
        """Projection, then one kernel for rotary + the K/V write, then attention: 3 launches."""
        from kvtier.model.kernels.paged_decode import rotary_write_kv

        t, hq, hk = x.shape[0], self.num_heads, self.num_kv_heads
        assert self.qkv_weight is not None  # only called on the fused path
        qkv = _linear(x, self.qkv_weight, self.qkv_bias, self.gemv).view(t, hq + 2 * hk, self.head_dim)
        rotary_write_kv(
            qkv, hq, rope.positions, rope.cos, rope.sin, kv_layer, meta.slot_mapping, self.kv_scales
        )
        o = backend.attend(qkv[:, :hq], kv_layer, meta, self.scale, self.sliding_window, self.kv_scales)
        return _linear(o.reshape(t, hq * self.head_dim), self.o_proj.weight, self.o_proj.bias, self.gemv)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gemv: tuple[int, bool]) -> torch.Tensor:
    """The fused path's projections: the small-M kernel where the model enabled it."""
    if gemv[0] == 0:
        return F.linear(x, w, b)
    from kvtier.model.kernels.gemv import linear

    return linear(x, w, b, gemv[0], gemv[1])


def _fuse_linears(linears: list[nn.Linear], name: str) -> torch.Tensor:
    parts = [getattr(lin, name) for lin in linears]
    fused = torch.cat([p.data for p in parts])
    at = 0
    for p in parts:
        p.data = fused[at : at + p.shape[0]]
        at += p.shape[0]
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_up_weight: torch.Tensor | None = None  # fused path
        self.gate_up_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        self.self_attn.fuse()
        self.gate_up_weight = _fuse_linears([self.mlp.gate_proj, self.mlp.up_proj], "weight")
        if self.mlp.gate_proj.bias is not None:
            self.gate_up_bias = _fuse_linears([self.mlp.gate_proj, self.mlp.up_proj], "bias")

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (x, residual); the layer's output stream is their sum."""
        if self.gate_up_weight is None:
            residual = x if residual is None else x + residual
            a = self.self_attn(self.input_layernorm(residual), rope, kv_layer, meta, backend)
            residual = a + residual
            return self.mlp(self.post_attention_layernorm(residual)), residual
        from kvtier.model.kernels.elementwise import add_rmsnorm, silu_mul

        if residual is None:
            residual = x
            h = add_rmsnorm(x, None, self.input_layernorm.weight, self.input_layernorm.eps)
        else:
            h = add_rmsnorm(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        a = self.self_attn(h, rope, kv_layer, meta, backend)
        norm = self.post_attention_layernorm
        h = add_rmsnorm(a, residual, norm.weight, norm.eps)  # residual += a, in place
        m = self.self_attn.gemv
        gate_up = _linear(h, self.gate_up_weight, self.gate_up_bias, m)
        down = self.mlp.down_proj
        return _linear(silu_mul(gate_up), down.weight, down.bias, m), residual


class DecoderBody(nn.Module):
    """``model.*`` in HF checkpoints: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Given its weight, Embedding skips its normal_ init: on the meta device (where models are
        # built) that op's Python meta kernel imported sympy & co., 1.6 s of every start.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """(token ids, positions, paged KV) -> logits. No scheduling, no caching policy."""

    def __init__(self, cfg: ModelConfig, hf_config: Any) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(hf_config, cfg.head_dim)
        self.attention_backend: AttentionBackend = TorchReferenceAttention()
        self.fused = False
        self.gemv_mode, self.gemv_max_m = "auto", 8  # the fused path's small-M projections
        self.gemv = (0, False)  # what they resolved to on this device: see use_fused_kernels

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def use_fused_kernels(self, gemv: str | None = None, gemv_max_m: int | None = None) -> None:
        """Switch to the fused path (needs the Triton kernels on the model's device). Irreversible:
        the projection weights become views of their fused tensors. ``gemv`` (auto|on|off: the
        ``decode_gemv`` setting) and ``gemv_max_m`` pick the small-M projection kernel for batches
        of at most that many rows (None keeps the current choice; calling again changes only it)."""
        if not self.fused:
            for layer in self.model.layers:
                cast(DecoderLayer, layer).fuse()
            self.fused = True
        from kvtier.model.kernels import triton_installed

        self.gemv_mode = gemv or self.gemv_mode
        self.gemv_max_m = self.gemv_max_m if gemv_max_m is None else gemv_max_m
        self.gemv = (0, False)
        if triton_installed():
            from kvtier.model.kernels.gemv import resolve

            self.gemv = resolve(self.gemv_mode, self.lm_head.weight.device, self.gemv_max_m)
        for layer in self.model.layers:
            cast(DecoderLayer, layer).self_attn.gemv = self.gemv

    def set_kv_scales(self, scales: torch.Tensor | None) -> None:
        """fp8 pool: [num_layers, 2, kv_heads] float32 dequantisation scales (None: no scaling)."""
        for i, layer in enumerate(self.model.layers):
            cast(DecoderLayer, layer).self_attn.kv_scales = None if scales is None else scales[i]

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        if self.fused:
            cos, sin = self.rotary.table(self.config.max_position_embeddings, dtype)
            return Rope(cos, sin, positions, tables=True)
        cos, sin = self.rotary(positions, dtype)
        return Rope(cos, sin, positions, tables=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        logits_indices: torch.Tensor | None = None,
        layer_ready: Sequence[torch.cuda.Event] | None = None,
    ) -> torch.Tensor:
        """Returns float32 logits for the tokens at ``logits_indices`` (all tokens when None).

        Computing the vocabulary projection only where a token is sampled saves a large matmul per
        prefill chunk. ``layer_ready``: one CUDA event per layer, recorded once that layer's KV
        has arrived in ``kv_cache`` (a load copied layer by layer): layer i waits for event i.
        """
        x = self.model.embed_tokens(input_ids)
        rope = self._rope(positions, x.dtype)
        residual: torch.Tensor | None = None
        stream = torch.cuda.current_stream(x.device) if layer_ready is not None else None
        for i, layer in enumerate(self.model.layers):
            if stream is not None and layer_ready is not None:
                stream.wait_event(layer_ready[i])
            x, residual = layer(x, residual, rope, kv_cache[i], meta, self.attention_backend)
        assert residual is not None  # a model has at least one layer
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        norm = self.model.norm
        if self.fused:
            from kvtier.model.kernels.elementwise import add_rmsnorm

            h = add_rmsnorm(x, residual, norm.weight, norm.eps)
            return _linear(h, self.lm_head.weight, self.lm_head.bias, self.gemv).float()
        return self.lm_head(norm(x + residual)).float()
