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
needs: streaming text, an interactive prompt, MatVecLinear and the benchmark, and a server:
continuous batching (requests join and leave the running decode batch between steps, each row
with its own cache length) behind OpenAI's HTTP API, with a chat page, on the standard library.

How to run:
    python kvcache.py                               # continue a story with the model train.py wrote
    python kvcache.py --prompt="Once upon a time|The cat" --num_samples=2 --top_p=0.9
    python kvcache.py --interactive                 # type, the story continues; Ctrl-D exits
    python kvcache.py --bench                       # tokens/s with and without the cache
    python kvcache.py --init_from=gpt2 --device=cuda    # OpenAI's GPT-2 (--gpt2_dir: its tokenizer)
    python kvcache.py --serve                       # a chat page at http://127.0.0.1:8000/
    python kvcache.py --bench_serve                 # 1, 4 and 16 streaming clients at once

Depends on gpt.py (the model and its cache) and bpe.py (the tokenizer); reads out/ckpt.pt from
train.py, or GPT-2. References: Efficiently Scaling Transformer Inference (arXiv:2211.05102);
top-p (1904.09751); GQA (2305.13245); gpt-fast; Orca, iteration-level scheduling (OSDI 2022);
OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat).
"""
import dataclasses
import http.server
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid

import requests
import torch
import torch.nn as nn

from bpe import STOP, Tokenizer, render_conversation
from gpt import (GPT, GPTConfig, KVCache, format_config, from_pretrained, load_checkpoint,
                 pick_device, refuse_torchrun, run_main, sample, setup_precision)

@dataclasses.dataclass
class KVCacheConfig:
    """Generate text with a KV cache from a train.py checkpoint or GPT-2, or benchmark the cache.
    Past block_size tokens of history, the window slides: its last block_size // 2 stay."""
    # I/O
    ckpt_path: str = ""                # '' = out/ckpt.pt (train.py); --serve: the last stage made
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
    # serving: an OpenAI-compatible API and a chat page (--serve), continuous batching
    serve: bool = False                # serve on http://host:port until Ctrl-C: by default the
                                       # first of out-dpo/, out-sft/, out/ that has a ckpt.pt
    host: str = "127.0.0.1"            # 0.0.0.0 opens the server to your network
    port: int = 8000                   # 0 = any free port
    api_key: str = ""                  # '' = none; else /v1/ needs "Authorization: Bearer <key>"
    max_batch: int = 16                # requests decoded together, one token each per step
    max_queue: int = 64                # requests waiting to join beyond this get 429
    bench_serve: bool = False          # aggregate tok/s of 1, 4 and 16 streaming clients
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
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} threads on {device}")
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
# serving: continuous batching behind an OpenAI-compatible HTTP API
# NEW vs gpt.py: KVCache keeps one length for the whole batch (left padding lines the rows up).
# A server's rows arrive and leave at different times, so here every row has its own length.

class RowCache:
    """One layer's keys and values for up to `rows` requests of up to max_len positions each. Row i
    holds request i of the running batch; `lengths` (set by the Engine before every step) says how
    many positions each row has filled. update() writes one new position per row."""
    def __init__(self, rows, max_len):
        self.shape = (rows, max_len)
        self.k = None
        self.v = None
        self.lengths = None

    def put(self, row, k, v):  # a prefilled prompt's (nkv, T, hs) keys and values join as a row
        if self.k is None:
            rows, max_len = self.shape
            self.k = k.new_zeros(rows, k.size(0), max_len, k.size(2))
            self.v = torch.zeros_like(self.k)
        self.k[row, :, :k.size(1)] = k
        self.v[row, :, :v.size(1)] = v

    def move(self, src, dst):  # a row leaves: the last row takes its place, so rows stay 0..n-1
        self.k[dst] = self.k[src]
        self.v[dst] = self.v[src]

    def update(self, k, v):
        n = k.size(0)
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, self.lengths] = k[:, :, 0]                 # (n, nkv, hs) into each row's slot
        self.v[rows, :, self.lengths] = v[:, :, 0]
        width = int(self.lengths.max()) + 1                        # the longest row's filled part
        return self.k[:n, :, :width], self.v[:n, :, :width]

