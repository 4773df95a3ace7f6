"""Data parallelism from scratch: all-reduce, gradient buckets that overlap backward, and ZeRO-1.

What you learn here (LLM101n chapter 10): N processes each run the same GPT on 1/N of the batch
and average their gradients, so every replica takes the step one process would take on the whole
batch. train.py leaves that to torch's DistributedDataParallel; here it is written out with
torch.distributed collectives and checked against it: `naive` (an all-reduce per gradient),
`bucketed` (gradients gathered into ~bucket_mb buckets, each all-reduced asynchronously from a
backward hook the moment it is full, as DDP does) and `zero1` (ZeRO stage 1: each rank keeps the
AdamW state of only its 1/N shard). The key number: a ring all-reduce sends 2(N-1)/N x the
gradient bytes per rank, almost independent of N, and ZeRO-1's reduce-scatter + all-gather the same.
How to run (under torchrun only: gloo on CPUs, nccl on GPUs with one GPU per process):
    torchrun --standalone --nproc_per_node=2 ddp.py                 # bucketed, ~1 min on a CPU
    torchrun --standalone --nproc_per_node=2 ddp.py --bench         # every mode, table, cost model
    torchrun --standalone --nproc_per_node=8 ddp.py --mode=zero1 --n_layer=12 --n_embd=768
Depends on: gpt.py (the model, flags, checkpoints) and bpe.py (the tokenizer saved with them).
Reads train.py's data/stories/train.bin when present, else its own source as bytes; writes
<out_dir>/<mode>/ckpt.pt. References: ZeRO, Rajbhandari et al. 2019 (arXiv:1910.02054); PyTorch
Distributed: Experiences on Accelerating Data Parallel Training, Li et al. 2020 (arXiv:2006.15704);
Patarasuk and Yuan 2009, Bandwidth optimal all-reduce algorithms (the ring).
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bpe import Tokenizer
from gpt import (GPT, GPTConfig, format_config, get_lr, pick_device, progress_bar,
                 require_positive, run_main, save_checkpoint)

@dataclasses.dataclass
class DDPConfig:
    """Data-parallel GPT training with hand-written collectives, under torchrun; fields are flags."""
    # I/O
    out_dir: str = "out-ddp"      # each mode writes <out_dir>/<mode>/ckpt.pt (replaced each run)
    report: str = ""              # also write the results as JSON to this path (rank 0); '' = none
    log_interval: int = 10        # steps between log lines (not in --bench)
    # data
    data: str = ""                # a train.py .bin; '' = data/stories/train.bin, else own bytes
    # model
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # channels
    block_size: int = 128         # context length in tokens
    # optimizer
    mode: str = "bucketed"        # torch, naive, bucketed or zero1 (--bench runs all four)
    batch_size: int = 16          # sequences per step, over all processes and micro-steps
    grad_accum: int = 1           # micro-steps per optimizer step, in each process
    max_iters: int = 30           # optimizer steps
    learning_rate: float = 1e-3   # after warmup; a cosine then decays it to a tenth
    warmup_iters: int = 5         # linear warmup steps
    weight_decay: float = 0.1     # AdamW decay of matrices and embeddings
    bucket_mb: float = 1.0        # bucket cap in MiB, for bucketed and torch (torch's default: 25)
    # benchmark and cost model
    bench: bool = False           # every mode from the same init + a 1-process reference, compared
    bandwidth_gbs: float = 0.0    # cost model link in GB/s; 0 = NVLink, PCIe and 100 Gb Ethernet
    latency_us: float = 10.0      # cost model latency per ring step, with --bandwidth_gbs
    zero_gpus: int = 8            # GPUs in the ZeRO memory table
    # system
    device: str = "auto"          # auto (cuda if present), cpu or cuda: rank r takes cuda:LOCAL_RANK
    seed: int = 1337              # the init (the same in every mode) and the batches

MODES = ("torch", "naive", "bucketed", "zero1")

# -----------------------------------------------------------------------------
# collectives that count the bytes they send

def nbytes(t):
    return t.numel() * t.element_size()

class Comm:
    """The collectives of the hand-written modes, each adding what this rank sends in a ring:
    a reduce-scatter or an all-gather sends (N-1)/N of the full buffer, an all-reduce (one of
    each) 2(N-1)/N. NCCL's rings and trees send as much for large messages."""
    def __init__(self, rank, world, native_reduce_scatter):
        self.rank = rank
        self.world = world
        self.native_reduce_scatter = native_reduce_scatter
        self.sent = 0.0
        self.calls = 0

    def count(self, full_bytes, halves):
        self.sent += halves * (self.world - 1) / self.world * full_bytes
        self.calls += 1

    def all_reduce(self, t, async_op=False):
        self.count(nbytes(t), 2)
        return dist.all_reduce(t, async_op=async_op)  # the default op: SUM

    def reduce_scatter(self, shard, flat):
        # rank r receives the sum over ranks of chunk r of flat
        if self.native_reduce_scatter:
            self.count(nbytes(flat), 1)
            dist.reduce_scatter(shard, list(flat.chunk(self.world)))
        else:  # emulated: all-reduce the whole buffer and keep our chunk, for twice the bytes
            self.all_reduce(flat)
            shard.copy_(flat.chunk(self.world)[self.rank])

    def all_gather(self, flat, shard):
        # chunk r of flat receives rank r's shard; the chunks are views, so flat fills in place
        self.count(nbytes(flat), 1)
        dist.all_gather(list(flat.chunk(self.world)), shard)

