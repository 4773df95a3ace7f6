"""Train a GPT, from scratch or from GPT-2, on stories, TinyStories, Shakespeare or text.

What you learn here (LLM101n chapters 07-11): text tokenized once into a flat file of ids
read through numpy.memmap; AdamW with warmup and cosine decay; gradient accumulation and
clipping; bfloat16 autocast and torch.compile (--bench: their tokens/s and MFU); DDP;
FSDP and activation checkpointing, for models past one GPU's memory;
checkpoints that resume exactly. The key idea: a step uses the mean gradient of
grad_accum micro-batches, made one after another by one process or at once by many.

How to run:
  python train.py               # 9 min on a 2-core CPU: synthetic stories, edits
  python train.py --bench       # tokens/s and MFU: float32/bfloat16, eager/compiled
  python train.py --dataset=tinystories --vocab_size=4096 --n_embd=512 --compile
  torchrun --standalone --nproc_per_node=8 train.py --dataset=tinystories --grad_accum=8
  torchrun --standalone --nproc_per_node=8 train.py --init_from=gpt2-xl --grad_accum=8 --fsdp
  python train.py --init_from=gpt2 --eval_only --eval_hellaswag=10042  # acc_norm 0.2955
  (--eval_hellaswag=N: N examples at each evaluation; --eval_only: one, no training)
Depends on: gpt.py, bpe.py. Writes out/ckpt.pt (latest) and out/best.pt, and the data in
data/<dataset>/ (for the stories also instruct.json: conversations for finetune.py and
dpo.py). The generator of stories and conversations is an appendix at the end.
References (arXiv): AdamW 1711.05101; SGDR 1608.03983; mixed precision 1710.03740;
PyTorch DDP 2006.15704; TinyStories 2305.07759; PaLM appendix B (MFU) 2204.02311;
HellaSwag 1905.07830; PyTorch FSDP 2304.11277; recomputation 1604.06174.
"""
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import random
import re
import shlex
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from bpe import BOYS, GIRLS, Tokenizer
from gpt import (GPT, GPT2_NAMES, GPTConfig, UserError, collate, download,
                 format_config, from_pretrained, get_lr, load_checkpoint, pick_device,
                 progress_bar, read_json, refuse_overwrite, require_positive, run,
                 save_checkpoint, save_json, setup_precision, user_input)

@dataclasses.dataclass
class TrainConfig:
    """Train a GPT on text; each field is a flag: python train.py --n_layer=4"""
    # I/O
    out_dir: str = "out"         # ckpt.pt (latest, resumable), best.pt (lowest val loss)
    overwrite: bool = False      # replace the checkpoint of an earlier run in out_dir
    data_dir: str = "data"       # downloads and prepared token files are cached here
    init_from: str = "scratch"   # scratch, resume, gpt2, gpt2-medium, ..., .safetensors
    eval_interval: int = 200     # steps between evaluations, checkpoints and samples
    eval_iters: int = 10         # fixed batches per split in each evaluation
    log_interval: int = 50       # steps between log lines
    sample_tokens: int = 200     # length of the story sampled at each evaluation
    bench: bool = False          # only measure tokens/s and MFU (precision x compile)
    eval_hellaswag: int = 0      # HellaSwag examples per evaluation (of 10042); 0 = off
    eval_only: bool = False      # evaluate once and exit: nothing trained or saved
    # data
    dataset: str = "stories"     # stories (offline), tinystories, shakespeare_char, .txt,
    # fineweb10B, finewebedu10B (GPT-2 token shards) or a folder of shards or of .txt files
    shards: int = 1              # fineweb: train shards to fetch (100M tokens each, 103)
    num_stories: int = 20000     # stories: 90% train, 10% val, +50% for instruct.json
    plans: float = 1.0           # share of stories after a plan or as an edit (half each)
    # --tokenizer='' picks byte for shakespeare_char, gpt2 when starting from GPT-2, else bpe
    tokenizer: str = ""          # bpe, gpt2, byte or a tok.json from bpe.py; '' = as above
    vocab_size: int = 1024       # bpe: 256 bytes + merges + <|endoftext|>; gpt2: the
    # model's rows, if more than 50,257 (50,304 = 64 x 786: faster matmuls on a GPU)
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, fetched if missing
    # model (ignored when resuming or starting from GPT-2)
    n_layer: int = 4             # transformer blocks
    n_head: int = 4              # attention heads
    n_embd: int = 256            # channels
    block_size: int = 512        # context length in tokens: two stories and requests
    dropout: float = 0.0         # 0 for pretraining small models on plenty of data
    bias: bool = False           # biases in Linear and LayerNorm (GPT-2 has them)
    # optimizer
    batch_size: int = 8          # sequences per micro-batch, in each process
    grad_accum: int = 1          # micro-batches per step, summed over all processes
    max_iters: int = 1000        # optimizer steps
    learning_rate: float = 2e-3  # peak learning rate, after warmup
    min_lr: float = 2e-4         # the cosine decays to this (about learning_rate / 10)
    warmup_iters: int = 50       # linear warmup steps
    lr_decay_iters: int = -1     # the cosine reaches min_lr here; -1 = max_iters
    weight_decay: float = 0.1    # AdamW decay of matrices and embeddings
    beta1: float = 0.9           # AdamW betas
    beta2: float = 0.99          # (0.95 for large models)
    grad_clip: float = 1.0       # clip the global gradient norm to this; 0 = off
    # system
    device: str = "auto"         # auto (cuda, mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"          # auto, float32, bfloat16, float16 (CUDA + GradScaler)
    compile: bool = False        # torch.compile the model (slow first steps, then fast)
    fsdp: bool = False           # torchrun: shard weights, gradients, AdamW state (not DDP)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    peak_flops: float = 0.0      # peak FLOP/s for MFU; 0: an A100's on CUDA, none on CPU
    seed: int = 1337             # model init, batch order, dropout, stories

# -----------------------------------------------------------------------------
# data: text -> a tokenizer -> one flat file of token ids per split, cached

EOT = "<|endoftext|>"
BPE_TRAIN_BYTES = 8 << 20  # bpe learns its merges from the train split's first 8 MB
DATASETS = {  # name -> urls: [train, val], or [one file that is split 90/10]
    "tinystories": ["https://huggingface.co/datasets/roneneldan/TinyStories/resolve/"
                    f"main/TinyStoriesV2-GPT4-{s}.txt" for s in ("train", "valid")],
    "shakespeare_char": ["https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                         "data/tinyshakespeare/input.txt"]}

def read_documents(path, lo, hi, piece):
    """Yield the documents in bytes [lo, hi) of a UTF-8 file, a list per `piece` bytes
    read: the text before each <|endoftext|> marker (or hi), stripped, then the marker;
    one unfinished after `piece` characters (plain text has no markers) comes in parts."""
    with open(path, "rb") as f:
        f.seek(lo)
        rest = ""  # the text after the last marker
        while f.tell() < hi:
            chunk = f.read(min(piece, hi - f.tell()))
            chunk += f.readline(hi - f.tell())  # to the line's end: no character cut
            *texts, rest = (rest + chunk.decode("utf-8")).split(EOT)
            part = []
            if f.tell() == hi:  # the last document ends at hi
                texts.append(rest)
            elif len(rest) > piece:  # a long document: its lines but the last, no marker
                cut = rest.rstrip().rfind("\n") + 1
                part = [rest[:cut]]
                rest = rest[cut:]
            yield [text.strip() + EOT for text in texts if text.strip()] + part

def encode_split(enc, path, lo, hi, out_path, dtype, piece=1 << 24):
    """Tokenize bytes [lo, hi) of a UTF-8 file into out_path, a flat file of ids, `piece`
    bytes at a time (tiktoken, on several threads): a 2 GB corpus never sits in memory.
    Returns (tokens, bytes of text) written."""
    n_tokens = 0
    n_bytes = 0
    with open(out_path + ".tmp", "wb") as out:
        for docs in read_documents(path, lo, hi, piece):
            # <|endoftext|> becomes its id; any other text is ordinary text
            encoded = enc.encode_batch(docs, allowed_special={EOT}, disallowed_special=())
            ids = [t for doc_ids in encoded for t in doc_ids]
            np.array(ids, dtype).tofile(out)
            n_tokens += len(ids)
            n_bytes += len("".join(docs).replace(EOT, "").encode("utf-8"))
    os.replace(out_path + ".tmp", out_path)  # atomic: no half-written file after a crash
    return n_tokens, n_bytes

def prepare_data(cfg, kind):
    """Text -> tokenizer -> train.bin, val.bin (uint16 ids; uint32 past 65536 ids) in the
    dataset's folder, cached: redone only when the text or the tokenizer changes.
    Returns (folder, meta)."""
    stories = cfg.dataset == "stories"
    name = os.path.splitext(os.path.basename(cfg.dataset))[0]  # stories, ..., a file's
    folder = os.path.join(cfg.data_dir, name)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.abspath(cfg.dataset)]
    if stories:  # written below, by the generator in the appendix
        paths = [os.path.join(folder, "train.txt"), os.path.join(folder, "val.txt")]
    elif cfg.dataset in DATASETS:  # downloaded once (streamed, resumable)
        urls = DATASETS[cfg.dataset]
        paths = [os.path.join(folder, url.rsplit("/", 1)[1]) for url in urls]
        for url, path in zip(urls, paths):
            download(url, path)
    # the cache key: what the token files depend on (for the stories: the flags)
    sources = [] if stories else paths
    if kind not in ("bpe", "byte", "gpt2"):
        sources = sources + [kind]  # a tok.json: retraining it redoes the data
    key = dict(files=[[p, os.path.getsize(p), os.path.getmtime(p)] for p in sources],
               tokenizer=kind, vocab_size=cfg.vocab_size if kind == "bpe" else 0,
               stories=[cfg.num_stories, cfg.seed, cfg.plans] if stories else None)
    meta_path = os.path.join(folder, "meta.json")
    bins = [os.path.join(folder, f"{split}.bin") for split in ("train", "val")]
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["key"] == key and all(map(os.path.exists, bins)):
            print(f"data: reusing {folder}, prepared for this data and tokenizer")
            return folder, meta
        os.remove(meta_path)  # stale: a half-done rebuild must not leave it vouching
    if stories:
        write_stories(folder, cfg.num_stories, cfg.seed, cfg.plans)
    ranges = [(p, 0, os.path.getsize(p)) for p in paths]  # bytes [lo, hi): train, val
    if len(paths) == 1:  # one file: 90% (to a line's end) trains, the rest validates
        with open(paths[0], "rb") as f:
            f.seek(int(0.9 * ranges[0][2]))
            f.readline()
            ranges = [(paths[0], 0, f.tell()), (paths[0], f.tell(), ranges[0][2])]
    with user_input():  # bpe.py's errors: GPT-2's files offline, a corrupt tok.json
        if kind == "gpt2":
            tok = Tokenizer.gpt2(cfg.gpt2_dir)
        elif kind == "byte":  # BPE with no merges: 256 bytes + <|endoftext|>
            tok = Tokenizer().train("", 257)
        elif kind == "bpe":  # merges learned now, from the start of the train split
            with open(paths[0], "rb") as f:
                text = f.read(min(ranges[0][2], BPE_TRAIN_BYTES)).decode("utf-8", "ignore")
            tok = Tokenizer().train(text, cfg.vocab_size)
        else:  # a tok.json from bpe.py
            tok = Tokenizer.load(kind)
    tok.save(os.path.join(folder, "tokenizer.json"))
    enc = tok.to_tiktoken()
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    meta = dict(key=key, dtype=dtype, vocab_size=tok.vocab_size)
    for split, (path, lo, hi), bin_path in zip(("train", "val"), ranges, bins):
        try:
            n_tokens, n_bytes = encode_split(enc, path, lo, hi, bin_path, dtype)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 ({e.reason}); convert it, e.g. "
                            f"iconv -f latin1 -t utf-8") from None
        meta[f"{split}_tokens"] = n_tokens
        meta[f"{split}_bytes"] = n_bytes
    save_json(meta_path, meta)  # written last: it vouches for the files above
    print(f"data: prepared {folder}: {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens")
    return folder, meta