class Request:
    """One completion: its prompt ids, sampling settings and the text made so far. The engine
    thread pushes tokens in; the HTTP thread reads whole-character text pieces from `pieces` (then
    None). `cancelled` (a client that went away) makes the engine drop the row at its next step."""
    def __init__(self, tok, prompt, max_tokens, temperature=1.0, top_p=1.0, stop=(), seed=None):
        self.tok = tok
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.sampling = dict(temperature=temperature, top_p=top_p)
        self.seed = seed          # None: a fresh random seed (the engine makes the generator)
        self.generator = None
        self.stop = list(stop)
        self.hold = max(map(len, self.stop), default=1) - 1  # what could begin a stop string waits
        self.pieces = queue.Queue()
        self.tokens = 0           # generated, the stop token included (usage.completion_tokens)
        self.pending = []         # ids whose bytes do not yet end on a whole character
        self.text = ""
        self.sent = 0             # characters of text already put in pieces
        self.finish = None        # "stop" or "length" once finished
        self.cancelled = False

    def push(self, token_id, eot_id, full):
        """Take the next token (full: no room left for another); return True when finished."""
        self.tokens += 1
        if token_id != eot_id:
            self.pending.append(token_id)
        piece = self.tok.decode(self.pending)  # U+FFFD at the end: a character is still split
        ended = token_id == eot_id or self.tokens == self.max_tokens or full
        if ended or not piece.endswith("\ufffd"):  # at the end, a split character stays U+FFFD
            self.text += piece
            self.pending = []
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish = "stop"
        elif ended:
            self.finish = "stop" if token_id == eot_id else "length"
        ready = len(self.text) if self.finish else len(self.text) - self.hold
        if ready > self.sent:
            self.pieces.put(self.text[self.sent:ready])
            self.sent = ready
        if self.finish:
            self.pieces.put(None)
        return self.finish is not None

class Engine:
    """Continuous batching: one thread owns the model. Requests wait in a bounded queue and join the
    running batch between steps (the prompt is prefilled alone, its cache copied into a free row);
    each step decodes one token for every row, and finished or abandoned rows leave at once, so a
    short request never waits for a long one. A row ends when its context fills block_size."""
    def __init__(self, model, eot_id, max_batch=16, max_queue=64):
        self.model = model
        self.eot_id = eot_id
        self.max_batch = max_batch
        self.device = model.lm_head.weight.device
        self.block_size = model.config.block_size
        self.waiting = queue.Queue(max_queue)
        self.rows = []                                             # the running Requests
        self.caches = [RowCache(max_batch, self.block_size) for _ in model.transformer.h]
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.last = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # next inputs
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def submit(self, request):  # queue.Full when too many wait: the caller answers 429
        self.waiting.put_nowait(request)

    def choose(self, i, logits):
        request = self.rows[i]
        temperature = request.sampling["temperature"]
        next_id = sample(logits[None], temperature, 0, request.sampling["top_p"],
                         request.generator).item()
        full = int(self.lengths[i]) == self.block_size
        if not request.push(next_id, self.eot_id, full):
            self.last[i] = next_id

    def join(self, request):
        request.generator = torch.Generator(self.device)  # on the device the draws are made on
        if request.seed is None:
            request.generator.seed()
        else:
            request.generator.manual_seed(request.seed)
        prompt = torch.tensor([request.prompt], device=self.device)
        cache = [KVCache(prompt.size(1)) for _ in self.caches]
        logits = self.model.prefill(prompt, torch.zeros(1, dtype=torch.long, device=self.device),
                                    cache)
        i = len(self.rows)
        for row_cache, layer_cache in zip(self.caches, cache):
            row_cache.put(i, layer_cache.k[0], layer_cache.v[0])
        self.lengths[i] = prompt.size(1)
        self.rows.append(request)
        self.choose(i, logits[0])

    def step(self):
        n = len(self.rows)
        lengths = self.lengths[:n]
        for row_cache in self.caches:
            row_cache.lengths = lengths
        # each row's new token sits at position lengths[i] and sees the filled slots up to it
        width = int(lengths.max()) + 1
        mask = torch.arange(width, device=self.device) <= lengths[:, None]  # (n, width)
        logits = self.model.forward_cached(self.last[:n, None], self.caches, lengths[:, None],
                                           mask[:, None, None])
        lengths += 1
        for i in range(n):
            self.choose(i, logits[i])

    def leave_finished(self):
        for i in reversed(range(len(self.rows))):  # backwards: the row moved into i is kept
            if self.rows[i].finish or self.rows[i].cancelled:
                last = len(self.rows) - 1
                self.rows[i] = self.rows[last]
                self.rows.pop()
                self.lengths[i] = self.lengths[last]
                self.last[i] = self.last[last]
                for row_cache in self.caches:
                    row_cache.move(last, i)

    @torch.inference_mode()
    def loop(self):
        while self.running:
            try:  # wait for work when idle; when busy, take only what is already waiting
                while len(self.rows) < self.max_batch:
                    request = self.waiting.get(block=not self.rows, timeout=0.05)
                    if not request.cancelled:
                        self.join(request)
            except queue.Empty:
                pass
            self.leave_finished()
            if self.rows:
                self.step()
                self.leave_finished()

    def stop(self):
        self.running = False
        self.thread.join()

