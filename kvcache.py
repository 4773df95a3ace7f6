"""KV cache: generate fast by keeping each layer's keys and values, and measure why.

What you learn here: without a cache every new token re-runs the whole history, O(T^2)
work over a run; with one, only the new token runs, against the stored keys and values,
O(T). Prefill (the prompt in one pass) versus decode (a token per step). And why batch-1
decode is memory-bound: tokens/s <= bandwidth / (weight bytes + cache bytes), as each
step reads every weight once. The cache is in gpt.py (`KVCache`, `GPT.prefill`); this
file streams, loops over your prompts and measures. Its second half is a server with a
chat page: continuous batching (rows join and leave between steps) behind OpenAI's API.

How to run:
    python kvcache.py                  # continue a story with the model train.py wrote
    python kvcache.py --prompt="Once upon a time|The cat" --num_samples=2 --top_p=0.9
    python kvcache.py --interactive    # type, the story continues; Ctrl-D exits
    python kvcache.py --bench          # tokens/s with and without the cache
    python kvcache.py --init_from=gpt2 --device=cuda   # OpenAI's GPT-2
    python kvcache.py --serve          # a chat page at http://127.0.0.1:8000/

Depends on gpt.py (the model, its cache) and bpe.py (the tokenizer); reads out/ckpt.pt
from train.py (--serve: the last stage made), or GPT-2. References: Efficiently Scaling
Transformer Inference (arXiv:2211.05102); top-p (1904.09751); GQA (2305.13245); Orca,
iteration-level scheduling (OSDI 2022); https://platform.openai.com/docs/api-reference
"""
import dataclasses
import http.server
import json
import os
import queue
import threading
import time
import traceback
import uuid

import torch

from bpe import STOP, Tokenizer, render_conversation, stop_ids, text_ends
from gpt import (GPT, GPTConfig, KVCache, UserError, format_config, from_pretrained,
                 load_checkpoint, pick_device, refuse_torchrun, require_positive, run,
                 sample, setup_precision, user_input)

@dataclasses.dataclass
class KVCacheConfig:
    """Generate text with a KV cache from a train.py checkpoint or GPT-2, benchmark the
    cache, or serve the model. Past block_size tokens the window slides: half stays."""
    # I/O
    ckpt_path: str = ""               # '' = out/ckpt.pt; --serve: out-dpo/, out-sft/, out/
    init_from: str = ""               # '' = ckpt_path; a Hub name (gpt2, Qwen/...) or folder
    gpt2_dir: str = "data/gpt2"       # GPT-2's tokenizer (encoder.json, vocab.bpe)
    # sampling
    prompt: str = "Once upon a time"  # '|' separates prompts, generated in one batch
    num_samples: int = 1              # samples per prompt (all in the same batch)
    max_new_tokens: int = 200         # stops at <|endoftext|>; the window slides
    temperature: float = 0.8          # 0 = greedy; 1 = the model's distribution
    top_k: int = 200                  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                # keep the fewest tokens reaching p; 1 = off
    seed: int = 1337
    interactive: bool = False         # a prompt loop: your text continues the story
    bench: bool = False               # tokens/s without and with the cache, vs the bound
    # serving (the second half): an OpenAI-compatible API and a chat page
    serve: bool = False               # serve on http://host:port until Ctrl-C
    host: str = "127.0.0.1"           # 0.0.0.0 opens the server to your network
    port: int = 8000                  # 0 = any free port
    api_key: str = ""                 # '' = none; else /v1/ needs "Bearer <key>"
    max_batch: int = 16               # requests decoded together, a token each per step
    max_queue: int = 64               # requests waiting to join beyond this get 429
    context: int = 4096               # tokens of context at most (Hub models allow up to 128k)
    # system
    device: str = "auto"              # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"               # auto, float32, bfloat16, float16 (casts weights)

# -----------------------------------------------------------------------------
# generation: prefill, decode with the cache, print the text as it comes

