"""LoRA: finetune a GPT by training two small matrices per layer, then merge them back.

What you learn here (LLM101n chapter 14, Build a LLM from Scratch appendix E): a frozen weight W
gets a low-rank update, y = W x + (alpha / r) * B (A x), with A (r, in) and B (out, r) the only
trained tensors; B starts at zero, so training starts from the base model exactly. The key idea:
the update B @ A has the shape of W, so after training it folds into W and costs nothing at
inference, while during training the optimizer keeps state for r * (in + out) numbers, not in * out.
How to run:
    python lora.py                     # 6-9 min on a 2-core CPU: rank-8 adapters on out/ckpt.pt
    python lora.py --compare           # full finetuning vs LoRA r=4, 8, 16, same data and steps
    python lora.py --init_from=gpt2 --dataset=alpaca --learning_rate=3e-4 --min_lr=3e-5
Depends on: gpt.py, bpe.py (the data, template, training loop and evaluation finetune.py uses).
Reads out/ckpt.pt; writes out-lora/ckpt.pt (merged: an ordinary checkpoint every script reads)
and out-lora/adapter.pt (the LoRA tensors alone, tied to their base by a fingerprint).
References: Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv:2106.09685;
Kalajdzievski 2023, rsLoRA, arXiv:2312.03732; Dettmers et al. 2023, QLoRA, arXiv:2305.14314.
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn

from bpe import (STOP, Tokenizer, constraints_met, instruct_records, make_examples,
                 record_messages, render_conversation, split_records)
from gpt import (collate, fit, heldout_loss, length_batches, load_model, pick_device,
                 refuse_overwrite, refuse_torchrun, require_positive, respond, response_loss,
                 run_main, save_checkpoint, save_json, setup_precision, start_finetuning)

@dataclasses.dataclass
class LoraConfig:
    """Finetune with low-rank adapters; every field is a flag: --rank=16 --targets=all"""
    # I/O
    ckpt_path: str = "out/ckpt.pt"  # the base model, written by train.py (or finetune.py)
    init_from: str = ""  # '' = ckpt_path; gpt2, gpt2-medium, ... or a .safetensors: OpenAI's GPT-2
    out_dir: str = "out-lora"  # ckpt.pt (merged), adapter.pt (LoRA only) and eval.json go here
    data_dir: str = "data"  # downloads are cached here; train.py wrote stories/instruct.json
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    adapter: str = ""  # put this adapter.pt onto its base, merge, evaluate (no training)
    compare: bool = False  # full finetuning and LoRA at ranks 4, 8, 16 side by side, then stop
    # LoRA
    rank: int = 8  # r, the inner size of B @ A; 0 = no adapters: full finetuning (the baseline)
    alpha: float = 16.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input, in training (it costs ~10% a step)
    targets: str = "attn"  # attn (c_attn, attn.c_proj), mlp (c_fc, c_gate, mlp.c_proj) or all
    rslora: bool = False  # scale by alpha / sqrt(r), so a higher rank still learns (rsLoRA)
    bf16_base: bool = False  # the frozen base in bfloat16, adapters in float32 (QLoRA's idea)
    # data (as finetune.py: the same records, template and held-out split)
    dataset: str = "stories"  # stories (train.py's instruct.json), alpaca, or a .json/.jsonl file
    template: str = "phi3"  # the chat template (bpe.py): phi3 or alpaca
    val_size: int = 100  # held-out instructions for the loss that picks the best adapter
    test_size: int = 200  # held-out instructions for the before/after table
    # training
    max_iters: int = 1100  # optimizer steps (finetune.py's default); -1 = epochs x batches
    epochs: int = 2  # passes over the training examples, when max_iters is -1
    batch_size: int = 16  # examples per step
    learning_rate: float = 5e-3  # peak; adapters start at zero and take larger steps than weights
    min_lr: float = 5e-4  # the cosine ends here
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay of the adapters (or of the weights, at rank 0)
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    eval_interval: int = 100  # steps between held-out evaluations (and saves when it improves)
    log_interval: int = 10  # steps between log lines
    max_new_tokens: int = 200  # the longest greedy response in the table
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 1337  # the split, the batch order, the adapters' initialisation
    overwrite: bool = False  # replace a checkpoint already in out_dir (else that is an error)

# -----------------------------------------------------------------------------
# the adapter: a frozen Linear plus a trained low-rank update

class LoRALinear(nn.Module):
    """y = base(x) + scale * lora_B(lora_A(dropout(x))), base frozen. lora_A.weight is (rank, in)
    and lora_B.weight (out, rank), as Hugging Face PEFT names and shapes them; A starts
    Kaiming-uniform (PEFT's choice, nn.Linear's own), B at zero, so at step 0 the layer is base."""
    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if rank < 1 or not alpha > 0:  # "not > 0" refuses nan too
            raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
        self.base = base.requires_grad_(False)
        device = base.weight.device  # beside the base, on whatever device it lives
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)   # (rank, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)  # (out, rank)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # PEFT's choice at 0
        self.rank = rank
        self.alpha = alpha
        # alpha / rank keeps the update's size steady as rank grows only if lr shrinks with it;
        # rsLoRA's alpha / sqrt(rank) lets higher ranks keep learning at one learning rate
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return y
        # the adapters may be float32 on a bfloat16 base: compute in theirs, add in the base's
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (self.scale * delta).to(y.dtype)

    def delta_weight(self):
        return self.scale * self.lora_B.weight @ self.lora_A.weight        # (out, in), like W

    @torch.no_grad()
    def merge(self):
        """W += scale * B @ A: afterwards base alone computes what base + adapter did."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= scale * B @ A: the base weight back (up to rounding), the adapter separate again."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

