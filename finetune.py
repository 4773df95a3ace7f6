"""Supervised finetuning: teach a pretrained GPT to follow instructions, or to classify.

What you learn here (LLM101n chapter 14, Build a LLM from Scratch chapters 6 and 7): a
chat template turns (prompt, response) pairs into one token sequence whose targets are
-100 at the prompt and the padding, so the model's own loss, model(x, y), counts only the
response and its stop token: the model learns to answer, not to ask. The key idea:
finetuning is pretraining's loop on masked targets. A classifier adds a linear head and
has one target per text: its label, at the last real token.
How to run:
    python finetune.py               # 10 min on a 2-core CPU: out/ckpt.pt learns to converse
    python finetune.py --init_from=gpt2 --dataset=alpaca --learning_rate=5e-5 --device=cuda
    python finetune.py --task=classify --dataset=sms    # SMS spam, beside naive Bayes
    python finetune.py --task=classify --classify_text="WIN a FREE prize now"
Depends on: gpt.py, bpe.py (the chat template and the checkers). Reads out/ckpt.pt
(or GPT-2) and data/stories/instruct.json, both from train.py; writes out-sft/ckpt.pt (the
best by held-out loss) and out-sft/eval.json (the before/after table), or out-classify/.
References: Ouyang et al. 2022, Training language models to follow instructions
(arXiv:2203.02155); Taori et al. 2023, Alpaca; Raschka 2024, Build a LLM (From Scratch).
"""
import contextlib
import copy
import dataclasses
import math
import os
import random
import re
import time
import zipfile
from collections import Counter

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import (CHAT_TEMPLATES, Tokenizer, end_of_turn, instruct_records, pass_rates, record_messages,
                 render_conversation, split_records)
from gpt import (UserError, download, get_lr, heldout_loss, length_batches, load_checkpoint,
                 pick_device, progress_bar, refuse_overwrite, refuse_torchrun,
                 require_positive, respond, run, save_checkpoint, save_json, start_finetuning,
                 user_input)

@dataclasses.dataclass
class FinetuneConfig:
    """Finetune a GPT on instructions or labels; every field is a flag: --dataset=alpaca"""
    # I/O
    ckpt_path: str = "out/ckpt.pt"  # the model to start from, written by train.py
    init_from: str = ""  # '' = ckpt_path; a Hub name (gpt2, Qwen/...) or folder
    out_dir: str = ""  # '' = out-sft (instruct) or out-classify: ckpt.pt, eval.json
    overwrite: bool = False  # replace a checkpoint already in out_dir (else an error)
    data_dir: str = "data"  # downloads are cached here; train.py wrote stories/ here
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    task: str = "instruct"  # instruct (a response to each prompt) or classify (a label)
    # data
    dataset: str = "stories"  # instruct: stories, alpaca, a .json(l); classify: stories, sms
    template: str = "phi3"  # the chat template (bpe.py): phi3 (short) or alpaca (Raschka's)
    mask_prompt: bool = True  # loss on responses only; False = every token (Raschka ex. 7.2)
    val_size: int = 100  # held-out instructions for the loss that picks the best weights
    test_size: int = 400  # held-out instructions for the before/after table
    # training
    # -2, 0, 0.0 and -1.0 below mean "per task": the values in TASK_DEFAULTS
    train_layers: int = -2  # train only the last N blocks + final norm (+ head); -1 = all
    epochs: int = 0  # passes over the training examples (when max_iters is -1)
    max_iters: int = 0  # optimizer steps; -1 = epochs x batches per epoch
    batch_size: int = 16  # examples per step
    learning_rate: float = 0.0  # peak, after warmup (smaller for bigger models: 5e-5 for GPT-2)
    min_lr: float = -1.0  # the cosine ends here (per task: learning_rate / 10)
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay of matrices
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    eval_interval: int = 100  # steps between held-out evaluations (the best one is kept)
    log_interval: int = 10  # steps between log lines
    # evaluation
    max_new_tokens: int = 200  # the longest greedy response in the table
    judge_url: str = ""  # an OpenAI-compatible chat URL that scores responses 0-100
    judge_model: str = "llama3"  # the model the judge endpoint runs
    classify_text: str = ""  # print the label of this text from out_dir/ckpt.pt, then stop
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 1337  # the split, the batch order, the head's initialisation