class TextStream:
    """Print tokens as they arrive. A character split across tokens decodes to U+FFFD
    until its last byte arrives, so text ending in U+FFFD waits for it."""
    def __init__(self, tok):
        self.tok = tok
        self.ids = []  # not printed yet

    def push(self, token_id=None):  # None flushes whatever is held back
        if token_id is not None:
            self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if token_id is None or not text.endswith("\ufffd"):
            print(text, end="", flush=True)
            self.ids = []

def text_start(tok):
    """What a text follows: <|endoftext|>, or Llama 3's <|begin_of_text|>, or nothing."""
    starts = [tok.special_tokens[s] for s in (STOP, "<|begin_of_text|>") if s in tok.special_tokens]
    return starts[:1]

def generate_text(cfg, model, tok):
    """Every prompt num_samples times in one batch (GPT.generate: prefill, then decode);
    a single row is printed as it comes. --interactive: each line continues the story.
    A model with a chat template (an instruct model from the Hub) answers each prompt as
    a user's message instead, and --interactive is a chat."""
    chat = tok.chat_template
    stops = stop_ids(tok, chat) if chat else text_ends(tok)
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    eot_id=stops, generator=generator)
    texts = [p for p in cfg.prompt.split("|") for _ in range(cfg.num_samples)]
    story = text_start(tok)  # the text so far; a chat's messages so far
    messages = []
    tokens = 0
    seconds = 0.0
    decode_tokens = 0  # the tokens after each row's first, and their time: decode alone
    decode_seconds = 0.0
    while True:
        if cfg.interactive:
            try:
                texts = [input("\n> ")]
            except EOFError:
                break
        prompts = [story + tok.encode(t, allowed_special="all") for t in texts]
        if chat:
            prompts = [render_conversation(tok, messages + [{"role": "user", "content": t}],
                                           chat)[0] for t in texts]
        stream = TextStream(tok)
        stamps = []  # when each step's tokens came out
        if len(texts) == 1 and not cfg.interactive and not chat:
            print(texts[0], end="")
        def show(step, ids, logits):
            stamps.append(time.perf_counter())
            if len(texts) == 1:
                stream.push(ids[0].item() if ids[0] not in stops else None)
        t0 = time.perf_counter()
        outs = model.generate(prompts, cfg.max_new_tokens, on_token=show, **sampling)
        seconds += time.perf_counter() - t0
        tokens += sum(len(o) for o in outs)
        longest = max(len(o) for o in outs)  # its last token came at step longest - 1
        decode_tokens += sum(max(len(o) - 1, 0) for o in outs)
        if longest > 1:
            decode_seconds += stamps[longest - 1] - stamps[0]
        stream.push()
        for i, ids in enumerate(outs):
            if len(outs) > 1:
                print(f"\n--- sample {i}\n{texts[i]}{tok.decode(ids)}", end="")
            if len(ids) < cfg.max_new_tokens:
                print(f" [stopped at {tok.decode([stops[0]])}]", end="")
        if not cfg.interactive:
            break
        story = prompts[0] + outs[0]  # the window crops it past block_size
        messages += [{"role": "user", "content": texts[0]},
                     {"role": "assistant", "content": tok.decode(outs[0])}]
    speed = tokens / max(seconds, 1e-9)
    decode = decode_tokens / decode_seconds if decode_seconds else float("nan")
    print(f"\n{tokens} tokens in {seconds:.2f} s: {speed:,.1f} tok/s (prefill "
          f"included), {decode:,.1f} after each row's first")
    return {"tokens": tokens, "tok_per_s": speed, "decode_tok_per_s": decode}

# -----------------------------------------------------------------------------
# --bench: the cache against no cache, and the memory-bandwidth bound

def best_time(fn, repeats):
    # the fastest of a few runs is the one least disturbed by other work on the machine
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best

def measure_bandwidth(device):
    # copying 512 MB (more than any CPU cache) reads and writes each byte once
    src = torch.ones(128 * 2**20, device=device)
    dst = torch.empty(128 * 2**20, device=device)
    copy = lambda: dst.copy_(src)[-1].item()  # .item() waits for a GPU to finish
    return 2 * src.nbytes / best_time(copy, 6)

