"""LoRA: finetune a GPT by training two small matrices per layer, then merge them back.

What you learn here (LLM101n chapter 14, Build a LLM from Scratch appendix E): a frozen
weight W gets a low-rank update, y = W x + (alpha / r) * B (A x), with A (r, in) and B
(out, r) the only trained tensors; B starts at zero, so training starts from the base model.
The key idea: B @ A has the shape of W, so after training it folds into W and costs nothing
at inference, while the optimizer keeps state for r * (in + out) numbers, not in * out.
How to run:
    python lora.py                  # 6-9 min on a 2-core CPU: rank-8 adapters on out/ckpt.pt
    python lora.py --adapter=out-lora/adapter.pt    # the adapter alone, onto its base
    python lora.py --init_from=gpt2 --dataset=alpaca --learning_rate=3e-4 --min_lr=3e-5
Against full finetuning: `python finetune.py` on the same data, steps and seed.
Depends on: gpt.py, bpe.py (finetune.py's data, template, split and evaluation). Reads
out/ckpt.pt; writes out-lora/ckpt.pt (merged: an ordinary checkpoint every script reads) and
out-lora/adapter.pt (the LoRA tensors alone, tied to their base by a fingerprint).
References: Hu et al. 2021, LoRA (arXiv:2106.09685); Kalajdzievski 2023, rsLoRA
(arXiv:2312.03732); Dettmers et al. 2023, QLoRA (arXiv:2305.14314).
"""
import dataclasses
import hashlib
import itertools
import math
import os
import random
import time

import torch
import torch.nn as nn

from bpe import (Tokenizer, end_of_turn, instruct_records, make_examples, pass_rates,
                 record_messages, render_conversation, split_records)
from gpt import (UserError, collate, get_lr, heldout_loss, length_batches, load_model,
                 progress_bar, refuse_overwrite, refuse_torchrun, require_positive, respond,
                 run, save_checkpoint, save_json, start_finetuning, user_input)

@dataclasses.dataclass
class LoraConfig:
    """Finetune with low-rank adapters; every field is a flag: --rank=16 --targets=all"""
    # I/O
    ckpt_path: str = "out/ckpt.pt"  # the base model, from train.py (or finetune.py)
    init_from: str = ""  # '' = ckpt_path; a Hub name (gpt2, Qwen/...) or folder
    out_dir: str = "out-lora"  # ckpt.pt (merged), adapter.pt (LoRA only), eval.json
    data_dir: str = "data"  # downloads are cached here; train.py wrote stories/ here
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    adapter: str = ""  # put this adapter.pt onto its base, merge, evaluate (no training)
    # LoRA
    rank: int = 8  # r, the inner size of B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r (rslora: alpha / sqrt(r))
    dropout: float = 0.0  # dropout on the adapter's input, in training (~10% a step)
    targets: str = "attn"  # attn (c_attn, attn.c_proj), mlp (c_fc, c_gate, c_proj) or all
    rslora: bool = False  # scale by alpha / sqrt(r), so a higher rank still learns
    bf16_base: bool = False  # the frozen base in bfloat16, adapters in float32 (QLoRA's idea)
    # data (as finetune.py: the same records, template and held-out split)
    dataset: str = "stories"  # stories (train.py's instruct.json), alpaca, or a .json(l) file
    template: str = "phi3"  # the chat template (bpe.py): phi3 or alpaca
    val_size: int = 100  # held-out instructions for the loss that picks the best adapter
    test_size: int = 200  # held-out instructions for the before/after table
    # training
    max_iters: int = 1100  # optimizer steps (finetune.py's default); -1 = epochs x batches
    epochs: int = 2  # passes over the training examples, when max_iters is -1
    batch_size: int = 16  # examples per step
    learning_rate: float = 5e-3  # peak; adapters start at zero and take larger steps
    min_lr: float = 5e-4  # the cosine ends here
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay of the adapters
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    eval_interval: int = 100  # steps between held-out evaluations (the best is kept)
    log_interval: int = 10  # steps between log lines
    max_new_tokens: int = 200  # the longest greedy response in the table
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 1337  # the split, the batch order, the adapters' initialisation
    overwrite: bool = False  # replace a checkpoint already in out_dir (else an error)