# instructions: 1.9 epochs of the conversations, all weights, in 8 CPU minutes; a small
# labelled set overfits fast: one block, longer, more gently. A flag passed explicitly wins
TASK_DEFAULTS = {"instruct": dict(train_layers=-1, max_iters=1100, epochs=2, learning_rate=2e-3),
                 "classify": dict(train_layers=1, max_iters=-1, epochs=10, learning_rate=5e-4)}
PER_TASK = dict(train_layers=-2, max_iters=0, epochs=0, learning_rate=0.0)
SMS_ZIP = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"

# -----------------------------------------------------------------------------
# the examples: targets are -100 wherever nothing is learned

def chat_examples(tok, records, template, block_size, mask_prompt=True):
    """Each record's conversation, rendered into ids and a mask (1 at each response token and
    the stop token after it), -> (x, y): y[t] is the token after x[t], or -100 where it is
    the prompt's, read but never learned. The first block_size + 1 tokens are kept: a long
    response loses its end, never the prompt. -> (examples, dropped: no response fits, cut)."""
    examples = []
    cut = 0
    for record in records:
        ids, mask = render_conversation(tok, record_messages(record), template)
        if 1 not in mask[1:block_size + 1]:
            continue
        cut += len(ids) > block_size + 1
        if not mask_prompt:  # Raschka's exercise 7.2: learn the prompt too
            mask = [1] * len(ids)
        ids = ids[:block_size + 1]
        y = [token if m else -100 for token, m in zip(ids[1:], mask[1:])]
        examples.append((ids[:-1], y))
    return examples, len(records) - len(examples), cut

def pad_batch(examples, pad_id, device):
    """Right-pad examples (x, y) to the longest: x with pad_id, y with -100, so the padding
    is not learned either. -> x, y, both (B, T)."""
    T = max(len(x) for x, _ in examples)
    x = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in examples], device=device)
    y = torch.tensor([y + [-100] * (T - len(y)) for _, y in examples], device=device)
    return x, y

# -----------------------------------------------------------------------------
# the training loop: the model's own loss on the masked targets

