"""Quantize: store a GPT's weights in 8 or 4 bits, and measure what that costs and buys.

What you learn here (LLM101n chapter 13): a weight matrix survives rounding to a few bits
if each small block of it gets its own scale. Symmetric absmax maps [-max|w|, max|w|]
onto [-qmax, qmax]; asymmetric min-max maps [min, max] onto [0, 2^bits - 1] with a zero
point. Either way dequantize(quantize(w)) is within scale / 2 of w, so one outlier in a
tensor-wide scale coarsens every weight (LLM.int8()'s lesson): a scale per output row, or
per group of G input columns, keeps scales small. Batch-1 decode reads each weight once a
token, so 4-8x fewer bytes mean more tokens/s when a kernel reads the integers directly.
Export hands the float model to other tools: a Hugging Face folder, or a GGUF file that
llama.cpp runs (its Q8_0 is absmax per block of 32 weights). How to run:
    python quantize.py                  # int8: out/ckpt.pt -> out/ckpt-int8.pt, a sample
    python quantize.py --bits=4 --group_size=64   # int4, a scale per 64 input columns
    python quantize.py --load=out/ckpt-int8.pt --prompt="Once upon a time"
    python quantize.py --bench          # size, loss, agreement and tokens/s per kind
    python quantize.py --init_from=gpt2 --bits=4  # OpenAI's GPT-2 124M, in int4
    python quantize.py --ckpt_path=out-dpo/ckpt.pt --export=gguf --out=story.gguf
    python quantize.py --ckpt_path=out-dpo/ckpt.pt --export=hf --out=story  # a folder
Depends on: gpt.py (the model, checkpoints, generate) and bpe.py (the tokenizer). Reads
any checkpoint in the shared format and the held-out tokens train.py prepared
(data/<dataset>/val.bin); writes a quantized checkpoint that only this script loads.
References: Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339; Frantar et al. 2022,
GPTQ, arXiv:2210.17323; gpt-fast's int8/int4 weight-only quantization; GGUF's spec,
github.com/ggml-org/ggml/blob/master/docs/gguf.md.
"""
import copy
import dataclasses
import json
import os
import re
import struct
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import Tokenizer, text_ends
from gpt import (GPT, GPTConfig, UserError, from_pretrained, hf_config, hf_layout,
                 load_checkpoint, pick_device, refuse_overwrite, refuse_torchrun,
                 require_positive, rope_tables, run, save_checkpoint, save_pretrained,
                 setup_precision, user_input)

@dataclasses.dataclass
class QuantizeConfig:
    """Quantize a checkpoint's weights to int8 or int4 and sample from it."""
    # I/O
    ckpt_path: str = "out/ckpt.pt"  # any checkpoint in the shared format
    init_from: str = ""  # '' = ckpt_path; a Hub name (gpt2, Qwen/...) or folder
    out_path: str = ""  # '' = beside ckpt_path: ckpt-int8.pt, ckpt-int4-g32.pt
    overwrite: bool = False  # replace a quantized checkpoint already at out_path
    load: str = ""  # a quantized checkpoint to sample from, instead of quantizing
    data_dir: str = "data"  # train.py's prepared data: <data_dir>/<dataset>/val.bin
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    # quantization
    bits: int = 8  # 8: int8, a scale per output channel; 4: int4, a scale per group
    group_size: int = 32  # int4: input columns that share a scale (32, 64, 128, ...)
    head: str = "tied"  # tied: the head quantized (a tied embedding shares it); float
    # sampling
    prompt: str = "Once upon a time"  # continued greedily by the quantized model
    max_new_tokens: int = 100
    # export (instead of quantizing): the float model for other tools
    export: str = ""  # '' = off; hf: a Hugging Face folder; gguf: one llama.cpp file
    out: str = ""  # export's folder (hf) or .gguf file; '' = beside the checkpoint
    export_dtype: str = "f16"  # gguf's matrices: f16, bf16, f32 or q8_0 (8-bit blocks)
    # benchmark
    bench: bool = False  # float32, bfloat16, int8, int4 g32/64/128 side by side; exit
    eval_windows: int = 64  # held-out windows of block_size tokens for the loss
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps (the int kernels are CPU ones)
    seed: int = 1337

# -----------------------------------------------------------------------------
# the lesson: quantizing a tensor, symmetric and asymmetric, at three granularities