# -----------------------------------------------------------------------------
# the adapter: a frozen Linear plus a trained low-rank update

class LoRALinear(nn.Module):
    """y = base(x) + scale * lora_B(lora_A(dropout(x))), base frozen. lora_A.weight is
    (rank, in), lora_B.weight (out, rank), as Hugging Face PEFT has them; A starts
    Kaiming-uniform (PEFT's and nn.Linear's choice), B at zero: at step 0 it is its base."""
    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False):
        super().__init__()
        if rank < 1 or not alpha > 0:  # "not > 0" refuses nan too
            raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, not {rank} and {alpha}")
        self.base = base.requires_grad_(False)
        device = base.weight.device  # beside the base, on whatever device it lives
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # PEFT's choice at 0
        self.rank = rank
        self.alpha = alpha
        # alpha / rank keeps the update's size steady as rank grows only if lr shrinks with
        # it; rsLoRA's alpha / sqrt(rank) lets higher ranks keep learning at one lr
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # the update already lives in base.weight
            return y
        # the adapters may be float32 on a bfloat16 base: compute in theirs, add in its
        delta = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return y + (self.scale * delta).to(y.dtype)

    def delta_weight(self):
        return self.scale * self.lora_B.weight @ self.lora_A.weight    # (out, in), like W

    @torch.no_grad()
    def merge(self):
        """W += scale * B @ A: afterwards base alone computes what base + adapter did."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= scale * B @ A: the base weight back (up to rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

# which Linear layers of a block each --targets name adapts (c_gate exists with swiglu only)
TARGETS = {"attn": ["attn.c_attn", "attn.c_proj"],
           "mlp": ["mlp.c_fc", "mlp.c_gate", "mlp.c_proj"]}
TARGETS["all"] = TARGETS["attn"] + TARGETS["mlp"]

def apply_lora(model, targets="all", rank=8, alpha=16.0, dropout=0.0, rslora=False):
    """Wrap the target Linear layers of every block in a LoRALinear, freeze everything else.
    The embedding, tied to the output layer, stays frozen: it is one (V, C) matrix serving
    both ends, the biggest in a small model, and an update to it would move the input and
    the output vocabulary together (PEFT and the LoRA paper leave it out too). -> model."""
    if targets not in TARGETS:
        raise ValueError(f"targets={targets!r} is unknown; use one of {list(TARGETS)}")
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
    """Fold every adapter into its base weight and put the plain Linear back: -> an ordinary
    GPT that save_checkpoint writes and every script reads."""
    for parent, name, lora in lora_layers(model):
        lora.merge()
        setattr(parent, name, lora.base)
    return model

# -----------------------------------------------------------------------------
# shipping the adapter alone, tied to the base it was trained on

def fingerprint(model):
    """sha256 of the base weights (names, shapes, values), adapters left out: the identity
    of the base model an adapter belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        digest.update(name.replace(".base.", ".").encode())  # one name, wrapped or not
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
    """Put the adapter at path onto model (wrapping it first, if it has no adapters yet).
    A different base, or adapters of another rank or alpha in the model, are errors."""
    try:
        adapter = torch.load(path, map_location="cpu", weights_only=True)
        config = adapter["lora_config"]
        rank, alpha, targets, rslora = [config[k] for k in ("rank", "alpha", "targets",
                                                             "rslora")]
        saved = dict(adapter["tensors"])
        fingerprint_of_base = adapter["base_fingerprint"]
    except FileNotFoundError:
        raise UserError(f"no adapter at {path}; train one with `python lora.py`") from None
    except Exception as e:  # a truncated or foreign file raises many kinds
        raise UserError(f"{path} is not a lora.py adapter ({type(e).__name__}); retrain it "
                        f"with `python lora.py`") from None
    if fingerprint_of_base != base_fingerprint:
        raise UserError(f"{path} was trained on another base model (fingerprint "
                        f"{fingerprint_of_base}, this one {base_fingerprint}); pass the "
                        f"--ckpt_path or --init_from it was trained on")
    layers = [lora for _, _, lora in lora_layers(model)]
    if layers and any((lora.rank, lora.alpha) != (rank, alpha) for lora in layers):
        raise UserError(f"{path} has rank {rank}, alpha {alpha}; the model's adapters have "
                        f"rank {layers[0].rank}, alpha {layers[0].alpha}")
    if not layers:
        apply_lora(model, targets, rank, alpha, 0.0, rslora)
    mine = {k: v.shape for k, v in model.state_dict().items() if ".lora_" in k}
    if {k: v.shape for k, v in saved.items()} != mine:
        raise UserError(f"{path}'s tensors do not fit this model's adapters (rank {rank}, "
                        f"targets {targets}); retrain it with `python lora.py`")
    model.load_state_dict(saved, strict=False)
    return model

