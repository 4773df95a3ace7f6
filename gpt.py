"""GPT: the transformer language model every later script trains, finetunes, caches or quantizes.

What you learn here: causal self-attention, the pre-norm transformer block, weight tying,
GPT-2's initialisation, and the modern (Llama-style) switches: rotary positions, RMSNorm,
SwiGLU and grouped-query attention. Generation prefills the prompts once, then decodes one
token at a time from a KV cache. The key equation:
    attention(Q, K, V) = softmax(Q K^T / sqrt(hs) + mask) V

How to run:
    python gpt.py                         # offline demo: a small random model
    python gpt.py --init_from=gpt2        # downloads GPT-2 small (500 MB) and runs it once
    python gpt.py --init_from=HuggingFaceTB/SmolLM2-135M --device=cuda   # or Llama, Qwen

Depends on nothing of ours. After the model, one banner holds the plumbing the later
scripts share: flags, device and precision, downloads, checkpoints, open models in and
out of Hugging Face's files, batches of examples. Shapes: B batch, T time, C channels,
V vocab, nh heads, nkv key/value heads, hs head size.
References: Attention Is All You Need (1706.03762); GPT-2 (OpenAI 2019); RoFormer
(2104.09864); RMSNorm (1910.07467); GLU variants (2002.05202); GQA (2305.13245).
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclasses.dataclass
class GPTConfig:
    """The model's shape. Defaults are GPT-2 small (124M)."""
    vocab_size: int = 50257  # 50,000 BPE merges + 256 bytes + <|endoftext|>
    block_size: int = 1024   # longest sequence the model sees
    n_layer: int = 12        # transformer blocks
    n_head: int = 12         # attention (query) heads
    n_embd: int = 768        # channels C of the residual stream
    dropout: float = 0.0     # 0.0 for pretraining small models, 0.1 for finetuning
    bias: bool = True        # biases in Linear and LayerNorm, as GPT-2 has
    rope: bool = False       # rotary position embeddings instead of a learned position table
    rmsnorm: bool = False    # RMSNorm instead of LayerNorm
    swiglu: bool = False     # SwiGLU MLP instead of GELU
    n_kv_head: int = 0       # key/value heads for grouped-query attention; 0 means n_head
    # what open models (Llama, SmolLM2, Qwen) need; the defaults change nothing above
    rope_theta: float = 10000.0  # rope's base: 500,000 in Llama 3, 1,000,000 in Qwen
    rope_scaling: tuple = ()   # Llama 3.1+: (factor, low_freq_factor, high_freq_factor, old_len)
    head_size: int = 0         # channels per head; 0 means n_embd // n_head (Qwen3 sets it)
    mlp_hidden: int = 0        # the MLP's width; 0 means 4 n_embd (SwiGLU: 8/3 n_embd)
    qkv_bias: bool = False     # biases on q, k and v even without bias (Qwen2)
    qk_norm: bool = False      # RMSNorm on each head's q and k before rope (Qwen3)
    tie_embeddings: bool = True  # the output layer is the token embedding
    norm_eps: float = 1e-5     # the norms' epsilon

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be at least 1")
        kv = self.n_kv_head or self.n_head
        if kv < 0 or self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={kv}; use a "
                             f"divisor (1 = multi-query, n_head = plain attention)")
        if self.rope and (self.head_size or self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, not "
                             f"{self.head_size or self.n_embd // self.n_head}")
        if not self.head_size and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias."""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

def make_norm(config):
    if config.rmsnorm:
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)

def rope_tables(hs, length, base=10000.0, scaling=()):
    # rope turns each channel pair (i, i + hs/2) by the angle pos * base^(-2i/hs)
    freqs = 1.0 / base ** (torch.arange(0, hs, 2).float() / hs)    # (hs/2,)
    if scaling:  # Llama 3.1: slow pairs (long wavelengths) turn factor x slower, fast ones
        factor, low, high, old_len = scaling  # as before, and a blend in between
        blend = (old_len * freqs / (2 * math.pi) - low) / (high - low)  # old_len / wavelength
        freqs = torch.lerp(freqs / factor, freqs, blend.clamp(0, 1))
    angles = torch.outer(torch.arange(length).float(), freqs)      # (T, hs/2)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs/2), or (B, T, hs/2) for per-row positions
    cos = cos.unsqueeze(-3)  # (1 or B, 1, T, hs/2): the same angles for every head
    sin = sin.unsqueeze(-3)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)

def decode_by_hand(q):
    # a decode step (one query) of 8+ rows in bfloat16 on a CPU: there attention written
    # out beats torch's fused kernel (a 64-row GRPO round sampled 1.38x faster)
    return q.size(2) == 1 and q.size(0) >= 8 and q.dtype == torch.bfloat16 and q.is_cpu

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.hs = config.head_size or config.n_embd // config.n_head
        # one matmul makes q (nh heads), k and v (nkv heads each): GPT-2's c_attn
        qkv_size = (self.n_head + 2 * self.n_kv_head) * self.hs
        self.c_attn = nn.Linear(config.n_embd, qkv_size, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(self.n_head * self.hs, config.n_embd, bias=config.bias)
        if config.qk_norm:  # each head's q and k scaled to a steady size (Qwen3)
            self.q_norm = RMSNorm(self.hs, config.norm_eps)
            self.k_norm = RMSNorm(self.hs, config.norm_eps)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x, rope=None):
        """x (B, T, C) -> q (B, nh, T, hs), k and v (B, nkv, T, hs), rotated by rope."""
        B, T, C = x.shape
        kv_size = self.n_kv_head * self.hs
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, kv_size, kv_size], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if hasattr(self, "q_norm"):
            q = self.q_norm(q)
            k = self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        return q, k, v

    def attend(self, q, k, v, mask=None):
        """softmax(q k^T / sqrt(hs)) v: causal, or by a boolean mask (True = may attend)."""
        B, nh, T, hs = q.shape
        if mask is not None and decode_by_hand(q):  # one query per row: two small matmuls
            q = q.reshape(B, self.n_kv_head, nh // self.n_kv_head, hs)  # heads sharing a k, v
            # k @ q^T reads the cache as it lies (q @ k^T would copy it transposed first)
            att = (k @ q.transpose(-2, -1)).transpose(-2, -1) * hs ** -0.5  # (B, nkv, nh/nkv, L)
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        else:
            # grouped-query: each k/v head serves nh/nkv query heads; enable_gqa pairs
            # them without copying k and v
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head)
        y = y.reshape(B, nh, T, hs).transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward(self, x, rope=None, cache=None, mask=None):
        q, k, v = self.qkv(x, rope)
        if cache is not None:  # append the new keys and values; attend over every cached position
            k, v = cache.update(k, v)                              # (B, nkv, L + T, hs)
        return self.attend(q, k, v, mask)

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.swiglu
        hidden = config.mlp_hidden or 4 * config.n_embd
        if config.swiglu:  # three matrices, so 2/3 of the width keeps the parameter count
            hidden = config.mlp_hidden or 32 * math.ceil(8 * config.n_embd / 3 / 32)
            self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)              # (B, T, hidden)
        else:  # GPT-2 used GELU's tanh approximation
            h = F.gelu(self.c_fc(x), approximate="tanh")           # (B, T, hidden)
        return self.dropout(self.c_proj(h))

class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))

# -----------------------------------------------------------------------------
# the KV cache and sampling, for fast generation

class KVCache:
    """One layer's keys and values: update(k, v) appends and returns all so far."""
    def __init__(self, max_len):
        self.max_len = max_len
        self.k = self.v = None  # (B, nkv, max_len, hs) each, made by the first write
        self.length = 0  # filled positions, the same in every row because prompts are left-padded

    def update(self, k, v):
        B, nkv, T, hs = k.shape
        if self.k is None:  # only the nkv key/value heads are kept: GQA shrinks the cache nh/nkv x
            self.k = k.new_zeros(B, nkv, self.max_len, hs)
            self.v = torch.zeros_like(self.k)
        L = self.length
        assert L + T <= self.max_len, f"cache overflow: {L} + {T} > {self.max_len} positions"
        # write in place (no allocation), then return views of the filled part:
        # attention reads L + T positions, not max_len
        self.k[:, :, L:L + T] = k
        self.v[:, :, L:L + T] = v
        self.length = L + T
        return self.k[:, :, :L + T], self.v[:, :, :L + T]          # (B, nkv, L + T, hs)

