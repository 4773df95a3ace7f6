"""Supervised finetuning: teach a pretrained GPT to follow instructions, or to classify text.

What you learn here (LLM101n chapter 14, Build a LLM from Scratch chapters 6 and 7): a chat
template turns (prompt, response) pairs into one token sequence, and the loss counts only the
response and the stop token that ends it (prompt and padding targets are -100), so the model
learns to answer, not to ask. The key idea: finetuning is pretraining's loss on a masked target.
A classifier is the same network with a small linear head over the last real token's state.
How to run:
    python finetune.py                  # 5-9 min on a 2-core CPU: out/ckpt.pt writes to order
    python finetune.py --init_from=gpt2 --dataset=alpaca --learning_rate=5e-5 --device=cuda
    python finetune.py --task=classify --dataset=sms    # SMS spam, beside naive Bayes
    python finetune.py --task=classify --classify_text="WIN a FREE prize now"
Depends on: gpt.py, bpe.py (the chat template and the story checker). Reads out/ckpt.pt from
train.py (or GPT-2), and data/stories/instruct.json that train.py writes; writes out-sft/ckpt.pt
(the best by held-out loss) and out-sft/eval.json (the before/after table), or out-classify/.
References: Ouyang et al. 2022, Training language models to follow instructions, arXiv:2203.02155;
Taori et al. 2023, Stanford Alpaca; Raschka 2024, Build a Large Language Model (From Scratch).
"""
import contextlib
import dataclasses
import math
import os
import random
import re
import zipfile
from collections import Counter

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

from bpe import (CHAT_TEMPLATES, STOP, Tokenizer, constraints_met, fetch, instruct_records,
                 make_examples, record_messages, render_conversation, split_records)
from gpt import (collate, fit, heldout_loss, length_batches, load_checkpoint, padding_fraction,
                 pick_device, refuse_overwrite, refuse_torchrun, require_positive, respond,
                 response_loss, run_main, save_checkpoint, save_json, start_finetuning)

@dataclasses.dataclass
class FinetuneConfig:
    """Finetune a GPT on instructions or labels; every field is a flag: --dataset=alpaca"""
    # I/O
    ckpt_path: str = "out/ckpt.pt"  # the model to start from, written by train.py
    init_from: str = ""  # '' = ckpt_path; gpt2, gpt2-medium, ... or a .safetensors: OpenAI's GPT-2
    out_dir: str = ""  # '' = out-sft (instruct) or out-classify; ckpt.pt and eval.json go there
    overwrite: bool = False  # replace a checkpoint already in out_dir (else that is an error)
    data_dir: str = "data"  # downloads are cached here; train.py wrote stories/instruct.json
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    task: str = "instruct"  # instruct (a response to each prompt) or classify (a label per text)
    # data
    dataset: str = "stories"  # instruct: stories, alpaca, a .json/.jsonl; classify: stories, sms, a file
    template: str = "phi3"  # the chat template (bpe.py): phi3 (short) or alpaca (Raschka's)
    mask_prompt: bool = True  # loss on responses only; False = on every token (Raschka ex. 7.2)
    val_size: int = 100  # held-out instructions for the loss that picks the best checkpoint
    test_size: int = 200  # held-out instructions for the before/after table (classify: 70/10/20)
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
    eval_interval: int = 100  # steps between held-out evaluations (and saves when it improves)
    log_interval: int = 10  # steps between log lines
    # evaluation
    max_new_tokens: int = 200  # the longest greedy response in the table
    judge_url: str = ""  # an OpenAI-compatible chat URL that scores responses 0-100 ('' = none)
    judge_model: str = "llama3"  # the model the judge endpoint runs
    classify_text: str = ""  # print the label of this text from out_dir/ckpt.pt, then stop
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 1337  # the split, the batch order, the head's initialisation

# instructions: about two epochs of the stories, all weights, within 5 CPU minutes; a small
# labelled set overfits fast, so classifying trains one block for longer, more gently (both
# measured in the README). A flag passed explicitly wins
TASK_DEFAULTS = {"instruct": dict(train_layers=-1, max_iters=1100, epochs=2, learning_rate=2e-3),
                 "classify": dict(train_layers=1, max_iters=-1, epochs=10, learning_rate=5e-4)}