def quantize_absmax(w, bits, dim=None):
    """Symmetric: scale = max|w| / qmax over dim (None: the whole tensor), q = round(w /
    scale) in [-qmax, qmax], qmax = 2^(bits-1) - 1. -> (q int8, scale, shaped for w)."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax() if dim is None else w.abs().amax(dim, keepdim=True)
    # scales are values bfloat16 holds exactly (the kernels take bfloat16 scales), nudged
    # up before rounding, so no stored scale is below the exact one: nothing clips
    scale = (amax.float().clamp(min=1e-8) / qmax * (1 + 2 ** -8)).bfloat16().float()
    return (w.float() / scale).round().clamp(-qmax, qmax).to(torch.int8), scale

def quantize_minmax(w, bits, dim=None):
    """Asymmetric: [min, max] onto 0 .. 2^bits - 1, scale = (max - min) / (2^bits - 1),
    the zero point is min: q = round((w - min) / scale). A range not centred on 0 (after
    a ReLU, say) wastes no levels. -> (q uint8, scale, zero)."""
    lo, hi = w.aminmax(dim=dim, keepdim=True)
    scale = ((hi - lo).float() / (2 ** bits - 1)).clamp(min=1e-8)
    return ((w - lo) / scale).round().to(torch.uint8), scale, lo.float()

def dequantize(q, scale, zero=0.0):
    return q.float() * scale.float() + zero

def grouped(w, group_size):
    # (out, in) -> (out, in / G, G): each row's columns in groups of G, a scale per group
    out_features, in_features = w.shape
    if in_features % group_size:
        raise UserError(f"--group_size={group_size} does not divide the input width "
                        f"{in_features}; pick a divisor such as 32 or 64")
    return w.view(out_features, in_features // group_size, group_size)

def outlier_demo(seed=0):
    """One large weight in a 256 x 256 matrix: its tensor-wide scale coarsens every
    weight, a per-channel scale only those of its row. Prints and returns the errors."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[3, 7] = 2.0  # 100x the typical weight, as LLM.int8() found in large models
    errors = {name: (dequantize(*quantize_absmax(w, 8, dim)) - w).abs().mean().item()
              for name, dim in [("per tensor", None), ("per channel", 1)]}
    ratio = errors["per tensor"] / errors["per channel"]
    print(f"int8 with one outlier: mean |error| {errors['per tensor']:.2e} per tensor, "
          f"{errors['per channel']:.2e} per channel ({ratio:.0f}x)")
    return errors

# -----------------------------------------------------------------------------
# quantized layers: int8 per channel, int4 per group, each with a plain-torch reference

def pack_int4(u):
    """(N, K) integers in 0..15 -> (N, K / 2) uint8: column 2j in the low nibble."""
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)

def unpack_int4(packed):
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (..., K) uint8

class Int8Linear(nn.Module):
    """A Linear whose weight is int8 with a scale per output channel: W ~ q * scale[:,
    None], so x W^T = (x q^T) * scale. 1 byte a weight instead of 4."""
    def __init__(self, weight, bias=None):
        super().__init__()
        q, scale = quantize_absmax(weight.detach(), 8, dim=1)
        self.register_buffer("weight", q)               # (out, in) int8
        self.register_buffer("scale", scale.flatten())  # (out,) float
        self.bias = bias
        self.use_kernel = True  # False: always the reference (the tests compare the two)

    def rows(self, idx, dtype):  # dequantized rows: the embedding lookup of a tied head
        return self.weight[idx].to(dtype) * self.scale[idx, None].to(dtype)

    def forward(self, x):
        # torch's weight-only int kernels are for CPUs, and take bfloat16 activations
        if self.use_kernel and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight,
                                          self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], -1)
        else:  # the reference: the integer matrix in x's dtype, scaled after the matmul
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

