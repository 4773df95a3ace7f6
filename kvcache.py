"""KV cache: generate text fast by remembering every layer's keys and values instead of recomputing them.

What you learn here: why a cache-free generate does O(T^2) work per token while a cached one does O(T);
prefill (the prompt in one forward pass) versus decode (one token per step against the cache); batching
prompts of different lengths with left padding, per-row positions and a padding mask; greedy, temperature,
top-k and top-p (nucleus) sampling; and why batch-1 decode is bound by memory bandwidth, not FLOPs:
every step reads all the weights once, so tokens/s <= bandwidth / (weight bytes + cache bytes), and a
matrix-vector kernel (MatVecLinear) gets closer to that bound than a matrix-matrix one. Past block_size the
window slides: only the last block_size // 2 tokens are kept and prefilled again (all rows of a batch together).

How to run:
    python kvcache.py                               # continue a story with the model train.py wrote
    python kvcache.py --prompt="Once upon a time|The cat" --num_samples=2 --temperature=0.9 --top_p=0.9
    python kvcache.py --interactive                 # type, the story continues; Ctrl-D exits
    python kvcache.py --bench                       # tokens/s with and without the cache, vs bandwidth
    python kvcache.py --init_from=gpt2 --device=cuda    # OpenAI's GPT-2 (--gpt2_dir: its tokenizer)

Depends on gpt.py (the model) and bpe.py (the tokenizer); reads out/ckpt.pt from train.py, or GPT-2. References:
Efficiently Scaling Transformer Inference (arXiv:2211.05102); top-p (1904.09751); GQA (2305.13245); gpt-fast.
"""
import dataclasses
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import Tokenizer
from gpt import (GPT, GPTConfig, format_config, from_pretrained, load_checkpoint, pick_device,
                 refuse_torchrun, run_main, setup_precision)

@dataclasses.dataclass
class KVCacheConfig:
    """Generate text with a KV cache from a train.py checkpoint or GPT-2, or benchmark the cache. When the
    history would pass block_size tokens, the window slides: only its last block_size // 2 are kept."""
    # I/O
    ckpt_path: str = "out/ckpt.pt"     # checkpoint written by train.py
    init_from: str = ""                # '' = read ckpt_path; gpt2 (or gpt2-medium, ...) = OpenAI's weights
    gpt2_dir: str = "data/gpt2"        # GPT-2 tokenizer files for --init_from=gpt2 (encoder.json, vocab.bpe)
    # sampling
    prompt: str = "Once upon a time"   # '|' separates several prompts, generated together in one batch
    num_samples: int = 1               # samples per prompt (all in the same batch)
    max_new_tokens: int = 200          # stops earlier at <|endoftext|>; past block_size the window slides
    temperature: float = 0.8           # 0 = greedy; 1 = the model's distribution
    top_k: int = 200                   # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                 # keep the fewest tokens whose probability reaches p; 1.0 = off, 0.9 typical
    seed: int = 1337
    interactive: bool = False          # a prompt loop: what you type continues the story; Ctrl-D exits
    bench: bool = False                # tokens/s without and with the cache, against the bandwidth bound
    # system
    device: str = "auto"               # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"                # auto, float32, bfloat16, float16: weights and cache are cast to it

# -----------------------------------------------------------------------------
# the cache: every layer's keys and values, allocated once for the whole generation