class BadRequest(Exception):
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status = status
        self.param = param

LIMITS = dict(body_bytes=2**20, messages=500, message_chars=8000, total_chars=32000, stops=4)

def field(body, name, kinds, default, check=None, rule=""):
    """body[name] (default when absent or null) if it is one of the types in kinds and passes
    check, else a 400 naming it. JSON's true and false are not numbers here, as in Python."""
    value = body.get(name)
    if value is None:
        return default
    wrong_type = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
    if wrong_type or (check is not None and not check(value)):
        raise BadRequest(400, f"'{name}' must be {rule}", name)
    return value

def parse_request(body, chat, tok, template, block_size):
    """A JSON request body -> a Request, or BadRequest naming the field that is wrong."""
    if chat:
        messages = field(body, "messages", (list,), None, lambda m: 0 < len(m) <= LIMITS["messages"],
                         f"a list of 1 to {LIMITS['messages']} messages")
        if messages is None:
            raise BadRequest(400, "'messages' is required", "messages")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and
                    isinstance(m.get("content"), str)):
                raise BadRequest(400, "each message needs a role (system, user or assistant) and "
                                 "a content string", "messages")
            if len(m["content"]) > LIMITS["message_chars"]:
                raise BadRequest(400, f"a message is over {LIMITS['message_chars']} characters",
                                 "messages")
        if sum(len(m["content"]) for m in messages) > LIMITS["total_chars"]:
            raise BadRequest(400, f"the messages are over {LIMITS['total_chars']} characters",
                             "messages")
        prompt = render_conversation(tok, messages, template)[0]
    else:
        text = field(body, "prompt", (str,), "", lambda p: len(p) <= LIMITS["total_chars"],
                     f"a string of at most {LIMITS['total_chars']} characters")
        prompt = [tok.special_tokens[STOP]] + tok.encode(text)   # text starts after <|endoftext|>
    if len(prompt) > block_size:
        raise BadRequest(400, f"the prompt is {len(prompt)} tokens; this model reads at most "
                         f"{block_size}", "messages" if chat else "prompt")
    stop = field(body, "stop", (str, list), [], lambda s: isinstance(s, str) or (
        len(s) <= LIMITS["stops"] and all(isinstance(x, str) and x for x in s)),
        f"a string or a list of up to {LIMITS['stops']} non-empty strings")
    if isinstance(stop, str):
        stop = [stop] if stop else []
    return Request(
        tok, prompt,
        max_tokens=field(body, "max_tokens", (int,), 256, lambda n: 1 <= n <= block_size,
                         f"an integer from 1 to {block_size}"),
        temperature=field(body, "temperature", (int, float), 1.0, lambda t: 0 <= t <= 2,
                          "a number from 0 to 2"),
        top_p=field(body, "top_p", (int, float), 1.0, lambda p: 0 < p <= 1,
                    "a number above 0 and at most 1"),
        stop=stop,
        seed=field(body, "seed", (int,), None, rule="an integer"))