class Int4Linear(nn.Module):
    """A Linear whose weight is symmetric int4 (q in [-7, 7], stored as q + 8, two to a
    byte) with a scale per group of group_size input columns. The reference rebuilds the
    float matrix at every call; the CPU kernel reads the nibbles directly, once tiled."""
    def __init__(self, weight, bias=None, group_size=32):
        super().__init__()
        q, scale = quantize_absmax(grouped(weight.detach(), group_size), 4, dim=-1)
        self.group_size = group_size
        u = (q.flatten(1) + 8).to(torch.uint8)
        self.register_buffer("weight", pack_int4(u))         # (N, K / 2) uint8
        self.register_buffer("scale", scale.squeeze(-1))     # (N, K / G)
        self.bias = bias
        self.use_kernel = True
        self.tiled = None  # the kernel's layout, made on first use (not saved)

    def rows(self, idx, dtype):
        q = unpack_int4(self.weight[idx]).float() - 8  # (..., K)
        scale = self.scale[idx].float().repeat_interleave(self.group_size, -1)
        return (q * scale).to(dtype)

    def kernel(self, x):
        N = self.weight.size(0)
        if self.tiled is None:
            # the kernel tiles the output by 16 rows: pad N (a vocabulary of 50257, say)
            pad = -N % 16
            u = F.pad(unpack_int4(self.weight).int(), (0, 0, 0, pad), value=8)  # (N', K)
            scale = F.pad(self.scale, (0, 0, 0, pad)).t()  # (K / G, N')
            # (K / G, N', 2): scale and zero, the kernel computes (u - 8) * s + z
            scale_zero = torch.stack([scale, torch.zeros_like(scale)], -1).contiguous()
            self.tiled = (torch._convert_weight_to_int4pack_for_cpu(u, 2), scale_zero)
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.size(-1)), self.tiled[0],
                                              self.group_size, self.tiled[1].to(x.dtype))
        return y[:, :N].view(*x.shape[:-1], N)

    def forward(self, x):
        if self.use_kernel and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            y = self.kernel(x)
        else:
            y = F.linear(x, self.rows(slice(None), x.dtype))
        return y if self.bias is None else y + self.bias

class QuantEmbedding(nn.Module):
    """A lookup into a quantized matrix, the picked rows dequantized: the head's (a tied
    model's token embedding reads the tensor the head does), or its own (positions)."""
    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, idx):  # the scales were cast with the model: they carry its dtype
        return self.table.rows(idx, self.table.scale.dtype)

def quantize_model(model, bits, group_size=32, head="tied"):
    """Swap every Linear in the blocks (attention, MLP) and the learned positions for
    quantized versions, in place. head='tied' quantizes the head too (a tied embedding
    reads it); 'float' keeps it exact. Norms and biases stay float."""
    def make(weight, bias=None):
        if bits == 8:
            return Int8Linear(weight, bias)
        return Int4Linear(weight, bias, group_size)
    for module in list(model.transformer.h.modules()):  # a list: children change as we go
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child.weight, child.bias))
    if "wpe" in model.transformer:
        model.transformer.wpe = QuantEmbedding(make(model.transformer.wpe.weight))
    if head == "tied":  # the head; a tied token embedding reads the same quantized matrix
        model.lm_head = make(model.lm_head.weight)
        if model.config.tie_embeddings:  # (an untied one, Llama 3.1 8B's, stays float)
            model.transformer.wte = QuantEmbedding(model.lm_head)
    return model

# -----------------------------------------------------------------------------
# quantized checkpoints: the shared format plus a 'quantized' entry

def tensor_bytes(model):
    # the bytes of the model's tensors, each storage once (the tied head counts once)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values()}
    return sum(storages.values())

def save_quantized(path, model, bits, group_size, head, **extra):
    # save_checkpoint writes a temp file and renames it: never a half-written checkpoint
    quantized = dict(bits=bits, group_size=group_size, head=head)
    return save_checkpoint(path, model, quantized=quantized, **extra)