def bench_row(model, prompts, new_tokens, points=4):
    """(cache-free tok/s, cached tok/s, cached decode tok/s, mean cached length) for greedy
    runs of new_tokens from prompts. Cached: a real run timed per step; its median decode
    step is the typical one, robust to other programs stealing the CPU. Cache-free: a step
    re-reads the history, so one is timed at `points` lengths and integrated (midpoint)."""
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
    # the cached positions each decode step reads, averaged over the run (window included)
    lengths = 0
    L = max(map(len, prompts))
    for _ in range(new_tokens - 1):
        L = L + 1 if L < config.block_size else config.block_size // 2 + 1
        lengths += L
    return B * new_tokens / seconds, cached, B / median, lengths / (new_tokens - 1)

def run_bench(cfg, device):
    bandwidth = measure_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} "
          f"threads on {device}")
    shapes = {"gpt2-124M": GPTConfig()}
    if os.path.exists(cfg.ckpt_path):
        shapes[cfg.ckpt_path] = load_checkpoint(cfg.ckpt_path)[0].config
    else:  # train.py's default shape, when no checkpoint has been trained yet
        shapes["train.py default"] = GPTConfig(vocab_size=1024, block_size=512,
                                               n_layer=4, n_head=4, n_embd=256, bias=False)
    print("| shape | dtype | batch | new tokens | no cache tok/s | cache tok/s | speedup "
          "| cache decode tok/s | bound tok/s | decode / bound |\n|" + "---|" * 10)
    for name, config in shapes.items():
        model = GPT(config).to(device).eval()
        # a decode step reads every weight once (the tied wte/lm_head once, wpe not at all)
        weights = model.num_params()
        if not config.rope:
            weights -= config.block_size * config.n_embd
        hs = config.n_embd // config.n_head
        kv_per_token = 2 * config.n_layer * (config.n_kv_head or config.n_head) * hs
        runs = [(1, 16, 256), (1, 16, 512), (1, 16, 1024), (8, 16, 256), (8, 16, 1024)]
        if name != "gpt2-124M":  # many ragged prompts, as finetune.py and dpo.py sample
            runs.append((64, 0, 200))
        for dtype in ("float32", "bfloat16"):
            # casting the weights (not autocast) halves the bytes a decode step reads
            model = model.to(getattr(torch, dtype))
            size = model.lm_head.weight.element_size()
            model.generate([[0] * 16] * 8, 8)  # warm up: the first calls pick kernels
            for B, prompt_len, new_tokens in runs:
                gen = torch.Generator().manual_seed(B)
                lengths = [prompt_len or int(torch.randint(10, 41, (), generator=gen))
                           for _ in range(B)]
                prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
                           for n in lengths]
                free, cached, decode, mean_len = bench_row(model, prompts, new_tokens)
                bound_cells = "| |"  # a batch shares each weight read: no batch-1 bound
                if B == 1:
                    bound = bandwidth / ((weights + kv_per_token * mean_len) * size)
                    bound_cells = f"{bound:,.1f} | {decode / bound:.2f} |"
                print(f"| {name} | {dtype} | {B} | {new_tokens} | {free:,.1f} | "
                      f"{cached:,.1f} | {cached / free:.1f}x | {decode:,.1f} | "
                      f"{bound_cells}", flush=True)
    print("no cache: a step timed at 4 lengths, integrated; cache: prefill + median decode "
          "step; bound: bandwidth / weight and cache bytes per token; batch 64: 10-40 tokens")
    return {"bandwidth": bandwidth}

# -----------------------------------------------------------------------------
# the second half, serving: continuous batching behind an OpenAI-compatible HTTP API
# NEW vs gpt.py: a cache length per row, not per batch, since rows come and go any step

class RowCache:
    """One layer's keys and values, (rows, nkv, max_len, hs), row i for running request i;
    `lengths` (n,), set by the Engine each step: the positions each row has filled."""
    def __init__(self, shape, dtype, device):
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = None

    def update(self, k, v):
        n = k.size(0)
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, self.lengths] = k[:, :, 0]      # (n, nkv, hs) into each row's slot
        self.v[rows, :, self.lengths] = v[:, :, 0]
        width = int(self.lengths.max()) + 1             # the longest row's filled part
        return self.k[:n, :, :width], self.v[:n, :, :width]