# the chat page GET / returns: no framework, nothing fetched from the internet. Model text goes in
# with textContent, never innerHTML, so it shows as text whatever it contains
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>buildllm chat</title>
<style>
body { font: 16px system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
#log div { white-space: pre-wrap; padding: .5rem .8rem; margin: .5rem 0; border-radius: .5rem; }
.user { background: #e8f0fe; } .assistant { background: #f1f3f4; } .error { color: #b00020; }
form { display: flex; gap: .5rem; } textarea { flex: 1; font: inherit; }
input[type=number] { width: 4.5rem; }
</style></head>
<body>
<h3>buildllm chat</h3>
<div id="log"></div>
<form id="form">
  <textarea id="input" rows="3" placeholder="Ask for a story (Enter sends, Shift+Enter: new line)"></textarea>
  <div><button id="send">Send</button> <button id="stop" type="button" disabled>Stop</button></div>
</form>
<p>temperature <input id="temperature" type="number" value="0.8" min="0" max="2" step="0.1">
max tokens <input id="max_tokens" type="number" value="200" min="1">
API key <input id="key" type="password" size="10">
<button id="clear" type="button">New chat</button></p>
<script>
const $ = (id) => document.getElementById(id);
const messages = [];  // the conversation, sent whole with every request
let controller = null;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = role;
  div.textContent = text;
  $("log").append(div);
  return div;
}

async function send(event) {
  event.preventDefault();
  const content = $("input").value.trim();
  if (!content || controller) return;
  $("input").value = "";
  messages.push({role: "user", content});
  bubble("user", content);
  const out = bubble("assistant", "");
  let reply = "";
  controller = new AbortController();
  $("stop").disabled = false;
  try {
    const headers = {"Content-Type": "application/json"};
    if ($("key").value) headers.Authorization = "Bearer " + $("key").value;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({messages, stream: true,
                            temperature: Number($("temperature").value),
                            max_tokens: Number($("max_tokens").value)})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();  // {stream: true} keeps a character split across reads
    let buffer = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n");
      buffer = events.pop();  // the last event may be cut off: it waits for the rest
      for (const event of events) {
        const data = event.slice("data: ".length);
        if (data === "[DONE]") continue;
        reply += JSON.parse(data).choices[0].delta.content || "";
        out.textContent = reply;
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") bubble("error", error.message);
  }
  messages.push({role: "assistant", content: reply});
  controller = null;
  $("stop").disabled = true;
}

$("form").onsubmit = send;
$("input").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); };
$("stop").onclick = () => controller.abort();
$("clear").onclick = () => { messages.length = 0; $("log").textContent = ""; };
</script>
</body></html>
"""

def error_body(message, param=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}

def pieces_as_they_come(pieces):
    """Yield the text in a queue of pieces (None ends it) as it comes: a piece at a time, or all
    that have piled up since the last yield in one string, so a busy server writes fewer events."""
    done = False
    while not done:
        text = [pieces.get()]
        while text[-1] is not None and not pieces.empty():
            text.append(pieces.get_nowait())
        done = text[-1] is None
        if done:
            text.pop()
        if text:
            yield "".join(text)

class Handler(http.server.BaseHTTPRequestHandler):
    """One thread per connection (ThreadingHTTPServer): parse and check a request, hand it to the
    engine, write the answer. `timeout` bounds every socket read and write, so a client that sends
    its headers slowly, or stops reading a stream, holds only its own thread, for at most that."""
    timeout = 10
    routes = {"/": "GET", "/v1/models": "GET", "/v1/completions": "POST",
              "/v1/chat/completions": "POST"}

    def send(self, status, body, content_type="application/json", headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # one line per request on stderr, as http.server does
        print(format % args, file=sys.stderr, flush=True)

    def allowed(self, method):
        path = self.path.split("?")[0]
        if path not in self.routes:
            self.send(404, error_body(f"no route {path}; see /v1/models, /v1/completions, "
                                      f"/v1/chat/completions, or / for the chat page"))
        elif self.routes[path] != method:
            self.send(405, error_body(f"{path} takes {self.routes[path]}, not {method}"),
                      headers=[("Allow", self.routes[path])])
        elif path.startswith("/v1/") and self.server.api_key and (
                self.headers.get("Authorization") != f"Bearer {self.server.api_key}"):
            self.send(401, error_body("missing or wrong API key: send 'Authorization: Bearer "
                                      "<key>'", kind="invalid_api_key"))
        else:
            return path
        return None

    def do_GET(self):
        path = self.allowed("GET")
        if path == "/":
            self.send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            self.send(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": 0,
                 "owned_by": "buildllm"}]})

    def do_POST(self):
        path = self.allowed("POST")
        if path is None:
            return
        chat = path == "/v1/chat/completions"
        try:
            size = int(self.headers.get("Content-Length", "-1"))
            if size > LIMITS["body_bytes"]:
                raise BadRequest(413, f"the body is over {LIMITS['body_bytes']} bytes")
            if size < 0:
                raise BadRequest(411, "send a Content-Length header")
            body = json.loads(self.rfile.read(size))
            if not isinstance(body, dict):
                raise BadRequest(400, "the body must be a JSON object")
            stream = field(body, "stream", (bool,), False, rule="true or false")
            request = parse_request(body, chat, self.server.tok, self.server.template,
                                    self.server.engine.block_size)
            self.server.engine.submit(request)
        except BadRequest as e:
            return self.send(e.status, error_body(str(e), e.param))
        except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
            return self.send(400, error_body(f"the body is not JSON: {e}"))
        except queue.Full:
            return self.send(429, error_body("too many requests are waiting; retry in a second",
                                             kind="rate_limit_error"), headers=[("Retry-After", "1")])
        self.answer(request, chat, stream)

    def answer(self, request, chat, stream):
        """Wait for the engine's text pieces; send them as one JSON answer, or as server-sent
        events in OpenAI's chunk format as they come, ending with `data: [DONE]`."""
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_name}
        if not stream:
            text = "".join(iter(request.pieces.get, None))
            choice = {"text": text, "logprobs": None}
            if chat:
                choice = {"message": {"role": "assistant", "content": text}}
            return self.send(200, {**head, "choices": [
                {"index": 0, **choice, "finish_reason": request.finish}], "usage": usage(request)})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        if chat:
            head["object"] = "chat.completion.chunk"
        try:
            for text in pieces_as_they_come(request.pieces):
                self.event(head, chat, text)
            self.event(head, chat, "", request.finish, usage=usage(request))
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client went away, or stopped reading for `timeout` seconds
            request.cancelled = True

    def event(self, head, chat, text, finish=None, **extra):
        choice = {"text": text, "logprobs": None}
        if chat:
            choice = {"delta": {"role": "assistant", "content": text} if text else {}}
        chunk = {**head, "choices": [{"index": 0, **choice, "finish_reason": finish}], **extra}
        # JSON escapes newlines, so "data: " or a blank line in the text cannot end the event
        self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

    def do_PUT(self):  # DELETE and PATCH too: no route takes them (405), or no such route (404)
        self.allowed(self.command)

    do_DELETE = do_PATCH = do_PUT