def load_quantized(path, device="cpu"):
    """A checkpoint written by save_quantized -> (model, ckpt). A float one is an error
    that says how to quantize it (and gpt.load_checkpoint refuses a quantized one)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # FileNotFoundError, or a bad file's UnpicklingError, ...
        raise UserError(f"no readable quantized checkpoint at {path} ({type(e).__name__})"
                        f"; make one with `python quantize.py`") from None
    q = ckpt.get("quantized") if isinstance(ckpt, dict) else None
    if not isinstance(q, dict) or "model_config" not in ckpt:
        raise UserError(f"{path} is not a quantized checkpoint; quantize it with "
                        f"`python quantize.py --ckpt_path={path}`")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    quantize_model(model, q["bits"], q["group_size"], q["head"])  # shapes, then values
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt

# -----------------------------------------------------------------------------
# measurements: held-out loss, agreement with float32, decode speed

def heldout_windows(ckpt, data_dir, block_size, n):
    # n windows of block_size + 1 tokens spread evenly over train.py's val.bin, or None
    dataset = ckpt.get("train_config", {}).get("dataset", "?")
    folder = os.path.join(data_dir, os.path.splitext(os.path.basename(dataset))[0])
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    data = np.memmap(os.path.join(folder, "val.bin"), dtype=meta["dtype"], mode="r")
    starts = np.linspace(0, len(data) - block_size - 1, n).astype(np.int64)
    windows = np.stack([data[s:s + block_size + 1] for s in starts])
    return torch.from_numpy(windows.astype(np.int64))

@torch.no_grad()
def loss_and_top1(model, windows, batch_size=8):
    """The mean next-token loss over the windows, and the model's top choice at every
    position (compared with float32's: teacher-forced agreement survives a tie)."""
    device = model.lm_head.weight.device
    losses = []
    choices = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)
        logits = model(w[:, :-1])[0].float()
        losses.append(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()))
        choices.append(logits.argmax(-1))
    return torch.stack(losses).mean().item(), torch.cat(choices)

def decode_speed(model, prompt, new_tokens, eot_id=-1):
    # batch-1 greedy decode with the cache -> (the new ids, tokens/s after the first)
    stamps = []  # when each token came out (the last may be a stop token, not returned)
    new = model.generate([prompt], new_tokens, temperature=0.0, eot_id=eot_id,
                         on_token=lambda *_: stamps.append(time.perf_counter()))[0]
    seconds = stamps[len(new) - 1] - stamps[0] if len(new) > 1 else float("nan")
    return new, (len(new) - 1) / seconds

def head_speed(model, reps=20):
    # one batch-1 product through the head, the largest matrix: the kernel alone, in GB/s
    norm = model.transformer.ln_f.weight  # the activations' dtype and device
    x = torch.randn(1, model.config.n_embd, dtype=norm.dtype, device=norm.device)
    model.lm_head(x)
    start = time.perf_counter()
    for _ in range(reps):
        y = model.lm_head(x)
    y[0, 0].item()  # waits for a GPU to finish
    return tensor_bytes(model.lm_head) * reps / (time.perf_counter() - start) / 1e9

def variant(model, kind, head="tied"):
    """A copy of the float32 model as kind: float32, bfloat16, int8, or int4-g32 (-g64,
    ...). The int kinds run with bfloat16 activations: the CPU kernels need them."""
    m = copy.deepcopy(model)
    if kind.startswith("int"):
        bits, _, group = kind[3:].partition("-g")
        quantize_model(m, int(bits), int(group or 0), head)
    return m.to(torch.float32 if kind == "float32" else torch.bfloat16).eval()

COLUMNS = ["kind", "head", "MB", "x smaller", "held-out loss", "change",
           "top-1 as float32", "greedy tokens as float32", "decode tok/s", "x float32",
           "head GB/s"]