# which Linear layers of a block each --targets name adapts (c_gate exists with swiglu only)
TARGETS = {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_gate", "mlp.c_proj"]}
TARGETS["all"] = TARGETS["attn"] + TARGETS["mlp"]

def apply_lora(model, targets="all", rank=8, alpha=16.0, dropout=0.0, rslora=False):
    """Wrap the target Linear layers of every block in a LoRALinear and freeze everything else.
    The embedding, tied to the output layer, stays frozen: it is one (V, C) matrix serving both
    ends, the biggest in a small model, and an update to it would move the input and the output
    vocabulary together (PEFT and the LoRA paper leave it out too). -> the model."""
    if targets not in TARGETS:
        raise ValueError(f"--targets={targets!r} is unknown; use one of {', '.join(TARGETS)}")
    model.requires_grad_(False)
    for block in model.transformer.h:
        for path in TARGETS[targets]:
            parent_name, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            if isinstance(getattr(parent, name, None), nn.Linear):
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout,
                                                 rslora))
    return model

def lora_layers(model):
    # (parent module, attribute name, LoRALinear) for every adapter in the model
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if isinstance(child, LoRALinear)]

def merge(model):
    """Fold every adapter into its base weight and put the plain Linear back: -> an ordinary GPT
    that save_checkpoint writes and every script reads."""
    for parent, name, lora in lora_layers(model):
        lora.merge()
        setattr(parent, name, lora.base)
    return model

# -----------------------------------------------------------------------------
# shipping the adapter alone, tied to the base it was trained on