def usage(request):
    return {"prompt_tokens": len(request.prompt), "completion_tokens": request.tokens,
            "total_tokens": len(request.prompt) + request.tokens}

def make_server(model, tok, template, host="127.0.0.1", port=0, api_key="", max_batch=16,
                max_queue=64, model_name="buildllm"):
    """An HTTP server, one thread per connection, and its Engine, already decoding. Call
    server.serve_forever() to answer; server.shutdown() and server.engine.stop() end it."""
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.engine = Engine(model, tok.special_tokens.get(STOP, -1), max_batch, max_queue)
    server.tok = tok
    server.template = template
    server.api_key = api_key
    server.model_name = model_name
    return server

def serve(cfg, model, tok, template, name):
    server = make_server(model, tok, template, cfg.host, cfg.port, cfg.api_key, cfg.max_batch,
                         cfg.max_queue, name)
    host, port = server.server_address[:2]
    print(f"serving at http://{host}:{port}/ (the chat page; the API is under /v1/), chat "
          f"template {template}, up to {cfg.max_batch} requests at once; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
        server.engine.stop()
    return {"url": f"http://{host}:{port}/"}

def bench_serve(cfg):
    """Start `kvcache.py --serve` on a free port and stream completions to it from 1, 4 and 16
    clients at once: aggregate tokens/s, time to first token, per-request latency."""
    flags = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "bench_serve"]
    # its log (a line per request) is dropped, so that the table reads cleanly
    server = subprocess.Popen([sys.executable, __file__, *flags, "--serve", "--port=0"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in server.stdout:  # the server prints its address once it listens
        if line.startswith("serving at "):
            url = line.split()[2]
            break
    else:
        raise RuntimeError("the server did not start: run `python kvcache.py --serve` with the "
                           "same flags to see why")
    print("| clients | tokens | seconds | aggregate tok/s | vs 1 client | first token median s | "
          "latency median s | latency p95 s |\n|" + "---|" * 8)
    rows = {}
    for n in (1, 4, 16):
        results = []
        refused = []  # an error in a client thread would not reach this one: it is passed here
        def client(seed):
            body = dict(prompt="Once upon a time", max_tokens=cfg.max_new_tokens, seed=seed,
                        temperature=cfg.temperature, stream=True)
            t0 = time.perf_counter()
            first = None
            with requests.post(url + "v1/completions", json=body, stream=True, timeout=600) as r:
                if r.status_code != 200:
                    refused.append(r.json()["error"]["message"])
                    return
                for line in r.iter_lines():
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        first = first or time.perf_counter()
            results.append((first - t0, time.perf_counter() - t0, chunk["usage"]["completion_tokens"]))
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(n)]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - t0
        if refused:
            server.send_signal(signal.SIGINT)
            raise ValueError(f"the server refused the benchmark: {refused[0]}")
        tokens = sum(r[2] for r in results)
        rows[n] = tokens / seconds
        first = sorted(r[0] for r in results)
        latency = sorted(r[1] for r in results)
        print(f"| {n} | {tokens} | {seconds:.2f} | {rows[n]:,.1f} | {rows[n] / rows[1]:.2f}x | "
              f"{first[n // 2]:.3f} | {latency[n // 2]:.2f} | {latency[int(0.95 * (n - 1))]:.2f} |",
              flush=True)
    server.send_signal(signal.SIGINT)  # Ctrl-C: the server shuts down cleanly
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:  # the figures are in: a stuck shutdown must not hang the bench
        server.kill()
        print("warning: the server did not stop within 30 s of Ctrl-C, so it was killed", file=sys.stderr)
    return rows

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
    if not 0 <= cfg.port <= 65535 or cfg.max_batch < 1 or cfg.max_queue < 1:
        raise ValueError(f"--port={cfg.port}, --max_batch={cfg.max_batch}, --max_queue="
                         f"{cfg.max_queue}: need a port from 0 to 65535 and both sizes 1 or more")
    if not cfg.ckpt_path:  # a server serves the most finished model: aligned, finetuned, base
        stages = ["out-dpo/ckpt.pt", "out-sft/ckpt.pt"] if cfg.serve or cfg.bench_serve else []
        found = [path for path in stages if os.path.exists(path)]
        cfg = dataclasses.replace(cfg, ckpt_path=(found + ["out/ckpt.pt"])[0])
    if not cfg.bench and not cfg.init_from and not os.path.exists(cfg.ckpt_path):
        raise FileNotFoundError(f"no checkpoint at --ckpt_path={cfg.ckpt_path}: train one with "
                                f"`python train.py`, or sample GPT-2 with --init_from=gpt2")
    if cfg.bench_serve:  # the server runs in its own process; this one is the clients
        return bench_serve(cfg)
    print(f"config:\n{format_config(cfg)}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.bench:
        return run_bench(cfg, device)
    dtype, reason, _ = setup_precision(device, cfg.dtype)  # weights are cast, not autocast
    # --- model and tokenizer (loaded on the cpu: a checkpoint's optimizer state never reaches the device)
    ckpt = {}
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
    if cfg.serve:  # messages are rendered with the template the checkpoint was finetuned with
        template = ckpt.get("chat_template", "phi3")
        return serve(cfg, model, tok, template, cfg.init_from or cfg.ckpt_path)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, eot_id=eot_id,
                    generator=torch.Generator(device).manual_seed(cfg.seed))
    # --- generate: every prompt num_samples times in one batch; a single row is streamed
    texts = [p for p in cfg.prompt.split("|") for _ in range(cfg.num_samples)]
    story = [eot_id] if eot_id >= 0 else []  # text starts after <|endoftext|>
    tokens = 0
    seconds = 0.0
    decoded = [0, 0.0]  # tokens after each row's first, and their seconds: decode without prefill
    while True:
        if cfg.interactive:  # each turn continues the whole story so far (the window rule crops it)
            try:
                texts = [input("\n> ")]
            except EOFError:
                break
        prompts = [story + tok.encode(t, allowed_special="all") for t in texts]
        stream = TextStream(tok)
        stamps = []  # when each step's tokens came out
        if len(texts) == 1 and not cfg.interactive:
            print(texts[0], end="")
        def show(step, ids, logits):
            stamps.append(time.perf_counter())
            if len(texts) == 1:
                stream.push(ids[0].item() if ids[0] != eot_id else None)
        t0 = time.perf_counter()
        outs = model.generate(prompts, cfg.max_new_tokens, on_token=show, **sampling)
        seconds += time.perf_counter() - t0
        tokens += sum(len(o) for o in outs)
        longest = max(len(o) for o in outs)  # its last token came out at step longest - 1
        decoded[0] += sum(max(len(o) - 1, 0) for o in outs)
        decoded[1] += stamps[longest - 1] - stamps[0] if longest > 1 else 0.0
        stream.push()
        for i, ids in enumerate(outs):
            if len(outs) > 1:
                print(f"\n--- sample {i}\n{texts[i]}{tok.decode(ids)}", end="")
            if len(ids) < cfg.max_new_tokens:
                print(" [stopped at <|endoftext|>]", end="")
        if not cfg.interactive:
            break
        story = prompts[0] + outs[0]
    decode = decoded[0] / decoded[1] if decoded[1] else float("nan")
    print(f"\n{tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):,.1f} tok/s "
          f"(prefill included), {decode:,.1f} after each row's first")
    return {"tokens": tokens, "tok_per_s": tokens / max(seconds, 1e-9), "decode_tok_per_s": decode}

if __name__ == "__main__":
    run_main(main, KVCacheConfig)