def train(cfg, model, params, train_ex, val_ex, pad_id, device, ctx):
    """AdamW on params, warmup then a cosine decay, the gradient norm clipped, batches of
    similar lengths; the held-out loss every eval_interval steps. The model ends at the
    weights that scored best. -> {best_step, best_val_loss, seconds, step_ms (mean)}."""
    # weight decay for the matrices, not for the biases and norm gains; fused: one kernel
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  fused=torch.device(device).type in ("cuda", "cpu"))
    # float16 gradients underflow: scale the loss up, and the gradients back down
    scaler = torch.amp.GradScaler(enabled=cfg.dtype == "float16")
    lengths = [len(x) for x, _ in train_ex]
    per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    steps = cfg.max_iters if cfg.max_iters > 0 else cfg.epochs * per_epoch
    rng = random.Random(cfg.seed)
    print(f"training: {steps} steps ({per_epoch} per epoch), "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")
    best_loss = float("inf")
    losses = []
    train_time = 0.0  # the steps alone, without the evaluations
    t_start = time.time()
    for step in range(steps + 1):
        if step % cfg.eval_interval == 0 or step == steps:
            val_loss = heldout_loss(model, val_ex, cfg.batch_size, pad_id, device, ctx)
            recent = losses[-cfg.eval_interval:]
            train_loss = f"train loss {sum(recent) / len(recent):.4f}, " if recent else ""
            print(f"step {step}: {train_loss}val loss {val_loss:.4f}")
            if step == 0 or val_loss < best_loss:  # a copy: steps change the weights
                best_loss = val_loss
                best_step = step
                best_state = copy.deepcopy(model.state_dict())
        if step == steps:
            break
        if step % per_epoch == 0:  # a new epoch: batches of similar lengths, a fresh order
            batches = length_batches(lengths, cfg.batch_size, rng)
        batch = batches[step % per_epoch]
        t0 = time.time()
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = pad_batch([train_ex[i] for i in batch], pad_id, device)
        model.train()
        with ctx:
            _, loss = model(x, y)  # the mean cross-entropy over the targets that are not -100
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the device, so the step time is honest
        dt = time.time() - t0
        train_time += dt
        if step % cfg.log_interval == 0:
            tokens = sum(lengths[i] for i in batch)
            pace = (time.time() - t_start) / (step + 1)
            print(f"step {step:5d}/{steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | "
                  f"{1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s | "
                  f"{progress_bar(step + 1, steps, pace)}", flush=True)
    model.load_state_dict(best_state)
    return dict(best_step=best_step, best_val_loss=best_loss, seconds=time.time() - t_start,
                step_ms=1000 * train_time / steps)

# -----------------------------------------------------------------------------
# classification: a linear head over the hidden state of each row's last real token

class Classifier(nn.Module):
    """The GPT, unchanged, and a head over the last real token: the only position that has
    seen the whole text, and that causal attention keeps from the right padding (Raschka
    pools the last position, usually a pad: 95.67% there vs 98.33%)."""
    def __init__(self, gpt, labels):
        super().__init__()
        self.gpt = gpt
        self.labels = list(labels)
        self.head = nn.Linear(gpt.config.n_embd, len(self.labels))

    def forward(self, idx, targets):
        """idx (B, T), right-padded; targets (B, T): -100 but at each row's last real token,
        which holds its label. -> logits (B, classes) and their mean cross-entropy."""
        h = self.gpt.hidden(idx)                                   # (B, T, C)
        last = (targets != -100).int().argmax(1)                   # (B,) the one target
        rows = torch.arange(idx.size(0), device=idx.device)
        logits = self.head(h[rows, last])                          # (B, classes)
        return logits, F.cross_entropy(logits.float(), targets[rows, last])

def text_example(tok, text, label, block_size):
    """A text as the classifier reads it: x = <|endoftext|>, the text's first block_size - 2
    tokens, <|endoftext|> (GPT-1's "extract" token: pretraining saw it between documents);
    y = -100 but the label at that last token."""
    stop = end_of_turn(tok)
    x = [stop] + tok.encode(text, allowed_special="none")[:block_size - 2] + [stop]
    return x, [-100] * (len(x) - 1) + [label]

def read_labelled(path):
    """label<TAB>text lines (the SMS Spam Collection's format) -> [(text, label)]."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; pass --dataset=sms, stories or a label<TAB>text "
                        f"file")
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            label, tab, text = line.rstrip("\n").partition("\t")
            if not tab or not label or not text.strip():
                raise UserError(f"{path}: line {n} is not label<TAB>text; fix or remove it")
            pairs.append((text, label))
    return pairs

def labelled_pairs(cfg):
    # the three sources of --dataset for --task=classify, as (text, label) pairs
    if cfg.dataset == "stories":  # which of the seven story arcs a held-out story follows
        records = [r for r in instruct_records("stories", cfg.data_dir) if "arc" in r]
        return [(r["messages"][1]["content"], r["arc"]) for r in records[:1500]]  # a minute
    if cfg.dataset != "sms":
        return read_labelled(cfg.dataset)
    folder = os.path.join(cfg.data_dir, "sms_spam")
    zip_path = download(SMS_ZIP, os.path.join(folder, "sms.zip"))  # downloaded once
    try:  # UCI serves a zip; the tab-separated file is inside it
        with zipfile.ZipFile(zip_path) as z:
            return read_labelled(z.extract("SMSSpamCollection", folder))
    except (zipfile.BadZipFile, KeyError):
        raise UserError(f"{zip_path} is not the SMS Spam Collection's zip; delete it and "
                        f"retry, or pass --dataset=path/to/SMSSpamCollection") from None

def balanced_split(pairs, seed):
    """Keep as many texts of each label as the rarest label has (747 ham, 747 spam for
    SMS), then split 70/10/20 into train, val and test, as Raschka's chapter 6 does."""
    by_label = {}
    for text, label in pairs:
        by_label.setdefault(label, []).append((text, label))
    if len(by_label) < 2:
        raise UserError(f"the data has one label only ({list(by_label)}); it needs two")
    rng = random.Random(seed)
    n = min(len(v) for v in by_label.values())
    kept = [pair for label in sorted(by_label) for pair in rng.sample(by_label[label], n)]
    rng.shuffle(kept)
    n_train = int(0.7 * len(kept))
    n_val = int(0.1 * len(kept))
    return kept[:n_train], kept[n_train:n_train + n_val], kept[n_train + n_val:]

def naive_bayes(train, texts):
    """Multinomial naive Bayes over lowercase words with add-one smoothing: the few-line,
    no-network baseline a transformer has to beat. -> the predicted label of each text."""
    def words(text):
        return re.findall(r"[a-z0-9']+", text.lower())
    docs = Counter(label for _, label in train)
    counts = {label: Counter() for label in docs}
    for text, label in train:
        counts[label].update(words(text))
    vocab = set().union(*counts.values())
    totals = {label: sum(c.values()) + len(vocab) for label, c in counts.items()}
    def score(label, text):  # log P(label) + sum of log P(word | label)
        known = [w for w in words(text) if w in vocab]
        return math.log(docs[label]) + sum(math.log((counts[label][w] + 1) / totals[label])
                                           for w in known)
    return [max(docs, key=lambda label: score(label, text)) for text in texts]

# -----------------------------------------------------------------------------
# helpers used by main: freezing, the judge, the config, the two tasks

def freeze(model, train_layers):
    """Train only the GPT's last train_layers blocks and its final norm; -1 = every
    parameter. -> the trainable parameters."""
    blocks = model.transformer.h
    if train_layers > len(blocks):
        raise UserError(f"--train_layers={train_layers} but the model has {len(blocks)} "
                        f"blocks; pass 0..{len(blocks)} or -1 (all)")
    model.requires_grad_(train_layers < 0)
    if train_layers >= 0:
        for module in [*blocks[len(blocks) - train_layers:], model.transformer.ln_f]:
            module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]