def fingerprint(model):
    """sha256 of the base weights (names, shapes, values), adapters left out: the identity of the
    base model an adapter belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        digest.update(name.replace(".base.", ".").encode())  # the same name wrapped or not
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]

def save_adapter(path, model, lora_config, base_fingerprint):
    """Only the LoRA tensors, their config and the base's fingerprint, written atomically."""
    tensors = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(dict(version=1, lora_config=lora_config, base_fingerprint=base_fingerprint,
                    tensors=tensors), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path

def load_adapter(path, model, base_fingerprint):
    """Put the adapter at path onto model (wrapping it first, if it has no adapters yet). A
    different base, or adapters of another rank or alpha already in the model, are errors."""
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
        config = adapter["lora_config"]
        rank = config["rank"]
        alpha = config["alpha"]
        targets = config["targets"]
        rslora = config["rslora"]
        saved = dict(adapter["tensors"])
        fingerprint_of_base = adapter["base_fingerprint"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no adapter at {path}; train one with `python lora.py`") from None
    except Exception as e:  # a truncated or foreign file raises many kinds
        raise ValueError(f"{path} is not a lora.py adapter ({type(e).__name__}); retrain it with "
                         f"`python lora.py`") from None
    if fingerprint_of_base != base_fingerprint:
        raise ValueError(f"{path} was trained on another base model (fingerprint "
                         f"{fingerprint_of_base}, this one {base_fingerprint}); pass the "
                         f"--ckpt_path or --init_from it was trained on")
    layers = [lora for _, _, lora in lora_layers(model)]
    if layers and any((lora.rank, lora.alpha) != (rank, alpha) for lora in layers):
        raise ValueError(f"{path} has rank {rank}, alpha {alpha}; the model's adapters have rank "
                         f"{layers[0].rank}, alpha {layers[0].alpha}")
    if not layers:
        apply_lora(model, targets, rank, alpha, 0.0, rslora)
    mine = {k: v.shape for k, v in model.state_dict().items() if ".lora_" in k}
    if {k: v.shape for k, v in saved.items()} != mine:
        raise ValueError(f"{path}'s tensors do not fit this model's adapters (rank {rank}, "
                         f"targets {targets}); retrain it with `python lora.py`")
    model.load_state_dict(saved, strict=False)
    return model

# -----------------------------------------------------------------------------
# helpers used by main: the run's measurements, and the side-by-side comparison

def peak_memory_mb(device):
    # the most memory this process has held: CUDA's allocator on a GPU, else the resident set
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10

def step_times(cfg, ranks, rounds=5, steps=3):
    """Milliseconds per training step of each rank (0 = full finetuning), timed side by side in
    one process on the same batch, round-robin, so a busy machine slows them all alike."""
    device = pick_device(cfg.device)
    _, _, ctx = setup_precision(device, cfg.dtype)
    base, saved_tok = load_model(cfg.ckpt_path, cfg.init_from, cfg.data_dir, device)
    tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    records = split_records(instruct_records(cfg.dataset, cfg.data_dir), cfg.val_size,
                            cfg.test_size, cfg.seed)[0][:cfg.batch_size]
    examples = make_examples(tok, [record_messages(r) for r in records], cfg.template,
                             base.config.block_size)[0]
    x, y = collate(examples, tok.special_tokens[STOP], device)
    runs = {}
    for rank in ranks:
        model = copy.deepcopy(base)
        if rank:
            apply_lora(model, cfg.targets, rank, cfg.alpha, cfg.dropout, cfg.rslora)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = device.split(":")[0] in ("cuda", "cpu")
        runs[rank] = (model.to(device).train(), torch.optim.AdamW(params, lr=1e-5, fused=fused), [])
    for k in range(rounds + 1):  # round 0 warms up
        for rank, (model, optimizer, times) in runs.items():
            for _ in range(steps):
                t0 = time.time()
                with ctx:
                    loss = response_loss(model(x)[0], y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss.item()
                if k:
                    times.append(time.time() - t0)
    return {rank: 1000 * sorted(t)[len(t) // 2] for rank, (_, _, t) in runs.items()}

FULL_FINETUNING = dict(learning_rate=2e-3, min_lr=2e-4, weight_decay=0.1)  # finetune.py's

def compare(cfg):
    """Full finetuning (rank 0) and LoRA at ranks 4, 8 and 16, each a fresh process on the same
    data, steps and seed (so each one's peak memory is its own), then one table."""
    rows = []
    for rank in (0, 4, 8, 16):
        run = dataclasses.replace(cfg, compare=False, rank=rank, overwrite=True,
                                  out_dir=os.path.join(cfg.out_dir, f"compare-rank{rank}"))
        if rank == 0:  # full finetuning at finetune.py's settings: weights need smaller steps
            run = dataclasses.replace(run, **FULL_FINETUNING)
        flags = dataclasses.asdict(run)
        argv = [sys.executable, os.path.abspath(__file__)]
        argv += [f"--{k}={v}" for k, v in flags.items()]
        name = "full finetuning" if rank == 0 else f"LoRA r={rank}"
        print(f"{name}: running, log in {flags['out_dir']}/log.txt", flush=True)
        os.makedirs(flags["out_dir"], exist_ok=True)
        with open(os.path.join(flags["out_dir"], "log.txt"), "w") as log:
            if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"the {name} run failed; see {flags['out_dir']}/log.txt")
        with open(os.path.join(flags["out_dir"], "eval.json")) as f:
            rows.append(dict(json.load(f), name=name))
    return comparison_table(cfg, rows)

def comparison_table(cfg, rows):
    # print the four runs side by side (with step times measured again, in one process) and save
    steps = step_times(cfg, [0, 4, 8, 16])
    for row, rank in zip(rows, steps):
        row["step_ms_side_by_side"] = steps[rank]
    full = rows[0]
    print(f"\n{'':16s} {'trainable':>12s} {'optimizer':>10s} {'peak mem':>9s} {'step':>7s} "
          f"{'resp loss':>9s} {'constraints':>11s} {'file':>9s}")
    for r in rows:
        print(f"{r['name']:16s} {r['trainable']:>8,} {r['trainable'] / r['params']:4.1%} "
              f"{r['optimizer_bytes'] / 2**20:7.2f} MB {r['peak_memory_mb']:6.0f} MB "
              f"{r['step_ms_side_by_side']:5.0f} ms {r['response_loss']:9.4f} {r['constraints'] or 0:11.1%} "
              f"{r['file_bytes'] / 2**20:6.2f} MB")
    print(f"(step: the median of 15 steps each, side by side in one process on one batch; "
          f"optimizer state of full finetuning / LoRA r=8: "
          f"{full['optimizer_bytes'] / rows[2]['optimizer_bytes']:.0f}x)")
    save_json(os.path.join(cfg.out_dir, "compare.json"), rows)
    return dict(rows=rows)

def check_config(cfg):
    if cfg.rank < 0 or not cfg.alpha > 0:  # "not > 0" refuses nan too
        raise ValueError(f"--rank={cfg.rank} --alpha={cfg.alpha}: pass rank >= 1 (0 = full "
                         f"finetuning) and alpha > 0")
    if cfg.targets not in TARGETS:
        raise ValueError(f"--targets={cfg.targets!r} is unknown; use one of {', '.join(TARGETS)}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout={cfg.dropout}: pass a probability in [0, 1)")
    require_positive(cfg, "batch_size", "eval_interval", "log_interval", "val_size", "test_size")
    if cfg.max_iters == 0 or cfg.max_iters < -1:
        raise ValueError(f"--max_iters={cfg.max_iters}: pass a number of steps, or -1 for --epochs")

def main(cfg):
    refuse_torchrun("lora.py")
    check_config(cfg)
    if cfg.compare:
        return compare(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    refuse_overwrite(ckpt_path, cfg.overwrite or bool(cfg.adapter))
    cfg, device, ctx, model, saved_tok = start_finetuning(cfg)
    tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    base_fingerprint = fingerprint(model)
    n_params = model.num_params()

    # --- data: finetune.py's records, template, split and masked examples
    records = instruct_records(cfg.dataset, cfg.data_dir)
    train_r, val_r, test_r = split_records(records, cfg.val_size, cfg.test_size, cfg.seed)
    block = model.config.block_size
    stop = tok.special_tokens[STOP]
    train_ex, val_ex, test_ex = [make_examples(tok, [record_messages(r) for r in rs], cfg.template,
                                               block)[0] for rs in (train_r, val_r, test_r)]
    if not (train_ex and val_ex and test_ex):
        raise ValueError(f"no train, val or test example fits block_size={block}")
    prompts = [render_conversation(tok, record_messages(r)[:-1], cfg.template)[0] for r in test_r]

    def evaluate(model):  # the held-out response loss and constraint satisfaction
        stories = respond(model, tok, prompts, cfg.max_new_tokens, stop, ctx)
        return dict(response_loss=heldout_loss(model, test_ex, cfg.batch_size, stop, device, ctx),
                    constraints=constraints_met(stories, test_r))
    if cfg.adapter:  # an adapter shipped alone: onto its base, merged, evaluated
        merge(load_adapter(cfg.adapter, model, base_fingerprint))
        result = evaluate(model)
        print(f"{cfg.adapter} merged into its base: {result}")
        return result
    base = evaluate(model)

    # --- adapters (or, at rank 0, every weight) train
    lora_config = dict(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                       rslora=cfg.rslora)
    if cfg.rank > 0:
        apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
        model.to(device)
        if cfg.bf16_base:  # frozen weights in half the memory; the adapters stay float32
            model.to(torch.bfloat16)
            for _, _, lora in lora_layers(model):
                lora.lora_A.float()
                lora.lora_B.float()
    params = [p for p in model.parameters() if p.requires_grad]
    adapter_path = os.path.join(cfg.out_dir, "adapter.pt")
    lengths = [len(x) for x, _ in train_ex]
    rng = random.Random(cfg.seed)

    def batch_loss(batch):
        x, y = collate([train_ex[i] for i in batch], stop, device)
        with ctx:
            return response_loss(model(x)[0], y), sum(lengths[i] for i in batch)
    def save(step, loss):  # the adapter alone while training; the merged model at the end
        if cfg.rank > 0:
            save_adapter(adapter_path, model, lora_config, base_fingerprint)
    run = fit(cfg, model, params, lambda: length_batches(lengths, cfg.batch_size, rng),
              batch_loss, lambda: heldout_loss(model, val_ex, cfg.batch_size, stop, device, ctx),
              save)
    tuned = evaluate(model)

    # --- merge, save an ordinary checkpoint, and compare the sizes
    if cfg.bf16_base and cfg.rank > 0:  # merge into the float32 base, not its bfloat16 rounding
        adapters = {k: v.float() for k, v in model.state_dict().items() if ".lora_" in k}
        model = apply_lora(load_model(cfg.ckpt_path, cfg.init_from, cfg.data_dir, device)[0],
                           cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
        model.load_state_dict(adapters, strict=False)
    merge(model.float())
    save_checkpoint(ckpt_path, model, step=run["best_step"], val_loss=run["best_val_loss"],
                    tokenizer=saved_tok, train_config=dataclasses.asdict(cfg),
                    chat_template=cfg.template, lora=lora_config if cfg.rank else None)
    file_path = adapter_path if cfg.rank > 0 else ckpt_path
    result = dict(tuned, base=base, params=n_params, trainable=sum(p.numel() for p in params),
                  optimizer_bytes=run["optimizer_bytes"], step_ms=run["step_ms"],
                  peak_memory_mb=peak_memory_mb(device), file_bytes=os.path.getsize(file_path),
                  ckpt_bytes=os.path.getsize(ckpt_path), train_seconds=run["seconds"])
    print(f"done: response loss {base['response_loss']:.4f} -> {tuned['response_loss']:.4f}, "
          f"constraints met {base['constraints'] or 0:.1%} -> {tuned['constraints'] or 0:.1%}; "
          f"{result['trainable']:,} trainable parameters ({result['trainable'] / n_params:.2%})")
    if cfg.rank > 0:
        print(f"saved {adapter_path} ({result['file_bytes'] / 2**20:.2f} MB, "
              f"{result['file_bytes'] / result['ckpt_bytes']:.1%} of the merged {ckpt_path}, "
              f"{result['ckpt_bytes'] / 2**20:.1f} MB)")
    save_json(os.path.join(cfg.out_dir, "eval.json"), result)
    return dict(result, ckpt_path=ckpt_path)

if __name__ == "__main__":
    run_main(main, LoraConfig)