PER_TASK = dict(train_layers=-2, max_iters=0, epochs=0, learning_rate=0.0)

SMS_ZIP = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"

# -----------------------------------------------------------------------------
# classification: a linear head over the hidden state of each row's last real token

class Classifier(nn.Module):
    """The GPT, unchanged (its tied LM head too), and a head over the last real token: the only
    position that has seen the whole text. Right padding comes after it, so causal attention keeps
    it from touching that state (Raschka pools the last position, usually a pad: 95.67% vs 98.33%)."""
    def __init__(self, gpt, labels):
        super().__init__()
        self.gpt = gpt
        self.labels = list(labels)
        self.head = nn.Linear(gpt.config.n_embd, len(self.labels))

    def forward(self, idx, lengths):
        h = self.gpt.hidden(idx)                                       # (B, T, C)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        return self.head(last)                                         # (B, classes)

def text_ids(tok, text, block_size):
    """A text as the classifier reads it: <|endoftext|>, the text's first block_size - 2 tokens,
    and <|endoftext|> again, the last real token (GPT-1's "extract" token). Pretraining showed the
    model this token between documents, and ending every text with it leaves its state all
    context."""
    stop = tok.special_tokens[STOP]
    return [stop] + tok.encode(text, allowed_special="none")[:block_size - 2] + [stop]

def read_labelled(path):
    """label<TAB>text lines (the SMS Spam Collection's format) -> [(text, label)]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass --dataset=sms, stories or a label<TAB>text "
                                f"file")
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            label, tab, text = line.rstrip("\n").partition("\t")
            if not tab or not label or not text.strip():
                raise ValueError(f"{path}: line {n} is not label<TAB>text; fix or remove it")
            pairs.append((text, label))
    return pairs

def labelled_pairs(cfg):
    # the three sources of --dataset for --task=classify, as (text, label) pairs
    if cfg.dataset == "stories":  # which of the seven story arcs a held-out story follows
        records = instruct_records("stories", cfg.data_dir)
        if "kind" not in records[0]:
            raise ValueError("data/stories/instruct.json has no 'kind' labels (an older train.py "
                             "wrote it); rebuild it: rm -r data/stories && python train.py")
        return [(r["output"], r["kind"]) for r in records[:1500]]  # ~1000 to train: a minute
    if cfg.dataset != "sms":
        return read_labelled(cfg.dataset)
    path = os.path.join(cfg.data_dir, "sms_spam", "SMSSpamCollection")
    if not os.path.isfile(path):  # UCI serves a zip; the tab-separated file is inside it
        zip_path = fetch(SMS_ZIP, os.path.join(cfg.data_dir, "sms_spam", "sms.zip"))
        try:
            with zipfile.ZipFile(zip_path) as z:
                data = z.read("SMSSpamCollection")
        except (zipfile.BadZipFile, KeyError):
            raise RuntimeError(f"{zip_path} is not the SMS Spam Collection's zip; delete it and "
                               f"retry, or pass --dataset=path/to/SMSSpamCollection") from None
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return read_labelled(path)

def balanced_split(pairs, seed):
    """Keep as many texts of each label as the rarest label has (747 ham, 747 spam for SMS), then
    split 70/10/20 into train, val and test, as Raschka's chapter 6 does."""
    by_label = {}
    for text, label in pairs:
        by_label.setdefault(label, []).append((text, label))
    if len(by_label) < 2:
        raise ValueError(f"the data has one label only ({list(by_label)}); a classifier needs two")
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
# helpers used by main: freezing, the shared training loop, evaluation, the judge

def freeze(model, gpt, train_layers):
    """Train only the last train_layers blocks, the final norm and any module outside the GPT
    (the classifier's head); -1 = every parameter. -> the trainable parameters."""
    blocks = gpt.transformer.h
    if train_layers > len(blocks):
        raise ValueError(f"--train_layers={train_layers} but the model has {len(blocks)} blocks; "
                         f"pass 0..{len(blocks)} or -1 (all)")
    model.requires_grad_(train_layers < 0)
    if train_layers >= 0:
        for module in [*blocks[len(blocks) - train_layers:], gpt.transformer.ln_f]:
            module.requires_grad_(True)
        for module in model.children():
            if module is not gpt:
                module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]