def top_p_filter(probs, p):
    """Keep the fewest most likely tokens whose probability reaches p, renormalised:
    top_p_filter([[0.5, 0.3, 0.15, 0.05]], 0.8) -> [[0.625, 0.375, 0, 0]]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))     # probability of the tokens above
    # drop a token when the tokens above it already reach p (so the first always stays)
    sorted_probs = sorted_probs.masked_fill(before >= p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)

def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next ids (B,) from logits (B, V): argmax at temperature 0, else a draw from the
    tempered softmax cut to the top_k tokens (0 = all), then the top_p nucleus (1 = all)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]

# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config)))
        if not config.rope:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # not parameters, and not saved: they are recomputed from the config
            self.make_rope()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # the ids generate may pick: a script lowers it to its tokenizer's size, so no
        # padding row (GPT-2's 50,304, Qwen's) is sampled, an id no tokenizer decodes
        self.vocab_used = config.vocab_size
        if config.tie_embeddings:  # the output layer is the token embedding (V*C fewer)
            self.lm_head.weight = self.transformer.wte.weight
        # GPT-2 init: N(0, 0.02); the projections into the residual stream shrink by
        # 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def make_rope(self):
        cfg = self.config
        cos, sin = rope_tables(cfg.head_size or cfg.n_embd // cfg.n_head, cfg.block_size,
                               cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, pos):
        """Token (+ position) embeddings, and rope tables, at positions pos (T,) or (B, T)."""
        x = self.transformer.wte(idx)                              # (B, T, C)
        if self.config.rope:
            return self.transformer.drop(x), (self.rope_cos[pos], self.rope_sin[pos])
        return self.transformer.drop(x + self.transformer.wpe(pos)), None

    def hidden(self, idx):
        """ids idx (B, T) -> the final hidden states (B, T, C), for lm_head or a classifier."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"cannot forward {T} tokens: block_size is only "
                             f"{self.config.block_size}; crop the input to its last tokens")
        x, rope = self.embed(idx, torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x, rope)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """ids idx (B, T) -> logits (B, T, V), and the mean loss over targets != -100."""
        logits = self.lm_head(self.hidden(idx))                    # (B, T, V)
        loss = None
        if targets is not None:  # cross_entropy skips targets of -100 (its ignore_index)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    def num_params(self):
        """Parameter count, the tied embedding/head once: 124,439,808 for GPT-2 small."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        # 6 FLOPs per weight per token (2 forward, 4 backward) plus attention's scores
        # and mixing; the position table does no multiplications, so it is left out
        cfg = self.config
        n = self.num_params()
        if not cfg.rope:
            n -= self.transformer.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilisation: FLOP/s over peak_flops (312e12: an A100 in bf16)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW that decays matrices and embeddings but not biases and norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused kernel updates every tensor in one pass (CUDA, CPUs); MPS keeps the loop
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type in ("cuda", "cpu"))

    # -------------------------------------------------------------------------
    # generation: prefill the prompts once, then one cached decode step per token

    def forward_cached(self, idx, cache, pos, mask):
        """New tokens idx (B, T) at positions pos (B, T) attend to the cache (a KVCache a
        layer), which they join, and to themselves where mask (B, 1, T, L + T) is True.
        -> the last position's logits (B, V) in float32."""
        x, rope = self.embed(idx, pos)                             # (B, T, C)
        for block, layer_cache in zip(self.transformer.h, cache):
            x = block(x, rope, layer_cache, mask)
        # only the last position picks the next token: skip T - 1 rows of the lm_head
        return self.lm_head(self.transformer.ln_f(x[:, -1])).float()  # (B, V)

    def prefill(self, idx, pad, cache):
        """Left-padded prompts idx (B, T) in one pass into an empty cache: row b starts with
        pad[b] pads; its real tokens get positions 0, 1, ... and never see a pad key."""
        t = torch.arange(idx.size(1), device=idx.device)
        pos = (t - pad[:, None]).clamp(min=0)                      # (B, T)
        real = t >= pad[:, None]                                   # (B, T) True at real tokens
        causal = t[None, :] <= t[:, None]                          # (T, T) key index <= query index
        # a pad query sees no real key: seeing itself keeps its softmax finite (not NaN)
        mask = (causal & real[:, None, :]) | (t[None, :] == t[:, None])  # (B, T, T)
        return self.forward_cached(idx, cache, pos, mask[:, None])

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eot_id=-1,
                 generator=None, use_cache=True, on_token=None):
        """Continue prompts (lists of ids, any lengths) in one batch -> each row's new ids,
        cut before its first eot_id (an id, or a list of them). temperature=0 is greedy;
        generator seeds the draws; on_token(step, ids (B,), logits (B, V)) sees each choice.
        use_cache=False redoes the whole history every step: the slow reference. Past
        block_size the window slides: the last block_size // 2 tokens are prefilled again."""
        block_size = self.config.block_size
        device = self.lm_head.weight.device
        keep = max(1, block_size // 2)
        prompts = [p if len(p) <= block_size else p[-keep:] for p in prompts]
        if not all(prompts):
            raise ValueError("an empty prompt has nothing to continue; start it with <|endoftext|>")
        stops = {eot_id} if isinstance(eot_id, int) else set(eot_id)  # an id, or several
        B = len(prompts)
        T = max(len(p) for p in prompts)
        # left padding lines the rows up: every row writes its next token in one slot
        ctx = torch.zeros(B, block_size, dtype=torch.long, device=device)  # the token in each slot
        ctx[:, :T] = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)
        pad = torch.tensor([T - len(p) for p in prompts], device=device)   # (B,)
        # room for the prompt and each fed-back token, up to block_size (then it slides)
        room = min(block_size, T + max(max_new_tokens, 1) - 1)
        cache = [KVCache(room) for _ in self.transformer.h]
        logits = self.prefill(ctx[:, :T], pad, cache)
        length = T  # filled slots
        out = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            next_id = sample(logits[:, :self.vocab_used], temperature, top_k, top_p, generator)
            if on_token is not None:
                on_token(step, next_id, logits)
            for b, i in enumerate(next_id.tolist()):
                done[b] = done[b] or i in stops
                if not done[b]:
                    out[b].append(i)
            if all(done) or step == max_new_tokens - 1:
                break
            if length == block_size:  # full: keep the history's last `keep` tokens, prefill again
                ctx[:, :keep] = torch.cat([ctx[:, length - keep + 1:], next_id[:, None]], dim=1)
                pad = (pad - (length + 1 - keep)).clamp(min=0)
                length = keep
                cache = [KVCache(block_size) for _ in cache]
                logits = self.prefill(ctx[:, :length], pad, cache)
            elif use_cache:  # decode: a token per row at pos length - pad, over length + 1 slots
                ctx[:, length] = next_id
                pos = (length - pad)[:, None]                      # (B, 1)
                real = torch.arange(length + 1, device=device) >= pad[:, None]
                logits = self.forward_cached(next_id[:, None], cache, pos, real[:, None, None])
                length += 1
            else:  # the reference: the whole history again, into a fresh cache that is then dropped
                ctx[:, length] = next_id
                length += 1
                logits = self.prefill(ctx[:, :length], pad, [KVCache(length) for _ in cache])
        return out