# the judge is asked for one integer, the scoring of Raschka's ollama_evaluate.py (ch. 7)
JUDGE_PROMPT = ("Here is a task and its correct answer. Score the response from 0 to 100, "
                "where 100 is as good as the correct answer. Reply with the integer only.\n\n"
                "Task:\n{prompt}\n\nCorrect answer:\n{reference}\n\nResponse:\n{response}")

def judge(url, model, records, responses):
    """The mean score 0-100 that an OpenAI-compatible chat endpoint (Ollama: --judge_url=
    http://localhost:11434/v1/chat/completions) gives the responses to records, a reply
    without a number left out; None when no reply has one."""
    scores = []
    for record, response in zip(records, responses):
        prompt, reference = [m["content"] for m in record_messages(record)[-2:]]
        text = JUDGE_PROMPT.format(prompt=prompt, reference=reference, response=response)
        body = {"model": model, "messages": [{"role": "user", "content": text}],
                "temperature": 0}
        try:
            reply = requests.post(url, json=body, timeout=120)
            reply.raise_for_status()
            answer = reply.json()["choices"][0]["message"]["content"]
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as e:
            what = f"{type(e).__name__}: {str(e)[:80]}"
            raise UserError(f"the judge at {url} failed ({what}); start it (ollama serve) "
                            f"or drop --judge_url") from None
        if number := re.search(r"\d+", str(answer)):
            scores.append(min(100, int(number[0])))
    return sum(scores) / len(scores) if scores else None

def check_config(cfg):
    """Check the flags and fill in the per-task defaults. -> the config to run."""
    if cfg.task not in TASK_DEFAULTS:
        raise UserError(f"--task={cfg.task!r} is unknown; use instruct or classify")
    unset = {k: v for k, v in TASK_DEFAULTS[cfg.task].items()
             if getattr(cfg, k) == PER_TASK[k]}
    if cfg.epochs != PER_TASK["epochs"] and cfg.max_iters == PER_TASK["max_iters"]:
        unset["max_iters"] = -1  # --epochs=N alone means N epochs
    cfg = dataclasses.replace(cfg, **unset)
    if cfg.min_lr < 0:
        cfg = dataclasses.replace(cfg, min_lr=cfg.learning_rate / 10)
    if cfg.template not in CHAT_TEMPLATES:
        raise UserError(f"--template={cfg.template!r} is unknown; use one of "
                        f"{', '.join(CHAT_TEMPLATES)}")
    require_positive(cfg, "batch_size", "eval_interval", "log_interval", "val_size",
                     "test_size")
    if cfg.max_iters <= 0 and cfg.epochs < 1:
        raise UserError("pass --epochs>=1 or --max_iters>=1")
    if cfg.train_layers < -1:
        raise UserError(f"--train_layers={cfg.train_layers}: pass N >= 0 blocks, or -1 (all)")
    return cfg

def show_table(rows, path):
    # the before/after table, printed and saved as JSON
    title = f"held-out ({rows['test_examples']} examples)"
    print(f"{title:32s} {'base':>10s} {'finetuned':>10s}")
    lines = [("response_loss", "response loss", "{:10.4f}"),
             ("judge", "judge score (0-100)", "{:10.1f}")]
    lines += [(kind, f"passes: {kind}", "{:10.1%}") for kind in rows["base"]["passes"] or []]
    for key, name, fmt in lines:
        base, tuned = [row.get(key, (row["passes"] or {}).get(key)) for row in
                       (rows["base"], rows["finetuned"])]
        if base is not None:  # passes need the stories' checks; judge a --judge_url
            print(f"{name:32s} {fmt.format(base)} {fmt.format(tuned)}")
    save_json(path, rows)