@torch.no_grad()
def bench(cfg, model, ckpt):
    """The table for the model and for the GPT-2 124M shape (random weights: no loss):
    bytes, held-out loss, agreement with float32 and batch-1 decode tokens/s per kind."""
    outlier_demo()
    kinds = ["float32", "bfloat16", "int8", "int4-g32", "int4-g64", "int4-g128"]
    runs = [(kind, "tied") for kind in kinds]
    shapes = [(cfg.init_from or cfg.ckpt_path, model, ckpt, runs + [("int8", "float")])]
    if model.config.n_embd != 768:
        torch.manual_seed(cfg.seed)
        gpt2_shape = GPT(GPTConfig()).to(model.lm_head.weight.device)
        shapes.append(("gpt2-124M shape, random", gpt2_shape, {}, runs))
    rows = []
    for name, base, meta, runs in shapes:
        windows = heldout_windows(meta, cfg.data_dir, base.config.block_size,
                                  cfg.eval_windows)
        prompt = [0] * 16 if windows is None else windows[0, :16].tolist()
        reference = base.generate([prompt], 64, temperature=0.0)[0]
        print(f"\n{name}\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        first = None
        for kind, head in runs:
            try:
                m = variant(base, kind, head)
            except UserError as e:  # a group that does not divide a width (SmolLM2's 576)
                print(f"| {kind} | {head} | skipped: {e} |")
                continue
            loss, top = (None, None) if windows is None else loss_and_top1(m, windows)
            greedy = m.generate([prompt], 64, temperature=0.0)[0]
            # how many of float32's greedy tokens come out the same, up to the first
            same = [a == b for a, b in zip(greedy, reference)] + [False]
            agree = same.index(False)
            m.generate([prompt], 8)  # warm up (and build the int4 kernel's layout)
            row = dict(shape=name, kind=kind, head=head, bytes=tensor_bytes(m),
                       loss=loss, top=top, agree=agree,
                       speed=decode_speed(m, prompt, 64)[1], head_gbs=head_speed(m))
            rows.append(row)
            first = first or row
            losses = ["-", "-", "-"]
            if loss is not None:
                top1 = (top == first["top"]).float().mean().item()
                change = loss / first["loss"] - 1
                losses = [f"{loss:.4f}", f"{change:+.3%}", f"{top1:.1%}"]
            cells = [kind, head, f"{row['bytes'] / 1e6:,.2f}",
                     f"{first['bytes'] / row['bytes']:.2f}", *losses, f"{agree}/64",
                     f"{row['speed']:,.1f}", f"{row['speed'] / first['speed']:.2f}",
                     f"{row['head_gbs']:.1f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    print("top-1: held-out positions whose top next token is float32's; greedy: "
          "float32's first 64 tokens, up to the first difference; head GB/s: the head's "
          "weight bytes read per second by the kernel; int kinds: bf16 activations")
    return rows

# -----------------------------------------------------------------------------
# export: the float model for other tools, as a Hugging Face folder or a GGUF file:
# one little-endian stream, mapped into memory as it lies by llama.cpp: a header, the
# metadata (keys, values), each tensor's name, shape and offset, then the data, aligned

# --export_dtype -> (ggml's tensor type, llama.cpp's file type "mostly X", torch's dtype)
GGUF_TYPES = {"f32": (0, 0, torch.float32), "f16": (1, 1, torch.float16),
              "bf16": (30, 32, torch.bfloat16), "q8_0": (8, 7, None)}
GGUF_ALIGNMENT = 32
GGUF_NAMES = {  # Hugging Face's module names -> llama.cpp's (in a block, after blk.N.)
    "transformer.wte": "token_embd", "transformer.wpe": "position_embd", "lm_head": "output",
    "model.embed_tokens": "token_embd", "transformer.ln_f": "output_norm",
    "model.norm": "output_norm", "ln_1": "attn_norm", "input_layernorm": "attn_norm",
    "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "self_attn.o_proj": "attn_output",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "ln_2": "ffn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.c_fc": "ffn_up",
    "mlp.up_proj": "ffn_up", "mlp.c_proj": "ffn_down", "mlp.down_proj": "ffn_down",
    "rope_freqs": "rope_freqs"}  # made here, from Llama 3's rope scaling

def gguf_string(s):  # a u64 byte length, then UTF-8
    return struct.pack("<Q", len(s.encode("utf-8"))) + s.encode("utf-8")

def gguf_value(v):
    # the type id (u32), then the value: a string (8), an array (9: the items' type, their
    # count, the items) of strings or int32 (5), bool (7), u32 (4) or f32 (6)
    if isinstance(v, str):
        return struct.pack("<I", 8) + gguf_string(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(map(gguf_string, v))
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 5, len(v)) + np.array(v, "<i4").tobytes()
    type_id, form = {bool: (7, "?"), int: (4, "I"), float: (6, "f")}[type(v)]
    return struct.pack(f"<I{form}", type_id, v)

def q8_0(w):
    # llama.cpp's Q8_0 is absmax per block of 32 weights of a row: an f16 scale d = max|w|
    # / 127, then 32 int8 round(w / d) made with d as stored. (N, K) -> (N K / 32, 34) bytes
    blocks = w.float().reshape(-1, 32)
    d = (blocks.abs().amax(1, keepdim=True) / 127).half()
    q = (blocks / d.float().clamp(min=1e-30)).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], 1)