# the judge is asked for one integer, the scoring of Raschka's ollama_evaluate.py (chapter 7)
JUDGE_PROMPT = ("Here is a task and its correct answer. Score the response from 0 to 100, where "
                "100 is as good as the correct answer. Reply with the integer only.\n\n"
                "Task:\n{prompt}\n\nCorrect answer:\n{reference}\n\nResponse:\n{response}")

def judge(url, model, rows):
    """Scores 0-100 from an OpenAI-compatible chat endpoint (Ollama: --judge_url=
    http://localhost:11434/v1/chat/completions) for (prompt, reference, response) rows; a reply
    without a number scores None."""
    scores = []
    for prompt, reference, response in rows:
        text = JUDGE_PROMPT.format(prompt=prompt, reference=reference, response=response)
        body = {"model": model, "messages": [{"role": "user", "content": text}],
                "temperature": 0}
        try:
            reply = requests.post(url, json=body, timeout=120)
            reply.raise_for_status()
            answer = reply.json()["choices"][0]["message"]["content"]
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"the judge at {url} failed ({type(e).__name__}: {str(e)[:80]}); "
                               f"start it (ollama serve) or drop --judge_url") from None
        number = re.search(r"\d+", str(answer))
        scores.append(min(100, int(number[0])) if number else None)
    return scores

def check_config(cfg):
    """Check the flags and fill in the per-task defaults. -> the config to run."""
    if cfg.task not in TASK_DEFAULTS:
        raise ValueError(f"--task={cfg.task!r} is unknown; use instruct or classify")
    unset = {k: v for k, v in TASK_DEFAULTS[cfg.task].items() if getattr(cfg, k) == PER_TASK[k]}
    if cfg.epochs != PER_TASK["epochs"] and cfg.max_iters == PER_TASK["max_iters"]:
        unset["max_iters"] = -1  # --epochs=N alone means N epochs
    cfg = dataclasses.replace(cfg, **unset)
    if cfg.min_lr < 0:
        cfg = dataclasses.replace(cfg, min_lr=cfg.learning_rate / 10)
    if cfg.template not in CHAT_TEMPLATES:
        raise ValueError(f"--template={cfg.template!r} is unknown; use one of "
                         f"{', '.join(CHAT_TEMPLATES)}")
    require_positive(cfg, "batch_size", "eval_interval", "log_interval", "val_size", "test_size")
    if cfg.max_iters <= 0 and cfg.epochs < 1:
        raise ValueError("pass --epochs>=1 or --max_iters>=1")
    if cfg.train_layers < -1:
        raise ValueError(f"--train_layers={cfg.train_layers}: pass N >= 0 blocks, or -1 for all")
    return cfg

def show_table(rows, path):
    # the before/after table, printed and saved as JSON
    print(f"{'held-out (' + str(rows['test_examples']) + ' examples)':32s} {'base':>10s} "
          f"{'finetuned':>10s}")
    for key, name, fmt in [("response_loss", "response loss", "{:10.4f}"),
                           ("constraints", "constraints met", "{:10.1%}"),
                           ("judge", "judge score (0-100)", "{:10.1f}")]:
        cells = [rows[m][key] for m in ("base", "finetuned")]
        if any(c is not None for c in cells):
            print(f"{name:32s} " + " ".join("{:>10s}".format("-") if c is None else
                                             fmt.format(c) for c in cells))
    save_json(path, rows)