def instruct(cfg, model, tok, common, out_dir, device, ctx):
    # --- data: records -> conversations -> (x, y) examples, and the prompts of the table
    with user_input():  # bpe.py's errors (a malformed file, a template's end missing): one line
        records = instruct_records(cfg.dataset, cfg.data_dir)
        train_r, val_r, test_r = split_records(records, cfg.val_size, cfg.test_size,
                                               cfg.seed)
        template = tok.chat_template or cfg.template  # a Hub model's own, else --template
        pad_id = end_of_turn(tok, template)  # padding is never learned (y = -100)
    block = model.config.block_size
    train_ex, dropped, cut = chat_examples(tok, train_r, template, block, cfg.mask_prompt)
    val_ex = chat_examples(tok, val_r, template, block)[0]
    test_ex = chat_examples(tok, test_r, template, block)[0]
    if not (train_ex and val_ex and test_ex):
        raise UserError(f"no train, val or test example fits block_size={block} once "
                        f"rendered; use shorter prompts or more data")
    prompts = [render_conversation(tok, record_messages(r)[:-1], template)[0]
               for r in test_r]
    lengths = [len(x) for x, _ in train_ex]
    rng = random.Random(cfg.seed)
    shuffled = rng.sample(range(len(lengths)), len(lengths))
    pads = []  # the share of a batch's (B, T) slots that is padding: sorted, then random
    random_batches = [shuffled[i:i + cfg.batch_size]
                      for i in range(0, len(lengths), cfg.batch_size)]
    for batches in (length_batches(lengths, cfg.batch_size, rng), random_batches):
        slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        pads.append(1 - sum(lengths) / slots)
    print(f"data: {len(train_ex)} train, {len(val_ex)} val, {len(test_ex)} test examples "
          f"({dropped} dropped: the prompt fills block_size {block}; {cut} responses cut); "
          f"padding {pads[0]:.2%} of each batch (random batches: {pads[1]:.2%})")

    def table_row(model):  # the held-out loss, the greedy responses and what they achieve
        responses = respond(model, tok, prompts, cfg.max_new_tokens, pad_id, ctx)
        loss = heldout_loss(model, test_ex, cfg.batch_size, pad_id, device, ctx)
        row = dict(response_loss=loss, passes=pass_rates(responses, test_r), judge=None)
        if cfg.judge_url:
            row["judge"] = judge(cfg.judge_url, cfg.judge_model, test_r, responses)
        return row, responses

    # --- the base model, then training, then the finetuned model
    params = freeze(model, cfg.train_layers)  # first: a bad --train_layers fails at once
    base, _ = table_row(model)
    result = train(cfg, model, params, train_ex, val_ex, pad_id, device, ctx)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(ckpt_path, model, step=result["best_step"],
                    val_loss=result["best_val_loss"], chat_template=cfg.template, **common)
    tuned, responses = table_row(model)
    rows = dict(base=base, finetuned=tuned, test_examples=len(test_r),
                train_seconds=result["seconds"], step_ms=result["step_ms"],
                trainable=sum(p.numel() for p in params),
                samples=[dict(prompt=record_messages(r)[-2]["content"], response=s)
                         for r, s in zip(test_r[:3], responses)])
    print(f"done: {result['seconds']:.0f} s of training, {result['step_ms']:.0f} ms a step; "
          f"best val loss {result['best_val_loss']:.4f}; saved {ckpt_path}")
    show_table(rows, os.path.join(out_dir, "eval.json"))
    for sample in rows["samples"]:
        print(f"\n### prompt\n{sample['prompt']}\n### response\n{sample['response']}")
    return dict(rows, ckpt_path=ckpt_path, best_val_loss=result["best_val_loss"])

@torch.no_grad()
def predict(clf, examples, batch_size, pad_id, device, ctx):
    # -> (N, classes) logits of every example, in order
    clf.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        x, y = pad_batch(examples[i:i + batch_size], pad_id, device)
        with ctx:
            out.append(clf(x, y)[0].float())
    return torch.cat(out)