def rope_interleave(w, n_head):
    # Hugging Face's rope turns channel i of a head with channel i + hs/2, llama.cpp's llama
    # turns neighbours 2i and 2i + 1: each head's rows of q_proj and k_proj reordered 0,
    # hs/2, 1, hs/2 + 1, ... Both reordered alike, every q . k, the attention, is unchanged
    halves = w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1)  # (nh, 2, hs/2, C)
    return halves.transpose(1, 2).reshape(w.shape)  # (nh, hs/2, 2, C) -> (nh hs, C)

def gguf_name(name):
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    layer = r"(?:(?:transformer\.h|model\.layers)\.(\d+)\.)?"
    block, module, kind = re.fullmatch(layer + r"(.+)\.(\w+)", name).groups()
    return (f"blk.{block}." if block else "") + f"{GGUF_NAMES[module]}.{kind}"

def gguf_pre(tokenizer_json):
    # llama.cpp splits text with regexes it knows by name; the pre_tokenizer (as JSON text)
    # tells which: GPT-2's (gpt-2; smollm after single digits), cl100k's digits in threes
    # (Llama 3's llama-bpe), or single digits after [^\r\n\p{L}\p{N}]?\p{L}+ (qwen2)
    pre = json.dumps(tokenizer_json["pre_tokenizer"])
    if '"use_regex": true' in pre or r" ?\\p{L}+| ?\\p{N}+" in pre:
        return "smollm" if '"individual_digits": true' in pre else "gpt-2"
    if r"\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if r"\\p{L}+|\\p{N}|" in pre:
        return "qwen2"
    raise ValueError(f"llama.cpp knows no pre-tokenizer like {pre[:200]}; train the "
                     f"tokenizer with bpe.py --pattern=gpt2 or gpt4")

def gguf_vocab(tokenizer_json, tokenizer_config, vocab_size):
    """bpe.Tokenizer.to_hf's two dicts -> llama.cpp's tokenizer keys: each id's token as
    tokenizer.json spells it and its type (1 normal, 3 control, 4 added, 5 unused: [PADn]
    for an id with no token), merges, bos, eos (the end of a turn), the chat template."""
    vocab = {i: (s, 1) for s, i in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json["added_tokens"]:
        vocab[added["id"]] = (added["content"], 3 if added["special"] else 4)
    tokens, types = zip(*[vocab.get(i, (f"[PAD{i}]", 5)) for i in range(vocab_size)])
    ids = {s: i for i, s in enumerate(tokens)}
    keys = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": gguf_pre(tokenizer_json),
            "tokenizer.ggml.tokens": list(tokens), "tokenizer.ggml.token_type": list(types),
            "tokenizer.ggml.merges": [" ".join(m) for m in tokenizer_json["model"]["merges"]],
            "tokenizer.ggml.bos_token_id": ids[tokenizer_config["bos_token"]],
            "tokenizer.ggml.eos_token_id": ids[tokenizer_config["eos_token"]],
            "tokenizer.ggml.add_bos_token": bool(tokenizer_config.get("add_bos_token"))}
    if "chat_template" in tokenizer_config:  # a base model has none
        keys["tokenizer.chat_template"] = tokenizer_config["chat_template"]
    return keys

