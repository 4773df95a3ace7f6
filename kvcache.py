"""KV cache: generate fast by remembering every layer's keys and values, and measure why it works.

What you learn here: a cache-free generate re-runs the whole history at every step, O(T^2) work per
token over a run, while a cached one runs only the new token against the stored keys and values,
O(T); prefill (the prompt in one forward pass) versus decode (one token per step); and why batch-1
decode is bound by memory bandwidth, not FLOPs: every step reads all the weights once, so
tokens/s <= bandwidth / (weight bytes + cache bytes), and a matrix-vector kernel (MatVecLinear) gets
closer to that bound than a matrix-matrix one. The cache itself is a few lines of gpt.py: `KVCache`,
`CausalSelfAttention.forward` (append, then attend over every cached position), `GPT.prefill` (left
padding, per-row positions and the padding mask) and `GPT.generate` (the decode loop, sampling,
<|endoftext|>, and the window that slides past block_size). This file adds what only inference
needs: streaming text, an interactive prompt, MatVecLinear and the benchmark.

How to run:
    python kvcache.py                               # continue a story with the model train.py wrote
    python kvcache.py --prompt="Once upon a time|The cat" --num_samples=2 --top_p=0.9
    python kvcache.py --interactive                 # type, the story continues; Ctrl-D exits
    python kvcache.py --bench                       # tokens/s with and without the cache
    python kvcache.py --init_from=gpt2 --device=cuda    # OpenAI's GPT-2 (--gpt2_dir: its tokenizer)

Depends on gpt.py (the model and its cache) and bpe.py (the tokenizer); reads out/ckpt.pt from
train.py, or GPT-2. References: Efficiently Scaling Transformer Inference (arXiv:2211.05102);
top-p (1904.09751); GQA (2305.13245); gpt-fast.
"""
import dataclasses
import os
import time

import torch
import torch.nn as nn

from bpe import Tokenizer
from gpt import (GPT, GPTConfig, format_config, from_pretrained, load_checkpoint, pick_device,
                 refuse_torchrun, run_main, setup_precision)

@dataclasses.dataclass
class KVCacheConfig:
    """Generate text with a KV cache from a train.py checkpoint or GPT-2, or benchmark the cache.
    Past block_size tokens of history, the window slides: its last block_size // 2 stay."""
    # I/O
    ckpt_path: str = "out/ckpt.pt"     # checkpoint written by train.py
    init_from: str = ""                # '' = read ckpt_path; gpt2 (or gpt2-medium, ...) = OpenAI's
    gpt2_dir: str = "data/gpt2"        # GPT-2's tokenizer files (encoder.json, vocab.bpe)
    # sampling
    prompt: str = "Once upon a time"   # '|' separates prompts, generated together in one batch
    num_samples: int = 1               # samples per prompt (all in the same batch)
    max_new_tokens: int = 200          # stops at <|endoftext|>; past block_size the window slides
    temperature: float = 0.8           # 0 = greedy; 1 = the model's distribution
    top_k: int = 200                   # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                 # keep the fewest tokens reaching probability p; 1.0 = off
    seed: int = 1337
    interactive: bool = False          # a prompt loop: your text continues the story; Ctrl-D exits
    bench: bool = False                # tokens/s without and with the cache, vs the bandwidth bound
    # system
    device: str = "auto"               # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"                # auto, float32, bfloat16, float16 (casts weights and cache)

# -----------------------------------------------------------------------------
# batch-1 decode as matrix-vector products

class MatVecLinear(nn.Linear):
    """nn.Linear that runs a single row (batch-1 decode) as a matrix-vector product: on CPUs the
    bf16 kernel of torch.mv reads the weights about 1.4x faster than the matmul one (`--bench`)."""
    def forward(self, x):
        if x.numel() != x.size(-1):  # several rows: the ordinary matmul
            return super().forward(x)
        y = torch.mv(self.weight, x.flatten())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

def use_matvec(model, on=True):
    for m in model.modules():  # switching the class in place keeps the very same (tied) weights
        if isinstance(m, nn.Linear):
            m.__class__ = MatVecLinear if on else nn.Linear
    return model

# -----------------------------------------------------------------------------
# helpers used by main: streaming, the benchmark

class TextStream:
    """Print tokens as they arrive. A character split across tokens decodes to U+FFFD until its last
    byte arrives, so text ending in U+FFFD waits; only unprinted ids are decoded (O(n) overall)."""
    def __init__(self, tok):
        self.tok = tok
        self.ids = []

    def push(self, token_id=None):  # None flushes whatever is held back
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if token_id is None or not text.endswith("\ufffd"):
            print(text, end="", flush=True)
            self.ids = []

def best_time(fn, repeats):
    # the fastest of a few runs is the one least disturbed by other work on the machine
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