def classify(cfg, model, tok, common, out_dir, device, ctx):
    # --- data: balanced, split 70/10/20; the naive-Bayes baseline on the same split
    with user_input():  # bpe.py's errors for a missing or malformed file: one line
        pairs = labelled_pairs(cfg)
    train_p, val_p, test_p = balanced_split(pairs, cfg.seed)
    if not (val_p and test_p):
        raise UserError(f"{len(pairs)} texts leave no validation or test text (70/10/20); "
                        f"give at least 10 texts of each label")
    labels = sorted({label for _, label in train_p + val_p + test_p})
    block = model.config.block_size
    pad_id = end_of_turn(tok)
    splits = {name: [text_example(tok, text, labels.index(label), block) for text, label in p]
              for name, p in [("train", train_p), ("val", val_p), ("test", test_p)]}
    nb = naive_bayes(train_p, [text for text, _ in test_p])
    nb_accuracy = sum(p == label for p, (_, label) in zip(nb, test_p)) / len(test_p)
    print(f"data: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} texts, labels "
          f"{labels}; naive Bayes (bag of words) test accuracy {nb_accuracy:.2%}")

    # --- the classifier: the GPT and a fresh head, the chosen layers trained
    torch.manual_seed(cfg.seed)
    clf = Classifier(model, labels).to(device)
    params = freeze(model, cfg.train_layers) + list(clf.head.parameters())
    result = train(cfg, clf, params, splits["train"], splits["val"], pad_id, device, ctx)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    head = dict(head=clf.head.state_dict(), labels=labels)
    save_checkpoint(ckpt_path, model, step=result["best_step"],
                    val_loss=result["best_val_loss"], classifier=head, **common)

    # --- accuracy on each split
    accuracy = {}
    for name, examples in splits.items():
        guess = predict(clf, examples, cfg.batch_size, pad_id, device, ctx).argmax(1).tolist()
        accuracy[name] = sum(g == y[-1] for g, (_, y) in zip(guess, examples)) / len(examples)
    print(f"done: {result['seconds']:.0f} s of training; accuracy: train "
          f"{accuracy['train']:.2%}, val {accuracy['val']:.2%}, test {accuracy['test']:.2%} "
          f"(naive Bayes {nb_accuracy:.2%}); saved {ckpt_path}")
    return dict(accuracy, ckpt_path=ckpt_path, naive_bayes_test=nb_accuracy,
                train_seconds=result["seconds"])

def classify_text(cfg, path, device):
    # the label of one text, from a classifier checkpoint that --task=classify saved
    if not os.path.isfile(path):
        raise UserError(f"no classifier at {path}; train one with `python finetune.py "
                        f"--task=classify` (or pass its --out_dir)")
    model, ckpt = load_checkpoint(path, device)
    if "classifier" not in ckpt:
        raise UserError(f"{path} is not a classifier (it has no head); pass the --out_dir "
                        f"of a `python finetune.py --task=classify` run")
    with user_input():  # GPT-2's tokenizer files may be missing, offline
        tok = Tokenizer.from_saved(ckpt["tokenizer"], cfg.gpt2_dir)
    clf = Classifier(model, ckpt["classifier"]["labels"]).to(device)
    clf.head.load_state_dict(ckpt["classifier"]["head"])
    # the label is what we ask for: 0 stands in for it, and only the logits are read
    example = text_example(tok, cfg.classify_text, 0, model.config.block_size)
    probs = predict(clf, [example], 1, 0, device, contextlib.nullcontext())[0].softmax(0)
    label = clf.labels[int(probs.argmax())]
    print(f"{label} ({probs.max():.1%})")
    return dict(label=label, probability=probs.max().item())

def main(cfg):
    refuse_torchrun("finetune.py")
    cfg = check_config(cfg)
    out_dir = cfg.out_dir or ("out-sft" if cfg.task == "instruct" else "out-classify")
    device = pick_device(cfg.device)
    if cfg.classify_text:
        return classify_text(cfg, os.path.join(out_dir, "ckpt.pt"), device)
    refuse_overwrite(os.path.join(out_dir, "ckpt.pt"), cfg.overwrite)
    cfg, device, ctx, model, saved_tok = start_finetuning(cfg)
    with user_input():  # GPT-2's tokenizer files may be missing, offline
        tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    model.vocab_used = tok.vocab_size  # rows past the tokenizer's ids are never sampled
    common = dict(tokenizer=saved_tok, train_config=dataclasses.asdict(cfg))
    task = instruct if cfg.task == "instruct" else classify
    return task(cfg, model, tok, common, out_dir, device, ctx)

if __name__ == "__main__":
    run(main, FinetuneConfig)