# -----------------------------------------------------------------------------
# helpers shared by the scripts: plumbing, not the lesson

# flags and the entry point

class UserError(ValueError):
    """A user's mistake (a bad flag, a missing file) and its fix: run() prints one line."""

def parse_args(config_class, argv=None):
    """Fill a config dataclass from `--name=value` flags, one per field, typed by its
    default: parse_args(TrainConfig, ["--n_layer=4"]) -> TrainConfig(n_layer=4, ...).
    -h lists each flag with the comment beside its field and its default."""
    def to_bool(text):  # type=bool would turn "False" into True
        if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    comments = dict(re.findall(r"\n\s+(\w+): \w+ = .*?  # (.*)", inspect.getsource(config_class)))
    parser = argparse.ArgumentParser(description=config_class.__doc__, allow_abbrev=False)
    for field in dataclasses.fields(config_class):
        kind = type(field.default)
        extra = dict(type=kind)
        if kind is bool:  # a bare flag (`--bench`) means True
            extra = dict(type=to_bool, nargs="?", const=True)
        help = comments.get(field.name, "").replace("%", "%%")  # argparse formats with %
        parser.add_argument(f"--{field.name}", default=field.default, metavar=kind.__name__,
                            help=f"{help} (default: {field.default!r})", **extra)
    return config_class(**vars(parser.parse_args(argv)))