def write_gguf(path, config, tensors, tokenizer_json, tokenizer_config, dtype="f16"):
    """gpt.hf_layout's (config.json's dict, {name: tensor}) for GPT-2, Llama, Qwen2 or Qwen3
    and gguf_vocab's tokenizer dicts -> one file llama.cpp runs, written whole or not at
    all: matrices in dtype, vectors (norms, biases) in f32."""
    arch = config["model_type"]  # gpt2, llama, qwen2, qwen3: llama.cpp's names too
    c = hf_config(config, "gpt2" if arch == "gpt2" else "llama", {})  # in gpt.py's names
    hs = c.head_size or c.n_embd // c.n_head
    n_kv_head = c.n_kv_head or c.n_head
    hyper = {"context_length": c.block_size, "embedding_length": c.n_embd,
             "block_count": c.n_layer, "vocab_size": c.vocab_size,
             "feed_forward_length": c.mlp_hidden or 4 * c.n_embd,
             "attention.head_count": c.n_head, "attention.head_count_kv": n_kv_head}
    if arch == "gpt2":
        hyper["attention.layer_norm_epsilon"] = c.norm_eps
    else:
        hyper.update({"attention.layer_norm_rms_epsilon": c.norm_eps,
                      "rope.freq_base": float(c.rope_theta), "rope.dimension_count": hs,
                      "attention.key_length": hs, "attention.value_length": hs})
    meta = {"general.architecture": arch, "general.file_type": GGUF_TYPES[dtype][1],
            "general.name": os.path.splitext(os.path.basename(path))[0],
            "general.quantization_version": 2, "general.alignment": GGUF_ALIGNMENT,
            **{f"{arch}.{k}": v for k, v in hyper.items()},
            **gguf_vocab(tokenizer_json, tokenizer_config, c.vocab_size)}
    if c.rope_scaling:  # llama.cpp divides each pair's frequency by rope_freqs: gpt.py's
        # rope tables at position 1 hold sin(frequency), without scaling and with it
        sines = [rope_tables(hs, 2, c.rope_theta, s)[1][1] for s in ((), c.rope_scaling)]
        tensors = {"rope_freqs.weight": sines[0].asin() / sines[1].asin(), **tensors}
    infos = []  # each tensor's name, dimension count, sizes innermost first, type, offset
    blobs = []  # and its bytes, padded: vectors f32, q8_0 in rows of whole blocks, else f16
    for name, t in tensors.items():
        t = t.detach().cpu().float()
        if arch == "gpt2" and t.dim() == 2 and ".h." in name:  # Conv1D's (in, out) -> (out, in)
            t = t.t()
        if arch == "llama" and re.search(r"\.[qk]_proj\.", name):
            t = rope_interleave(t, c.n_head if ".q_proj." in name else n_kv_head)
        kind = "f32" if t.dim() == 1 else dtype
        kind = "f16" if kind == "q8_0" and t.shape[-1] % 32 else kind
        blob = q8_0(t) if kind == "q8_0" else t.to(GGUF_TYPES[kind][2])
        shape = struct.pack(f"<I{t.dim()}Q", t.dim(), *t.shape[::-1])
        place = struct.pack("<IQ", GGUF_TYPES[kind][0], sum(map(len, blobs)))
        infos.append(gguf_string(gguf_name(name)) + shape + place)
        blobs.append(blob.reshape(-1).view(torch.uint8).numpy().tobytes())
        blobs[-1] += b"\0" * (-len(blobs[-1]) % GGUF_ALIGNMENT)
    with open(path + ".tmp", "wb") as f:  # b"GGUF", version 3, the counts of tensors and keys
        f.write(struct.pack("<4sIQQ", b"GGUF", 3, len(blobs), len(meta)))
        f.write(b"".join(gguf_string(k) + gguf_value(v) for k, v in meta.items()))
        f.write(b"".join(infos))
        f.write(b"\0" * (-f.tell() % GGUF_ALIGNMENT) + b"".join(blobs))
    os.replace(path + ".tmp", path)  # never a half-written file at path
    return path

def export(cfg, model, ckpt, stem):
    """The float model and its tokenizer, with the chat template it was finetuned on (an
    open model's own), as a Hugging Face folder (hf) or one llama.cpp file (gguf)."""
    suffix = "-hf" if cfg.export == "hf" else f"-{cfg.export_dtype}.gguf"
    out = cfg.out or stem + suffix  # out/ckpt-hf/, out/ckpt-f16.gguf
    if os.path.exists(out if cfg.export == "gguf" else f"{out}/config.json") and not cfg.overwrite:
        raise UserError(f"{out} already holds a model; pass --overwrite to replace it, "
                        f"or another --out")
    with user_input():  # GPT-2's tokenizer files offline, or what a format cannot hold
        tok = Tokenizer.from_saved(ckpt["tokenizer"], cfg.gpt2_dir)
        template = tok.chat_template or ckpt.get("chat_template")  # None: a base model
        if cfg.export == "hf":
            save_pretrained(model, out, overwrite=cfg.overwrite)
            tok.save_pretrained(out, template)
        else:
            write_gguf(out, *hf_layout(model), *tok.to_hf(template), cfg.export_dtype)
    tool = "transformers' from_pretrained" if cfg.export == "hf" else "llama.cpp's llama-cli -m"
    print(f"exported {out}; run it with {tool} {out}")
    return dict(model=model, ckpt=ckpt, out=out)