# -----------------------------------------------------------------------------
# data at scale: llm.c's token shards, FineWeb's published ones or written from text

SHARD_MAGIC = 20240520  # a shard: 256 int32 (magic, version 1, token count, zeros), uint16s
SHARD_SETS = {"fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb"),  # val 0, train 1..103
              "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "edu_fineweb")}

def read_shard(path):
    """A token shard -> its ids as a read-only uint16 memmap (nothing copied), the header
    checked against the file: magic, version and the size its token count gives."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=256) if size >= 1024 else np.zeros(1)
    if header[0] != SHARD_MAGIC or header[1] != 1:
        raise UserError(f"{path} is not a version-1 token shard (magic {SHARD_MAGIC}); "
                        f"fetch it again or write it with train.py --dataset=FOLDER")
    if size != 1024 + 2 * int(header[2]):
        raise UserError(f"{path} holds {(size - 1024) // 2:,} tokens, its header says "
                        f"{int(header[2]):,}: truncated; delete it and fetch it again")
    return np.memmap(path, dtype="<u2", mode="r", offset=1024, shape=(int(header[2]),))

def write_shard(path, ids):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, 1, len(ids))
    with open(path + ".tmp", "wb") as f:
        f.write(header.tobytes() + np.asarray(ids, dtype="<u2").tobytes())
    os.replace(path + ".tmp", path)  # a shard is whole or absent

def write_shards(enc, texts, folder, shard_tokens=100_000_000):
    """.txt files -> shards in folder: every 100th document to the val shard (000000), the
    rest to train shards of shard_tokens ids (000001, ...), a progress bar over bytes."""
    total = sum(os.path.getsize(p) for p in texts)
    done = 0
    train = np.empty(shard_tokens, dtype="<u2")  # the shard being filled: 2 bytes an id
    filled = 0
    shard = 1
    val = []  # arrays of ids: a hundredth of the text
    n_docs = 0
    for path in texts:
        for docs in read_documents(path, 0, os.path.getsize(path), 1 << 24):
            for ids in enc.encode_batch(docs, allowed_special="all"):
                n_docs += 1
                if n_docs % 100 == 1:
                    val.append(np.array(ids, dtype="<u2"))
                    continue
                while ids:  # into the shard; a full one is written, and the next begun
                    take = ids[:shard_tokens - filled]
                    train[filled:filled + len(take)] = take
                    filled += len(take)
                    ids = ids[len(take):]
                    if filled == shard_tokens:
                        write_shard(os.path.join(folder, f"shard_train_{shard:06d}.bin"), train)
                        shard += 1
                        filled = 0
            done = min(total, done + (1 << 24))
            print(f"\rshards: {done / 1e6:,.0f}/{total / 1e6:,.0f} MB "
                  f"{progress_bar(done, total, 0)[:22]}", end="", flush=True)
    write_shard(os.path.join(folder, f"shard_train_{shard:06d}.bin"), train[:filled])
    write_shard(os.path.join(folder, "shard_val_000000.bin"), np.concatenate(val or [train[:0]]))
    print()

def prepare_shards(cfg, enc):
    """fineweb10B / finewebedu10B (the val shard and --shards train shards, fetched once,
    resumably), a folder of shards, or one of .txt files (made shards in data/ by the
    tiktoken encoder enc, redone when the files or the tokenizer change; enc None: only
    read) -> (train memmaps, val memmap)."""
    folder = cfg.dataset
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if cfg.dataset in SHARD_SETS:
        repo, prefix = SHARD_SETS[cfg.dataset]
        folder = os.path.join(cfg.data_dir, cfg.dataset)
        hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co")  # or a mirror
        url = f"{hub}/datasets/{repo}/resolve/main/"
        splits = [("val", 0)] + [("train", i + 1) for i in range(cfg.shards)]
        names = [f"{prefix}_{split}_{i:06d}.bin" for split, i in splits]  # these, no more
        for name in names:
            read_shard(download(url + name, os.path.join(folder, name)))
    if not any(n.endswith(".bin") for n in names):  # a user's corpus: shards written once
        texts = [os.path.join(folder, n) for n in names if n.endswith(".txt")]
        if not texts:
            raise UserError(f"{folder} holds no .bin shards and no .txt files")
        sources = texts + [cfg.tokenizer] * os.path.isfile(cfg.tokenizer)  # a tok.json
        key = dict(files=[[p, os.path.getsize(p), os.path.getmtime(p)] for p in sources],
                   tokenizer=cfg.tokenizer or "gpt2")
        folder = os.path.join(cfg.data_dir, os.path.basename(os.path.normpath(folder)) + "-shards")
        meta = os.path.join(folder, "meta.json")
        if enc and not (os.path.exists(meta) and read_json(meta) == key):
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):  # stale, or half-written by a crash: redone
                os.remove(os.path.join(folder, name))
            try:
                write_shards(enc, texts, folder)
            except UnicodeDecodeError as e:
                raise UserError(f"a .txt file in {cfg.dataset} is not UTF-8 ({e.reason}); "
                                f"convert it, e.g. iconv -f latin1 -t utf-8") from None
            save_json(meta, key)  # written last: it vouches for the shards
        names = sorted(os.listdir(folder))
    shards = {s: [read_shard(os.path.join(folder, n)) for n in names
                  if n.endswith(".bin") and f"_{s}_" in n] for s in ("train", "val")}
    if len(shards["val"]) != 1 or not shards["train"]:
        raise UserError(f"{folder} needs one *_val_*.bin shard and *_train_*.bin shards; "
                        f"it has {len(shards['val'])} and {len(shards['train'])}")
    return shards["train"], shards["val"][0]

def shard_batch(shards, batch_size, block_size, g, device):
    """Micro-batch g of the train shards read in order: B consecutive windows of T + 1
    tokens, a pure function of g (any rank, any resume); each shard's tail that fills
    no whole micro-batch is skipped, and after the last shard the first comes again."""
    span = batch_size * block_size
    per_shard = [(len(s) - 1) // span for s in shards]
    g %= sum(per_shard)
    k = 0
    while g >= per_shard[k]:
        g -= per_shard[k]
        k += 1
    buf = torch.from_numpy(shards[k][g * span:g * span + span + 1].astype(np.int64))
    x = buf[:-1].view(batch_size, block_size)
    y = buf[1:].view(batch_size, block_size)
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# batches, evaluation and samples (the learning rate schedule is gpt.get_lr)

def get_batch(data, batch_size, block_size, key, device):
    """Windows x and next tokens y, (B, T) each: a pure function of key (resume, DDP)."""
    ix = np.random.default_rng(key).integers(0, len(data) - block_size, size=batch_size)
    windows = np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64)
    xy = torch.from_numpy(windows)                                 # (B, T + 1)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)  # x, y (B, T): y is x shifted

@torch.no_grad()
def estimate_loss(model, splits, batch_size, block_size, eval_iters, device, ctx):
    # the mean loss on the same batches every time (keys (1, split, i)): comparable
    model.eval()
    out = {}
    for k, (name, data) in enumerate(splits.items()):
        total = 0.0
        for i in range(eval_iters):
            x, y = get_batch(data, batch_size, block_size, (1, k, i), device)
            with ctx:
                total += model(x, y)[1].item()
        out[name] = total / eval_iters
    model.train()
    return out

@torch.no_grad()
def sample_story(model, tok, max_new_tokens, device, ctx, seed):
    # a document after <|endoftext|>, always the same seed: progress shows, not luck
    torch.manual_seed(seed)
    model.eval()
    eot = tok.special_tokens[EOT]
    with ctx:
        ids = model.generate([[eot]], max_new_tokens, temperature=0.8, top_k=50, eot_id=eot)[0]
    model.train()
    return tok.decode([i for i in ids if i < tok.vocab_size]).strip()  # no padding rows

# -----------------------------------------------------------------------------
# HellaSwag: completion-style multiple choice (build-nanogpt's hellaswag.py)

HELLASWAG_URL = ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
                 "hellaswag_val.jsonl")  # the validation set: 10,042 examples

def read_hellaswag(path):
    """HellaSwag's JSON lines -> [{ctx, endings (4 strings), label (0-3)}, ...]; a
    malformed line is one UserError naming the file and the line."""
    examples = []
    with open(path, "rb") as f:  # bytes: json.loads decodes them (bad UTF-8: an error)
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                texts = [record["ctx"], *record["endings"]]
                good = type(record["endings"]) is list and record["label"] in range(4)
                good = good and len(texts) == 5 and all(isinstance(t, str) for t in texts)
            except (ValueError, KeyError, TypeError):  # not JSON, a key missing, not {}
                good = False
            if not good:
                raise UserError(f"{path}, line {number}: not a HellaSwag record (ctx, "
                                f"4 endings, label 0-3); delete it to fetch it again")
            examples.append({key: record[key] for key in ("ctx", "endings", "label")})
    if not examples:
        raise UserError(f"{path} holds no examples; delete it to fetch it again")
    return examples

def load_hellaswag(data_dir, n, master, ddp):
    # the first n examples ([] for 0); rank 0 downloads the file once, the others wait
    if n == 0:
        return []
    path = os.path.join(data_dir, "hellaswag", "hellaswag_val.jsonl")
    if master:
        download(HELLASWAG_URL, path)
    if ddp:
        dist.barrier()
    return read_hellaswag(path)[:n]

def hellaswag_rows(tok, example, block_size):
    """(x, y) rows of the context + " " + each ending (GPT-2's words carry their space),
    y = -100 over the context: only the ending is scored; cropped from the left."""
    context = tok.encode(example["ctx"])
    rows = []
    for ending in example["endings"]:
        ending_ids = tok.encode(" " + ending)
        ids = (context + ending_ids)[-block_size - 1:]
        targets = ([-100] * len(context) + ending_ids)[-block_size - 1:]
        rows.append((ids[:-1], targets[1:]))
    return rows

def completion_losses(logits, y):
    """Each row's summed and mean loss over its scored tokens (y != -100), (B,) each: the
    lowest sum is acc's pick; the lowest mean (long endings not penalized) acc_norm's."""
    # logits (B, T, V) -> (B, V, T), as cross_entropy wants; the losses (B, T), 0 at -100
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), y,
                                               reduction="none")
    total = losses.sum(1)
    return total, total / (y != -100).sum(1)

@torch.no_grad()
def score_hellaswag(model, tok, examples, device, ctx, rank=0, world=1):
    """{acc, acc_norm, n} over examples: this process scores examples rank, rank + world,
    ...; with world > 1 the right picks are then summed over the processes. Every process
    runs as many forwards (FSDP's run together): past the end, example 0 again, uncounted."""
    model.eval()
    right = torch.zeros(2, device=device)  # by the summed loss, by the mean loss
    n = len(examples)
    for i in range(rank, -(-n // world) * world, world):  # ceil(n / world) each
        example = examples[i % n]
        rows = hellaswag_rows(tok, example, model.config.block_size)
        x, y = collate(rows, 0, device)  # (4, T) each: padding is not scored (y = -100)
        with ctx:
            logits = model(x)[0]                                   # (4, T, V)
        total, mean = completion_losses(logits, y)
        picks = torch.stack([total.argmin(), mean.argmin()])
        right += (picks == example["label"]) * (i < n)
    if world > 1:
        dist.all_reduce(right)
    model.train()
    return dict(acc=right[0].item() / n, acc_norm=right[1].item() / n, n=n)

# -----------------------------------------------------------------------------
# --bench: tokens/s and MFU of one model in each precision, eager and compiled

def measure_matmul_flops(device, dtype):
    # this machine's practical peak (a CPU has no datasheet one): a big matmul, best of 8
    a = torch.randn(2048, 2048, device=device, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(8):
        t0 = time.time()
        (a @ a)[0, 0].item()
        best = min(best, time.time() - t0)
    return 2 * 2048 ** 3 / best

def bench(cfg, device, low_dtype):
    # the shard loader alone, on 16M tokens (GPT-2 124M on 8 GPUs needs about 1M tokens/s)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench_train_000001.bin")
        write_shard(path, np.random.default_rng(0).integers(0, 50257, 1 << 24))
        t0 = time.time()
        for g in range(256):  # each micro-batch once: 256 x 16 x 4096 = 16M tokens
            shard_batch([read_shard(path)], 16, 4096, g, device)
        loader = (1 << 24) / (time.time() - t0)
    print(f"shard loader: {loader / 1e6:,.0f}M tokens/s to {device} (16 x 4096 a batch)")
    # a fixed GPT (6 layers, 384 wide, 256 tokens) trains on random ids in each mode
    print("| 6 layers, 384 wide, 8 x 256 tokens | tokens/s | MFU | peak TFLOP/s | "
          "speedup |\n|---|---|---|---|---|")
    rows = {}
    kind = device.split(":")[0]
    x = torch.randint(0, 2048, (8, 256), device=device)
    config = GPTConfig(vocab_size=2048, block_size=256, n_layer=6, n_head=6, n_embd=384,
                       bias=False)
    for compiled in (False, True):
        for dtype in dict.fromkeys(("float32", low_dtype)):
            name = f"{dtype} {'+ compile' if compiled else 'eager'}"
            model = GPT(config).to(device)
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), kind)
            step_model = torch.compile(model) if compiled else model
            times = []
            try:
                for _ in range(8):  # 2 warmup steps (compiling happens there), then 6
                    t0 = time.time()
                    low = dtype != "float32"
                    with torch.autocast(kind, getattr(torch, dtype), enabled=low):
                        loss = step_model(x, x)[1]
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    loss.item()  # waits for a GPU
                    times.append(time.time() - t0)
            except Exception as e:  # compile fails in many ways (no C++ compiler, ...)
                print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                continue
            dt = min(times[2:])  # the fastest step: least disturbed by other work
            rows[name] = 8 * 256 / dt
            peak = cfg.peak_flops or measure_matmul_flops(device, dtype)
            mfu = 100 * model.estimate_mfu(8 * 256, dt, peak)
            print(f"| {name} | {rows[name]:,.0f} | {mfu:.1f}% | {peak / 1e12:.2f} | "
                  f"{rows[name] / rows['float32 eager']:.2f}x |", flush=True)
    return dict(rows, loader=loader)

# -----------------------------------------------------------------------------
# helpers of main: the checks of the flags, the model's flags, the resume command, and
# FSDP's state in an ordinary checkpoint

# what --init_from=resume takes from the checkpoint (the data, its order, the batches)
RESUMED_FIELDS = ("dataset", "shards", "num_stories", "plans", "tokenizer", "vocab_size",
                  "seed", "block_size", "batch_size", "grad_accum")

def check_config(cfg, kind, world, ddp):
    """Every check of the flags, before any data or model work: one UserError."""
    require_positive(cfg, "eval_interval", "eval_iters", "log_interval", "batch_size",
                     "grad_accum", "num_stories")
    own = cfg.init_from in ("scratch", "resume")  # else GPT-2: its tokenizer and context
    tok_json = kind.endswith(".json") and os.path.isfile(kind)
    sharded = cfg.dataset in SHARD_SETS or os.path.isdir(cfg.dataset)
    # a .safetensors file: GPT-2's only (train.py's data is in GPT-2's ids), by its config
    config = os.path.join(os.path.dirname(cfg.init_from), "config.json")
    gpt2_file = os.path.isfile(cfg.init_from) and os.path.isfile(config)
    gpt2_file = gpt2_file and read_json(config).get("model_type") == "gpt2"
    rules = [(name, getattr(cfg, name) >= 0, "0 or more") for name in ("max_iters",
             "warmup_iters", "learning_rate", "weight_decay", "grad_clip", "seed")]
    rules += [
        ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
        ("plans", 0 <= cfg.plans <= 1, "in [0, 1]"),
        ("block_size", own or cfg.block_size <= 1024, "at most GPT-2's 1024"),
        ("min_lr", 0 <= cfg.min_lr <= cfg.learning_rate,
         f"0 to --learning_rate={cfg.learning_rate}, e.g. a tenth"),
        ("grad_accum", cfg.grad_accum % world == 0, f"a multiple of {world} processes"),
        ("bench", not (ddp and cfg.bench), "False under torchrun: run it with python"),
        ("fsdp", ddp or not cfg.fsdp, "False without torchrun (torchrun --standalone "
         "--nproc_per_node=N train.py --fsdp)"),
        ("eval_hellaswag", cfg.eval_hellaswag >= 0, "0 (off) or more (all: 10042)"),
        ("eval_only", not cfg.eval_only or cfg.init_from != "scratch",
         "False from scratch: evaluate a model (--init_from=resume, gpt2, ...)"),
        ("tokenizer", kind == "gpt2" or (own and (kind in ("bpe", "byte") or tok_json)),
         "bpe, gpt2, byte or a tok.json from bpe.py (from GPT-2: gpt2)"),
        ("vocab_size", kind != "bpe" or 257 <= cfg.vocab_size <= 1 << 17,
         "257 (bytes + <|endoftext|>) to 131072"),
        ("init_from", own or cfg.init_from in GPT2_NAMES or gpt2_file, "scratch, resume, gpt2, "
         "gpt2-medium, ... or a GPT-2 .safetensors file beside its config.json"),
        ("dataset", cfg.dataset in ("stories", *DATASETS, *SHARD_SETS)
         or os.path.exists(cfg.dataset), "stories, tinystories, shakespeare_char, "
         "fineweb10B, finewebedu10B, an existing UTF-8 text file, or a folder of token "
         "shards or of .txt files"),
        ("tokenizer", not sharded or kind == "gpt2" or tok_json,
         "gpt2 or a tok.json for token shards (GPT-2's ids in FineWeb's)"),
        ("shards", cfg.shards >= 1, "at least 1")]
    for name, ok, need in rules:
        if not ok:
            raise UserError(f"--{name}={getattr(cfg, name)!r}: it must be {need}")
    with user_input():  # the model's shape, e.g. n_embd divisible by n_head
        GPTConfig(**model_args(cfg))
    if cfg.init_from != "resume" and not (cfg.bench or cfg.eval_only):
        refuse_overwrite(os.path.join(cfg.out_dir, "ckpt.pt"), cfg.overwrite)

def model_args(cfg):
    # the GPTConfig fields that train.py has flags for (vocab_size: the tokenizer's)
    names = [f.name for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)]
    return {name: getattr(cfg, name) for name in names}

def resume_command(cfg, world):
    # what to type to continue this run: its flags that are not defaults (quoted: a path
    # may hold spaces), except those the checkpoint keeps
    launcher = "python train.py"
    if world > 1:
        launcher = f"torchrun --standalone --nproc_per_node={world} train.py"
    skip = (*RESUMED_FIELDS, "init_from", "out_dir", "overwrite")
    flags = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()
             if k not in skip and v != getattr(TrainConfig, k)]
    flags = ["--init_from=resume", f"--out_dir={cfg.out_dir}", *flags]
    return " ".join([launcher, *map(shlex.quote, flags)])

def gather_state(model, optimizer, master):
    """FSDP's shards -> (weights, AdamW's state) as in an ordinary checkpoint, keyed as
    without FSDP: whole tensors on rank 0's CPU (the other ranks get None). Every rank
    calls it: full_tensor() all-gathers one tensor from every rank's shard."""
    def whole(t):
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.cpu() if master else None
    weights = {name: whole(t) for name, t in model.state_dict().items()}
    opt_state = optimizer.state_dict()  # its tensors are the optimizer's own: copy, not edit
    opt_state["state"] = {k: {name: whole(t) for name, t in state.items()}
                          for k, state in opt_state["state"].items()}
    return weights, opt_state

def shard_optimizer_state(optimizer, opt_state):
    # the reverse, on every rank: each whole tensor of a checkpoint -> this rank's shard of
    # it, split as its parameter is (AdamW's step counts stay whole)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for k, state in opt_state["state"].items():
        p = params[k]
        for name, t in state.items():
            if name != "step":
                state[name] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
    optimizer.load_state_dict(opt_state)

# -----------------------------------------------------------------------------
# the run: setup, data, model, optimizer, the loop, cleanup

def main(cfg):
    # --- setup: processes (torchrun sets RANK...), device, precision, and every check
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    device = pick_device(cfg.device)
    device_type = device.split(":")[0]
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    best_path = os.path.join(cfg.out_dir, "best.pt")
    if cfg.init_from == "resume":  # the data and its order are the run's own
        raw_model, ckpt = load_checkpoint(ckpt_path, verbose=master)  # on the cpu
        cfg = dataclasses.replace(cfg, **{k: ckpt["train_config"][k] for k in RESUMED_FIELDS})
    sharded = cfg.dataset in SHARD_SETS or os.path.isdir(cfg.dataset)
    kind = cfg.tokenizer
    if not kind:
        kind = "byte" if cfg.dataset == "shakespeare_char" else "bpe"
        if cfg.init_from not in ("scratch", "resume") or sharded:
            kind = "gpt2"
    check_config(cfg, kind, world, ddp)
    dtype, reason, ctx = setup_precision(device, cfg.dtype)
    if cfg.fsdp and dtype == "float16":  # GradScaler's skipped steps are decided per rank
        raise UserError("--fsdp runs in bfloat16 or float32, not float16 (this GPU has no "
                        "bf16): pass --dtype=float32")
    if ddp:
        if device_type == "cuda":
            device = f"cuda:{local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if master:
        print(f"config:\n{format_config(cfg)}\ndevice: {device} x {world} process(es); "
              f"dtype: {dtype} ({reason})")
    if cfg.bench:
        return bench(cfg, device, dtype)  # and float32: no emulated bfloat16 (slow, no lesson)
    # TF32 matmuls on CUDA: training needs no full float32 accuracy (a no-op elsewhere)
    torch.backends.cuda.matmul.allow_tf32 = device_type == "cuda"
    torch.backends.cudnn.allow_tf32 = device_type == "cuda"

    # --- data: rank 0 prepares it (and fetches GPT-2) while the other ranks wait
    gpt2 = master and cfg.init_from not in ("scratch", "resume")
    pretrained = from_pretrained(cfg.init_from, cfg.data_dir) if gpt2 else None
    shards = None  # the train shards, read in order (the other datasets: random windows)
    if sharded:  # rank 0 fetches or writes the shards; then every rank maps them
        with user_input():
            tok = Tokenizer.gpt2(cfg.gpt2_dir) if kind == "gpt2" else Tokenizer.load(kind)
        if master:
            prepare_shards(cfg, tok.to_tiktoken())
        if ddp:
            dist.barrier()
        shards, val = prepare_shards(cfg, None)
        data = {"train": shards[0], "val": val}  # evaluation: random windows of each
        meta = {"train_tokens": sum(map(len, shards)), "val_tokens": len(val)}
        if not sum((len(s) - 1) // (cfg.batch_size * cfg.block_size) for s in shards):
            meta["train_tokens"] = 0  # no shard holds a whole micro-batch
    else:
        shared = [prepare_data(cfg, kind) if master else None]
        if ddp:
            dist.broadcast_object_list(shared)
        folder, meta = shared[0]
        tok = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    if min(meta["train_tokens"], meta["val_tokens"]) <= cfg.block_size:
        raise UserError(f"--block_size={cfg.block_size} needs more data than "
                        f"{meta['train_tokens']} train and {meta['val_tokens']} val "
                        f"tokens: a larger dataset or a smaller --block_size")
    if not sharded:
        data = {s: np.memmap(os.path.join(folder, f"{s}.bin"), meta["dtype"], "r")
                for s in ("train", "val")}
    saved_config = dataclasses.asdict(dataclasses.replace(cfg, tokenizer=kind))
    common = dict(tokenizer=tok.to_dict(), train_config=saved_config)
    hellaswag = load_hellaswag(cfg.data_dir, cfg.eval_hellaswag, master, ddp)  # [] if 0

    # --- model: from scratch, from our last checkpoint, or from OpenAI's GPT-2
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP copies rank 0's)
    start = 0
    best_val = float("inf")
    val_loss = float("nan")
    if cfg.init_from == "resume":
        start = ckpt["step"]
        best_val = ckpt["best_val_loss"]
    elif cfg.init_from == "scratch":
        vocab = tok.vocab_size  # the rows past it are never a target: their logits sink
        if kind == "gpt2":
            vocab = max(vocab, cfg.vocab_size)
        raw_model = GPT(GPTConfig(**{**model_args(cfg), "vocab_size": vocab}))
    else:
        raw_model = pretrained or from_pretrained(cfg.init_from, cfg.data_dir)
    raw_model = raw_model.to(device)

    # --- memory: recompute each block in the backward pass instead of keeping its insides
    # (--activation_checkpointing: about 1/3 more compute); FSDP (--fsdp): each rank keeps
    # 1/world of every weight, gradient and AdamW moment, and a block's forward and
    # backward all-gather its weights first and free them after (each rank built the whole
    # model first: fine up to GPT-2 XL's 6 GB; far larger ones start on the meta device)
    for block in raw_model.transformer.h:
        if cfg.activation_checkpointing:  # autograd saves the block's input, not its insides
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if cfg.fsdp:
        # bfloat16: all-gather bf16 copies (half the bytes), sum the gradients in float32;
        # the shards that AdamW updates stay float32, and autocast runs as without FSDP
        mp = MixedPrecisionPolicy()
        if dtype == "bfloat16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # the ranks, on this run's device (the default is a GPU's even under --device=cpu)
        mesh = init_device_mesh(device_type, (world,))
        for block in raw_model.transformer.h:
            if cfg.compile:  # block by block: FSDP's hooks between the blocks stay eager
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(raw_model, mesh=mesh, mp_policy=mp)  # the rest: embeddings, ln_f, lm_head
        register_fsdp_forward_method(raw_model, "forward_cached")  # generate's forward

    # --- optimizer, loss scaling, compile, DDP
    # (under FSDP it updates the shards, DTensors: fused AdamW and clip_grad_norm_ take them)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                               (cfg.beta1, cfg.beta2), device_type)
    # float16 gradients underflow: scale the loss up, then the gradients back down
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    if cfg.init_from == "resume":
        if cfg.fsdp:  # each rank takes its shards of AdamW's moments
            shard_optimizer_state(optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        # the scale, if both runs use float16 (a disabled scaler saves {})
        scaler.load_state_dict(ckpt["scaler"] or scaler.state_dict())
    model = raw_model
    if cfg.compile:  # compiling fails at the first call (no C++ compiler, ...)
        if not cfg.fsdp:  # (FSDP's blocks were compiled one by one above)
            model = torch.compile(raw_model)
        x, y = get_batch(data["val"], cfg.batch_size, cfg.block_size, (2,), device)
        try:
            with ctx:
                model(x, y)
        except Exception as e:
            raise UserError(f"--compile failed on {device}: {repr(e)[:200]}; "
                            f"drop --compile") from None
    # DDP averages the gradients across processes in backward; raw_model is saved
    if ddp and not cfg.fsdp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    accum = cfg.grad_accum // world
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters >= 0 else cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    # MFU against an A100's bf16 peak on CUDA (--peak_flops for other GPUs); a CPU has no
    # datasheet peak, so there the log shows TFLOP/s
    peak = cfg.peak_flops or (312e12 if device_type == "cuda" else 0.0)
    if master:
        mfu = f"; MFU against {peak / 1e12:.0f} TFLOP/s per device" if peak else ""
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters; "
              f"{tokens_per_step:,} tokens per step = {cfg.batch_size} sequences x "
              f"{cfg.block_size} tokens x {accum} micro-steps x {world} processes{mfu}")

    # --- the loop: evaluate and save every eval_interval steps, log every log_interval
    losses = []
    score = None  # the last HellaSwag score, {acc, acc_norm, n}
    step = start
    t_start = time.time()
    try:  # the finally tears the process group down even when a rank fails
        while True:
            # >=: resuming a finished run just evaluates; --eval_only: evaluate, then stop
            last = step >= cfg.max_iters or cfg.eval_only
            evaluating = step % cfg.eval_interval == 0 or last
            if evaluating and hellaswag:  # every process scores its share
                score = score_hellaswag(raw_model, tok, hellaswag, device, ctx, rank, world)
            if (master or cfg.fsdp) and evaluating:  # FSDP: every rank, each holds shards
                ev = estimate_loss(raw_model, data, cfg.batch_size, cfg.block_size,
                                   cfg.eval_iters, device, ctx)
                # bits per byte = bits per token x tokens per byte: any tokenizer's
                bpb = ""
                if "val_bytes" in meta:  # shards do not say how many bytes they came from
                    bpb = [ev[s] / math.log(2) * meta[f"{s}_tokens"] / meta[f"{s}_bytes"]
                           for s in ("train", "val")]
                    bpb = f" (bits per byte: train {bpb[0]:.3f}, val {bpb[1]:.3f})"
                if master:
                    print(f"step {step}: train loss {ev['train']:.4f}, val loss "
                          f"{ev['val']:.4f}{bpb}")
                if score and master:
                    print(f"step {step}: HellaSwag acc_norm {score['acc_norm']:.4f}, "
                          f"acc {score['acc']:.4f} ({score['n']} examples)")
                story = sample_story(raw_model, tok, cfg.sample_tokens, device, ctx,
                                     cfg.seed)
                val_loss = ev["val"]
                if master and not last:
                    print(f"sample: {story}\n")
                if cfg.eval_only:  # nothing was trained: nothing to save
                    break
                if cfg.fsdp:  # whole tensors onto rank 0's CPU: every rank sends its shards
                    weights, opt_state = gather_state(raw_model, optimizer, master)
                else:
                    weights = raw_model.state_dict()
                    opt_state = optimizer.state_dict()
                if master and val_loss < best_val:
                    best_val = val_loss
                    save_checkpoint(best_path, raw_model, weights, step=step,
                                    val_loss=val_loss, hellaswag=score, **common)
                if master:
                    save_checkpoint(ckpt_path, raw_model, weights, step=step,
                                    val_loss=val_loss, best_val_loss=best_val,
                                    optimizer=opt_state, scaler=scaler.state_dict(),
                                    hellaswag=score, **common)
            if last:
                break
            t0 = time.time()
            lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters,
                        decay_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # dropout is a function of (seed, step, rank) too: a resume needs no RNG state
            torch.manual_seed(cfg.seed + 1_000_003 * step + rank)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                # micro-batch m * world + r: the same global batch for any world size
                g = micro * world + rank
                if shards:  # in order: micro-batch g of the whole run
                    g += step * cfg.grad_accum
                    x, y = shard_batch(shards, cfg.batch_size, cfg.block_size, g, device)
                else:
                    x, y = get_batch(data["train"], cfg.batch_size, cfg.block_size,
                                     (0, cfg.seed, step, g), device)
                # no_sync: only the last micro-step all-reduces the gradients (FSDP: sums
                # and scatters them; until then each rank keeps its whole gradients)
                sync = contextlib.nullcontext()
                if cfg.fsdp:
                    model.set_requires_gradient_sync(micro == accum - 1)
                elif ddp and micro < accum - 1:
                    sync = model.no_sync()
                with sync:
                    with ctx:
                        loss = model(x, y)[1] / accum  # the mean over micro-batches
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if ddp:  # log the mean over the global batch (gloo has no AVG: SUM, divide)
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_value = loss_sum.item()  # waits for the device: honest timings below
            if not math.isfinite(loss_value):
                raise UserError(f"the loss is {loss_value} at step {step}: training "
                                f"diverged; {ckpt_path} keeps the last good state: "
                                f"lower --learning_rate, continue with --init_from=resume")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not scaled ones
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            step += 1  # at once: from here on, a Ctrl-C saves these weights as `step`
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            if master and (step - 1) % cfg.log_interval == 0:
                dt = time.time() - t0
                # the ETA at the average pace so far (evaluations included)
                pace = (time.time() - t_start) / (step - start)  # seconds per step
                flops = raw_model.flops_per_token() * tokens_per_step / dt
                speed = f"{flops / 1e12:.2f} TFLOP/s"
                if peak:
                    speed = f"mfu {100 * flops / (peak * world):.1f}%"
                print(f"step {step - 1:5d}/{cfg.max_iters} | loss {loss_value:.4f} | "
                      f"lr {lr:.2e} | {1000 * dt:.0f} ms | "
                      f"{tokens_per_step / dt:,.0f} tok/s | {speed} | "
                      f"{progress_bar(step, cfg.max_iters, pace)}", flush=True)
        if ddp:  # no rank tears the group down while another still talks to it
            dist.barrier()
    except KeyboardInterrupt:  # (FSDP's ranks stop at different places: none can gather)
        if master and not (cfg.eval_only or cfg.fsdp):  # the weights after `step` steps
            save_checkpoint(ckpt_path, raw_model, step=step, val_loss=val_loss,
                            best_val_loss=best_val, optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), hellaswag=score, **common)
            print(f"\ninterrupted at step {step}: saved {ckpt_path}; continue with:\n"
                  f"  {resume_command(cfg, world)}")
        raise SystemExit(130)  # a shell's `&&` must not go on to the next step
    finally:
        if ddp:  # free the DDP wrapper (a reference cycle: gc) first: it holds the group
            del model
            gc.collect()
            dist.destroy_process_group()
    if master and not cfg.eval_only:
        print(f"done: {step - start} steps in {time.time() - t_start:.0f} s; val loss "
              f"{val_loss:.4f} (best {best_val:.4f}); saved {ckpt_path} and "
              f"{best_path}\n\n{story}")
    return dict(losses=losses, val_loss=val_loss, best_val_loss=best_val, step=step,
                ckpt_path=ckpt_path, hellaswag=score)

# -----------------------------------------------------------------------------
# appendix: the synthetic children's stories of --dataset=stories (the offline default),
# and instruct.json: conversations with a storyteller, each request in a user's words

def pretraining_doc(rng, story, plans):
    """A story, or (a share `plans`) a document that teaches a skill, half each: after its
    plan (words, summary) as in TinyStories-Instruct, or a story, a change in its plainest
    words and the changed story. Finetuning then maps a user's words onto these skills."""
    if rng.random() >= plans:
        return render(story)
    if rng.random() < 0.5:
        return (f"Words: {', '.join(story['words'])}\nSummary: {story['summary']}\n"
                f"Story:\n{render(story)}")
    kind = rng.choice(list(REFINE))
    request, new, _ = refine(rng, story, kind, REFINE[kind][:1])
    return f"Story:\n{render(story)}\nChange: {request}\nStory:\n{render(new, kind == 'continue')}"

def write_stories(folder, n, seed, plans):
    # train.txt, val.txt: n documents (90/10); instruct.json: n // 2 fresh conversations
    stories = generate_stories(n + n // 2, seed)
    rng = random.Random(seed)
    docs = [pretraining_doc(rng, story, plans) for story in stories[:n]]
    n_train = n - n // 10
    for name, split in (("train.txt", docs[:n_train]), ("val.txt", docs[n_train:])):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write("".join(f"{doc}\n{EOT}\n" for doc in split))  # as TinyStories does
    fresh = stories[n:]
    test = len(fresh) - min(400, len(fresh) // 4)  # the last ones: unseen phrasings
    records = [conversation(rng, story, KINDS[k % len(KINDS)] if k >= test else None,
                            k >= test) for k, story in enumerate(fresh)]
    save_json(os.path.join(folder, "instruct.json"), records)

# small closed word banks keep the language learnable by a tiny GPT in minutes, while all
# the choices below (far beyond 10^9) leave room for as many distinct stories as we need;
# the names are bpe.py's, whose checkers must recognise every name a story may hold
ANIMALS = ("cat dog bunny bear bird fox duck frog mouse puppy kitten lamb pig squirrel turtle owl "
           "lion tiger elephant monkey penguin dragon unicorn dinosaur horse goat hen deer").split()
TRAITS = "little kind happy curious friendly sweet playful brave shy clever".split()
TOYS = ("ball kite doll hat boat book drum truck balloon blanket scarf train robot bike teddy "
        "puzzle car whistle").split()
COLORS = "red blue green yellow pink purple white brown orange".split()
PLACES = "park garden forest yard meadow playground field village river school".split()
DAYS = ["One day", "One sunny morning", "One afternoon", "One morning", "One windy day"]
SPOTS = ["under the big tree", "behind the bench", "near the pond", "in the tall grass",
         "under a bush", "by the fence", "next to the swings", "inside an old box"]
FRAGILE = "vase cup plate bowl lamp jar".split()
GIFTS = ["card with a big heart on it", "picture of a rainbow", "necklace of flowers",
         "little cake", "paper crown", "funny song"]
# tuples keep one situation consistent: (what is feared, what the brave hero then did)
FEARS = [("the dark", "slept with the light off"), ("the big slide", "went down the slide"),
         ("the deep water", "swam in the deep water"), ("the tall tree", "climbed the tall tree"),
         ("the thunder", "watched the storm outside"), ("the big dog", "petted the big dog")]
# (animal, its trouble, how the hero helped)
TROUBLES = [("bird", "had a hurt wing", "made a soft bed of leaves for it"),
            ("kitten", "was stuck up in a tall tree", "climbed up slowly and carried it down"),
            ("duck", "could not find its mom", "walked with it to the pond to find its mom"),
            ("puppy", "was cold and hungry", "gave it some bread and a warm blanket"),
            ("bunny", "was stuck under a big log", "pushed and pushed until the log rolled away"),
            ("turtle", "was stuck on its back", "gently turned it over")]
# (place, what you see there, what you do there)
TRIPS = [("beach", "big waves and little crabs", "built a big sand castle"),
         ("farm", "cows, pigs and hens", "fed the baby goats"),
         ("zoo", "tall giraffes and funny monkeys", "watched the lions sleep in the sun"),
         ("forest", "tall trees and a little stream", "found a shiny stone by the water"),
         ("lake", "white ducks and tiny fish", "threw stones into the water"),
         ("hill", "green grass and yellow flowers", "had a picnic on the grass")]
# the instruct words are drawn from these, keeping only words the story really contains
NOUNS = TOYS + PLACES + ANIMALS + FRAGILE + [trip[0] for trip in TRIPS] + (
    "turtle tree friend card picture cake crown necklace rainbow pieces truth gift birthday dark "
    "slide water thunder dog hand hug stones grass flowers log wing leaves window sun").split()
VERBS = ("played looked found lost shared helped hugged smiled cried laughed jumped ran gave made "
         "saw learned loved climbed walked broke shouted threw held thought pushed carried swam "
         "petted heard worked cleaned dreamed packed took").split()
ADJECTIVES = list(dict.fromkeys(COLORS + TRAITS + (
    "sad scared proud tired big soft tall brave lonely sorry new shiny special warm").split()))

# every story starts with one of these; {kind} is girl, boy or an animal
OPENING = ["Once upon a time, there was a {trait} {kind} named {name}.",
           "There once was a {trait} {kind} called {name}.",
           "Once upon a time, in a small town, there lived a {trait} {kind} named {name}."]

# the arcs: each starts with "kind = summary" (the kind is the label finetune.py
# --task=classify learns), then one sentence slot per line, its alternatives split by "|"
# (an empty one makes the slot optional); "/" starts a new paragraph
ARCS = """
lost toy = {name} lost {his} {color} {toy}, and {his} friend {fname} helped {him} find it.
{He} loved {his} {color} {toy} more than anything. | {He} took {his} {color} {toy} everywhere.
{Day}, {name} went to the {place} to play with {his} {toy}. | {Day}, {name} went to the {place}.
When it was time to go home, {his} {toy} was gone! | Then {he} looked around. The {toy} was gone!
{name} was very sad and began to cry. | {name} felt sad. {He} did not know what to do.
/{His} friend {fname} saw {him} and asked, "Why are you sad?" | {His} friend {fname} came to help.
"I lost my {color} {toy}," said {name}. | "My {toy} is lost!" cried {name}.
"Let's look for it together," said {fname}. | "Don't worry. I will help you look," said {fname}.
They looked {spot1}. Then they looked {spot2}.
At last, {fname} saw something {color} {spot3}. "Here it is!" {fhe} shouted.
/{name} hugged {his} {toy}. "Thank you, {fname}! You are a good friend." | "Thank you!" said {name}.
From that day on, {name} always kept {his} {toy} close. | Friends always help each other.
sharing = {name} did not want to share {his} {toy} with {fname}, but then {he} shared it.
{He} had a new {color} {toy}. | {His} {parent} gave {him} a shiny {color} {toy}.
{Day}, {name} took the {toy} to the {place}. | {Day}, {name} played with the {toy} in the {place}.
{His} friend {fname} came over. "Can I play too?" asked {fname}. | {fname} asked, "Can I try?"
"No, it is mine!" said {name}, and {he} held the {toy} tight. | "No, it is my {toy}," said {name}.
{fname} looked sad and walked away. | {fname} felt sad and sat down alone.
/{name} played alone, but it was not much fun. | Soon {name} felt lonely. Playing alone was boring.
{He} ran to {fname} and said, "I am sorry. Let's play together." | {He} said, "Sorry, {fname}."
They took turns and played together all day. | They shared the {toy} and had lots of fun.
{name} learned that sharing makes everyone happy. | Sharing was more fun than playing alone.
fear = {name} was scared of {fear}, but {his} {parent} helped, and {he} {feat}.
{name} was afraid of {fear}. | But {name} had one problem. {He} was scared of {fear}.
{Day}, {his} {parent} said, "Let's try it today." | {Day}, {his} {parent} wanted {him} to try.
"I can't. I am too scared," said {name}. | {name} shook {his} head. "What if something bad happens?"
/{His} {parent} held {his} hand. "Don't be scared. I am here." | {His} {parent} said, "You can!"
{name} took a deep breath and counted to three. | {name} closed {his} eyes and smiled.
Then {he} {feat}! | And then {he} {feat}!
It was not scary at all. It was fun! | {He} was not scared anymore. {He} felt so proud.
{name} learned that being brave means trying when you are scared. | {His} {parent} hugged {him}.
animal rescue = {name} found a little {animal} that {trouble}, and {he} helped it.
{Day}, {name} was walking in the {place}. | {Day}, {name} went to the {place} with {his} {toy}.
{He} heard a small sound {spot1}. | Suddenly, {he} saw something move {spot1}.
It was a little {animal}. The {animal} {trouble}. | There was a little {animal}. It {trouble}.
"Don't worry, little {animal}. I will help you," said {name}. | The poor {animal} looked scared.
/So {name} {fix}. | {name} was very careful. {He} {fix}.
Soon the {animal} felt much better. | After a while, the {animal} was happy again.
"Thank you, {name}! You are very kind," said the {animal}. | The {animal} smiled at {name}.
From then on, the {animal} and {name} were best friends. | {name} felt warm and happy inside.
accident = {name} broke {his} {parent}'s {fragile} by accident, but {he} told the truth.
{He} liked to play with {his} {toy} in the house. | {He} loved to run and jump in the house.
{Day}, {name} threw {his} {color} {toy} high in the air. | {Day}, {name} ran fast around the table.
Crash! {He} hit {his} {parent}'s {fragile}, and it broke. | Oh no! {His} {parent}'s {fragile} broke.
/{name} felt scared. {He} wanted to hide. | {name} thought about hiding the pieces under the bed.
But {he} knew that hiding was wrong. | But then {he} thought about how {his} {parent} would feel.
{He} went to {his} {parent} and said, "I am sorry, {Parent}. I broke your {fragile}."
{His} {parent} hugged {him}. "Thank you for telling me the truth." | {His} {parent} was not mad.
Together they cleaned up the pieces. | {name} helped {his} {parent} clean up the pieces. |
{name} learned that it is best to tell the truth. | From then on, {name} played outside.
gift = {name} made a {gift} for {fname}'s birthday, and {fname} loved it.
{Day}, {name} remembered it was almost {fname}'s birthday. | {His} friend {fname} was turning five.
{name} wanted to give {fname} a special gift. | {name} wanted to make {fname} a surprise.
{He} thought and thought. Then {he} had an idea. | "I know! I will make a {gift}," said {name}.
{He} made a {gift}. It took all day. | {His} {parent} helped {him} make a {gift}.
/On the big day, {name} gave the surprise to {fname}. | At the party, {name} gave {fname} the gift.
{fname} smiled. "Wow! Did you make this for me?" | {fname}'s eyes got big. "I love it!" {fhe} said.
"Yes, I made it just for you," said {name}. | {fname} gave {name} a big hug.
Giving a gift made {name} just as happy as getting one. | The best gifts are made with love.
trip = {name} went to the {trip} with {his} {parent}, saw {sights}, and {activity}.
{Day}, {his} {parent} said, "Let's go to the {trip}!" | {Day}, {name} and {his} {parent} went out.
{name} was so excited that {he} jumped up and down. | {name} packed {his} {toy} and a snack.
The sun was warm and the sky was blue. | It was a cool day with a soft wind. |
/At the {trip}, {name} saw {sights}. | When they got to the {trip}, {name} saw {sights}.
"Look, {Parent}! Look!" said {name}. | "Wow!" said {name}. "This is the best day ever!"
Then {name} {activity}. | After lunch, {name} and {his} {parent} {activity}.
At the end of the day, {name} was tired but happy. | At home, {name} was tired but happy.
That night, {name} dreamed about the {trip}. |
"""

def compile_arcs(text):
    # the arcs as (kind, summary, slots): a slot lists alternatives, None is a paragraph
    arcs = []
    for line in text.strip().split("\n"):
        if " = " in line:  # "kind = summary" starts an arc
            kind, summary = line.split(" = ")
            slots = [OPENING]
            arcs.append((kind, summary, slots))
            continue
        if line.startswith("/"):
            slots.append(None)
        slots.append([part.strip() for part in line.lstrip("/").split("|")])
    return arcs

COMPILED_ARCS = compile_arcs(ARCS)
# per arc: its sad ending (for "give it a sad ending"; "happy" then restores its own), its
# title, and what a request may say it is about, after the hero ("... named Max who ...")
EXTRAS = {label: dict(zip(("sad", "title", "topic"), parts.split(" | "))) for label, parts in (
    line.split(": ", 1) for line in """
lost toy: They looked and looked, but the {toy} was gone. {name} walked home alone and cried. {He} never saw {his} {toy} again. | {name} and the lost {toy} | who loses a {toy}
sharing: {name} did not say sorry, and {fname} went home. {name} sat alone with {his} {toy}. {He} felt sad and lonely. | {name} learns to share | who learns to share
fear: {name} cried and ran home. {He} was still scared of {fear}. That night, {he} felt sad and alone. | {name} is brave | who is scared of {fear}
animal rescue: {name} tried to help, but the {animal} ran away. {name} never saw it again. {He} went home and cried. | {name} and the little {animal} | who helps a {animal}
accident: {name} hid the pieces and said nothing. {His} {parent} found them and was very sad. {name} cried alone in {his} room. | the broken {fragile} | who breaks a {fragile}
gift: But the {gift} broke on the way to the party. {name} had no gift for {fname}. {He} sat alone and cried. | a gift for {fname} | who makes a gift for a friend
trip: But when they got to the {trip}, it began to rain. They had to go home at once. {name} was sad and cried all the way home. | {name} goes to the {trip} | who goes to the {trip}
""".strip().split("\n"))}
NEXT = "The next day, {name} and {fname} went to the {place} together. They played until the sun went down. It was another happy day.|That night, {name} told {his} {parent} all about it. {His} {parent} smiled and gave {him} a big hug.|After that, {name} went to the {place} every day. {He} always took {his} {toy}, and {he} made many new friends.|That night, {name} could not sleep. {He} thought about the day and smiled. Then {he} closed {his} eyes and dreamed.".split("|")
# "add the word X": a sentence that holds X, at the end of the first paragraph
ADDED = "rainbow butterfly cookie snail cloud bee feather shell leaf star candle pencil spoon basket carrot banana flower rock stick button pumpkin marble ribbon sandwich bucket ladder mitten cupcake lemon pillow rocket sock wagon cherry crayon kettle lantern map nest pebble pie puppet quilt sled snowman sunflower tent tomato tractor wand wheel worm cactus coin donut parrot violin guitar hammer key mushroom peach pear popcorn radio rope ruler scooter shovel slipper sponge spider statue teapot towel trumpet tulip".split()
FRAMES = "{name} saw a {word} on the way.|There was a {word} nearby.|{name} found a little {word} too.|{He} had a {word} with {him}.".split("|")

# a user's words: each list is one way of asking, the last phrasing of each held out of
# training (the test set's records use only those: instruct.json marks them "heldout")
ASK = "Tell me a story|Can you write a story|Please write a story|Make up a story|I want a bedtime story|Write a short story for children|Can you tell me a story|I would like a story|Write me a little story|Could you make up a little story".split("|")
HERO = "{a} {trait} {kind} named {name}|{name} the {kind}|{a} {kind} called {name}|{a} {trait} {kind}|{a} {kind}|{a} {kind} with the name {name}|{name}, {a} {trait} {kind}".split("|")
WORDS = " using the words {words}| that uses the words {words}| with the words {words}|. Use the words {words}|, and put in the words {words}".split("|")
PLOT = ". It should follow this summary: {summary}|. Here is what happens: {summary}|. The story goes like this: {summary}|. This is what happens in it: {summary}".split("|")
REFINE = {kind: phrasings.split("|") for kind, phrasings in [
    ("rename", "Call the hero {new} instead.|Change {old}'s name to {new}.|Can you rename {old} to {new}?|Rename the {kind} to {new}.|Let's call {old} {new}.|I don't like the name {old}. Use {new}.|Make the hero's name {new}.|Change the name to {new}.|Use {new} as the name.|The hero should be {new}.|Can {old} be named {new}?|{new} is a better name.|I want the {kind} to be called {new}."),
    ("shorter", "Make it shorter.|Can you make the story shorter?|Shorter, please.|That is too long. Please shorten it.|Tell it again, but shorter.|Can you tell a short version?|Could you tell a shorter version?"),
    ("add_word", "Use the word {word} too.|Can you add the word {word}?|Put the word {word} in the story.|Add a {word} to the story.|I want the story to have a {word} in it.|Can there be a {word} in it?|I want a {word} in the story too."),
    ("ending", "Give it a {mood} ending.|Can the story end in a {mood} way?|Change the ending so it is {mood}.|Make the ending {mood}.|Can you make the end {mood}?|Tell it with a {mood} ending.|I want a {mood} ending instead."),
    ("title", "Give it a title.|Add a title on top.|What is a good title? Put it first.|Can the story have a title?|Write a title for it.|Put a title at the top.|Please add a title to the story."),
    ("continue", "What happened next?|Continue the story.|Tell me more!|What happens after that?|Go on, please.|Keep going!|And then what happened?")]}
THANKS = ["", "", "", "Nice! ", "Thank you. ", "I like it. ", "OK. "]  # before a refinement
# off-topic questions: the last three held out; answers in character
QUESTIONS = ("What is {n} plus {m}?|What is {n}+{m}?|Who are you?|What is your name?|How are you?|Hello!|Hi there!|What is the capital of France?|Can you help me with my math homework?|What time is it?|How old are you?|"
             "How many legs does a {animal} have?|What does a {animal} eat?|Where do you live?|Can you count to {n}?|Is it going to rain?|Can you sing a song?|Do you like {toy}s?|What color is the sun?|Are you a robot?|Why is the sky blue?|What is the weather like today?|What is {n} times {m}?").split("|")
ANSWERS = "I am a storyteller, so I only know stories. Ask me for one, for example: {ex}|I can't answer that, but I can tell you a story! Try: {ex}|I tell short stories for children. You could ask me: {ex}|I am not sure, but I love telling stories. Ask me: {ex}".split("|")
KINDS = ["create", *REFINE, "offtopic"]

def person(name, she, kind):
    # the slots that follow from the hero's name: pronouns, and girl or boy
    he, his, him = ("she", "her", "her") if she else ("he", "his", "him")
    if kind in ("girl", "boy"):
        kind = "girl" if she else "boy"
    return dict(name=name, he=he, his=his, him=him, He=he.capitalize(), His=his.capitalize(),
                kind=kind)

def make_story(rng):
    """A random story: its sentences (templates, a list per paragraph), their slots, its
    summary, words (a noun, verb and adjective in it) and label (its arc, for classify)."""
    she = rng.random() < 0.5
    friend_she = rng.random() < 0.5
    name = rng.choice(GIRLS if she else BOYS)
    fname = rng.choice([n for n in (GIRLS if friend_she else BOYS) if n != name])
    # a quarter of the heroes are animals, as in TinyStories ("a little bunny named Max")
    kind = rng.choice(ANIMALS) if rng.random() < 0.25 else "girl"
    parent = rng.choice(["mom", "dad"])
    slots = dict(person(name, she, kind), fname=fname, fhe="she" if friend_she else "he",
                 parent=parent, Parent=parent.capitalize(), trait=rng.choice(TRAITS),
                 Day=rng.choice(DAYS), toy=rng.choice(TOYS), color=rng.choice(COLORS),
                 place=rng.choice(PLACES), fragile=rng.choice(FRAGILE), gift=rng.choice(GIFTS))
    # one tuple per situation, so its parts agree (the kitten in a tree is carried down)
    for keys, situations in [("fear feat", FEARS), ("animal trouble fix", TROUBLES),
                             ("trip sights activity", TRIPS)]:
        slots.update(zip(keys.split(), rng.choice(situations)))
    slots.update(zip(["spot1", "spot2", "spot3"], rng.sample(SPOTS, 3)))
    label, summary, arc = rng.choice(COMPILED_ARCS)
    paragraphs = [[]]
    for alternatives in arc:
        if alternatives is None:
            paragraphs.append([])
        elif sentence := rng.choice(alternatives):
            paragraphs[-1].append(sentence)
    story = dict(paragraphs=[p for p in paragraphs if p], slots=slots, label=label,
                 summary=summary.format(**slots), title="", sad=False)
    # scan the banks (lists), not a set, so the choice never depends on PYTHONHASHSEED
    present = set(re.findall(r"[a-z]+", render(story).lower()))
    words = []
    for bank in (NOUNS, VERBS, ADJECTIVES):
        candidates = [word for word in bank if word in present]
        assert candidates, f"no word of {bank[:3]}... occurs in the story {render(story)!r}"
        words.append(rng.choice(candidates))
    rng.shuffle(words)
    return dict(story, words=words)

def render(story, last_only=False):
    # the story's text: its title line, then a line per paragraph
    slots = story["slots"]
    paragraphs = story["paragraphs"][-1:] if last_only else story["paragraphs"]
    text = "\n".join(" ".join(s.format(**slots) for s in p) for p in paragraphs)
    if not story["title"] or last_only:
        return text
    small = ("a", "and", "the", "to", "for", "is")
    title = story["title"].format(**slots).split()
    title = [w if w in small and k else w[0].upper() + w[1:] for k, w in enumerate(title)]
    return " ".join(title) + "\n" + text

def refine(rng, story, kind, phrasings):
    """A request of a refine kind (REFINE) in one of `phrasings`, the story after it and
    the check of the reply (bpe.reply_problems)."""
    slots = story["slots"]
    new = dict(story, slots=dict(slots), paragraphs=[list(p) for p in story["paragraphs"]])
    check = dict(kind=kind, hero=slots["name"], cast=[slots["name"], slots["fname"]],
                 length=len(render(story).split()))
    fill = dict(old=slots["name"], kind=slots["kind"])
    if kind == "rename":
        she = rng.random() < 0.5
        fill["new"] = rng.choice([n for n in (GIRLS if she else BOYS) if n not in check["cast"]])
        new["slots"].update(person(fill["new"], she, slots["kind"]))
        check.update(hero=fill["new"], cast=[fill["new"], slots["fname"]], old=slots["name"])
    elif kind == "shorter":  # each paragraph's first sentence; the last's with the hero
        *paragraphs, last = story["paragraphs"]
        named = [s for s in last[:-1] if "{name}" in s][:1] or last[:1]
        new["paragraphs"] = [p[:1] for p in paragraphs] + [named + last[-1:] * (named != last[-1:])]
    elif kind == "add_word":
        text = render(story).lower()
        fill["word"] = rng.choice([w for w in ADDED if not re.search(rf"\b{w}\b", text)])
        new["paragraphs"][0].append(rng.choice(FRAMES).replace("{word}", fill["word"]))
        check["word"] = fill["word"]
    elif kind == "ending":  # to sad, or back to the arc's own ending
        fill["mood"] = "happy" if story["sad"] else "sad"
        ending = story["original_end"] if story["sad"] else [EXTRAS[story["label"]]["sad"]]
        new.update(sad=not story["sad"], original_end=story["paragraphs"][-1])
        new["paragraphs"][-1] = ending
        check.update(mood=fill["mood"], last=render(story, last_only=True))
    elif kind == "title":
        new["title"] = EXTRAS[story["label"]]["title"]
    else:  # continue: the reply is the new paragraph alone
        new["paragraphs"].append([rng.choice(NEXT)])
    return rng.choice(phrasings).format(**fill), new, check

def create_request(rng, story, pick):
    """A request for `story` in a user's words (a hero, a plot, words: a mix, each phrased
    by pick(list)) and the check of the reply (bpe.reply_problems)."""
    slots = story["slots"]
    parts = rng.choice([["hero"], ["hero", "topic"], ["words"], ["hero", "words"], ["plot"],
                        ["hero", "topic", "words"], ["words", "plot"]])
    check = dict(kind="create", hero=None, who=[], words=[], summary="")
    text = pick(ASK)
    if "hero" in parts:
        hero = pick(HERO)
        a = "an" if slots["kind"][0] in "aeiou" and hero.startswith("{a} {kind}") else "a"
        text += " about " + hero.format(a=a, **slots)
        check.update(hero=slots["name"] if "{name}" in hero else None, who=[slots["kind"]])
    if "topic" in parts:
        text += " " + EXTRAS[story["label"]]["topic"].format(**slots)
    if "words" in parts:
        listed = ", ".join(story["words"][:-1]) + f" and {story['words'][-1]}"
        text += pick(WORDS).format(words=listed)
        check["words"] = story["words"]
    if "plot" in parts:
        text += pick(PLOT).format(summary=story["summary"])
        check["summary"] = story["summary"]
    end = "?" if text.startswith(("Can", "Could")) else "."
    return text if text.endswith(".") else text + end, check

def conversation(rng, story, kind, heldout):
    """An instruct.json record: `messages` whose last reply answers a request of `kind`
    (None: random) and its check; heldout: phrased only in the last way of each list."""
    def pick(options):
        return options[-1] if heldout else rng.choice(options[:-1])
    kind = kind or rng.choices(KINDS, [3, 1, 1, 1, 1, 1, 1, 1])[0]
    request, check = create_request(rng, story, pick)
    turns = [(request, render(story))]  # (user, assistant)
    if kind == "offtopic":  # asked first, or after a story: a short answer in character
        turns = turns[:rng.random() < 0.4]
        example = '"Tell me a story about a {trait} {kind} named {name}."'.format(
            **story["slots"])
        question = rng.choice(QUESTIONS[-3:] if heldout else QUESTIONS[:-3]).format(
            n=rng.randint(1, 20), m=rng.randint(1, 20), **story["slots"])
        turns.append((question, rng.choice(ANSWERS).format(ex=example)))
        check = dict(kind="offtopic")
    elif kind != "create":  # a refinement, in a third turn after another one at times
        kinds = [kind]
        if rng.random() < 0.3:
            others = [k for k in REFINE if k not in ("continue", kind)]
            kinds.insert(0, "ending" if kind == "ending" else rng.choice(others))
        for k in kinds:
            request, story, check = refine(rng, story, k, [pick(REFINE[k])])
            turns.append((rng.choice(THANKS) + request, render(story, k == "continue")))
    messages = [{"role": role, "content": text} for turn in turns
                for role, text in zip(("user", "assistant"), turn)]
    record = dict(messages=messages, check=check, heldout=heldout)
    if kind != "offtopic" or len(turns) > 1:  # a story came first: its arc is a label
        record["arc"] = story["label"]
    return record

def generate_stories(n, seed):
    """n distinct stories (make_story's dicts), the same for the same (n, seed); a smaller
    n gives a prefix of a larger one: train, val, instruct slice one call."""
    rng = random.Random(seed)
    stories = {}  # text -> story; a dict keeps the first of repeats, in order
    for _ in range(2 * n + 1000):  # bounded: an impossible n fails, never loops forever
        if len(stories) == n:
            break
        story = make_story(rng)
        stories.setdefault(render(story), story)
    if len(stories) < n:
        raise UserError(f"--num_stories={n}: only {len(stories)} distinct stories came "
                        f"out; ask for fewer")
    return list(stories.values())

if __name__ == "__main__":
    run(main, TrainConfig)
