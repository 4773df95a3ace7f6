"""Data parallelism from scratch: all-reduce, overlapped gradient buckets, and ZeRO-1.

What you learn here (LLM101n chapter 10): N processes each run the GPT on 1/N of the
batch and average their gradients, so every replica takes the step one process would take
on the whole batch. train.py leaves that to torch's DDP; here it is written with
torch.distributed collectives and checked against DDP: `naive` (an all-reduce per
gradient), `bucketed` (buckets all-reduced asynchronously from backward hooks, so they
overlap backward, as DDP does) and `zero1` (ZeRO-1: each rank keeps the AdamW state of
only its 1/N shard). The key number: a ring all-reduce sends 2(N-1)/N x the gradient
bytes per rank, whatever N, and ZeRO-1 sends just as much.
How to run (under torchrun only: gloo on CPUs; nccl on GPUs, one GPU per process):
    torchrun --standalone --nproc_per_node=2 ddp.py           # bucketed, ~1 min on a CPU
    torchrun --standalone --nproc_per_node=2 ddp.py --bench   # every mode, table, costs
    torchrun --standalone --nproc_per_node=8 ddp.py --mode=zero1 --n_layer=12 --n_embd=768
Depends on gpt.py and bpe.py; reads data/stories/train.bin (train.py) if it is there,
else its own bytes; writes <out_dir>/<mode>/ckpt.pt. References: ZeRO, arXiv:1910.02054;
PyTorch Distributed (DDP), arXiv:2006.15704.
"""
import contextlib
import dataclasses
import functools
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bpe import Tokenizer
from gpt import (GPT, GPTConfig, UserError, format_config, pick_device, require_positive,
                 run, save_checkpoint, user_input)

@dataclasses.dataclass
class DDPConfig:
    """Data-parallel GPT training with hand-written collectives, under torchrun."""
    # I/O
    out_dir: str = "out-ddp"      # <out_dir>/<mode>/ckpt.pt, with the measurements
    # data
    data: str = ""                # a train.py .bin; '' = data/stories/train.bin if any
    # model
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # channels
    block_size: int = 128         # context length in tokens
    # optimizer
    mode: str = "bucketed"        # torch, naive, bucketed or zero1 (--bench: all four)
    batch_size: int = 16          # sequences per step, over all processes, micro-steps
    grad_accum: int = 1           # micro-steps per optimizer step, in each process
    max_iters: int = 30           # optimizer steps
    learning_rate: float = 1e-3   # constant: the schedule is train.py's lesson
    weight_decay: float = 0.1     # AdamW, on every parameter (one group: see Zero1)
    bucket_mb: float = 1.0        # bucket cap in MiB, bucketed and torch (DDP's: 25)
    # system
    bench: bool = False           # every mode from one init + a 1-process reference
    device: str = "auto"          # auto (cuda if present, else cpu), cpu, cuda
    seed: int = 1337              # the init (the same in every mode) and the batches

MODES = ("torch", "naive", "bucketed", "zero1")
# torch 2.13 renamed these two (the old names warn); gloo has both since 2.2
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
MIB = 2 ** 20

# -----------------------------------------------------------------------------
# the lesson: collectives that count what they send, then the modes

class Comm:
    """This rank, the world size, and the bytes the collectives send, as in a ring:
    (N-1)/N of the buffer for a reduce-scatter or all-gather, 2(N-1)/N for all-reduce."""
    def __init__(self, rank, world):
        self.rank = rank
        self.world = world
        self.sent = 0.0
        self.calls = 0

    def count(self, full_bytes, halves):
        self.sent += halves * (self.world - 1) / self.world * full_bytes
        self.calls += 1

def all_reduce_each(params, comm):
    """mode naive: after backward, an all-reduce per gradient, making p.grad the mean."""
    for p in params:
        p.grad.div_(comm.world)  # divide, then sum, as DDP does (gloo long had no AVG)
        comm.count(p.grad.nbytes, 2)
        dist.all_reduce(p.grad)  # the default op: SUM