# -----------------------------------------------------------------------------
# main

def check_config(cfg):
    choices = dict(export=["", "hf", "gguf"], export_dtype=list(GGUF_TYPES), bits=[8, 4],
                   head=["tied", "float"])
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name}={getattr(cfg, name)!r}: pass one of {allowed}")
    # flags the chosen mode would ignore: quantizing's with --export, export's without it
    unused = ["bits", "group_size", "head", "out_path", "load", "bench"] if cfg.export else ["out"]
    if cfg.export != "gguf":
        unused.append("export_dtype")
    if given := [f"--{f}" for f in unused if getattr(cfg, f) != getattr(QuantizeConfig, f)]:
        raise UserError(f"{' '.join(given)}: unused with --export={cfg.export!r}; drop it (int8 "
                        f"GGUF: --export_dtype=q8_0; a quantized checkpoint's path: --out_path)")
    require_positive(cfg, "group_size", "eval_windows")
    if cfg.max_new_tokens < 0:
        raise UserError(f"--max_new_tokens={cfg.max_new_tokens} must not be negative")

def main(cfg):
    refuse_torchrun("quantize.py")
    check_config(cfg)
    device = pick_device(cfg.device)
    if cfg.load:
        model, ckpt = load_quantized(cfg.load, device)
        bits = ckpt["quantized"]["bits"]
        print(f"loaded {cfg.load}: int{bits}, {tensor_bytes(model):,} bytes")
    else:
        if cfg.init_from:  # its tokenizer: the folder's tokenizer.json, or GPT-2's
            # in float32, as checkpoints are (each kind is made from it); an export keeps its dtype
            dtype = None if cfg.export else torch.float32
            model = from_pretrained(cfg.init_from, cfg.data_dir, dtype).to(device)
            has_json = os.path.isfile(os.path.join(model.folder, "tokenizer.json"))
            ckpt = {"tokenizer": model.folder if has_json else "gpt2"}
        else:
            model, ckpt = load_checkpoint(cfg.ckpt_path, device)
        model.eval()
        if cfg.bench:
            return bench(cfg, model, ckpt)
        stem = os.path.splitext(cfg.ckpt_path)[0]  # out/ckpt
        if cfg.init_from:  # a Hub name or a folder: out/<its last part> (Qwen2.5-0.5B whole)
            stem = os.path.join("out", os.path.basename(os.path.normpath(cfg.init_from)))
        if cfg.export:
            return export(cfg, model, ckpt, stem)
        kind = "int8" if cfg.bits == 8 else f"int4-g{cfg.group_size}"
        out_path = cfg.out_path or f"{stem}-{kind}.pt"
        refuse_overwrite(out_path, cfg.overwrite)
        float_bytes = tensor_bytes(model)
        quantize_model(model, cfg.bits, cfg.group_size, cfg.head)
        keep = ("tokenizer", "chat_template", "train_config")
        extra = {k: ckpt[k] for k in keep if k in ckpt}
        save_quantized(out_path, model, cfg.bits, cfg.group_size, cfg.head, **extra)
        print(f"saved {out_path}: {kind}, head {cfg.head}: "
              f"{os.path.getsize(out_path):,} bytes on disk, "
              f"{float_bytes / tensor_bytes(model):.2f}x smaller than float32")
        ckpt = dict(extra, quantized=True)
    if cfg.max_new_tokens:  # a greedy sample; on a CPU in bfloat16 (the kernels' dtype)
        dtype = "bfloat16" if device == "cpu" else setup_precision(device)[0]
        model = model.to(getattr(torch, dtype))
        with user_input():  # GPT-2's tokenizer files may be missing, offline
            tok = Tokenizer.from_saved(ckpt["tokenizer"], cfg.gpt2_dir)
        model.vocab_used = tok.vocab_size  # rows past the tokenizer's ids are never sampled
        ends = text_ends(tok)
        prompt = tok.encode(cfg.prompt, allowed_special="none") or ends[:1]
        new, speed = decode_speed(model, prompt, cfg.max_new_tokens, ends)
        print(f"{cfg.prompt}{tok.decode(new)}\n"
              f"{len(new)} tokens, {speed:,.1f} tok/s after the first")
    return dict(model=model, ckpt=ckpt)

if __name__ == "__main__":
    run(main, QuantizeConfig)