def has_reduce_scatter(device, world):
    # gloo has reduce_scatter only in recent torch (2.13 does); all_reduce and all_gather it
    # always had, so where reduce_scatter is missing, Comm emulates it with an all_reduce
    try:
        dist.reduce_scatter(torch.zeros(1, device=device), [torch.zeros(1, device=device)] * world)
    except (RuntimeError, NotImplementedError):
        return False
    return True

# -----------------------------------------------------------------------------
# the modes: naive and bucketed all-reduce, ZeRO-1 (torch's DDP and one process are in train)

def broadcast_parameters(model):
    # every replica starts from rank 0's weights, as DDP's constructor does (setup: not counted)
    for p in model.parameters():
        dist.broadcast(p.data, src=0)

def all_reduce_each(params, comm):
    """mode naive: after backward, one all-reduce per gradient tensor, so p.grad = the mean."""
    for p in params:
        p.grad.div_(comm.world)  # divide, then sum, as DDP does (gloo long had no AVG)
        comm.all_reduce(p.grad)

def bucket_plan(params, cap_bytes):
    """Parameter indices grouped into buckets of at most cap_bytes, last parameter first (backward
    produces the last layers' gradients first); a tensor over the cap gets a bucket of its own.
    Sizes 1, 1 and 3 KiB with a 2 KiB cap -> [[2], [1, 0]]."""
    buckets = [[]]
    size = 0
    for i in reversed(range(len(params))):
        if buckets[-1] and size + nbytes(params[i]) > cap_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes(params[i])
    return buckets

class Buckets:
    """mode bucketed: a hook on each parameter copies its gradient into its bucket as soon as
    autograd has it; a full bucket is all-reduced asynchronously while backward goes on with the
    earlier layers, and wait() collects the results before the step, as torch's DDP does."""
    def __init__(self, params, comm, cap_bytes):
        self.params = params
        self.comm = comm
        self.plan = bucket_plan(params, cap_bytes)
        self.slots = {}  # parameter index -> (bucket, offset of its gradient in that buffer)
        self.buffers = []
        for k, bucket in enumerate(self.plan):
            offset = 0
            for i in bucket:
                self.slots[i] = (k, offset)
                offset += params[i].numel()
            self.buffers.append(torch.zeros(offset, device=params[0].device))
        self.sync = True  # our no_sync: False on the micro-steps before the last
        self.reset()
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(functools.partial(self.grad_ready, i))

    def reset(self):
        self.missing = [len(bucket) for bucket in self.plan]  # gradients each bucket waits for
        self.launched = 0
        self.handles = []

    def grad_ready(self, i, p):
        # autograd calls this once p.grad holds this backward's gradient (added to earlier ones)
        if not self.sync:
            return
        k, offset = self.slots[i]
        self.buffers[k][offset:offset + p.numel()].copy_(p.grad.flatten())
        self.missing[k] -= 1
        # launch full buckets strictly in plan order: every rank must issue the same collectives
        # in the same order, or they would pair up different buckets (or hang)
        while self.launched < len(self.plan) and self.missing[self.launched] == 0:
            buffer = self.buffers[self.launched].div_(self.comm.world)
            self.handles.append(self.comm.all_reduce(buffer, async_op=True))
            self.launched += 1

    def wait(self):
        assert self.launched == len(self.plan), (f"{self.launched} of {len(self.plan)} buckets "
                                                 f"sent: a parameter got no gradient")
        for handle in self.handles:  # the only wait: the sends overlapped the rest of backward
            handle.wait()
        for i, p in enumerate(self.params):
            k, offset = self.slots[i]
            p.grad.copy_(self.buffers[k][offset:offset + p.numel()].view_as(p))
        self.reset()