def bucket_plan(params, cap_bytes):
    """Parameter indices grouped into buckets of at most cap_bytes, last parameter first
    (backward produces the last layers' gradients first); a tensor over the cap gets a
    bucket of its own. Sizes 1, 1 and 3 KiB with a 2 KiB cap -> [[2], [1, 0]]."""
    buckets = [[]]
    size = 0
    for i in reversed(range(len(params))):
        if buckets[-1] and size + params[i].nbytes > cap_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += params[i].nbytes
    return buckets

class Buckets:
    """mode bucketed, as torch's DDP does: hooks count gradients in; a complete bucket is
    all-reduced asynchronously while backward goes on; wait() collects the results."""
    def __init__(self, params, comm, cap_bytes):
        self.params = params
        self.comm = comm
        self.plan = bucket_plan(params, cap_bytes)
        self.bucket_of = {i: k for k, bucket in enumerate(self.plan) for i in bucket}
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(functools.partial(self.grad_ready, i))

    def start(self, sync):
        # before each backward; sync=False on micro-steps before the last: our no_sync
        self.sync = sync
        self.missing = [len(bucket) for bucket in self.plan]  # gradients still to come
        self.sent = []  # (bucket, flat buffer, async handle), in launch order

    def grad_ready(self, i, p):
        # autograd calls this once p.grad holds this backward's gradient (+ earlier ones)
        if not self.sync:
            return
        self.missing[self.bucket_of[i]] -= 1
        # launch complete buckets strictly in plan order: every rank must issue the same
        # collectives in the same order, or they would pair different buckets (or hang)
        while len(self.sent) < len(self.plan) and self.missing[len(self.sent)] == 0:
            bucket = self.plan[len(self.sent)]
            # a fresh buffer per bucket keeps this short; DDP allocates them once
            grads = [self.params[j].grad.flatten() for j in bucket]
            buffer = torch.cat(grads).div_(self.comm.world)
            self.comm.count(buffer.nbytes, 2)
            self.sent.append((bucket, buffer, dist.all_reduce(buffer, async_op=True)))

    def wait(self):
        sent = f"{len(self.sent)} of {len(self.plan)} buckets sent"
        assert len(self.sent) == len(self.plan), f"{sent}: a parameter got no gradient"
        for bucket, buffer, handle in self.sent:
            handle.wait()  # the only wait: the sends overlapped the rest of backward
            sizes = [self.params[j].numel() for j in bucket]
            for j, grad in zip(bucket, buffer.split(sizes)):
                self.params[j].grad.copy_(grad.view_as(self.params[j]))