def instruct(cfg, model, tok, common, out_dir, device, ctx):
    # --- data: records -> conversations -> masked examples, and prompts for the table
    records = instruct_records(cfg.dataset, cfg.data_dir)
    train_r, val_r, test_r = split_records(records, cfg.val_size, cfg.test_size, cfg.seed)
    block = model.config.block_size
    pad_id = tok.special_tokens[STOP]  # padding has no loss, so any id would do
    train_ex, dropped, cut = make_examples(tok, [record_messages(r) for r in train_r],
                                           cfg.template, block, cfg.mask_prompt)
    val_ex = make_examples(tok, [record_messages(r) for r in val_r], cfg.template, block)[0]
    test_ex = make_examples(tok, [record_messages(r) for r in test_r], cfg.template, block)[0]
    if not (train_ex and val_ex and test_ex):
        raise ValueError(f"no train, val or test example fits block_size={block} once rendered; "
                         f"use shorter prompts or more data")
    prompts = [render_conversation(tok, record_messages(r)[:-1], cfg.template)[0] for r in test_r]
    lengths = [len(x) for x, _ in train_ex]
    rng = random.Random(cfg.seed)
    shuffled = rng.sample(range(len(lengths)), len(lengths))
    unsorted = [shuffled[i:i + cfg.batch_size] for i in range(0, len(lengths), cfg.batch_size)]
    print(f"data: {len(train_ex)} train, {len(val_ex)} val, {len(test_ex)} test examples "
          f"({dropped} dropped: the prompt fills block_size {block}; {cut} responses cut); "
          f"padding {padding_fraction(lengths, length_batches(lengths, cfg.batch_size, rng)):.2%}"
          f" of each batch (random batches: {padding_fraction(lengths, unsorted):.2%})")

    def table_row(model):  # the held-out loss, the greedy responses and what they achieve
        responses = respond(model, tok, prompts, cfg.max_new_tokens, pad_id, ctx)
        row = dict(response_loss=heldout_loss(model, test_ex, cfg.batch_size, pad_id, device, ctx),
                   constraints=constraints_met(responses, test_r), judge=None)
        if cfg.judge_url:
            rows = [(record_messages(r)[-2]["content"], record_messages(r)[-1]["content"], s)
                    for r, s in zip(test_r, responses)]
            scores = [x for x in judge(cfg.judge_url, cfg.judge_model, rows) if x is not None]
            row["judge"] = sum(scores) / len(scores) if scores else None
        return row, responses

    # --- the base model, then training, then the finetuned model
    params = freeze(model, model, cfg.train_layers)  # first: a bad --train_layers fails at once
    base, _ = table_row(model)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")

    def batch_loss(batch):
        x, y = collate([train_ex[i] for i in batch], pad_id, device)
        with ctx:
            return response_loss(model(x)[0], y), sum(lengths[i] for i in batch)
    def save(step, loss):
        save_checkpoint(ckpt_path, model, step=step, val_loss=loss, chat_template=cfg.template,
                        **common)
    run = fit(cfg, model, params, lambda: length_batches(lengths, cfg.batch_size, rng), batch_loss,
              lambda: heldout_loss(model, val_ex, cfg.batch_size, pad_id, device, ctx), save)
    tuned, responses = table_row(model)
    rows = dict(base=base, finetuned=tuned, test_examples=len(test_r), train_seconds=run["seconds"],
                samples=[dict(prompt=record_messages(r)[-2]["content"], response=s)
                         for r, s in zip(test_r[:3], responses)])
    print(f"done: {run['seconds']:.0f} s of training; best val loss {run['best_val_loss']:.4f}; "
          f"saved {ckpt_path}")
    show_table(rows, os.path.join(out_dir, "eval.json"))
    for sample in rows["samples"]:
        print(f"\n### prompt\n{sample['prompt']}\n### response\n{sample['response']}")
    return dict(rows, ckpt_path=ckpt_path, best_val_loss=run["best_val_loss"])

@torch.no_grad()
def predict(clf, examples, batch_size, pad_id, device, ctx):
    # -> (B, classes) logits of every example, in order
    clf.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        rows = examples[i:i + batch_size]
        x = collate([(ids, ids) for ids, _ in rows], pad_id, device)[0]
        lengths = torch.tensor([len(ids) for ids, _ in rows], device=device)
        with ctx:
            out.append(clf(x, lengths).float())
    return torch.cat(out)