def measure_bandwidth(device):
    # copying 512 MB (beyond any CPU cache) reads and writes each byte once: the memory speed limit
    src = torch.ones(128 * 2**20, device=device)
    dst = torch.empty(128 * 2**20, device=device)
    return 2 * src.nbytes / best_time(lambda: dst.copy_(src)[-1].item(), 6)  # .item() syncs a GPU

def bench_row(model, prompts, new_tokens, points=4):
    """(cache-free tok/s, cached tok/s, cached decode tok/s, mean cached length) for greedy runs of
    new_tokens from prompts. Cached: a real run, timed per step; the median decode step is the
    typical one, robust to other programs briefly stealing the CPU (the run's total is prefill +
    new_tokens - 1 such steps). Cache-free: each step re-reads a longer history, so one step is
    timed (best of 2 at batch 1) at `points` evenly spaced lengths, integrated (midpoint rule)."""
    config = model.config
    B = len(prompts)
    stamps = []
    t0 = time.perf_counter()
    model.generate(prompts, new_tokens, temperature=0,
                   on_token=lambda *_: stamps.append(time.perf_counter()))
    median = sorted(b - a for a, b in zip(stamps, stamps[1:]))[(new_tokens - 1) // 2]
    cached = B * new_tokens / (stamps[0] - t0 + (new_tokens - 1) * median)
    seconds = 0.0
    for i in range(points):
        grown = int((i + 0.5) * new_tokens / points)
        history = [(p + [0] * grown)[-config.block_size:] for p in prompts]
        one_step = lambda: model.generate(history, 1, temperature=0, use_cache=False)
        seconds += best_time(one_step, 2 if B == 1 else 1) * new_tokens / points
    # the number of cached positions each decode step reads, averaged over the run (window included)
    lengths = 0
    L = max(map(len, prompts))
    for _ in range(new_tokens - 1):
        L = L + 1 if L < config.block_size else config.block_size // 2 + 1
        lengths += L
    return B * new_tokens / seconds, cached, B / median, lengths / (new_tokens - 1)

def run_bench(cfg, device):
    bandwidth = measure_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"{torch.get_num_threads()} threads on {device}")
    shapes = {"gpt2-124M": GPTConfig()}
    if os.path.exists(cfg.ckpt_path):
        shapes[cfg.ckpt_path] = load_checkpoint(cfg.ckpt_path)[0].config
    else:  # train.py's default shape, when no checkpoint has been trained yet
        shapes["train.py default"] = GPTConfig(vocab_size=1024, block_size=256, n_layer=4, n_head=4,
                                               n_embd=256, bias=False)
    print("| shape | dtype | batch | new tokens | no cache tok/s | cache tok/s | speedup | "
          "cache decode tok/s | bound tok/s | decode / bound |\n|" + "---|" * 10)
    rows = []
    notes = []
    for name, config in shapes.items():
        model = GPT(config).to(device).eval()
        # every weight is read once per decode step (the tied wte/lm_head once, wpe not at all)
        weights = model.num_params() - (0 if config.rope else config.block_size * config.n_embd)
        hs = config.n_embd // config.n_head
        kv_per_token = 2 * config.n_layer * (config.n_kv_head or config.n_head) * hs
        runs = [(1, 16, 256), (1, 16, 512), (1, 16, 1024), (8, 16, 256), (8, 16, 1024)]
        if name != "gpt2-124M":  # many ragged prompts at once, as finetune.py and dpo.py sample
            runs.append((64, 0, 200))
        for dtype in ("float32", "bfloat16"):
            # casting the weights (not autocast) halves the bytes each decode step reads
            model = model.to(getattr(torch, dtype))
            size = model.lm_head.weight.element_size()
            model.generate([[0] * 16] * 8, 8)  # warm up: the first calls pick and build the kernels
            one = [[0] * 16]
            plain = bench_row(use_matvec(model, False), one, 256)[2]  # batch-1 decode, nn.Linear
            matvec = bench_row(use_matvec(model), one, 256)[2]
            notes.append(f"| {name} | {dtype} | {plain:,.1f} | {matvec:,.1f} | "
                         f"{matvec / plain:.2f}x |")
            for B, prompt_len, new_tokens in runs:
                gen = torch.Generator().manual_seed(B)
                lengths = [prompt_len or int(torch.randint(10, 41, (), generator=gen))
                           for _ in range(B)]
                prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
                           for n in lengths]
                free, cached, decode, mean_len = bench_row(model, prompts, new_tokens)
                bound_cells = "| |"  # the bound is for batch 1: larger batches share each weight read
                if B == 1:
                    bound = bandwidth / ((weights + kv_per_token * mean_len) * size)
                    bound_cells = f"{bound:,.1f} | {decode / bound:.2f} |"
                rows.append(dict(shape=name, dtype=dtype, B=B, new_tokens=new_tokens, no_cache=free,
                                 cache=cached))
                print(f"| {name} | {dtype} | {B} | {new_tokens} | {free:,.1f} | {cached:,.1f} | "
                      f"{cached / free:.1f}x | {decode:,.1f} | {bound_cells}", flush=True)
    print("no cache: GPT.generate(use_cache=False), one step timed at 4 evenly spaced history "
          "lengths and integrated; cache: prefill + median decode step; bound: copy bandwidth / "
          "bytes of weights and cache read per token; batch 64: prompts of 10-40 tokens")
    print("\n| shape | dtype | batch-1 decode tok/s, nn.Linear | MatVecLinear | speedup |\n|"
          + "---|" * 5, *notes, sep="\n")
    return {"bandwidth": bandwidth, "rows": rows}