class Zero1:
    """mode zero1, ZeRO stage 1, in the optimizer's place: the parameters become views
    into a flat buffer padded to N equal shards; rank r's AdamW keeps shard r's state.
    step(): reduce-scatter the gradients (r gets shard r's mean), update, all-gather."""
    def __init__(self, params, comm, cfg):
        self.params = params
        self.comm = comm
        total = sum(p.numel() for p in params)
        self.padding = -total % comm.world  # zeros that make N equal shards
        self.flat = torch.zeros(total + self.padding, device=params[0].device)
        offset = 0
        for p in params:
            self.flat[offset:offset + p.numel()] = p.detach().flatten()
            p.data = self.flat[offset:offset + p.numel()].view_as(p)  # a view into flat
            offset += p.numel()
        self.flat_grad = torch.zeros_like(self.flat)
        self.shard = self.flat.chunk(comm.world)[comm.rank].clone()  # our shard r
        self.shard.grad = torch.zeros_like(self.shard)
        # one AdamW group (decay on every tensor, where train.py spares biases and gains)
        # keeps the shard one tensor; DeepSpeed keeps a flat buffer per group instead
        self.optimizer = torch.optim.AdamW([self.shard], cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        self.state = self.optimizer.state  # AdamW's two moments, of this shard only

    def step(self):
        total = self.flat.numel() - self.padding
        self.flat_grad[:total] = torch.cat([p.grad.flatten() for p in self.params])
        self.flat_grad.div_(self.comm.world)  # so that the sum is the mean
        self.comm.count(self.flat_grad.nbytes, 1)
        REDUCE_SCATTER(self.shard.grad, self.flat_grad)  # the sum over ranks of chunk r
        self.optimizer.step()
        self.comm.count(self.flat.nbytes, 1)
        ALL_GATHER(self.flat, self.shard)  # chunk r of flat = rank r's shard

# -----------------------------------------------------------------------------
# the cost model: planning past this machine on paper

LINKS = [("NVLink 4", 450e9, 3e-6), ("PCIe 4 x16", 25e9, 5e-6),
         ("100 Gb Ethernet", 12.5e9, 20e-6)]
# GPT(GPTConfig(n_layer, n_head, n_embd)).num_params() for the four GPT-2 sizes
GPT2_PARAMS = {"gpt2 124M": 124_439_808, "gpt2-medium 355M": 354_823_168,
               "gpt2-large 774M": 774_030_080, "gpt2-xl 1.5B": 1_557_611_200}

def ring_all_reduce_seconds(size, n, bandwidth, latency):
    """Ring all-reduce on n GPUs: 2(n-1) steps of size/n bytes each, so
    2(n-1)/n x size / bandwidth + 2(n-1) x latency."""
    return 2 * (n - 1) / n * size / bandwidth + 2 * (n - 1) * latency

def zero_bytes_per_gpu(n_params, stage, n):
    """ZeRO's model states per GPU, mixed-precision Adam (paper, section 3): fp16 weights
    2 bytes + fp16 gradients 2 + fp32 weights, momentum, variance 12 = 16 per parameter;
    stage 1 shards the 12 over n GPUs, stage 2 the gradients too, stage 3 the weights."""
    weights = 2 * n_params / (n if stage >= 3 else 1)
    grads = 2 * n_params / (n if stage >= 2 else 1)
    return weights + grads + 12 * n_params / (n if stage >= 1 else 1)

def print_markdown(title, header, rows):
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")

def print_cost_model():
    grad_bytes = 4 * GPT2_PARAMS["gpt2 124M"]
    rows = []
    for n in (2, 8, 64, 256, 1024):
        seconds = [ring_all_reduce_seconds(grad_bytes, n, bw, lat) for _, bw, lat in LINKS]
        rows.append([str(n)] + [f"{1000 * t:,.1f}" for t in seconds])
    links = [f"{name} {bw / 1e9:g} GB/s, {lat * 1e6:g} us" for name, bw, lat in LINKS]
    print_markdown(f"cost model: ms per ring all-reduce of GPT-2 124M's float32 "
                   f"gradients ({grad_bytes / 1e6:.0f} MB)", ["GPUs"] + links, rows)
    header = ["model"] + [f"stage {s}" for s in range(4)]
    rows = [[name] + [f"{zero_bytes_per_gpu(count, s, 8) / 1e9:.2f}" for s in range(4)]
            for name, count in GPT2_PARAMS.items()]
    print_markdown("ZeRO model states per GPU in GB on 8 GPUs, one node (mixed-"
                   "precision Adam; activations extra)", header, rows)

# -----------------------------------------------------------------------------
# helpers used by main: checks, data, one training run

def check_config(cfg, world):
    # the flags' checks, before data or processes (GPTConfig checks the model's in main)
    require_positive(cfg, "batch_size", "grad_accum", "max_iters")
    if cfg.mode not in MODES:
        raise UserError(f"--mode={cfg.mode!r}: use one of {', '.join(MODES)} or --bench")
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        example = (cfg.batch_size // per_step + 1) * per_step
        raise UserError(f"--batch_size={cfg.batch_size} does not split into {world} "
                        f"processes x --grad_accum={cfg.grad_accum} micro-steps: pass a "
                        f"multiple of {per_step}, e.g. --batch_size={example}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device={cfg.device}: use auto, cpu or cuda (rank r: cuda:r)")
    # never mps: it has no process-group backend
    return "cuda" if pick_device(cfg.device) == "cuda" else "cpu"

def load_tokens(data):
    # (token ids, tokenizer): train.py's .bin, its meta.json (dtype) and tokenizer.json;
    # for data='' without data/stories/train.bin, this file's bytes (256: <|endoftext|>)
    path = data or os.path.join("data", "stories", "train.bin")
    if not data and not os.path.exists(path):
        return np.fromfile(__file__, dtype=np.uint8), Tokenizer().train("", 257)
    folder = os.path.dirname(path)
    needed = [path] + [os.path.join(folder, f) for f in ("meta.json", "tokenizer.json")]
    if not all(os.path.isfile(p) for p in needed):
        raise UserError(f"--data={path} needs {', '.join(needed)}: prepare them with "
                        f"`python train.py`, or pass --data='' for the built-in text")
    with open(needed[1]) as f:
        return np.memmap(path, json.load(f)["dtype"], "r"), Tokenizer.load(needed[2])

def train(mode, cfg, data, model_config, comm, device, accum, log):
    # a fresh GPT (the same init in every mode) trained in one mode, or "single": one
    # process and no communication -> the model, its parameters flattened, measurements
    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    forward = model
    if mode == "torch":  # the constructor broadcasts rank 0's weights
        forward = DDP(model, bucket_cap_mb=cfg.bucket_mb)
    elif mode != "single":  # every replica starts from rank 0's weights, as DDP's does
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    params = list(model.parameters())
    buckets = Buckets(params, comm, cfg.bucket_mb * MIB) if mode == "bucketed" else None
    optimizer = torch.optim.AdamW(params, cfg.learning_rate, weight_decay=cfg.weight_decay)
    if mode == "zero1":  # ZeRO-1 takes the optimizer's place
        optimizer = Zero1(params, comm, cfg)
    micro = cfg.batch_size // (comm.world * accum)
    times = []
    for step in range(cfg.max_iters):
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, step])  # the global batch, set by step
        starts = rng.integers(0, len(data) - cfg.block_size, size=cfg.batch_size)
        loss = torch.zeros((), device=device)
        for m in range(accum):
            first = (m * comm.world + comm.rank) * micro  # our slice of the global batch
            ours = starts[first:first + micro]
            windows = np.stack([data[i:i + cfg.block_size + 1] for i in ours])
            xy = torch.from_numpy(windows.astype(np.int64)).to(device)  # (B, T + 1)
            x = xy[:, :-1]  # (B, T)
            y = xy[:, 1:]  # (B, T): the token after each of x
            last = m == accum - 1
            # the micro-steps before the last only accumulate gradients; the last sends
            sync = contextlib.nullcontext()
            if mode == "torch" and not last:
                sync = forward.no_sync()
            if buckets is not None:
                buckets.start(sync=last)
            with sync:
                part = forward(x, y)[1] / accum  # the mean over micro-batches
                part.backward()
            loss += part.detach()
        if mode == "naive":
            all_reduce_each(params, comm)
        if mode == "bucketed":
            buckets.wait()
        if mode == "torch":  # DDP makes the calls itself: all the gradients, once
            comm.count(sum(p.nbytes for p in params), 2)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        if comm.world > 1:  # the global batch's mean loss, for the log (not counted)
            dist.all_reduce(loss)
            loss /= comm.world
        loss = loss.item()  # waits for the device: the step time is honest
        times.append(time.time() - t0)
        if log and not cfg.bench and step % max(1, cfg.max_iters // 10) == 0:
            print(f"step {step:4d}/{cfg.max_iters} | loss {loss:.4f}", flush=True)
    step_ms = 1000 * float(np.median(times))
    if log:
        print(f"{mode}: loss {loss:.4f} after {cfg.max_iters} steps, "
              f"{step_ms:.0f} ms a step")
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    flat = torch.cat([p.detach().flatten().cpu() for p in params])
    return dict(model=model, params=flat, loss=loss, step_ms=step_ms,
                calls_per_step=comm.calls / cfg.max_iters,
                sent_per_step=comm.sent / cfg.max_iters,
                optimizer_bytes=sum(t.nbytes for t in state),
                buckets=len(buckets.plan) if buckets else 0,
                padding=getattr(optimizer, "padding", 0))

def print_bench(results, world):
    header = ["mode", "ms/step", "calls/step", "MiB sent/rank/step", "AdamW MiB/rank",
              "max abs diff vs torch", "vs 1 process"]
    rows = []
    for mode, r in results.items():
        calls = "DDP's" if mode == "torch" else f"{r['calls_per_step']:.0f}"
        rows.append([mode, f"{r['step_ms']:.0f}", calls, f"{r['sent_per_step'] / MIB:.3f}",
                     f"{r['optimizer_bytes'] / MIB:.3f}", f"{r['max_diff_torch']:.1e}",
                     f"{r['max_diff_single']:.1e}"])
    buckets = results["bucketed"]["buckets"]
    padding = results["zero1"]["padding"]
    print_markdown(f"{world} processes; bucketed: {buckets} buckets; zero1: {padding} "
                   f"zeros of padding; single: 1 process, whole batch", header, rows)
    print_cost_model()

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    # --- setup: torchrun starts the processes; each gets RANK, LOCAL_RANK, WORLD_SIZE
    if "RANK" not in os.environ:
        raise UserError("ddp.py runs as several processes: start it with `torchrun "
                        "--standalone --nproc_per_node=2 ddp.py` (torchrun is python -m "
                        "torch.distributed.run)")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    device = check_config(cfg, world)
    data, tok = load_tokens(cfg.data)
    if len(data) <= cfg.block_size + 1:
        raise UserError(f"{len(data)} tokens: too few for --block_size={cfg.block_size}")
    with user_input():  # GPTConfig's own checks (n_embd divisible by n_head, ...)
        model_config = GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    if device == "cuda":  # one GPU per process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # no TF32: the modes agree to 1e-6
    dist.init_process_group("gloo" if device == "cpu" else "nccl")
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if rank == 0:
        print(f"config:\n{format_config(cfg)}\n{device} x {world} processes "
              f"({dist.get_backend()}), float32, {len(data):,} tokens of data; a step: "
              f"{cfg.batch_size} sequences = {world} processes x {cfg.grad_accum} "
              f"micro-steps x {micro}")
    results = {}
    try:  # the finally tears the process group down even when a rank fails
        for mode in MODES if cfg.bench else [cfg.mode]:
            results[mode] = train(mode, cfg, data, model_config, Comm(rank, world),
                                  device, cfg.grad_accum, rank == 0)
        if cfg.bench and rank == 0:  # the reference: one process, the whole global batch
            results["single"] = train("single", cfg, data, model_config, Comm(0, 1),
                                      device, 1, True)
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
    if rank > 0:
        return {}

    # --- save and compare (rank 0)
    params = {mode: result.pop("params") for mode, result in results.items()}
    for mode, result in results.items():
        for other in ("torch", "single"):
            if other in params:
                diff = (params[mode] - params[other]).abs().max().item()
                result[f"max_diff_{other}"] = diff
        # the measurements go into the checkpoint (plain types), to compare from outside
        save_checkpoint(os.path.join(cfg.out_dir, mode, "ckpt.pt"), result.pop("model"),
                        step=cfg.max_iters, measured=result, world=world,
                        train_config=dataclasses.asdict(cfg), tokenizer=tok.to_dict())
    if cfg.bench:
        print_bench(results, world)
    paths = [os.path.join(cfg.out_dir, mode, "ckpt.pt") for mode in results]
    print(f"saved {', '.join(paths)}")
    return results

if __name__ == "__main__":
    run(main, DDPConfig)