def classify(cfg, model, tok, common, out_dir, device, ctx):
    # --- data: balanced, split 70/10/20; the naive-Bayes baseline on the same split
    train_p, val_p, test_p = balanced_split(labelled_pairs(cfg), cfg.seed)
    if not (val_p and test_p):
        raise ValueError(f"{len(train_p + val_p + test_p)} balanced texts leave no validation or "
                         f"test text (70/10/20); give at least 10 texts of each label")
    labels = sorted({label for _, label in train_p + val_p + test_p})
    block = model.config.block_size
    pad_id = tok.special_tokens[STOP]
    def encode(pairs):  # a text longer than block_size keeps its start
        return [(text_ids(tok, text, block), labels.index(label)) for text, label in pairs]
    splits = dict(train=encode(train_p), val=encode(val_p), test=encode(test_p))
    lengths = [len(ids) for ids, _ in splits["train"]]
    nb = naive_bayes(train_p, [text for text, _ in test_p])
    nb_accuracy = sum(p == label for p, (_, label) in zip(nb, test_p)) / len(test_p)
    print(f"data: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} texts, labels {labels}; "
          f"naive Bayes (bag of words) test accuracy {nb_accuracy:.2%}")

    # --- the classifier: the GPT and a fresh head, the chosen layers trained
    torch.manual_seed(cfg.seed)
    clf = Classifier(model, labels).to(device)
    params = freeze(clf, model, cfg.train_layers)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    rng = random.Random(cfg.seed)

    def loss_of(examples, logits):
        return F.cross_entropy(logits.float(), torch.tensor([y for _, y in examples],
                                                            device=device))
    def batch_loss(batch):
        rows = [splits["train"][i] for i in batch]
        x = collate([(ids, ids) for ids, _ in rows], pad_id, device)[0]
        with ctx:
            logits = clf(x, torch.tensor([len(ids) for ids, _ in rows], device=device))
        return loss_of(rows, logits), sum(lengths[i] for i in batch)
    def save(step, loss):
        head = dict(head=clf.head.state_dict(), labels=labels)
        save_checkpoint(ckpt_path, model, step=step, val_loss=loss, classifier=head, **common)
    def val_loss():
        return loss_of(splits["val"], predict(clf, splits["val"], cfg.batch_size, pad_id, device,
                                              ctx)).item()
    run = fit(cfg, clf, params, lambda: length_batches(lengths, cfg.batch_size, rng), batch_loss,
              val_loss, save)
    seconds = run["seconds"]

    # --- accuracy on each split and the confusion matrix on test
    result = dict(ckpt_path=ckpt_path, naive_bayes_test=nb_accuracy, train_seconds=seconds)
    for name, examples in splits.items():
        guess = predict(clf, examples, cfg.batch_size, pad_id, device, ctx).argmax(1).tolist()
        result[name] = sum(g == y for g, (_, y) in zip(guess, examples)) / len(examples)
    print(f"done: {seconds:.0f} s of training; accuracy: train {result['train']:.2%}, val "
          f"{result['val']:.2%}, test {result['test']:.2%} (naive Bayes {nb_accuracy:.2%}); "
          f"saved {ckpt_path}")
    confusion = Counter(zip([y for _, y in splits["test"]], guess))
    width = max(len(label) for label in labels) + 2
    print("test confusion (rows: true label, columns: predicted)\n" + " " * width +
          "".join(label.rjust(width) for label in labels))
    for i, label in enumerate(labels):
        print(label.ljust(width) + "".join(str(confusion[i, j]).rjust(width)
                                           for j in range(len(labels))))
    result["confusion"] = [[confusion[i, j] for j in range(len(labels))] for i in range(len(labels))]
    return result

def classify_text(cfg, path, device):
    # the label of one text, from a classifier checkpoint that --task=classify saved
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no classifier at {path}; train one with `python finetune.py "
                                f"--task=classify` (or pass its --out_dir)")
    model, ckpt = load_checkpoint(path, device)
    if "classifier" not in ckpt:
        raise ValueError(f"{path} is not a classifier (it has no head); pass the --out_dir of a "
                         f"`python finetune.py --task=classify` run")
    tok = Tokenizer.from_saved(ckpt["tokenizer"], cfg.gpt2_dir)
    clf = Classifier(model, ckpt["classifier"]["labels"]).to(device)
    clf.head.load_state_dict(ckpt["classifier"]["head"])
    example = [(text_ids(tok, cfg.classify_text, model.config.block_size), 0)]
    probs = predict(clf, example, 1, 0, device, contextlib.nullcontext())[0].softmax(0)
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
    tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    common = dict(tokenizer=saved_tok, train_config=dataclasses.asdict(cfg))
    task = instruct if cfg.task == "instruct" else classify
    return task(cfg, model, tok, common, out_dir, device, ctx)

if __name__ == "__main__":
    run_main(main, FinetuneConfig)