class Request:
    """One completion: prompt ids, sampling settings, text so far. The engine pushes tokens
    in; the HTTP thread reads whole-character `pieces` (then None) or sets `cancelled`."""
    def __init__(self, tok, prompt, max_tokens, temperature=1.0, top_p=1.0, stop=(), seed=0,
                 dropped=0):
        self.tok = tok
        self.prompt = prompt
        self.dropped = dropped  # a chat: how many of its oldest messages did not fit
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.generator = None   # the engine makes it, on the device that samples
        self.stop = [s for s in stop if s]  # "" stops nothing
        self.hold = max(map(len, self.stop), default=1) - 1  # may begin a stop: it waits
        self.pieces = queue.Queue()
        self.tokens = 0         # generated, the stop token included
        self.pending = []       # ids whose bytes do not end on a whole character yet
        self.text = ""
        self.sent = 0           # characters of text already put in pieces
        self.finish = None      # "stop" or "length" once finished
        self.cancelled = False

    def push(self, token_id, stops, full):
        """Take the next token (full: no room for another); return True when finished."""
        self.tokens += 1
        if token_id not in stops:
            self.pending.append(token_id)
        piece = self.tok.decode(self.pending)  # U+FFFD at the end: a split character
        ended = token_id in stops or self.tokens == self.max_tokens or full
        if ended or not piece.endswith("\ufffd"):
            self.text += piece
            self.pending = []
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish = "stop"
        elif ended:
            self.finish = "stop" if token_id in stops else "length"
        ready = len(self.text) if self.finish else len(self.text) - self.hold
        if ready > self.sent:
            self.pieces.put(self.text[self.sent:ready])
            self.sent = ready
        if self.finish:
            self.pieces.put(None)
        return self.finish is not None

class Engine:
    """Continuous batching: one thread owns the model. Requests wait in a bounded queue and
    join the batch between steps (prefilled alone, copied into a free row); a step decodes a
    token per row, and rows done, abandoned or full leave at once: none waits for another."""
    def __init__(self, model, stops, max_batch=16, max_queue=64):
        self.model = model
        self.stops = set(stops)  # the ids that end a reply
        self.max_batch = max_batch
        self.device = model.lm_head.weight.device
        c = model.config
        self.block_size = c.block_size
        self.waiting = queue.Queue(max_queue)
        self.rows = []                                  # the running Requests
        hs = c.head_size or c.n_embd // c.n_head
        shape = (max_batch, c.n_kv_head or c.n_head, c.block_size, hs)
        dtype = model.lm_head.weight.dtype
        self.caches = [RowCache(shape, dtype, self.device) for _ in model.transformer.h]
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.last = torch.zeros_like(self.lengths)     # each row's next input token
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def submit(self, request):  # queue.Full when too many wait: the caller answers 429
        self.waiting.put_nowait(request)

    def choose(self, i, logits):
        request = self.rows[i]
        logits = logits[None, :self.model.vocab_used]  # no padding row is ever sampled
        next_id = sample(logits, request.temperature, 0, request.top_p, request.generator).item()
        full = int(self.lengths[i]) == self.block_size
        if not request.push(next_id, self.stops, full):
            self.last[i] = next_id

    def join(self, request):
        request.generator = torch.Generator(self.device).manual_seed(request.seed)
        prompt = torch.tensor([request.prompt], device=self.device)
        T = prompt.size(1)
        cache = [KVCache(T) for _ in self.caches]
        logits = self.model.prefill(prompt, torch.zeros_like(prompt[:, 0]), cache)
        i = len(self.rows)
        for row_cache, layer_cache in zip(self.caches, cache):
            row_cache.k[i, :, :T] = layer_cache.k[0]
            row_cache.v[i, :, :T] = layer_cache.v[0]
        self.lengths[i] = T
        self.rows.append(request)
        self.choose(i, logits[0])

    def step(self):
        n = len(self.rows)
        lengths = self.lengths[:n]
        for row_cache in self.caches:
            row_cache.lengths = lengths
        # row i's new token sits at position lengths[i] and sees the filled slots up to it
        width = int(lengths.max()) + 1
        mask = torch.arange(width, device=self.device) <= lengths[:, None]  # (n, width)
        logits = self.model.forward_cached(self.last[:n, None], self.caches,
                                           lengths[:, None], mask[:, None, None])
        lengths += 1
        for i in range(n):
            self.choose(i, logits[i])

    def leave_finished(self):
        for i in reversed(range(len(self.rows))):  # backwards: the row moved into i stays
            if self.rows[i].finish or self.rows[i].cancelled:
                last = len(self.rows) - 1  # it takes row i's place: rows stay 0..n-1
                self.rows[i] = self.rows[last]
                self.rows.pop()
                self.lengths[i] = self.lengths[last]
                self.last[i] = self.last[last]
                for row_cache in self.caches:
                    row_cache.k[i] = row_cache.k[last]
                    row_cache.v[i] = row_cache.v[last]

    @torch.inference_mode()
    def loop(self):
        while self.running:
            try:
                self.turn()
            except Exception:  # a bug must not stall every later request: the requests
                traceback.print_exc()  # in hand end (finish_reason "error"), the rest go on
                for request in self.rows + self.joining:
                    request.finish = "error"
                    request.pieces.put(None)
                self.rows = []

    def turn(self):
        self.joining = []  # a request being prefilled: in no row yet
        try:  # wait for work when idle; when busy, take only what already waits
            while len(self.rows) < self.max_batch:
                self.joining = [self.waiting.get(block=not self.rows, timeout=0.05)]
                if not self.joining[0].cancelled:
                    self.join(self.joining[0])
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
    """The API checks a request field by field; a mistake is answered in OpenAI's error
    shape, naming the field, and never reaches the engine."""
    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status = status
        self.param = param