class KVCache:
    """Keys and values for B rows of up to max_len tokens, one (B, nkv, max_len, hs) slab per layer.
    update(layer, k, v) writes the new positions and returns the keys/values of every position so far."""
    def __init__(self, config, B, max_len, device, dtype):
        nkv, hs = config.n_kv_head or config.n_head, config.n_embd // config.n_head
        # only the nkv key/value heads are stored: grouped-query attention shrinks the cache by nh / nkv
        self.k = torch.zeros(config.n_layer, B, nkv, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # filled positions, the same for every row because prompts are left-padded

    def update(self, layer, k, v):
        L, T = self.length, k.size(2)
        assert L + T <= self.k.size(3), f"cache overflow: {L} + {T} > {self.k.size(3)} positions"
        # write in place (no allocation), then return views of the filled part: attention costs O(L), not O(max_len)
        self.k[layer, :, :, L:L + T] = k
        self.v[layer, :, :, L:L + T] = v
        return self.k[layer, :, :, :L + T], self.v[layer, :, :, :L + T]  # (B, nkv, L + T, hs)

    def nbytes(self):
        return 2 * self.k.numel() * self.k.element_size()

# -----------------------------------------------------------------------------
# a forward pass that reads and extends the cache

def forward_cached(model, cache, idx, pos, mask):
    """Run the new tokens idx (B, T) at positions pos (B, T) through the model, appending their keys and
    values to the cache. mask (B, 1, T, L + T): True where a new query may see a key. Returns the
    logits of the last position (B, V) in float32."""
    # NEW vs gpt.py: Block.forward, unrolled so that attention sees the cached keys and values as well
    x, rope = model.embed(idx, pos)                                # (B, T, C)
    for i, block in enumerate(model.transformer.h):
        q, k, v = block.attn.qkv(block.ln_1(x), rope)             # (B, nh, T, hs), (B, nkv, T, hs) x 2
        k, v = cache.update(i, k, v)                               # (B, nkv, L + T, hs)
        x = x + block.attn.attend(q, k, v, mask)
        x = x + block.mlp(block.ln_2(x))
    cache.length += idx.size(1)
    # only the last position's logits are needed to pick the next token: skip T - 1 rows of the lm_head
    return model.lm_head(model.transformer.ln_f(x[:, -1])).float()  # (B, V)

def prefill(model, cache, idx, pad):
    # the left-padded prompts idx (B, T) in one pass; row b starts with pad[b] pad tokens, so its real
    # tokens sit at positions 0, 1, ... and no real query may look at a pad key
    assert cache.length == 0, f"prefill needs an empty cache, this one holds {cache.length} positions"
    t = torch.arange(idx.size(1), device=idx.device)
    pos = (t - pad[:, None]).clamp(min=0)                          # (B, T)
    real = t >= pad[:, None]                                       # (B, T) keys that are real tokens
    causal = t[None, :] <= t[:, None]                              # (T, T) key index <= query index
    # a pad query sees no real key; letting it see itself keeps its softmax finite (else NaN)
    mask = (causal & real[:, None, :]) | (t[None, :] == t[:, None])  # (B, T, T)
    return forward_cached(model, cache, idx, pos, mask[:, None])

class MatVecLinear(nn.Linear):
    """nn.Linear that runs a single row (batch-1 decode) as a matrix-vector product: on CPUs the bf16 kernel of
    torch.mv reads the weights about 1.4x faster than the matrix-matrix one (`--bench` compares them)."""
    def forward(self, x):
        if x.numel() != x.size(-1):  # several rows: the ordinary matmul
            return super().forward(x)
        y = torch.mv(self.weight, x.flatten())
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)

def use_matvec(model, on=True):
    for m in model.modules():  # switching the class in place keeps the very same (tied) weights
        if isinstance(m, nn.Linear):
            m.__class__ = MatVecLinear if on else nn.Linear
    return model

# -----------------------------------------------------------------------------
# sampling: temperature, top-k, top-p

def top_p_filter(probs, p):
    """Keep the smallest set of most likely tokens whose probability reaches p, renormalised:
    top_p_filter([[0.5, 0.3, 0.15, 0.05]], 0.8) -> [[0.625, 0.375, 0, 0]]; p=0.81 keeps three."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = F.pad(sorted_probs.cumsum(-1)[..., :-1], (1, 0))     # probability of the tokens ranked above
    # a token is dropped when the tokens above it already reach p (the first one is always kept)
    sorted_probs = sorted_probs.masked_fill(before >= p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)

def sample(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Next token ids (B,) from logits (B, V): argmax when temperature == 0, else a draw from the
    tempered softmax cut to the top_k tokens (0 = all), then to the top_p nucleus (1.0 = all)."""
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
# generation: prefill once, then one cached decode step per token