def run(main, config_class):
    """Every script's entry point: main(the flags' config). A UserError ends the run as
    one line on stderr with exit status 1; any other exception keeps its traceback."""
    try:
        return main(parse_args(config_class))
    except UserError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {e}") from None

def format_config(cfg, per_line=3):
    """The config as aligned `name = value` columns, for the top of a run's log."""
    items = [f"{k} = {v!r}" for k, v in dataclasses.asdict(cfg).items()]
    width = max(map(len, items)) + 2
    rows = [items[i:i + per_line] for i in range(0, len(items), per_line)]
    return "\n".join("  " + "".join(x.ljust(width) for x in row).rstrip() for row in rows)

def get_lr(step, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warmup to learning_rate, a cosine down to min_lr at decay_iters, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)

def progress_bar(step, total, pace):
    """'[#####               ] eta 2m46s' at step of total; pace: mean seconds a step."""
    eta = divmod(round(pace * (total - step)), 60)
    return f"[{'#' * (20 * step // max(total, 1)):<20}] eta {eta[0]}m{eta[1]:02d}s"

# device and precision

def refuse_torchrun(script):
    """Single-process scripts call this first: torchrun would start copies of the run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{script} runs in one process: start it with python, not torchrun")

def pick_device(device="auto"):
    """'auto' -> cuda if available, then mps (Apple GPUs), then cpu; others are checked."""
    mps = torch.backends.mps.is_available()
    available = {"cuda": torch.cuda.is_available(), "mps": mps, "cpu": True}
    if device == "auto":
        return next(kind for kind, ok in available.items() if ok)
    kind, colon, index = device.partition(":")
    ok = available.get(kind, False)
    if colon:  # only cuda:N names a device by number
        cuda_index = kind == "cuda" and index.isdigit()
        ok = ok and cuda_index and int(index) < torch.cuda.device_count()
    if not ok:
        raise UserError(f"--device={device} is not available; "
                        f"use auto, cpu, cuda, cuda:N or mps")
    return device

def choose_precision(device_type, dtype="auto", bf16=False):
    """(dtype, reason) for a device kind with or without native bf16 ('auto': the table
    below). A pure function, so every device kind is tested."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={dtype} is not one of auto, float32, bfloat16, float16")
    if dtype == "auto":  # (device kind, native bf16) -> (dtype, reason)
        auto = {("cuda", True): ("bfloat16", "CUDA GPU with bf16"),
                ("cuda", False): ("float16", "CUDA GPU without bf16"),
                ("cpu", True): ("bfloat16", "CPU with native bf16 (AVX512-BF16/AMX)")}
        fallback = ("float32", f"{device_type} without fast low precision")
        return auto.get((device_type, bool(bf16)), fallback)
    if dtype != "float32" and device_type == "mps":  # MPS autocast varies by version
        raise UserError(f"--dtype={dtype} on mps: MPS runs in float32 here; "
                        f"pass --dtype=float32")
    if dtype == "float16" and device_type != "cuda":
        raise UserError("--dtype=float16 needs CUDA (its GradScaler is CUDA-only); "
                        "pass bfloat16 or float32")
    if dtype == "bfloat16" and device_type == "cuda" and not bf16:
        raise UserError("--dtype=bfloat16: this GPU has no bf16; pass --dtype=float16")
    return dtype, "asked for"

def setup_precision(device, dtype="auto"):
    """(dtype, reason, autocast context) for a device such as 'cuda:1': choose_precision
    with this machine's bf16 support; the context is a no-op in float32."""
    device_type = device.split(":")[0]
    # native bf16: CUDA compute capability 8.0+ (older GPUs only emulate it, slowly), or a
    # CPU with AVX512-BF16 or AMX, which Linux lists in /proc/cpuinfo
    bf16 = False
    if device_type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device_type == "cpu" and os.path.exists("/proc/cpuinfo"):
        bf16 = bool(re.search(r"avx512_bf16|amx_bf16", open("/proc/cpuinfo").read()))
    dtype, reason = choose_precision(device_type, dtype, bf16)
    if dtype == "float32":
        return dtype, reason, contextlib.nullcontext()
    return dtype, reason, torch.autocast(device_type, getattr(torch, dtype))

# downloads and checkpoints