def adamw(decay, rest, cfg):
    # AdamW as train.py sets it up: matrices and embeddings decay, biases and norm gains do not
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99))

class Zero1:
    """mode zero1, ZeRO stage 1, in the optimizer's place: the parameters live in one flat
    buffer, padded with zeros to N equal shards, and rank r's AdamW keeps state for shard r only
    (1/N of the memory). step(): reduce-scatter the gradients (rank r gets the mean of shard r),
    update shard r, all-gather every shard back into the parameters."""
    def __init__(self, params, comm, cfg):
        self.params = params
        self.comm = comm
        total = sum(p.numel() for p in params)
        size = math.ceil(total / comm.world)  # the shard size
        self.padding = size * comm.world - total
        self.flat = torch.zeros(size * comm.world, device=params[0].device)
        self.flat_grad = torch.zeros_like(self.flat)
        self.shard = torch.zeros(size, device=params[0].device)  # our master copy of shard r
        self.shard_grad = torch.zeros_like(self.shard)
        lo = comm.rank * size
        decay = []
        rest = []
        offset = 0
        for p in params:
            n = p.numel()
            self.flat[offset:offset + n] = p.detach().flatten()
            p.data = self.flat[offset:offset + n].view_as(p)  # a view: the all-gather fills it
            # AdamW decays matrices only, so it gets one piece (a view) of the shard per
            # parameter the shard overlaps, its .grad the same slice of shard_grad
            start = max(offset, lo)
            end = min(offset + n, lo + size)
            if start < end:
                piece = self.shard[start - lo:end - lo]
                piece.copy_(self.flat[start:end])
                piece.grad = self.shard_grad[start - lo:end - lo]
                (decay if p.dim() >= 2 else rest).append(piece)
            offset += n
        self.optimizer = adamw(decay, rest, cfg)
        self.param_groups = self.optimizer.param_groups  # what the loop sets the lr in
        self.state = self.optimizer.state  # AdamW's moments: for this shard only

    def step(self):
        total = self.flat.numel() - self.padding
        self.flat_grad[:total] = torch.cat([p.grad.flatten() for p in self.params])
        self.flat_grad.div_(self.comm.world)  # mean = sum of the gradients / N
        self.comm.reduce_scatter(self.shard_grad, self.flat_grad)
        self.optimizer.step()  # updates the pieces, that is our shard
        self.comm.all_gather(self.flat, self.shard)

# -----------------------------------------------------------------------------
# the cost model: planning past this machine on paper

LINKS = [("NVLink 4", 450e9, 3e-6), ("PCIe 4 x16", 25e9, 5e-6), ("100 Gb Ethernet", 12.5e9, 20e-6)]
GPT2_SHAPES = {"gpt2 124M": (12, 12, 768), "gpt2-medium 355M": (24, 16, 1024),
               "gpt2-large 774M": (36, 20, 1280), "gpt2-xl 1.5B": (48, 25, 1600)}

def ring_all_reduce_seconds(size, n, bandwidth, latency):
    """A ring all-reduce of size bytes over n GPUs: 2(n-1) steps, each sending size/n bytes to the
    next GPU: 2(n-1)/n x size / bandwidth + 2(n-1) x latency."""
    return 2 * (n - 1) / n * size / bandwidth + 2 * (n - 1) * latency