@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eot_id=-1, generator=None,
             on_token=None):
    """Continue prompts (lists of token ids, any lengths) in one batch; returns the new ids of each row,
    cut before eot_id. on_token(step, ids (B,), logits (B, V)) sees every choice (streaming, tests).
    Window rule: the model sees the whole history until it would pass block_size tokens, then only the
    last block_size // 2, which are prefilled again (a batch slides when its left-padded length does)."""
    block_size, device = model.config.block_size, model.lm_head.weight.device
    keep = max(1, block_size // 2)
    prompts = [p if len(p) <= block_size else p[-keep:] for p in prompts]
    if not all(prompts):
        raise ValueError("an empty prompt has nothing to continue; start it with <|endoftext|> or any text")
    B, T = len(prompts), max(len(p) for p in prompts)
    # left padding lines the rows up, so every row writes its next token into the same cache slot
    ctx = torch.zeros(B, block_size, dtype=torch.long, device=device)  # the token in each cache slot
    ctx[:, :T] = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)  # (B,)
    # room for the prompt and every fed-back token, at most block_size (then the window slides)
    room = min(block_size, T + max(max_new_tokens, 1) - 1)
    cache = KVCache(model.config, B, room, device, model.lm_head.weight.dtype)
    logits = prefill(model, cache, ctx[:, :T], pad)
    slots = torch.arange(block_size, device=device)
    real = (slots >= pad[:, None])[:, None, None, :]               # (B, 1, 1, block_size) real keys
    out, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        next_id = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        if on_token is not None:
            on_token(step, next_id, logits)
        for b, i in enumerate(next_id.tolist()):
            done[b] = done[b] or i == eot_id
            if not done[b]:
                out[b].append(i)
        L = cache.length
        if all(done) or step == max_new_tokens - 1:
            break
        if L == block_size:  # full: keep the last `keep` tokens of the history and prefill them again
            ctx[:, :keep] = torch.cat([ctx[:, L - keep + 1:], next_id[:, None]], dim=1)
            pad = (pad - (L + 1 - keep)).clamp(min=0)
            real = (slots >= pad[:, None])[:, None, None, :]
            cache.length = 0
            logits = prefill(model, cache, ctx[:, :keep], pad)
        else:  # decode: one token per row at position L - pad, attending over the L + 1 cached slots
            ctx[:, L] = next_id
            logits = forward_cached(model, cache, next_id[:, None], (L - pad)[:, None], real[..., :L + 1])
    return out

# -----------------------------------------------------------------------------
# helpers used by main: loading, streaming, benchmark

def load_tokenizer(ckpt, gpt2_dir):
    # GPT-2 (no checkpoint, or one trained on GPT-2's tokens) or the bpe.py tokenizer train.py saved
    saved = "gpt2" if ckpt is None else ckpt.get("tokenizer", "gpt2")
    if saved == "gpt2":
        return Tokenizer.gpt2(gpt2_dir)
    if isinstance(saved, dict):
        return Tokenizer.from_dict(saved)
    raise ValueError(f"the checkpoint's tokenizer {str(saved)[:60]!r} is neither 'gpt2' nor a bpe.py dict; "
                     f"retrain with train.py")

class TextStream:
    """Print tokens as they arrive. A character split across tokens decodes to U+FFFD until its last
    byte arrives, so text ending in U+FFFD is held back; only unprinted ids are decoded (O(n) overall)."""
    def __init__(self, tok):
        self.tok, self.ids = tok, []

    def push(self, token_id=None):  # None flushes whatever is held back
        self.ids += [] if token_id is None else [token_id]
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
    # copying 512 MB (more than any CPU cache) reads and writes each byte once: the memory speed limit
    src, dst = torch.ones(128 * 2**20, device=device), torch.empty(128 * 2**20, device=device)
    return 2 * src.nbytes / best_time(lambda: dst.copy_(src)[-1].item(), 6)  # .item() waits for a GPU