def download(url, path):
    """Fetch url to path once, streamed with progress, resuming path.part; then rename."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={done}-"}
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_TOKEN") and url.startswith(hub + "/"):  # for gated models; the
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"  # Hub's host alone
    try:
        with requests.get(url, stream=True, timeout=30, headers=headers) as r:
            if r.status_code != 416:  # 416: nothing is left to fetch, .part is complete
                r.raise_for_status()
                if r.status_code != 206:  # 200: the server ignored Range, start over
                    done = 0
                total = done + int(r.headers.get("content-length", 0))
                with open(part, "ab" if done else "wb") as f:
                    for block in r.iter_content(1 << 20):
                        done += f.write(block)
                        print(f"\r{url}: {done / 1e6:.1f}/{total / 1e6:.1f} MB", end="",
                              file=sys.stderr)
                print(file=sys.stderr)
    except requests.RequestException as e:
        raise UserError(f"could not download {url} ({type(e).__name__}); fetch it yourself "
                        f"and save it as {path} (a rerun resumes from {part})") from None
    os.replace(part, path)  # atomic: path is either absent or complete
    return path

CHECKPOINT_VERSION = 1

def save_checkpoint(path, model, weights=None, **extra):
    """{version, model_config, model: weights or model.state_dict(), **extra}, atomically."""
    ckpt = dict(version=CHECKPOINT_VERSION, model_config=dataclasses.asdict(model.config),
                model=model.state_dict() if weights is None else weights, **extra)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path

def save_json(path, obj):
    """Write obj as indented JSON, atomically as save_checkpoint does (a run's eval.json)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)

def load_checkpoint(path, device="cpu", verbose=True):
    """A checkpoint from save_checkpoint -> (model on device, ckpt), saying which (verbose)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train one with `python train.py` "
                        f"(it writes out/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a bad file raises many kinds (OSError, UnpicklingError, ...)
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e)[:120]}); it may be truncated: retrain with train.py") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path} is not a buildllm checkpoint (no model_config/model); "
                        f"write it with train.py")
    if "quantized" in ckpt:  # integer tensors that only quantize.py's layers hold
        raise UserError(f"{path} is a quantized checkpoint; load it with "
                        f"`python quantize.py --load={path}`")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} is version {ckpt.get('version')}, not "
                        f"{CHECKPOINT_VERSION}: retrain with train.py")
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:  # unknown config fields, or misfit tensors
        raise UserError(f"{path} does not fit this gpt.py ({str(e)[:150]}); "
                        f"retrain with train.py") from None
    if verbose:
        dataset = ckpt.get("train_config", {}).get("dataset", "?")
        print(f"checkpoint {path}: step {ckpt.get('step', '?')}, dataset {dataset}, "
              f"val loss {ckpt.get('val_loss', float('nan')):.4f}")
    return model.to(device), ckpt

# open models from Hugging Face (GPT-2, Llama, SmolLM2, Qwen): safetensors in and out

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SHARDS = "model.safetensors.index.json"  # a big model's list of its shard files
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

def safetensors_index(path):
    """Where each tensor of a .safetensors file lies -> {name: (path, dtype, shape, start,
    nbytes)}. Format: an 8-byte little-endian length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the raw data. Every entry is checked; nothing is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else size
        if n > size - 8:
            raise UserError(f"{path}: header length {n} runs past the end of the "
                            f"{size}-byte file (truncated, or not a .safetensors file?)")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)  # Attribute/TypeError unless a JSON object
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
            raise UserError(f"{path}: the safetensors header is not a valid JSON object "
                            f"({e})") from None
    data_size = size - 8 - n
    index = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = info["shape"]
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has a malformed header entry or "
                            f"an unknown dtype: {str(info)[:100]}") from None
        numbers = [*shape, begin, end] if isinstance(shape, list) else [-1]
        counts = all(isinstance(d, int) and d >= 0 for d in numbers)
        nbytes = math.prod(shape) * dtype.itemsize if counts else -1  # -1 fits nothing
        if nbytes < 0 or end > data_size or end - begin != nbytes:
            raise UserError(f"{path}: tensor {name}'s shape {shape} and offsets [{begin}, "
                            f"{end}] do not fit together in {data_size} bytes of data")
        index[name] = (path, dtype, shape, 8 + n + begin, nbytes)
    return index

def read_tensor(entry):
    """One tensor from safetensors_index's entry: only its own bytes are read."""
    path, dtype, shape, start, nbytes = entry
    if not nbytes:  # frombuffer cannot take 0 bytes
        return torch.empty(shape, dtype=dtype)
    with open(path, "rb") as f:
        f.seek(start)
        raw = bytearray(f.read(nbytes))
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)