def zero_bytes_per_gpu(n_params, stage, n):
    """ZeRO's model states per GPU with mixed-precision Adam (paper, section 3): 2 bytes of fp16
    weights + 2 of fp16 gradients + 12 of fp32 weights, momentum and variance = 16 per parameter;
    stage 1 shards the 12 over n GPUs, stage 2 the gradients too, stage 3 the weights too."""
    weights = 2 * n_params / (n if stage >= 3 else 1)
    grads = 2 * n_params / (n if stage >= 2 else 1)
    return weights + grads + 12 * n_params / (n if stage >= 1 else 1)

def print_cost_model(cfg):
    links = LINKS
    if cfg.bandwidth_gbs > 0:
        links = [(f"{cfg.bandwidth_gbs:g} GB/s", cfg.bandwidth_gbs * 1e9, cfg.latency_us * 1e-6)]
    with torch.device("meta"):  # shapes only: no memory, no init
        sizes = {name: GPT(GPTConfig(n_layer=layers, n_head=heads, n_embd=width)).num_params()
                 for name, (layers, heads, width) in GPT2_SHAPES.items()}
    grad_bytes = 4 * sizes["gpt2 124M"]
    header = " | ".join(f"{name} {bw / 1e9:g} GB/s, {lat * 1e6:g} us" for name, bw, lat in links)
    print(f"\ncost model: ms per ring all-reduce of GPT-2 124M's float32 gradients "
          f"({grad_bytes / 1e6:.0f} MB)\n| GPUs | {header} |\n|---|{'---|' * len(links)}")
    for n in (2, 8, 64, 256, 1024):
        times = [1000 * ring_all_reduce_seconds(grad_bytes, n, bw, lat) for _, bw, lat in links]
        print(f"| {n} | " + " | ".join(f"{t:,.1f}" for t in times) + " |")
    print(f"\nZeRO model states in GB per GPU on {cfg.zero_gpus} GPUs (mixed-precision Adam, no "
          f"activations)\n| model | stage 0 | stage 1 | stage 2 | stage 3 |\n|---|---|---|---|---|")
    for name, n_params in sizes.items():
        row = [zero_bytes_per_gpu(n_params, stage, cfg.zero_gpus) / 1e9 for stage in range(4)]
        print(f"| {name} | " + " | ".join(f"{gb:.2f}" for gb in row) + " |")

# -----------------------------------------------------------------------------
# helpers used by main: checks, data, memory, one training run, the table

def model_shape(cfg):
    return {name: getattr(cfg, name) for name in ("block_size", "n_layer", "n_head", "n_embd")}

def check_config(cfg, world):
    """Every check of the flags, before data, processes or model: one error naming the flag.
    Returns the device type, cuda or cpu."""
    require_positive(cfg, "log_interval", "batch_size", "grad_accum", "max_iters", "zero_gpus")
    if cfg.mode not in MODES:
        raise ValueError(f"--mode={cfg.mode!r}: use one of {', '.join(MODES)}, or --bench for all")
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        fix = per_step * math.ceil(cfg.batch_size / per_step)
        raise ValueError(f"--batch_size={cfg.batch_size} does not split into {world} processes x "
                         f"--grad_accum={cfg.grad_accum} micro-steps: pass a multiple of "
                         f"{per_step}, e.g. --batch_size={fix}")
    if min(cfg.learning_rate, cfg.bucket_mb) <= 0:
        raise ValueError(f"--learning_rate={cfg.learning_rate} and --bucket_mb={cfg.bucket_mb} "
                         f"must both be above 0")
    GPTConfig(vocab_size=257, **model_shape(cfg))  # raises if, e.g., n_head does not divide n_embd
    if pick_device(cfg.device).startswith("cuda"):  # pick_device raises for an unknown device
        return "cuda"
    if cfg.device == "mps":
        raise ValueError("--device=mps: torch.distributed has no mps backend; pass --device=cpu")
    return "cpu"