def bench_row(model, B, new_tokens, device, prompt_len=16, points=4):
    # cached: a real greedy run, timed per step; the median decode step is the typical one, robust to
    # other programs stealing the CPU for a while (the run's total is prefill + new_tokens - 1 such steps)
    config, stamps = model.config, []
    prompts = torch.randint(0, config.vocab_size, (B, prompt_len)).tolist()
    t0 = time.perf_counter()
    generate(model, prompts, new_tokens, on_token=lambda *_: stamps.append(time.perf_counter()))
    median = sorted(b - a for a, b in zip(stamps, stamps[1:]))[(new_tokens - 1) // 2]
    cached, decode = B * new_tokens / (stamps[0] - t0 + (new_tokens - 1) * median), B / median
    # cache-free: each step of gpt.py's generate re-reads a longer context, so time one step (best of 2
    # at batch 1) at `points` evenly spaced context lengths and integrate over the run (the midpoint rule)
    seconds = 0.0
    for i in range(points):
        T = min(prompt_len + int((i + 0.5) * new_tokens / points), config.block_size)
        idx = torch.randint(0, config.vocab_size, (B, T), device=device)
        step = best_time(lambda: model.generate(idx, 1, temperature=0).tolist(), 2 if B == 1 else 1)
        seconds += step * new_tokens / points
    # the number of cached positions each decode step reads, averaged over the run (window rule included)
    lengths, L = 0, prompt_len
    for _ in range(new_tokens - 1):
        L = L + 1 if L < config.block_size else config.block_size // 2 + 1
        lengths += L
    return B * new_tokens / seconds, cached, decode, lengths / (new_tokens - 1)

def run_bench(cfg, device):
    bandwidth = measure_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads on {device}")
    shapes = {"gpt2-124M": GPTConfig()}
    if os.path.exists(cfg.ckpt_path):
        shapes[cfg.ckpt_path] = load_checkpoint(cfg.ckpt_path)[0].config
    else:  # placeholder for train.py's default shape when no checkpoint has been trained yet
        shapes["train.py default"] = GPTConfig(vocab_size=1024, block_size=256, n_layer=4, n_head=4, n_embd=256,
                                               bias=False)
    print("| shape | dtype | batch | new tokens | no cache tok/s | cache tok/s | speedup | cache decode tok/s | "
          "bound tok/s | decode / bound |\n|" + "---|" * 10)
    rows, notes = [], []
    for name, config in shapes.items():
        model = GPT(config).to(device).eval()
        # every weight is read once per decode step: the tied wte/lm_head once, the position table not at all
        weights = model.num_params() - (0 if config.rope else config.block_size * config.n_embd)
        kv_per_token = 2 * config.n_layer * (config.n_kv_head or config.n_head) * (config.n_embd // config.n_head)
        for dtype in ("float32", "bfloat16"):
            # casting the weights (not autocast) halves the bytes each decode step reads; the cache follows
            model = model.to(getattr(torch, dtype))
            size = model.lm_head.weight.element_size()
            generate(model, [[0] * 16] * 8, 8)  # warm up: the first calls pick and build the kernels
            plain = bench_row(use_matvec(model, False), 1, 256, device)[2]  # batch-1 decode with nn.Linear
            matvec = bench_row(use_matvec(model), 1, 256, device)[2]
            notes.append(f"| {name} | {dtype} | {plain:,.1f} | {matvec:,.1f} | {matvec / plain:.2f}x |")
            for B, new_tokens in ((1, 256), (1, 512), (1, 1024), (8, 256), (8, 1024)):
                free, cached, decode, mean_len = bench_row(model, B, new_tokens, device)
                bound = bandwidth / ((weights + kv_per_token * mean_len) * size) if B == 1 else float("nan")
                rows.append(dict(shape=name, dtype=dtype, B=B, new_tokens=new_tokens, no_cache=free, cache=cached))
                print(f"| {name} | {dtype} | {B} | {new_tokens} | {free:,.1f} | {cached:,.1f} | {cached / free:.1f}x "
                      f"| {decode:,.1f} | {bound:,.1f} | {decode / bound:.2f} |", flush=True)
    print("no cache: gpt.py's generate, one step timed at 4 evenly spaced context lengths and integrated; cache: "
          "prefill + median decode step; bound: copy bandwidth / bytes of weights and cache read per token")
    print("\n| shape | dtype | batch-1 decode tok/s, nn.Linear | MatVecLinear | speedup |\n|" + "---|" * 5, *notes,
          sep="\n")
    return {"bandwidth": bandwidth, "rows": rows}

# -----------------------------------------------------------------------------
# main

def main(cfg):
    # --- setup: check the flags before loading anything
    refuse_torchrun("kvcache.py")
    if not (cfg.temperature >= 0 and cfg.top_k >= 0 and 0 < cfg.top_p <= 1 <= min(cfg.num_samples, cfg.max_new_tokens)):
        raise ValueError(f"--temperature={cfg.temperature}, --top_k={cfg.top_k}, --top_p={cfg.top_p}, "
                         f"--num_samples={cfg.num_samples}, --max_new_tokens={cfg.max_new_tokens}: need "
                         f"temperature >= 0, top_k >= 0, 0 < top_p <= 1, num_samples >= 1, max_new_tokens >= 1")
    if not cfg.bench and not cfg.init_from and not os.path.exists(cfg.ckpt_path):
        raise FileNotFoundError(f"no checkpoint at --ckpt_path={cfg.ckpt_path}: train one with `python train.py`, "
                                f"or sample OpenAI's GPT-2 with --init_from=gpt2")
    print(f"config:\n{format_config(cfg)}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.bench:
        return run_bench(cfg, device)
    dtype, reason, _ = setup_precision(device, cfg.dtype)  # weights are cast, not autocast
    # --- model and tokenizer (a checkpoint loads on the cpu: its optimizer state never reaches the device)
    if cfg.init_from:
        model, ckpt = from_pretrained(cfg.init_from), None
    else:
        model, ckpt = load_checkpoint(cfg.ckpt_path)
    # cast the weights (not autocast): decode reads every weight once per token, so half the bytes is
    # up to twice the speed; the cache takes the same dtype. Batch-1 decode multiplies one row: MatVecLinear
    model = use_matvec(model.to(device, getattr(torch, dtype)).eval())
    tok = load_tokenizer(ckpt, cfg.gpt2_dir)
    eot_id = tok.special_tokens.get("<|endoftext|>", -1)
    config, nh = model.config, model.config.n_head
    nkv, cache = config.n_kv_head or nh, KVCache(config, 1, config.block_size, "meta", getattr(torch, dtype))
    print(f"device {device}, dtype {dtype} ({reason}); {model.num_params() / 1e6:.2f}M parameters")
    print(f"KV cache {cache.nbytes() / 1e6:.2f} MB per row of {config.block_size} tokens: {nkv} of {nh} heads "
          f"stored, grouped-query attention saves {cache.nbytes() * (nh // nkv - 1) / 1e6:.2f} MB")
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eot_id=eot_id,
                    generator=torch.Generator(device).manual_seed(cfg.seed))
    # --- generate: every prompt num_samples times in one batch; a single row is streamed as it comes
    texts = [p for p in cfg.prompt.split("|") for _ in range(cfg.num_samples)]
    story, tokens, seconds = [eot_id] if eot_id >= 0 else [], 0, 0.0  # text starts after <|endoftext|>
    while True:
        if cfg.interactive:  # each turn continues the whole story so far (the window rule crops it)
            try:
                texts = [input("\n> ")]
            except EOFError:
                break
        prompts, stream = [story + tok.encode(t, allowed_special="all") for t in texts], TextStream(tok)
        print(texts[0] if len(texts) == 1 and not cfg.interactive else "", end="")
        show = lambda step, ids, logits: stream.push(ids[0].item() if ids[0] != eot_id else None)
        t0 = time.perf_counter()
        outs = generate(model, prompts, cfg.max_new_tokens, on_token=show if len(texts) == 1 else None, **sampling)
        seconds, tokens = seconds + time.perf_counter() - t0, tokens + sum(len(o) for o in outs)
        stream.push()
        for i, ids in enumerate(outs if len(outs) > 1 else []):
            print(f"\n--- sample {i}\n{texts[i]}{tok.decode(ids)}")
        if not cfg.interactive:
            break
        story = prompts[0] + outs[0]
    print(f"\n{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):,.1f} tok/s (prefill included)")
    return {"tokens": tokens, "tok_per_s": tokens / max(seconds, 1e-9)}

if __name__ == "__main__":
    run_main(main, KVCacheConfig)