def write_safetensors(path, tensors):
    """{name: tensor} -> a .safetensors file, written to a temporary name and renamed."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = dict(dtype=names[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + nbytes])
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    os.replace(path + ".tmp", path)

# Hugging Face's classes -> our family and the switches they need. One name map per family:
# GPT-2's names are ours (its Conv1D weights transposed); Llama's map each of our parameters
# to the tensors it is made of ({} is the layer): c_attn is q, k and v stacked.
ARCHITECTURES = {"GPT2LMHeadModel": ("gpt2", {}), "LlamaForCausalLM": ("llama", {}),
                 "Qwen2ForCausalLM": ("llama", {"qkv_bias": True}),
                 "Qwen3ForCausalLM": ("llama", {"qk_norm": True})}
LAYER = "model.layers.{}."
LLAMA_NAMES = {
    "transformer.wte.weight": ["model.embed_tokens.weight"],
    "transformer.h.{}.ln_1.weight": [LAYER + "input_layernorm.weight"],
    "transformer.h.{}.attn.c_attn.weight": [LAYER + f"self_attn.{x}_proj.weight" for x in "qkv"],
    "transformer.h.{}.attn.c_attn.bias": [LAYER + f"self_attn.{x}_proj.bias" for x in "qkv"],
    "transformer.h.{}.attn.q_norm.weight": [LAYER + "self_attn.q_norm.weight"],
    "transformer.h.{}.attn.k_norm.weight": [LAYER + "self_attn.k_norm.weight"],
    "transformer.h.{}.attn.c_proj.weight": [LAYER + "self_attn.o_proj.weight"],
    "transformer.h.{}.ln_2.weight": [LAYER + "post_attention_layernorm.weight"],
    "transformer.h.{}.mlp.c_gate.weight": [LAYER + "mlp.gate_proj.weight"],
    "transformer.h.{}.mlp.c_fc.weight": [LAYER + "mlp.up_proj.weight"],
    "transformer.h.{}.mlp.c_proj.weight": [LAYER + "mlp.down_proj.weight"],
    "transformer.ln_f.weight": ["model.norm.weight"],
    "lm_head.weight": ["lm_head.weight"]}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# config.json's keys -> GPTConfig's fields, read and written alike (the first five are
# required), and each family's fixed switches and defaults
CONFIG_KEYS = {
    "gpt2": {"vocab_size": "vocab_size", "n_positions": "block_size", "n_layer": "n_layer",
             "n_head": "n_head", "n_embd": "n_embd", "n_inner": "mlp_hidden",
             "layer_norm_epsilon": "norm_eps"},
    "llama": {"vocab_size": "vocab_size", "max_position_embeddings": "block_size",
              "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "hidden_size": "n_embd", "intermediate_size": "mlp_hidden",
              "num_key_value_heads": "n_kv_head", "head_dim": "head_size",
              "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps",
              "tie_word_embeddings": "tie_embeddings"}}
FAMILY = {"gpt2": dict(bias=True),
          "llama": dict(bias=False, rope=True, rmsnorm=True, swiglu=True, norm_eps=1e-6,
                        tie_embeddings=False)}
ROPE_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

def hf_names(family, name):
    """Our parameter name -> the Hugging Face tensors it is made of, in order."""
    if family == "gpt2":
        return [name]
    layer = re.search(r"\.h\.(\d+)\.", name)
    key = re.sub(r"\.h\.\d+\.", ".h.{}.", name)
    return [hf.format(layer[1]) for hf in LLAMA_NAMES[key]] if layer else LLAMA_NAMES[key]

def hf_config(hf, family, switches):
    """A config.json -> GPTConfig; Llama 3's rope scaling is the one scaling read."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3") or hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"rope scaling {kind!r} or activation {hf.get('hidden_act')!r} is not "
                        f"supported; only Llama 3's scaling and SiLU are")
    fields = {ours: hf[k] for i, (k, ours) in enumerate(CONFIG_KEYS[family].items())
              if i < 5 or hf.get(k) is not None}
    scaling = tuple(rope[k] for k in ROPE_SCALING) if kind == "llama3" else ()
    if "rope_theta" in rope:  # newer files keep it there
        fields.setdefault("rope_theta", rope["rope_theta"])
    return GPTConfig(**{**FAMILY[family], **fields, **switches}, rope_scaling=scaling)

def read_json(path):
    """The JSON object in path; anything else is a UserError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); download it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds no JSON object; download it again")
    return obj

def hub_download(name, data_dir):
    """A Hub model's files, once, into data/<name>/: config.json, the tokenizer's and the
    weights (model.safetensors, or the shards model.safetensors.index.json lists).
    HF_TOKEN authorizes gated models (Llama); HF_ENDPOINT names a mirror."""
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}/{name}/resolve/main/"
    folder = os.path.join(data_dir, name)
    files = ["config.json"] + ["tokenizer.json", "tokenizer_config.json"] * (name not in GPT2_NAMES)
    for file in files:  # GPT-2's tokenizer is bpe.py's own (encoder.json, vocab.bpe)
        download(url + file, os.path.join(folder, file))
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        try:  # big models come in shards, which an index lists
            index = read_json(download(url + SHARDS, os.path.join(folder, SHARDS)))
            shards = sorted(set(index.get("weight_map", {}).values()))
        except UserError:  # no index: one file
            shards = ["model.safetensors"]
        for shard in shards:
            download(url + shard, os.path.join(folder, os.path.basename(shard)))
    return folder

def weight_files(name_or_path, data_dir):
    """A Hub name, a folder or a .safetensors file -> (folder, its weight files)."""
    hub = name_or_path in GPT2_NAMES or re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path)
    if hub and not os.path.exists(name_or_path):
        name_or_path = hub_download(name_or_path, data_dir)
    if os.path.isfile(name_or_path):
        return os.path.dirname(name_or_path), [name_or_path]
    single = os.path.join(name_or_path, "model.safetensors")
    files = [single if os.path.isdir(name_or_path) else name_or_path]
    if os.path.isfile(os.path.join(name_or_path, SHARDS)):
        weight_map = read_json(os.path.join(name_or_path, SHARDS)).get("weight_map", {})
        files = [os.path.join(name_or_path, s) for s in sorted(set(weight_map.values()))]
    if missing := [f for f in files if not os.path.isfile(f)]:
        raise UserError(f"{missing[0]} not found; pass a Hub name (HuggingFaceTB/SmolLM2-135M, "
                        f"gpt2) or a folder with config.json and model.safetensors (or shards)")
    return name_or_path, files

def check_fits(nbytes, device="cpu"):
    """Refuse, before loading, a model larger than the memory free on device."""
    free = math.inf  # unknown (not Linux, not CUDA): the load simply tries
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(device)[0]
    elif os.path.exists("/proc/meminfo"):
        free = 1024 * int(re.search(r"MemAvailable:\s+(\d+)", open("/proc/meminfo").read())[1])
    if nbytes > free:
        raise UserError(f"the model needs {nbytes / 1e9:.1f} GB but {device} has "
                        f"{free / 1e9:.1f} GB free; pick a smaller model or a lower dtype")

def from_pretrained(name_or_path, data_dir="data", dtype=None):
    """An open model: a Hub name (downloaded once to data/<name>/), a folder (config.json
    and model.safetensors, or shards) or a GPT-2 .safetensors file. Tensors are read one at
    a time into an empty model, so memory peaks at the model plus one tensor; dtype None
    keeps the file's float type (bfloat16 stays bfloat16)."""
    folder, files = weight_files(name_or_path, data_dir)
    index = {k: v for path in files for k, v in safetensors_index(path).items()}
    hf = read_json(os.path.join(folder, "config.json"))
    arch = str((hf.get("architectures") or ["?"])[0])
    if arch not in ARCHITECTURES:
        raise UserError(f"{folder}: architecture {arch} is not supported; use one of "
                        f"{', '.join(ARCHITECTURES)}")
    family, switches = ARCHITECTURES[arch]
    if family == "gpt2":  # Hub files may drop "transformer."; attn.bias is a mask buffer
        index = {"transformer." + k.removeprefix("transformer."): v for k, v in index.items()
                 if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))}
    try:
        config = hf_config(hf, family, switches)
    except (KeyError, TypeError, ValueError) as e:  # a missing key, a bad value
        raise UserError(f"{folder}/config.json does not describe a {arch} ({e!r})") from None
    with torch.device("meta"):  # no memory yet: every weight is then read into place
        model = GPT(config)
    wanted = {k: hf_names(family, k) for k in model.state_dict()
              if not (k == "lm_head.weight" and config.tie_embeddings)}
    missing = sorted(n for names in wanted.values() for n in names if n not in index)
    unexpected = sorted(index.keys() - {n for names in wanted.values() for n in names}
                        - {"lm_head.weight"})  # some tied checkpoints store the head too
    if missing or unexpected:
        raise UserError(f"{folder}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    stored = index[wanted["transformer.wte.weight"][0]][1]
    dtype = dtype or (stored if stored.is_floating_point else torch.float32)
    check_fits(model.num_params() * dtype.itemsize)
    model = model.to(dtype).to_empty(device="cpu")  # new tensors, so tie and rope anew
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    if config.rope:
        model.make_rope()  # the tables are computed, not read, and stay float32
    state = model.state_dict()  # the parameters' storage: copy_ fills it in place
    for name, names in wanted.items():
        parts = [read_tensor(index[n]) for n in names]
        if family == "gpt2" and name.endswith(CONV1D) and parts[0].dim() == 2:
            parts = [parts[0].t()]  # GPT-2's Conv1D stores (in, out)
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        if t.shape != state[name].shape:
            raise UserError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, "
                            f"expected {tuple(state[name].shape)}")
        state[name].copy_(t)
    model.folder = folder  # where its tokenizer.json is, if it has one
    return model