# -----------------------------------------------------------------------------
# main

def main(cfg):
    # --- setup: check the flags before loading anything
    refuse_torchrun("kvcache.py")
    if not cfg.temperature >= 0:  # (not >= also catches nan)
        raise ValueError(f"--temperature={cfg.temperature} must be 0 (greedy) or more")
    if cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top_k={cfg.top_k}, --top_p={cfg.top_p}: need top_k >= 0 (0 = off) "
                         f"and 0 < top_p <= 1 (1 = off)")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"--num_samples={cfg.num_samples}, --max_new_tokens={cfg.max_new_tokens}: "
                         f"both must be 1 or more")
    if not cfg.bench and not cfg.init_from and not os.path.exists(cfg.ckpt_path):
        raise FileNotFoundError(f"no checkpoint at --ckpt_path={cfg.ckpt_path}: train one with "
                                f"`python train.py`, or sample GPT-2 with --init_from=gpt2")
    print(f"config:\n{format_config(cfg)}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.bench:
        return run_bench(cfg, device)
    dtype, reason, _ = setup_precision(device, cfg.dtype)  # weights are cast, not autocast
    # --- model and tokenizer (a checkpoint loads on the cpu: its optimizer state never reaches the
    # device)
    if cfg.init_from:
        model = from_pretrained(cfg.init_from)
        tok = Tokenizer.from_saved("gpt2", cfg.gpt2_dir)
    else:
        model, ckpt = load_checkpoint(cfg.ckpt_path)
        tok = Tokenizer.from_saved(ckpt.get("tokenizer", "gpt2"), cfg.gpt2_dir)
    # cast the weights (not autocast): decode reads every weight once per token, so half the bytes
    # is up to twice the speed. Batch-1 decode multiplies one row: MatVecLinear
    model = use_matvec(model.to(device, getattr(torch, dtype)).eval())
    eot_id = tok.special_tokens.get("<|endoftext|>", -1)
    config = model.config
    nh = config.n_head
    nkv = config.n_kv_head or nh
    row_bytes = 2 * config.n_layer * nkv * (config.n_embd // nh) * config.block_size * (
        model.lm_head.weight.element_size())
    print(f"device {device}, dtype {dtype} ({reason}); {model.num_params() / 1e6:.2f}M parameters")
    kv_note = f"KV cache {row_bytes / 1e6:.2f} MB per row of {config.block_size} tokens"
    if nkv < nh:
        kv_note += (f": {nkv} of {nh} heads stored, grouped-query attention saves "
                    f"{row_bytes * (nh // nkv - 1) / 1e6:.2f} MB")
    print(kv_note)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eot_id=eot_id,
                    generator=torch.Generator(device).manual_seed(cfg.seed))
    # --- generate: every prompt num_samples times in one batch; a single row is streamed
    texts = [p for p in cfg.prompt.split("|") for _ in range(cfg.num_samples)]
    story = [eot_id] if eot_id >= 0 else []  # text starts after <|endoftext|>
    tokens = 0
    seconds = 0.0
    while True:
        if cfg.interactive:  # each turn continues the whole story so far (the window rule crops it)
            try:
                texts = [input("\n> ")]
            except EOFError:
                break
        prompts = [story + tok.encode(t, allowed_special="all") for t in texts]
        stream = TextStream(tok)
        show = None
        if len(texts) == 1:
            if not cfg.interactive:
                print(texts[0], end="")
            def show(step, ids, logits):
                stream.push(ids[0].item() if ids[0] != eot_id else None)
        t0 = time.perf_counter()
        outs = model.generate(prompts, cfg.max_new_tokens, on_token=show, **sampling)
        seconds += time.perf_counter() - t0
        tokens += sum(len(o) for o in outs)
        stream.push()
        for i, ids in enumerate(outs):
            if len(outs) > 1:
                print(f"\n--- sample {i}\n{texts[i]}{tok.decode(ids)}", end="")
            if len(ids) < cfg.max_new_tokens:
                print(" [stopped at <|endoftext|>]", end="")
        if not cfg.interactive:
            break
        story = prompts[0] + outs[0]
    print(f"\n{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):,.1f} tok/s "
          f"(prefill included)")
    return {"tokens": tokens, "tok_per_s": tokens / max(seconds, 1e-9)}

if __name__ == "__main__":
    run_main(main, KVCacheConfig)