LIMITS = dict(body_bytes=2**20, messages=500, message_chars=8000, total_chars=32000, stops=4)

def field(body, name, kinds, default, check=None, rule=""):
    """body[name] (default when absent or null) if it is one of the types in kinds and
    passes check, else a 400 naming it. JSON's true and false are not numbers here."""
    value = body.get(name)
    if value is None:
        return default
    is_bool = isinstance(value, bool) and bool not in kinds
    if is_bool or not isinstance(value, kinds) or (check and not check(value)):
        raise BadRequest(400, f"'{name}' must be {rule}", name)
    return value

def parse_request(body, chat, tok, template, block_size):
    """A JSON request body -> a Request, or BadRequest naming the field that is wrong."""
    most = LIMITS["total_chars"]
    max_tokens = field(body, "max_tokens", (int,), 256, lambda n: 1 <= n <= block_size,
                       f"an integer from 1 to {block_size}")
    dropped = 0  # a chat's oldest messages left out to fit the window
    if chat:
        messages = field(body, "messages", (list,), [], lambda m: len(m) <= LIMITS["messages"],
                         f"a list of 1 to {LIMITS['messages']} messages")
        chars = LIMITS["message_chars"]
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) and len(m["content"]) <= chars):
                raise BadRequest(400, f"'messages[{i}]' needs a role (system, user or assistant) "
                                 f"and a content of at most {chars} characters", "messages")
            if not m["content"].strip():
                raise BadRequest(400, f"'messages[{i}].content' is empty", "messages")
        if not messages or sum(len(m["content"]) for m in messages) > most:
            raise BadRequest(400, f"'messages' must hold 1 or more messages of at most "
                             f"{most} characters in all", "messages")
        # too long: keep the system message, drop the oldest others till the reply has room
        system = messages[:1] if messages[0]["role"] == "system" and len(messages) > 1 else []
        others = messages[len(system):]
        render = lambda k: render_conversation(tok, system + others[k:], template)[0]
        room = block_size - min(max_tokens, block_size // 2)  # half at most, to keep the chat
        dropped = len(others) - 1  # from the newest: a try renders what fits and one more
        while dropped and len(render(dropped - 1)) <= room:
            dropped -= 1
        prompt = render(dropped)
    else:
        text = field(body, "prompt", (str,), "", lambda p: len(p) <= most,
                     f"a string of at most {most} characters")
        prompt = text_start(tok) + tok.encode(text)
    if len(prompt) > block_size:
        raise BadRequest(400, f"the prompt is {len(prompt)} tokens"
                         f"{' with only the last message' if chat else ''}; this model "
                         f"reads at most {block_size}", "messages" if chat else "prompt")
    stop = field(body, "stop", (str, list), [], lambda s: isinstance(s, str) or (
        len(s) <= LIMITS["stops"] and all(isinstance(x, str) and x for x in s)),
        f"a string or a list of up to {LIMITS['stops']} non-empty strings")
    stop = [stop] if isinstance(stop, str) else stop  # Request drops "" (no stop)
    return Request(
        tok, prompt, max_tokens, dropped=dropped, stop=stop,
        temperature=field(body, "temperature", (int, float), 1.0, lambda t: 0 <= t <= 2,
                          "a number from 0 to 2"),
        top_p=field(body, "top_p", (int, float), 1.0, lambda p: 0 < p <= 1,
                    "a number above 0 and at most 1"),
        seed=field(body, "seed", (int,), int.from_bytes(os.urandom(6)), rule="an int"))

# the chat page (GET /): nothing fetched from the internet; model text is set with textContent
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>buildllm chat</title>
<style>body { font: 16px sans-serif; max-width: 46rem; margin: 2rem auto; }
p { white-space: pre-wrap; }</style></head>
<body><p id="try">Try: <button>Tell me a story about a brave little turtle named Max.</button>
<button>Call the hero Leo instead.</button> <button>What happened next?</button></p>
<div id="log"></div>
<form id="form"><textarea id="input" rows="3" cols="60"></textarea><button>Send</button>
</form><p>API key, if the server has one: <input id="key" type="password"></p>
<script>
const $ = (id) => document.getElementById(id);
const messages = [];  // the conversation, sent whole with every request
let busy = false;

function bubble(text) {
  const p = $("log").appendChild(document.createElement("p"));
  p.textContent = text;
  return p;
}

async function send(event, example) {  // example: the text of a "Try:" button
  event.preventDefault();
  const content = (example || $("input").value).trim();
  if (!content || busy) return;
  busy = true;
  $("input").value = "";
  messages.push({role: "user", content});
  bubble("> " + content);
  const out = bubble("");
  let reply = "";
  try {
    const headers = {"Content-Type": "application/json"};
    if ($("key").value) headers.Authorization = "Bearer " + $("key").value;
    const body = JSON.stringify({messages, stream: true, temperature: 0.8});
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();  // {stream: true} keeps a split character
    let buffer = "";
    for (let read = await reader.read(); !read.done; read = await reader.read()) {
      buffer += decoder.decode(read.value, {stream: true});
      const events = buffer.split("\\n\\n");
      buffer = events.pop();  // the last event may be cut off: it waits for the rest
      for (const event of events) {
        const data = event.slice("data: ".length);
        if (data !== "[DONE]") reply += JSON.parse(data).choices[0].delta.content || "";
      }
      out.textContent = reply;
    }
  } catch (error) {
    out.textContent = reply + " [error: " + error.message + "]";
  }
  if (reply.trim()) messages.push({role: "assistant", content: reply});
  else messages.pop();  // no reply, no turn: the server refuses an empty message
  busy = false;
}
$("form").onsubmit = send;
for (const example of $("try").children)  // a click sends it, as if typed
  example.onclick = (event) => send(event, example.textContent);
</script>
</body></html>
"""

def error_body(message, param=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}

def usage(request, chat):  # a chat's also says how many old messages were left out
    counts = {"prompt_tokens": len(request.prompt), "completion_tokens": request.tokens,
              "total_tokens": len(request.prompt) + request.tokens}
    return {**counts, "dropped_messages": request.dropped} if chat else counts

class Handler(http.server.BaseHTTPRequestHandler):
    """A thread per connection: check a request, hand it to the engine, write the answer.
    `timeout` bounds each socket read and write: a slow client holds its thread, no more."""
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

    def allowed(self, method):
        path = self.path.split("?")[0]
        key = self.server.api_key
        if path not in self.routes:
            self.send(404, error_body(f"no route {path}; see /v1/models, /v1/completions, "
                                      f"/v1/chat/completions, or / for the chat page"))
        elif self.routes[path] != method:
            self.send(405, error_body(f"{path} takes {self.routes[path]}, not {method}"),
                      headers=[("Allow", self.routes[path])])
        elif path.startswith("/v1/") and key and (
                self.headers.get("Authorization") != f"Bearer {key}"):
            self.send(401, error_body("missing or wrong API key: send 'Authorization: "
                                      "Bearer <key>'", kind="invalid_api_key"))
        else:
            return path

    def do_GET(self):
        path = self.allowed("GET")
        if path == "/":
            self.send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": 0,
                     "owned_by": "buildllm"}
            self.send(200, {"object": "list", "data": [model]})

    def do_POST(self):
        path = self.allowed("POST")
        if path is None:
            return
        chat = path == "/v1/chat/completions"
        try:
            size = int(self.headers.get("Content-Length", 0))  # none: empty, a 400
            if size > LIMITS["body_bytes"]:  # refused before it is read
                raise BadRequest(413, f"the body is over {LIMITS['body_bytes']} bytes")
            body = json.loads(self.rfile.read(max(size, 0)))
            if not isinstance(body, dict):
                raise BadRequest(400, "the body must be a JSON object")
            stream = field(body, "stream", (bool,), False, rule="true or false")
            request = parse_request(body, chat, self.server.tok, self.server.template,
                                    self.server.engine.block_size)
            self.server.engine.submit(request)
        except BadRequest as e:
            return self.send(e.status, error_body(str(e), e.param))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            return self.send(400, error_body(f"the body is not JSON: {e}"))
        except queue.Full:
            busy = error_body("too many requests are waiting; retry in a second",
                              kind="rate_limit_error")
            return self.send(429, busy, headers=[("Retry-After", "1")])
        self.answer(request, chat, stream)

    def answer(self, request, chat, stream):
        """The engine's text as one JSON answer, or as it comes in OpenAI's stream chunks."""
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.server.model_name}
        if not stream:
            text = "".join(iter(request.pieces.get, None))
            choice = {"text": text, "logprobs": None}
            if chat:
                choice = {"message": {"role": "assistant", "content": text}}
            choice.update(index=0, finish_reason=request.finish)
            return self.send(200, {**head, "choices": [choice], "usage": usage(request, chat)})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        if chat:
            head["object"] = "chat.completion.chunk"
        try:
            for text in iter(request.pieces.get, None):
                self.event(head, chat, text)
            self.event(head, chat, "", request.finish, usage=usage(request, chat))
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client left, or stopped reading for `timeout` seconds
            request.cancelled = True

    def event(self, head, chat, text, finish=None, **extra):
        choice = {"text": text, "logprobs": None}
        if chat:
            choice = {"delta": {"role": "assistant", "content": text} if text else {}}
        choice.update(index=0, finish_reason=finish)
        chunk = {**head, "choices": [choice], **extra}
        # JSON escapes newlines, so "data: " or a blank line in the text cannot end it
        self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

    def do_PUT(self):  # and DELETE, PATCH: no route takes them (405), or no route (404)
        self.allowed(self.command)

    do_DELETE = do_PATCH = do_PUT

def make_server(model, tok, template, host="127.0.0.1", port=0, api_key="",
                max_batch=16, max_queue=64, model_name="buildllm"):
    """An HTTP server, a thread per connection, and its Engine, already decoding. Call
    server.serve_forever() to answer; server.shutdown() and server.engine.stop() end it."""
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.engine = Engine(model, stop_ids(tok, template), max_batch, max_queue)
    vars(server).update(tok=tok, template=template, api_key=api_key, model_name=model_name)
    return server

# -----------------------------------------------------------------------------
# main

def main(cfg):
    # --- setup: check the flags before loading anything
    refuse_torchrun("kvcache.py")
    if not cfg.temperature >= 0:  # (not >= also catches nan)
        raise UserError(f"--temperature={cfg.temperature} must be 0 (greedy) or more")
    if cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise UserError(f"--top_k={cfg.top_k}, --top_p={cfg.top_p}: need top_k >= 0 "
                        f"(0 = off) and 0 < top_p <= 1 (1 = off)")
    require_positive(cfg, "num_samples", "max_new_tokens", "max_batch", "max_queue", "context")
    if not 0 <= cfg.port <= 65535:
        raise UserError(f"--port={cfg.port} must be from 0 (any free port) to 65535")
    if not cfg.ckpt_path:  # a server serves the most finished model: aligned, finetuned
        stages = ["out-dpo/ckpt.pt", "out-sft/ckpt.pt"] if cfg.serve else []
        found = [path for path in stages if os.path.exists(path)]
        cfg = dataclasses.replace(cfg, ckpt_path=(found + ["out/ckpt.pt"])[0])
    if not (cfg.bench or cfg.init_from or os.path.exists(cfg.ckpt_path)):
        raise UserError(f"no checkpoint at --ckpt_path={cfg.ckpt_path}: train one with "
                        f"`python train.py`, or sample GPT-2 with --init_from=gpt2")
    print(f"config:\n{format_config(cfg)}")
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.bench:
        return run_bench(cfg, device)
    dtype, reason, _ = setup_precision(device, cfg.dtype)
    # --- model and tokenizer (read on the cpu: the optimizer state stays there)
    if cfg.init_from:  # in the dtype it will run in: a 1B model is read once, not cast
        model = from_pretrained(cfg.init_from, dtype=getattr(torch, dtype))
        has_tokenizer = os.path.isfile(os.path.join(model.folder, "tokenizer.json"))
        ckpt = {"tokenizer": model.folder if has_tokenizer else "gpt2"}
    else:
        model, ckpt = load_checkpoint(cfg.ckpt_path)
    with user_input():  # GPT-2's tokenizer files may be missing, offline
        tok = Tokenizer.from_saved(ckpt.get("tokenizer", "gpt2"), cfg.gpt2_dir)
    model.vocab_used = tok.vocab_size  # rows past the tokenizer's ids are never sampled
    # cast the weights (not autocast): half the bytes, so memory-bound decode runs ~2x
    model = model.to(device, getattr(torch, dtype)).eval()
    if model.config.block_size > cfg.context:  # its KV cache would not fit: the window slides
        model.config.block_size = cfg.context
    print(f"device {device}, dtype {dtype} ({reason}); {model.num_params() / 1e6:.2f}M "
          f"parameters")
    # the cache keeps the nkv key/value heads: grouped-query attention shrinks it nh/nkv x
    c = model.config
    nkv = c.n_kv_head or c.n_head
    row = 2 * c.n_layer * nkv * (c.head_size or c.n_embd // c.n_head) * c.block_size
    row_mb = row * model.lm_head.weight.element_size() / 1e6
    print(f"KV cache {row_mb:.2f} MB per row of {c.block_size} tokens ({nkv} of "
          f"{c.n_head} heads kept)")
    if not cfg.serve:  # --- generate
        return generate_text(cfg, model, tok)
    # --- serve until Ctrl-C (chats rendered with the template the model was tuned with)
    template = tok.chat_template or ckpt.get("chat_template", "phi3")
    if template == "phi3" and STOP not in tok.special_tokens:  # a base Llama 3, say
        raise UserError(f"{cfg.init_from or cfg.ckpt_path} has no chat template to serve; "
                        f"continue its text with --prompt, or serve an instruct model")
    server = make_server(model, tok, template, cfg.host, cfg.port, cfg.api_key,
                         cfg.max_batch, cfg.max_queue, cfg.init_from or cfg.ckpt_path)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    name = template if isinstance(template, str) else "the model's own"
    print(f"serving at {url} (the chat page; the API is under /v1/), chat template "
          f"{name}, up to {cfg.max_batch} requests at once; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
        server.engine.stop()
    return {"url": url}

if __name__ == "__main__":
    run(main, KVCacheConfig)