def hf_layout(model):
    """Our model -> (config.json's dict, {name: tensor}) in Hugging Face's layout: GPT-2's
    for GPT-2-shaped models, Llama's (Qwen2's with q/k/v biases, Qwen3's with q/k norms)
    for rope + RMSNorm + SwiGLU ones."""
    cfg = model.config
    state = model.state_dict()
    hs = cfg.head_size or cfg.n_embd // cfg.n_head
    dtype = str(state["transformer.wte.weight"].dtype).removeprefix("torch.")
    modern = (cfg.rope, cfg.rmsnorm, cfg.swiglu)
    plain = (cfg.n_kv_head or cfg.n_head) == cfg.n_head and cfg.tie_embeddings
    if not any(modern) and not (cfg.qkv_bias or cfg.qk_norm or cfg.head_size) and plain:
        tensors = {}
        for name, t in state.items():  # GPT-2 always has biases: zeros where ours has none
            if name != "lm_head.weight":
                tensors[name] = t.t().contiguous() if name.endswith(CONV1D) else t
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_attn.weight",
                              "c_proj.weight", "c_fc.weight")) and name[:-6] + "bias" not in state:
                tensors[name[:-6] + "bias"] = t.new_zeros(t.shape[0])
        config = {k: getattr(cfg, ours) for k, ours in CONFIG_KEYS["gpt2"].items()}
        config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", torch_dtype=dtype,
                      n_inner=cfg.mlp_hidden or None, activation_function="gelu_new")
        return config, tensors
    if not all(modern) or cfg.bias:
        raise UserError("this model is neither GPT-2-shaped nor Llama-shaped (rope, rmsnorm, "
                        "swiglu, no bias): Hugging Face has no layout for it")
    kv = (cfg.n_kv_head or cfg.n_head) * hs
    tensors = {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        names = hf_names("llama", name)
        parts = t.split([cfg.n_head * hs, kv, kv]) if len(names) == 3 else [t]
        tensors.update(zip(names, (p.contiguous() for p in parts)))
    arch = "Llama"
    if cfg.qk_norm or cfg.qkv_bias:  # the Qwen classes read these switches
        arch = "Qwen3" if cfg.qk_norm else "Qwen2"
    config = {k: getattr(cfg, ours) for k, ours in CONFIG_KEYS["llama"].items()}
    config.update(architectures=[arch + "ForCausalLM"], model_type=arch.lower(), head_dim=hs,
                  num_key_value_heads=cfg.n_kv_head or cfg.n_head, hidden_act="silu",
                  intermediate_size=model.transformer.h[0].mlp.c_fc.out_features,
                  rope_scaling=dict(zip(ROPE_SCALING, cfg.rope_scaling), rope_type="llama3")
                  if cfg.rope_scaling else None, attention_bias=False, torch_dtype=dtype)
    return config, tensors

def save_pretrained(model, folder, overwrite=False):
    """config.json and model.safetensors in Hugging Face's layout (hf_layout), which
    transformers and from_pretrained load with the same logits."""
    if os.path.exists(os.path.join(folder, "config.json")) and not overwrite:
        raise UserError(f"{folder} already holds a model; pass --overwrite to replace it, "
                        f"or another --out")
    config, tensors = hf_layout(model)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    save_json(os.path.join(folder, "config.json"), config)
    return folder

# finetuning plumbing for finetune.py, lora.py and dpo.py (bpe.py renders the examples)

def load_model(ckpt_path, init_from="", data_dir="data", device="cpu"):
    """An open model if init_from names one (in float32, to train), else ckpt_path's ->
    (model, its tokenizer: 'gpt2', the model's folder (tokenizer.json), or as saved)."""
    if init_from:
        model = from_pretrained(init_from, data_dir, torch.float32)
        check_fits(model.num_params() * 4, device)
        folder = os.path.abspath(model.folder)  # checkpoints keep it: valid from any directory
        tokenizer = folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else "gpt2"
        return model.to(device), tokenizer
    model, ckpt = load_checkpoint(ckpt_path, device)
    return model, ckpt["tokenizer"]

def start_finetuning(cfg):
    """Device, precision (the dtype goes back into cfg), seed and model of a finetuning
    script, printed -> (cfg, device, autocast context, model, saved tokenizer)."""
    device = pick_device(cfg.device)
    dtype, reason, ctx = setup_precision(device, cfg.dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    print(f"config:\n{format_config(cfg)}\ndevice: {device}; dtype: {dtype} ({reason})")
    torch.manual_seed(cfg.seed)
    model, saved_tok = load_model(cfg.ckpt_path, cfg.init_from, cfg.data_dir, device)
    return cfg, device, ctx, model, saved_tok

@contextlib.contextmanager
def user_input():
    """Inside it, a library's error about what the user gave (bpe.py's for a missing,
    corrupt or unreachable file; GPTConfig's for a bad shape) is a UserError: one line."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(str(e)) from None

def refuse_overwrite(ckpt_path, overwrite):
    """A run never replaces an earlier run's checkpoint unless asked (--overwrite)."""
    if os.path.exists(ckpt_path) and not overwrite:
        raise UserError(f"{ckpt_path} holds an earlier run; pass another --out_dir, or "
                        f"--overwrite to replace it")

def require_positive(cfg, *names):
    """One error naming the flags among names whose value is below 1."""
    if low := [f"--{name}={getattr(cfg, name)}" for name in names if getattr(cfg, name) < 1]:
        raise UserError(f"{', '.join(low)}: each must be at least 1")

def length_batches(lengths, batch_size, rng):
    """Indices cut into batches of similar lengths (little padding), in shuffled order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches

def collate(rows, pad_id, device):
    """Right-pad lists of (x, y) into (B, T) tensors: x with pad_id, y with -100 (no loss)."""
    T = max(len(x) for x, _ in rows)
    x = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in rows], device=device)
    y = torch.tensor([y + [-100] * (T - len(y)) for _, y in rows], device=device)
    return x, y

@torch.no_grad()
def heldout_loss(model, examples, batch_size, pad_id, device, ctx):
    """The loss over all of examples' trained tokens (y != -100): their summed loss over
    their count, not a mean of batch means (which would weight short answers up)."""
    model.eval()
    total = 0.0
    count = 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i:i + batch_size], pad_id, device)
        with ctx:
            loss = model(x, y)[1]  # the mean over the batch's trained tokens
        n = int((y != -100).sum())
        total += loss.item() * n
        count += n
    return total / count

@torch.no_grad()
def respond(model, tok, prompts, max_new_tokens, eot_id, ctx, batch_size=50):
    """Greedy answers to prompts (token ids), in batches, each cut at eot_id, decoded."""
    model.eval()
    answers = []
    for i in range(0, len(prompts), batch_size):
        with ctx:
            new = model.generate(prompts[i:i + batch_size], max_new_tokens,
                                 temperature=0.0, eot_id=eot_id)
        answers += [tok.decode(ids).strip() for ids in new]
    return answers

# -----------------------------------------------------------------------------
# demo: a random small model offline, or OpenAI's GPT-2

@dataclasses.dataclass
class DemoConfig:
    """Build a small random GPT (or load GPT-2), run one forward pass, sample a few ids."""
    init_from: str = ""       # '' = a small random model; a Hub name or a folder
    max_new_tokens: int = 8   # token ids to sample
    seed: int = 1337          # the random weights and the samples
    device: str = "auto"      # auto, cpu, cuda, cuda:N, mps

def main(cfg):
    if cfg.max_new_tokens < 0:
        raise UserError(f"--max_new_tokens={cfg.max_new_tokens} must not be negative")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    small = GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64)
    model = from_pretrained(cfg.init_from) if cfg.init_from else GPT(small)
    model = model.to(device).eval()
    config = model.config
    idx = torch.randint(0, config.vocab_size, (2, min(64, config.block_size)), device=device)
    logits, loss = model(idx, idx)
    print(f"{cfg.init_from or 'a random model'} on {device}: {config}")
    print(f"parameters: {model.num_params():,}; "
          f"training FLOPs per token: {model.flops_per_token():,}")
    print(f"idx {tuple(idx.shape)} -> logits {tuple(logits.shape)}; loss {loss.item():.3f} "
          f"on random ids (ln V = {math.log(config.vocab_size):.3f} at initialisation)")
    prompts = [idx[0, :4].tolist(), idx[1, :7].tolist()]  # two prompts, two lengths
    print(f"sampled ids, one batch with a KV cache: {model.generate(prompts, cfg.max_new_tokens)}")
    return {"loss": loss.item()}

if __name__ == "__main__":
    run(main, DemoConfig)