# -----------------------------------------------------------------------------
# helpers used by main

def check_config(cfg):
    if cfg.rank < 1 or not cfg.alpha > 0:  # "not > 0" refuses nan too
        raise UserError(f"--rank={cfg.rank} --alpha={cfg.alpha}: pass rank >= 1 and alpha > 0 "
                        f"(full finetuning is `python finetune.py`)")
    if cfg.targets not in TARGETS:
        raise UserError(f"--targets={cfg.targets!r} is unknown; use one of "
                        f"{', '.join(TARGETS)}")
    if not 0 <= cfg.dropout < 1:  # a range; "not" refuses nan too
        raise UserError(f"--dropout={cfg.dropout}: pass a probability in [0, 1)")
    require_positive(cfg, "epochs", "batch_size", "eval_interval", "log_interval",
                     "val_size", "test_size")
    if cfg.max_iters == 0 or cfg.max_iters < -1:
        raise UserError(f"--max_iters={cfg.max_iters}: pass steps >= 1, or -1 for --epochs")

def main(cfg):
    refuse_torchrun("lora.py")
    check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    adapter_path = os.path.join(cfg.out_dir, "adapter.pt")
    refuse_overwrite(ckpt_path, cfg.overwrite or bool(cfg.adapter))
    cfg, device, ctx, model, saved_tok = start_finetuning(cfg)
    with user_input():  # GPT-2's tokenizer files may be missing, offline
        tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    model.vocab_used = tok.vocab_size  # rows past the tokenizer's ids are never sampled
    base_fingerprint = fingerprint(model)
    n_params = model.num_params()

    # --- data: finetune.py's records, template, split and masked examples
    with user_input():  # bpe.py's errors (a malformed file, a template's end missing): one line
        records = instruct_records(cfg.dataset, cfg.data_dir)
        splits = split_records(records, cfg.val_size, cfg.test_size, cfg.seed)
        template = tok.chat_template or cfg.template  # a Hub model's own, else --template
        stop = end_of_turn(tok, template)  # y = -100 at the prompt and the padding
    block = model.config.block_size
    train_ex, val_ex, test_ex = [make_examples(tok, [record_messages(r) for r in rs],
                                               template, block)[0] for rs in splits]
    if not (train_ex and val_ex and test_ex):
        raise UserError(f"no train, val or test example fits block_size={block}")
    test_r = splits[2]
    prompts = [render_conversation(tok, record_messages(r)[:-1], template)[0]
               for r in test_r]

    def evaluate(model):  # the held-out response loss and the share of replies passed
        stories = respond(model, tok, prompts, cfg.max_new_tokens, stop, ctx)
        loss = heldout_loss(model, test_ex, cfg.batch_size, stop, device, ctx)
        return dict(response_loss=loss, passed=(pass_rates(stories, test_r) or {}).get("all"))
    if cfg.adapter:  # an adapter shipped alone: onto its base, merged, evaluated
        result = evaluate(merge(load_adapter(cfg.adapter, model, base_fingerprint)))
        print(f"{cfg.adapter} merged into its base: {result}")
        return result
    base = evaluate(model)

    # --- the adapters: every target layer wrapped, everything else frozen
    lora_config = dict(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                       targets=cfg.targets, rslora=cfg.rslora)
    apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora).to(device)
    if cfg.bf16_base:  # frozen weights in half the memory; the adapters stay float32
        model.to(torch.bfloat16)
        for _, _, lora in lora_layers(model):
            lora.lora_A.float()
            lora.lora_B.float()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    # AdamW over the adapters alone (all matrices: one group), two numbers of state each
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=torch.device(device).type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(enabled=cfg.dtype == "float16")  # float16 underflows
    lengths = [len(x) for x, _ in train_ex]
    per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    steps = cfg.max_iters if cfg.max_iters > 0 else cfg.epochs * per_epoch
    rng = random.Random(cfg.seed)
    # one epoch after another, each cut into batches of similar lengths in a fresh order
    batches = (batch for _ in itertools.count()
               for batch in length_batches(lengths, cfg.batch_size, rng))
    print(f"training: {steps} steps, {trainable:,} trainable parameters "
          f"({trainable / n_params:.2%} of {n_params:,})")

    # --- the loop: only A and B learn; the loss is the model's own, model(x, y)
    best_loss = float("inf")
    train_time = 0.0
    t_start = time.time()
    for step in range(steps + 1):
        if step % cfg.eval_interval == 0 or step == steps:
            val_loss = heldout_loss(model, val_ex, cfg.batch_size, stop, device, ctx)
            print(f"step {step}: val loss {val_loss:.4f}")
            if step == 0 or val_loss < best_loss:  # the best adapter, on disk
                best_loss = val_loss
                best_step = step
                save_adapter(adapter_path, model, lora_config, base_fingerprint)
        if step == steps:
            break
        t0 = time.time()
        batch = next(batches)
        x, y = collate([train_ex[i] for i in batch], stop, device)  # y: -100 = no loss
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, steps)
        optimizer.param_groups[0]["lr"] = lr
        model.train()
        with ctx:
            loss = model(x, y)[1]
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # the true gradients, for the clip
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss.item()  # waits for the device: an honest step time
        dt = time.time() - t0
        train_time += dt
        if step % cfg.log_interval == 0:
            tokens = sum(lengths[i] for i in batch)
            bar = progress_bar(step + 1, steps, (time.time() - t_start) / (step + 1))
            print(f"step {step:5d}/{steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                  f"{1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s | {bar}", flush=True)
    load_adapter(adapter_path, model, base_fingerprint)  # the best adapter back
    tuned = evaluate(model)

    # --- merge into the float32 base, save an ordinary checkpoint, compare the sizes
    if cfg.bf16_base:  # not into the base's bfloat16 rounding
        adapters = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        model = apply_lora(load_model(cfg.ckpt_path, cfg.init_from, cfg.data_dir, device)[0],
                           cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
        model.load_state_dict(adapters, strict=False)
    merge(model.float())
    save_checkpoint(ckpt_path, model, step=best_step, val_loss=best_loss, tokenizer=saved_tok,
                    train_config=dataclasses.asdict(cfg), chat_template=cfg.template,
                    lora=lora_config)
    state_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values())
    result = dict(tuned, base=base, params=n_params, trainable=trainable,
                  optimizer_bytes=state_bytes, step_ms=1000 * train_time / steps,
                  file_bytes=os.path.getsize(adapter_path),
                  ckpt_bytes=os.path.getsize(ckpt_path), train_seconds=time.time() - t_start)
    print(f"done: response loss {base['response_loss']:.4f} -> {tuned['response_loss']:.4f}, "
          f"requests passed {base['passed'] or 0:.1%} -> {tuned['passed'] or 0:.1%};"
          f" {result['step_ms']:.0f} ms a step; AdamW state {state_bytes / 2**20:.2f} MB")
    print(f"saved {adapter_path} ({result['file_bytes'] / 2**20:.2f} MB: "
          f"{result['file_bytes'] / result['ckpt_bytes']:.1%} of the merged {ckpt_path})")
    save_json(os.path.join(cfg.out_dir, "eval.json"), result)
    return dict(result, ckpt_path=ckpt_path)

if __name__ == "__main__":
    run(main, LoraConfig)