def load_tokens(path, block_size):
    """(token ids, tokenizer, where from): a .bin that train.py prepared (meta.json beside it names
    the dtype), or for path '' without data/stories/train.bin, this file's own bytes."""
    default = os.path.join("data", "stories", "train.bin")
    if not path and os.path.exists(default):
        path = default
    if not path:  # ids 0-255 are bytes and 256 is <|endoftext|>, as train.py --tokenizer=byte
        ids = np.fromfile(os.path.abspath(__file__), dtype=np.uint8)
        tok = Tokenizer().train("", 257)
        path = "the bytes of ddp.py"
    else:
        folder = os.path.dirname(path)
        needed = [path, os.path.join(folder, "meta.json"), os.path.join(folder, "tokenizer.json")]
        if not all(os.path.isfile(p) for p in needed):
            raise FileNotFoundError(f"--data={path} needs {', '.join(needed)}: prepare them with "
                                    f"`python train.py`, or pass --data='' for the built-in text")
        with open(needed[1]) as f:
            ids = np.memmap(path, json.load(f)["dtype"], "r")
        tok = Tokenizer.load(needed[2])
    if len(ids) <= block_size + 1:
        raise ValueError(f"{path} has {len(ids)} tokens, too few for --block_size={block_size}")
    return ids, tok, path

def get_batch(data, starts, block_size, device):
    # windows x at the given starts and the next tokens y, (B, T) each
    windows = np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64)
    xy = torch.from_numpy(windows)                                 # (B, T + 1)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)

def reset_peak_memory(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):  # Linux: "5" resets the peak resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

