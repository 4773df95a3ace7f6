"""Quantize: store a GPT's weights in 8 or 4 bits, and measure what that costs and buys.

What you learn here (LLM101n chapter 13): a weight matrix survives rounding to a few bits
if each small block of it gets its own scale. Symmetric absmax maps [-max|w|, max|w|]
onto [-qmax, qmax]; asymmetric min-max maps [min, max] onto [0, 2^bits - 1] with a zero
point. Either way dequantize(quantize(w)) is within scale / 2 of w, so one outlier in a
tensor-wide scale coarsens every weight (LLM.int8()'s lesson): a scale per output row, or
per group of G input columns, keeps scales small. Batch-1 decode reads each weight once a
token, so 4-8x fewer bytes mean more tokens/s when a kernel reads the integers directly.
How to run:
    python quantize.py                  # int8: out/ckpt.pt -> out/ckpt-int8.pt, a sample
    python quantize.py --bits=4 --group_size=64   # int4, a scale per 64 input columns
    python quantize.py --load=out/ckpt-int8.pt --prompt="Once upon a time"
    python quantize.py --bench          # size, loss, agreement and tokens/s per kind
    python quantize.py --init_from=gpt2 --bits=4  # OpenAI's GPT-2 124M, in int4
Depends on: gpt.py (the model, checkpoints, generate) and bpe.py (the tokenizer). Reads
any checkpoint in the shared format and the held-out tokens train.py prepared
(data/<dataset>/val.bin); writes a quantized checkpoint that only this script loads.
References: Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339; Frantar et al. 2022,
GPTQ, arXiv:2210.17323; gpt-fast's int8/int4 weight-only quantization.
"""
import copy
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import STOP, Tokenizer
from gpt import (GPT, GPTConfig, UserError, from_pretrained, load_checkpoint,
                 pick_device, refuse_overwrite, refuse_torchrun, require_positive, run,
                 save_checkpoint, setup_precision, user_input)

@dataclasses.dataclass
class QuantizeConfig:
    """Quantize a checkpoint's weights to int8 or int4 and sample from it."""
    # I/O
    ckpt_path: str = "out/ckpt.pt"  # any checkpoint in the shared format
    init_from: str = ""  # '' = ckpt_path; gpt2, gpt2-medium, ... or a GPT-2 .safetensors
    out_path: str = ""  # '' = beside ckpt_path: ckpt-int8.pt, ckpt-int4-g32.pt
    overwrite: bool = False  # replace a quantized checkpoint already at out_path
    load: str = ""  # a quantized checkpoint to sample from, instead of quantizing
    data_dir: str = "data"  # train.py's prepared data: <data_dir>/<dataset>/val.bin
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    # quantization
    bits: int = 8  # 8: int8, a scale per output channel; 4: int4, a scale per group
    group_size: int = 32  # int4: input columns that share a scale (32, 64, 128, ...)
    head: str = "tied"  # tied: the shared embedding/head quantized once for both; float
    # sampling
    prompt: str = "Once upon a time"  # continued greedily by the quantized model
    max_new_tokens: int = 100
    # benchmark
    bench: bool = False  # float32, bfloat16, int8, int4 g32/64/128 side by side; exit
    eval_windows: int = 64  # held-out windows of block_size tokens for the loss
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps (the int kernels are CPU ones)
    seed: int = 1337

# -----------------------------------------------------------------------------
# the lesson: quantizing a tensor, symmetric and asymmetric, at three granularities

def bf16_scale(scale):
    # scales are values that bfloat16 holds exactly (the kernels take bfloat16 scales),
    # nudged up before rounding, so no stored scale is below the exact one: nothing clips
    return (scale * (1 + 2 ** -8)).to(torch.bfloat16).to(scale.dtype)

def quantize_absmax(w, bits, dim=None):
    """Symmetric: scale = max|w| / qmax over dim (None: the whole tensor), q = round(w /
    scale) in [-qmax, qmax], qmax = 2^(bits-1) - 1. -> (q int8, scale, shaped for w)."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax() if dim is None else w.abs().amax(dim, keepdim=True)
    scale = bf16_scale(amax.float().clamp(min=1e-8) / qmax)
    return (w.float() / scale).round().clamp(-qmax, qmax).to(torch.int8), scale

def quantize_minmax(w, bits, dim=None):
    """Asymmetric: [min, max] onto 0 .. 2^bits - 1, scale = (max - min) / (2^bits - 1),
    the zero point is min: q = round((w - min) / scale). A range not centred on 0 (after
    a ReLU, say) wastes no levels. -> (q uint8, scale, zero)."""
    lo = w.amin() if dim is None else w.amin(dim, keepdim=True)
    hi = w.amax() if dim is None else w.amax(dim, keepdim=True)
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
    errors = {}
    for name, dim in [("per tensor", None), ("per channel", 1)]:
        q, scale = quantize_absmax(w, 8, dim)
        errors[name] = (dequantize(q, scale) - w).abs().mean().item()
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
    quantized versions, in place. head='tied' quantizes the shared embedding/head matrix
    once for both; 'float' keeps it exact. Norms and biases stay float."""
    def make(weight, bias=None):
        if bits == 8:
            return Int8Linear(weight, bias)
        return Int4Linear(weight, bias, group_size)

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child.weight, child.bias))
            else:
                swap(child)
    swap(model.transformer.h)
    if "wpe" in model.transformer:
        model.transformer.wpe = QuantEmbedding(make(model.transformer.wpe.weight))
    if head == "tied":
        model.lm_head = make(model.lm_head.weight)
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
    model.eval()
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
            m = variant(base, kind, head)
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
# main

def check_config(cfg):
    if cfg.bits not in (4, 8):
        raise UserError(f"--bits={cfg.bits}: pass 8 (int8 per channel) or 4 (per group)")
    if cfg.head not in ("tied", "float"):
        raise UserError(f"--head={cfg.head!r} is unknown; use tied or float")
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
        if cfg.init_from:
            model = from_pretrained(cfg.init_from, cfg.data_dir).to(device)
            ckpt = {"tokenizer": "gpt2"}
        else:
            model, ckpt = load_checkpoint(cfg.ckpt_path, device)
        model.eval()
        if cfg.bench:
            return bench(cfg, model, ckpt)
        kind = "int8" if cfg.bits == 8 else f"int4-g{cfg.group_size}"
        source = f"out/{cfg.init_from}" if cfg.init_from else cfg.ckpt_path
        out_path = cfg.out_path or f"{os.path.splitext(source)[0]}-{kind}.pt"
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
        stop = tok.special_tokens[STOP]
        prompt = tok.encode(cfg.prompt, allowed_special="none") or [stop]
        new, speed = decode_speed(model, prompt, cfg.max_new_tokens, stop)
        print(f"{cfg.prompt}{tok.decode(new)}\n"
              f"{len(new)} tokens, {speed:,.1f} tok/s after the first")
    return dict(model=model, ckpt=ckpt)

if __name__ == "__main__":
    run(main, QuantizeConfig)