def peak_memory(device):
    # CUDA: the most bytes torch allocated; CPU: the peak resident set of the whole process,
    # torch included (ru_maxrss is in kilobytes on Linux)
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def train(mode, cfg, data, model_config, comm, device, accum, log):
    """A fresh GPT (the same init in every mode) trained max_iters steps in one mode, or "single":
    one process, no communication. This rank's micro-step m is slice m * world + rank of each
    global batch. -> the model, its parameters flattened, and the measurements."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    forward = model
    if mode == "torch":  # the constructor broadcasts rank 0's weights; backward reduces buckets
        forward = DDP(model, bucket_cap_mb=cfg.bucket_mb)
    elif mode != "single":
        broadcast_parameters(model)
    params = list(model.parameters())
    buckets = Buckets(params, comm, cfg.bucket_mb * 2 ** 20) if mode == "bucketed" else None
    optimizer = Zero1(params, comm, cfg) if mode == "zero1" else None
    if optimizer is None:
        optimizer = adamw([p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2],
                          cfg)
    micro = cfg.batch_size // (comm.world * accum)
    reset_peak_memory(device)
    times = []
    for step in range(cfg.max_iters):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, step])  # the global batch: a function of the step
        starts = rng.integers(0, len(data) - cfg.block_size, size=cfg.batch_size)
        loss = torch.zeros((), device=device)
        for m in range(accum):
            first = (m * comm.world + comm.rank) * micro
            x, y = get_batch(data, starts[first:first + micro], cfg.block_size, device)
            last = m == accum - 1
            # the micro-steps before the last only accumulate gradients; the last communicates
            sync = contextlib.nullcontext()
            if mode == "torch" and not last:
                sync = forward.no_sync()
            if buckets is not None:
                buckets.sync = last
            with sync:
                part = forward(x, y)[1] / accum  # the mean over micro-batches, not the sum
                part.backward()
            loss += part.detach()
        if mode == "naive":
            all_reduce_each(params, comm)
        if mode == "bucketed":
            buckets.wait()
        if mode == "torch":  # DDP makes its calls itself: all the gradients, once
            comm.count(sum(nbytes(p) for p in params), 2)
        lr = get_lr(step, cfg.learning_rate, cfg.learning_rate / 10, cfg.warmup_iters, cfg.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if comm.world > 1:  # the mean loss over the global batch, for the log (not counted)
            dist.all_reduce(loss)
            loss /= comm.world
        loss = loss.item()  # waits for the device: the step time is honest
        times.append(time.time() - t0)
        if log and step % cfg.log_interval == 0:
            print(f"step {step:4d}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"{1000 * times[-1]:.0f} ms | {progress_bar(step + 1, cfg.max_iters, np.mean(times))}")
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return dict(model=model, params=torch.cat([p.detach().flatten().cpu() for p in params]),
                loss=loss, step_ms=1000 * float(np.median(times)), peak_memory=peak_memory(device),
                calls_per_step=comm.calls / cfg.max_iters, sent_per_step=comm.sent / cfg.max_iters,
                optimizer_bytes=sum(nbytes(t) for t in state),
                buckets=len(buckets.plan) if buckets else 0, padding=getattr(optimizer, "padding", 0))

def print_table(results, world, device):
    memory = "peak allocated" if device.startswith("cuda") else "peak RSS"
    print(f"\n| mode, {world} processes | ms/step | calls/step | sent/rank/step | AdamW state/rank "
          f"| {memory} | max abs diff vs torch | vs 1 process |\n|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        name = {"single": "1 process, whole batch", "bucketed": f"bucketed ({r['buckets']} "
                f"buckets)", "zero1": f"zero1 (+{r['padding']} padding)"}.get(mode, mode)
        calls = "DDP's own" if mode == "torch" else f"{r['calls_per_step']:.0f}"
        print(f"| {name} | {r['step_ms']:.0f} | {calls} | {r['sent_per_step'] / 2 ** 20:.3f} MiB | "
              f"{r['optimizer_bytes'] / 2 ** 20:.3f} MiB | {r['peak_memory'] / 2 ** 20:.0f} MiB | "
              f"{r.get('max_diff_torch', 0.0):.1e} | {r.get('max_diff_single', 0.0):.1e} |")

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    # --- setup: torchrun starts the processes and gives each RANK, LOCAL_RANK and WORLD_SIZE
    if "RANK" not in os.environ:
        raise RuntimeError("ddp.py runs as several processes: start it with `torchrun "
                           "--standalone --nproc_per_node=2 ddp.py` (or `python -m "
                           "torch.distributed.run --standalone --nproc_per_node=2 ddp.py`)")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    master = rank == 0
    device = check_config(cfg, world)
    data, tok, source = load_tokens(cfg.data, cfg.block_size)
    if device == "cuda":  # one GPU per process
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 throughout: modes compare to 1e-6
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    model_config = GPTConfig(vocab_size=tok.vocab_size, **model_shape(cfg))
    results = {}
    try:  # the finally tears the process group down even when a rank fails
        native = has_reduce_scatter(device, world)
        if master:
            print(f"config:\n{format_config(cfg)}\ndevice: {device} x {world} processes "
                  f"({dist.get_backend()}), float32; reduce-scatter "
                  f"{'native' if native else 'missing: emulated with all_reduce'}\ndata: {source}, "
                  f"{len(data):,} tokens; {cfg.batch_size} sequences of {cfg.block_size} tokens "
                  f"a step = {world} processes x {cfg.grad_accum} micro-steps x "
                  f"{cfg.batch_size // (world * cfg.grad_accum)} sequences")
        for mode in MODES if cfg.bench else [cfg.mode]:
            comm = Comm(rank, world, native)
            results[mode] = train(mode, cfg, data, model_config, comm, device, cfg.grad_accum,
                                  master and not cfg.bench)
            if master:
                print(f"{mode}: loss {results[mode]['loss']:.4f} after {cfg.max_iters} steps, "
                      f"{results[mode]['step_ms']:.0f} ms/step", flush=True)
        if cfg.bench and master:  # the reference: one process, the whole global batch at once
            results["single"] = train("single", cfg, data, model_config, Comm(0, 1, native),
                                      device, 1, False)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
    if not master:
        return {}

    # --- save and compare (rank 0)
    for mode, result in results.items():
        save_checkpoint(os.path.join(cfg.out_dir, mode, "ckpt.pt"), result.pop("model"),
                        step=cfg.max_iters, train_loss=result["loss"],
                        train_config=dataclasses.asdict(cfg), tokenizer=tok.to_dict())
        for other in ("torch", "single"):
            if other in results:
                diff = result["params"] - results[other]["params"]
                result[f"max_diff_{other}"] = diff.abs().max().item()
    for result in results.values():
        del result["params"]
    if cfg.bench:
        print_table(results, world, device)
        print_cost_model(cfg)
    print(f"saved {', '.join(os.path.join(cfg.out_dir, mode, 'ckpt.pt') for mode in results)}")
    results["world"] = world
    results["reduce_scatter"] = "native" if native else "emulated with all_reduce"
    if cfg.report:  # atomic, like the checkpoints
        with open(cfg.report + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(cfg.report + ".tmp", cfg.report)
    return results

if __name__ == "__main__":
    run_main(main, DDPConfig)
