"""Train a GPT from scratch (or from GPT-2) on synthetic stories, TinyStories, Shakespeare or any text file.

What you learn here (LLM101n chapters 07-11): data tokenized once into a flat file read through numpy.memmap,
AdamW with warmup and cosine decay, gradient accumulation and clipping, bfloat16 autocast, torch.compile,
DistributedDataParallel, checkpoints that resume exactly. The key idea: a step uses the mean gradient of
grad_accum micro-batches, whether one process makes them one after another or many make them at once.

How to run:
    python train.py                     # ~5 min on a 2-core CPU: synthetic stories, then a sampled story
    python train.py --dataset=tinystories --vocab_size=4096 --n_layer=8 --n_head=8 --n_embd=512 --compile
    torchrun --standalone --nproc_per_node=8 train.py --dataset=tinystories --vocab_size=4096 --grad_accum=8
Depends on: gpt.py, bpe.py. Writes out/ckpt.pt (latest) and out/best.pt; --bench times fp32/bf16, eager/compiled.
References (arXiv): AdamW 1711.05101; SGDR 1608.03983; mixed precision 1710.03740; PyTorch DDP 2006.15704;
TinyStories 2305.07759; PaLM appendix B (MFU) 2204.02311.
"""
import codecs
import contextlib
import dataclasses
import gc
import json
import math
import os
import random
import re
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bpe import Tokenizer
from gpt import (GPT, GPTConfig, choose_precision, download, load_checkpoint, native_bf16, parse_args,
                 pick_device, save_checkpoint)

@dataclasses.dataclass
class TrainConfig:
    """Train a GPT on a text dataset; every field is a flag: python train.py --n_layer=4 --max_iters=500"""
    # I/O
    out_dir: str = "out"            # ckpt.pt (latest state, resumable) and best.pt (lowest val loss) go here
    data_dir: str = "data"          # downloads and prepared token files are cached here
    init_from: str = "scratch"      # scratch, resume (out_dir/ckpt.pt), gpt2, gpt2-medium, ... or a .safetensors
    eval_interval: int = 200        # steps between evaluations, checkpoints and samples
    eval_iters: int = 10            # fixed batches per split in each evaluation
    log_interval: int = 50          # steps between log lines
    sample_tokens: int = 200        # length of the story sampled at each evaluation and at the end
    bench: bool = False             # only measure tokens/s and MFU: float32, bfloat16, eager, compiled
    # data
    dataset: str = "stories"        # stories (synthetic, offline), tinystories, shakespeare_char or a .txt path
    num_stories: int = 20000        # stories to generate: 90% train, 10% val, and 10% more for instruct.txt
    tokenizer: str = ""             # bpe, gpt2, byte; '' = byte for shakespeare_char, gpt2 for GPT-2, else bpe
    vocab_size: int = 1024          # bpe: 256 bytes + merges + <|endoftext|> (the stories allow <= 1223)
    # model (ignored when resuming or starting from GPT-2)
    n_layer: int = 4                # transformer blocks
    n_head: int = 4                 # attention heads
    n_embd: int = 256               # channels
    block_size: int = 256           # context length in tokens
    dropout: float = 0.0            # 0 for pretraining small models on plenty of data
    bias: bool = False              # biases in Linear and LayerNorm (GPT-2 has them)
    # optimizer
    batch_size: int = 16            # sequences per micro-batch, in each process
    grad_accum: int = 1             # micro-batches per optimizer step, summed over all processes
    max_iters: int = 1000           # optimizer steps
    learning_rate: float = 2e-3     # peak learning rate, after warmup
    min_lr: float = 2e-4            # the cosine decays to this (about learning_rate / 10)
    warmup_iters: int = 50          # linear warmup steps
    lr_decay_iters: int = -1        # the cosine reaches min_lr at this step; -1 = max_iters
    weight_decay: float = 0.1       # AdamW decay of matrices and embeddings
    beta1: float = 0.9              # AdamW betas
    beta2: float = 0.99             # (0.95 for large models)
    grad_clip: float = 1.0          # clip the global gradient norm to this; 0 = off
    # system
    device: str = "auto"            # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"             # auto, float32, bfloat16, float16 (float16 = CUDA + GradScaler)
    compile: bool = False           # torch.compile the model (slow first steps, faster after)
    peak_flops: float = 0.0         # device peak for MFU in FLOP/s; 0 = auto (see peak_flops_for)
    seed: int = 1337                # model init, batch order, dropout, stories

# -----------------------------------------------------------------------------
# a synthetic children's-story generator (the offline default dataset)

# small closed word banks keep the language learnable by a tiny GPT in minutes, while the product
# of all the choices below (far beyond 10^9) leaves room for as many distinct stories as we need
GIRLS = "Lily Mia Sue Anna Emma Zoe Lucy Amy Ella Rose Kim Ava Sara Lena Nina Molly Ruby".split()
BOYS = "Tom Ben Max Sam Tim Leo Jack Finn Jake Luke Noah Joe Dan Bob Ted Eli Owen Milo".split()
ANIMALS = "cat dog bunny bear bird fox duck frog mouse puppy kitten lamb pig squirrel".split()
TRAITS = "little kind happy curious friendly sweet playful".split()
TOYS = "ball kite doll hat boat book drum truck balloon blanket scarf train robot bike".split()
COLORS = "red blue green yellow pink purple white brown".split()
PLACES = "park garden forest yard meadow playground field".split()
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

# each arc is (summary, story template). The template has one sentence slot per line with
# alternatives split by "|" (an empty one makes the slot optional); "/" starts a new paragraph
ARCS = [("{name} lost {his} {color} {toy}, and {his} friend {fname} helped {him} find it.", """
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
"""), ("{name} did not want to share {his} {toy} with {fname}, but then {he} shared it.", """
{He} had a new {color} {toy}. | {His} {parent} gave {him} a shiny {color} {toy}.
{Day}, {name} took the {toy} to the {place}. | {Day}, {name} played with the {toy} in the {place}.
{His} friend {fname} came over. "Can I play too?" asked {fname}. | {fname} asked, "Can I try?"
"No, it is mine!" said {name}, and {he} held the {toy} tight. | "No, it is my {toy}," said {name}.
{fname} looked sad and walked away. | {fname} felt sad and sat down alone.
/{name} played alone, but it was not much fun. | Soon {name} felt lonely. Playing alone was boring.
{He} ran to {fname} and said, "I am sorry. Let's play together." | {He} said, "Sorry, {fname}."
They took turns and played together all day. | They shared the {toy} and had lots of fun.
{name} learned that sharing makes everyone happy. | Sharing was more fun than playing alone.
"""), ("{name} was scared of {fear}, but {his} {parent} helped, and {he} {feat}.", """
{name} was afraid of {fear}. | But {name} had one problem. {He} was scared of {fear}.
{Day}, {his} {parent} said, "Let's try it today." | {Day}, {his} {parent} wanted {him} to try.
"I can't. I am too scared," said {name}. | {name} shook {his} head. "What if something bad happens?"
/{His} {parent} held {his} hand. "Don't be scared. I am here." | {His} {parent} said, "You can!"
{name} took a deep breath and counted to three. | {name} closed {his} eyes and smiled.
Then {he} {feat}! | And then {he} {feat}!
It was not scary at all. It was fun! | {He} was not scared anymore. {He} felt so proud.
{name} learned that being brave means trying when you are scared. | {His} {parent} hugged {him}.
"""), ("{name} found a little {animal} that {trouble}, and {he} helped it.", """
{Day}, {name} was walking in the {place}. | {Day}, {name} went to the {place} with {his} {toy}.
{He} heard a small sound {spot1}. | Suddenly, {he} saw something move {spot1}.
It was a little {animal}. The {animal} {trouble}. | There was a little {animal}. It {trouble}.
"Don't worry, little {animal}. I will help you," said {name}. | The poor {animal} looked scared.
/So {name} {fix}. | {name} was very careful. {He} {fix}.
Soon the {animal} felt much better. | After a while, the {animal} was happy again.
"Thank you, {name}! You are very kind," said the {animal}. | The {animal} smiled at {name}.
From then on, the {animal} and {name} were best friends. | {name} felt warm and happy inside.
"""), ("{name} broke {his} {parent}'s {fragile} by accident, but {he} told the truth.", """
{He} liked to play with {his} {toy} in the house. | {He} loved to run and jump in the house.
{Day}, {name} threw {his} {color} {toy} high in the air. | {Day}, {name} ran fast around the table.
Crash! {He} hit {his} {parent}'s {fragile}, and it broke. | Oh no! {His} {parent}'s {fragile} broke.
/{name} felt scared. {He} wanted to hide. | {name} thought about hiding the pieces under the bed.
But {he} knew that hiding was wrong. | But then {he} thought about how {his} {parent} would feel.
{He} went to {his} {parent} and said, "I am sorry, {Parent}. I broke your {fragile}."
{His} {parent} hugged {him}. "Thank you for telling me the truth." | {His} {parent} was not mad.
Together they cleaned up the pieces. | {name} helped {his} {parent} clean up the pieces. |
{name} learned that it is best to tell the truth. | From then on, {name} played outside.
"""), ("{name} made a {gift} for {fname}'s birthday, and {fname} loved it.", """
{Day}, {name} remembered it was almost {fname}'s birthday. | {His} friend {fname} was turning five.
{name} wanted to give {fname} a special gift. | {name} wanted to make {fname} a surprise.
{He} thought and thought. Then {he} had an idea. | "I know! I will make a {gift}," said {name}.
{He} made a {gift}. It took all day. | {His} {parent} helped {him} make a {gift}.
/On the big day, {name} gave the surprise to {fname}. | At the party, {name} gave {fname} the gift.
{fname} smiled. "Wow! Did you make this for me?" | {fname}'s eyes got big. "I love it!" {fhe} said.
"Yes, I made it just for you," said {name}. | {fname} gave {name} a big hug.
Giving a gift made {name} just as happy as getting one. | The best gifts are made with love.
"""), ("{name} went to the {trip} with {his} {parent}, saw {sights}, and {activity}.", """
{Day}, {his} {parent} said, "Let's go to the {trip}!" | {Day}, {name} and {his} {parent} went out.
{name} was so excited that {he} jumped up and down. | {name} packed {his} {toy} and a snack.
The sun was warm and the sky was blue. | It was a cool day with a soft wind. |
/At the {trip}, {name} saw {sights}. | When they got to the {trip}, {name} saw {sights}.
"Look, {Parent}! Look!" said {name}. | "Wow!" said {name}. "This is the best day ever!"
Then {name} {activity}. | After lunch, {name} and {his} {parent} {activity}.
At the end of the day, {name} was tired but happy. | At home, {name} was tired but happy.
That night, {name} dreamed about the {trip}. |
""")]

# turn a story template into a list of slots (lists of alternatives), None marking a new paragraph
def _compile_arc(template):
    slots = []
    for line in template.strip().split("\n"):
        if line.startswith("/"):
            slots.append(None)
        slots.append([part.strip() for part in line.lstrip("/").split("|")])
    return slots

COMPILED_ARCS = [(summary, [OPENING] + _compile_arc(story)) for summary, story in ARCS]

def make_story(rng):
    """One random story from rng (a random.Random) as (story, summary, words): words are a noun,
    a verb and an adjective in random order, each a whole word of the story, e.g.
    ("Once upon a time, there was a little girl named Lily. ...", "Lily lost ...", ["red", ...])."""
    she, friend_she = rng.random() < 0.5, rng.random() < 0.5
    name = rng.choice(GIRLS if she else BOYS)
    fname = rng.choice([n for n in (GIRLS if friend_she else BOYS) if n != name])
    he, his, him = ("she", "her", "her") if she else ("he", "his", "him")
    # a quarter of the heroes are animals, as in TinyStories ("a little bunny named Max")
    kind = rng.choice(ANIMALS) if rng.random() < 0.25 else ("girl" if she else "boy")
    parent = rng.choice(["mom", "dad"])
    slots = dict(name=name, fname=fname, he=he, his=his, him=him, He=he.capitalize(),
                 His=his.capitalize(), fhe="she" if friend_she else "he", kind=kind,
                 parent=parent, Parent=parent.capitalize(), trait=rng.choice(TRAITS),
                 Day=rng.choice(DAYS), toy=rng.choice(TOYS), color=rng.choice(COLORS),
                 place=rng.choice(PLACES), fragile=rng.choice(FRAGILE), gift=rng.choice(GIFTS))
    # draw each situation as one tuple so its parts agree (the kitten in the tree is carried down)
    for keys, situations in [("fear feat", FEARS), ("animal trouble fix", TROUBLES),
                             ("trip sights activity", TRIPS)]:
        slots.update(zip(keys.split(), rng.choice(situations)))
    slots.update(zip(["spot1", "spot2", "spot3"], rng.sample(SPOTS, 3)))
    summary, arc = rng.choice(COMPILED_ARCS)
    paragraphs = [[]]
    for alternatives in arc:
        if alternatives is None:
            paragraphs.append([])
        elif sentence := rng.choice(alternatives):
            paragraphs[-1].append(sentence.format(**slots))
    story = "\n".join(" ".join(sentences) for sentences in paragraphs if sentences)
    # scan the banks (lists), not a set, so the choice never depends on PYTHONHASHSEED
    present = set(re.findall(r"[a-z]+", story.lower()))
    words = []
    for bank in (NOUNS, VERBS, ADJECTIVES):
        candidates = [word for word in bank if word in present]
        assert candidates, f"no word of {bank[:3]}... occurs in the story {story!r}"
        words.append(rng.choice(candidates))
    rng.shuffle(words)
    return story, summary.format(**slots), words

def generate_stories(n, seed):
    """n distinct (story, summary, words) records, the same for the same (n, seed); a smaller
    n gives a prefix of a larger one, so train/val/instruct can be slices of one call."""
    rng, records = random.Random(seed), {}  # story -> record; a dict keeps the first of repeats, in order
    for _ in range(2 * n + 1000):  # bounded, so an impossible n fails instead of looping forever
        if len(records) == n:
            break
        record = make_story(rng)
        records.setdefault(record[0], record)
    if len(records) < n:
        raise ValueError(f"got only {len(records)} distinct stories, not n={n}; ask for fewer")
    return list(records.values())

def format_instruct(story, summary, words):
    """The TinyStories-Instruct record "Words: a, b, c\\nSummary: ...\\nStory: \\n<story>"."""
    return f"Words: {', '.join(words)}\nSummary: {summary}\nStory: \n{story}"

# -----------------------------------------------------------------------------
# datasets: text files on disk, tokenized once into flat files of ids

EOT = "<|endoftext|>"
SEP = f"\n{EOT}\n"  # between documents, as in the TinyStories files
STORIES_VERSION, PREP_VERSION = 1, 1  # bump to rebuild cached data after changing the generator or the prep
BPE_TRAIN_BYTES = 8 << 20  # bpe learns its merges from (at most) the first 8 MB of the train split
TS = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-"
SHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# --init_from=resume takes these from the checkpoint (the data, its order, the batches); the rest from the flags
RESUMED_FIELDS = ("dataset", "num_stories", "tokenizer", "vocab_size", "seed", "block_size", "batch_size", "grad_accum")
DATASETS = {  # name -> (urls: [train, val] or [one file split 90/10], a local file that works offline)
    "tinystories": ([TS + "train.txt", TS + "valid.txt"], "../shared/data/tinystories/TinyStories-train-head2MiB.txt"),
    "shakespeare_char": ([SHAKESPEARE], "../shared/data/tinyshakespeare/input.txt")}

def write_text(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # atomic: an interrupted run never leaves half a file

def write_stories(folder, n, seed):
    # train and val stories, and held-out ones in TinyStories-Instruct format for finetune.py and dpo.py
    records, n_train = generate_stories(n + n // 10, seed), n - n // 10
    write_text(os.path.join(folder, "train.txt"), "".join(r[0] + SEP for r in records[:n_train]))
    write_text(os.path.join(folder, "val.txt"), "".join(r[0] + SEP for r in records[n_train:n]))
    write_text(os.path.join(folder, "instruct.txt"), "".join(format_instruct(*r) + SEP for r in records[n:]))

def encode_split(enc, eot, path, lo, hi, out_path, dtype, piece=1 << 24):
    # the documents (text between <|endoftext|> markers) in bytes [lo, hi) of a file, each encoded (tiktoken's
    # Rust encoder, on several threads) and followed by <|endoftext|>, into a flat binary file; 16 MB at a
    # time, so a 2 GB corpus never sits in memory
    decoder, rest, opened, n_tokens, n_bytes = codecs.getincrementaldecoder("utf-8")(), "", False, 0, 0
    with open(path, "rb") as f, open(out_path + ".tmp", "wb") as out:
        f.seek(lo)
        while lo < hi:
            block = f.read(min(piece, hi - lo))
            lo = lo + len(block) if block else hi
            # the decoder holds back a character cut by the piece boundary; the last document may go on
            docs = (rest + decoder.decode(block, final=lo >= hi)).split(EOT)
            continued, rest, part = opened, docs.pop() if lo < hi else "", ""
            if len(rest) > piece:  # a document longer than a piece (plain text): flush its lines so far
                cut = rest.rfind("\n") + 1
                part, rest = rest[:cut], rest[cut:]
            opened = bool(part) or (opened and not docs)  # some of the unfinished document is written already
            # a document partly written in earlier pieces ends here: kept even if empty, for its <|endoftext|>
            docs = [doc.strip() for i, doc in enumerate(docs) if doc.strip() or (i == 0 and continued)]
            ids = [t for ids in enc.encode_ordinary_batch(docs) for t in ids + [eot]] + enc.encode_ordinary(part)
            np.array(ids, dtype).tofile(out)
            n_tokens, n_bytes = n_tokens + len(ids), n_bytes + sum(len(doc.encode()) for doc in docs + [part])
    os.replace(out_path + ".tmp", out_path)  # atomic, like write_text
    return n_tokens, n_bytes

def prepare_data(cfg, kind):
    """Text -> tokenizer -> train.bin, val.bin (uint16 ids; uint32 beyond 65536 ids) in the dataset's folder,
    cached: redone only when the text, the tokenizer or vocab_size change. Returns (folder, meta)."""
    name = cfg.dataset if cfg.dataset in ("stories", *DATASETS) else os.path.splitext(os.path.basename(cfg.dataset))[0]
    folder = os.path.join(cfg.data_dir, name)
    os.makedirs(folder, exist_ok=True)
    urls, local = DATASETS.get(cfg.dataset, ([], ""))
    paths = [os.path.join(folder, url.rsplit("/", 1)[1]) for url in urls] or [os.path.abspath(cfg.dataset)]
    for url, path in zip(urls, paths):
        try:
            download(url, path)  # streamed, resumable, cached
        except RuntimeError as e:
            raise RuntimeError(f"{e}. Or train on a local copy: --dataset={local} --tokenizer={kind}") from None
    if cfg.dataset == "stories":
        paths = [os.path.join(folder, "train.txt"), os.path.join(folder, "val.txt")]
    # the cache key holds everything the prepared files depend on
    source = [cfg.num_stories, cfg.seed, STORIES_VERSION] if cfg.dataset == "stories" else \
        [[p, os.path.getsize(p), os.path.getmtime(p)] for p in paths]
    key = dict(source=source, tokenizer=kind, vocab_size=cfg.vocab_size * (kind == "bpe"), version=PREP_VERSION)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["key"] == key and all(os.path.exists(os.path.join(folder, f"{s}.bin")) for s in ("train", "val")):
            print(f"data: reusing {folder}, prepared earlier for this dataset and tokenizer")
            return folder, meta
        os.remove(meta_path)  # stale: an interrupted rebuild below must not leave it vouching for new files
    if cfg.dataset == "stories":
        write_stories(folder, cfg.num_stories, cfg.seed)
    ranges = [(p, 0, os.path.getsize(p)) for p in paths]  # byte ranges [lo, hi) of train and val
    if len(paths) == 1:  # one file: the first 90% (up to a line break) trains, the rest validates
        with open(paths[0], "rb") as f:
            f.seek(int(0.9 * ranges[0][2]))
            f.readline()
            ranges = [(paths[0], 0, f.tell()), (paths[0], f.tell(), ranges[0][2])]
    if kind == "gpt2":
        tok = Tokenizer.gpt2(os.path.join(cfg.data_dir, "gpt2"))
    else:  # bpe learns its merges from the start of the train split; byte is BPE with no merges (+ <|endoftext|>)
        with open(paths[0], "rb") as f:
            text = f.read(min(ranges[0][2], BPE_TRAIN_BYTES)).decode("utf-8", "ignore") if kind == "bpe" else ""
        tok = Tokenizer().train(text, cfg.vocab_size if kind == "bpe" else 257)
    tok.save(os.path.join(folder, "tokenizer.json"))
    enc, dtype = tok.to_tiktoken(), "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    meta = dict(key=key, dtype=dtype, vocab_size=tok.vocab_size)
    for split, (path, lo, hi) in zip(("train", "val"), ranges):
        try:
            meta[f"{split}_tokens"], meta[f"{split}_bytes"] = encode_split(
                enc, tok.special_tokens[EOT], path, lo, hi, os.path.join(folder, f"{split}.bin"), dtype)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 ({e.reason}); convert it: iconv -f latin1 -t utf-8") from None
    write_text(meta_path, json.dumps(meta))  # written last: its presence means the .bin files are complete
    print(f"data: prepared {folder}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return folder, meta

# -----------------------------------------------------------------------------
# batches, learning rate, evaluation, sampling, MFU

def get_batch(data, batch_size, block_size, key, device):
    """Windows x and next tokens y, (B, T) each, a pure function of key: resumed or DDP runs draw the same."""
    ix = np.random.default_rng(key).integers(0, len(data) - block_size, size=batch_size)
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))  # (B, T + 1)
    return xy[:, :-1].to(device), xy[:, 1:].to(device)  # x (B, T), and y (B, T): the token after each

def get_lr(step, learning_rate, min_lr, warmup_iters, decay_iters):
    """Linear warmup to learning_rate, a cosine down to min_lr at decay_iters, then flat."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, decay_iters - warmup_iters))  # 0 -> 1, then stays 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)

@torch.no_grad()
def estimate_loss(model, splits, batch_size, block_size, eval_iters, device, ctx):
    # the mean loss on the same batches every time (keys (1, split, i)), so evaluations compare
    model.eval()
    with ctx:
        out = {name: sum(model(*get_batch(data, batch_size, block_size, (1, k, i), device))[1].item()
                         for i in range(eval_iters)) / eval_iters for k, (name, data) in enumerate(splits.items())}
    model.train()
    return out

@torch.no_grad()
def sample_story(model, tok, max_new_tokens, device, ctx, seed):
    # a document starts after <|endoftext|> and ends at the next one
    torch.manual_seed(seed)  # the same seed every time: successive samples show progress, not luck
    model.eval()
    with ctx:
        ids = model.generate(torch.tensor([[tok.special_tokens[EOT]]], device=device), max_new_tokens, 0.8, 50)
    model.train()
    return tok.decode(ids[0, 1:].tolist()).split(EOT)[0].strip()

def peak_flops_for(device, dtype):
    # MFU needs a peak FLOP/s. CUDA: an A100 in bf16 (312e12; pass --peak_flops for other GPUs). A CPU has no
    # simple datasheet number, so we time a big matmul in the training dtype: this machine's practical peak
    if device.startswith("cuda"):
        return 312e12
    a, best = torch.randn(2048, 2048, device=device, dtype=getattr(torch, dtype)), float("inf")
    for _ in range(8):  # the fastest of 8 (the first warms up; .item() waits for an asynchronous device)
        t0 = time.time()
        (a @ a)[0, 0].item()
        best = min(best, time.time() - t0)
    return 2 * 2048 ** 3 / best

def bench(cfg, device, low_dtype):
    # a fixed GPT (6 layers, 384 wide, 256 tokens) trains on random tokens in each mode, side by side
    print("| 6 layers, 384 wide, 8 x 256 tokens | tokens/s | MFU | peak TFLOP/s | speedup |\n|---|---|---|---|---|")
    rows, kind, x = {}, device.split(":")[0], torch.randint(0, 2048, (8, 256), device=device)
    for dtype, compiled in [(d, c) for c in (False, True) for d in dict.fromkeys(("float32", low_dtype))]:
        name = f"{dtype} {'+ compile' if compiled else 'eager'}"
        model = GPT(GPTConfig(vocab_size=2048, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False)).to(device)
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), kind)
        try:
            step_model, times = torch.compile(model) if compiled else model, []
            for _ in range(8):  # 2 warmup steps (compilation happens there), then the fastest of 6
                t0 = time.time()
                with torch.autocast(kind, getattr(torch, dtype), enabled=dtype != "float32"):
                    loss = step_model(x, x)[1]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss.item()  # waits for a GPU
                times.append(time.time() - t0)
        except Exception as e:  # compile fails in many ways (no C++ compiler, an unsupported op): report it
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
            continue
        dt = min(times[2:])  # the fastest step: the least disturbed by other work on the machine
        rows[name], peak = 8 * 256 / dt, cfg.peak_flops or peak_flops_for(device, dtype)
        print(f"| {name} | {rows[name]:,.0f} | {100 * model.estimate_mfu(8 * 256, dt, peak):.1f}% | "
              f"{peak / 1e12:.2f} | {rows[name] / rows['float32 eager']:.2f}x |", flush=True)
    return rows

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    # --- setup: processes, device, precision and every check, before any data or model work
    ddp = "RANK" in os.environ  # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain python does not
    rank, local_rank, world = [int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")] if ddp else [0, 0, 1]
    master, device, gpt2 = rank == 0, pick_device(cfg.device), cfg.init_from not in ("scratch", "resume")
    device_type, ckpt_path = device.split(":")[0], os.path.join(cfg.out_dir, "ckpt.pt")
    resumed = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None  # (model, ckpt) on the cpu
    if resumed:  # the data and its order are the run's own, whatever the flags say
        cfg = dataclasses.replace(cfg, **{k: resumed[1]["train_config"][k] for k in RESUMED_FIELDS})
    kind = cfg.tokenizer or ("gpt2" if gpt2 else "byte" if cfg.dataset == "shakespeare_char" else "bpe")
    counts = ("eval_interval", "eval_iters", "log_interval", "batch_size", "grad_accum", "num_stories")
    rules = [(name, getattr(cfg, name) >= 1, "1 or more") for name in counts]
    rules += [(name, getattr(cfg, name) >= 0, "0 or more") for name in ("learning_rate", "weight_decay", "grad_clip")]
    rules += [(name, 0 <= getattr(cfg, name) < 1, "in [0, 1)") for name in ("beta1", "beta2")]
    for name, ok, need in rules + [
            ("max_iters", cfg.max_iters >= 0 <= cfg.warmup_iters, "0 or more, and so must --warmup_iters"),
            ("grad_accum", cfg.grad_accum % world == 0, f"a multiple of the {world} processes (resumed: as saved)"),
            ("min_lr", 0 <= cfg.min_lr <= cfg.learning_rate, f"0 to --learning_rate={cfg.learning_rate}, e.g. a tenth"),
            ("seed", cfg.seed >= 0, "0 or more"),
            ("bench", not (ddp and cfg.bench), "False under torchrun: run the benchmark with python"),
            ("device", not (ddp and device_type == "mps"), "cpu or cuda under torchrun (DDP has no backend for mps)"),
            ("tokenizer", kind in (("gpt2",) if gpt2 else ("bpe", "gpt2", "byte")), "bpe, gpt2, byte (GPT-2: gpt2)"),
            ("vocab_size", kind != "bpe" or 257 <= cfg.vocab_size <= 1 << 17, "257 (bytes + <|endoftext|>) to 131072"),
            ("init_from", cfg.init_from in ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") or
             os.path.exists(cfg.init_from), "scratch, resume, gpt2, gpt2-medium, ... or a GPT-2 .safetensors file"),
            ("dataset", cfg.dataset in ("stories", *DATASETS) or os.path.isfile(cfg.dataset),
             "stories, tinystories, shakespeare_char or the path of an existing UTF-8 text file")]:
        if not ok:
            raise ValueError(f"--{name}={getattr(cfg, name)!r} is invalid: it must be {need}")
    model_args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GPTConfig) if hasattr(cfg, f.name)}
    GPTConfig(**model_args)  # checks the shape now (e.g. n_embd divisible by n_head), not after data prep
    dtype, reason = choose_precision(device_type, cfg.dtype, native_bf16(device_type))
    if ddp:
        if device_type == "cuda":
            device = f"cuda:{local_rank}"  # one GPU per process
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if master:
        print(f"config: {dataclasses.asdict(cfg)}\ndevice: {device} x {world} process(es); dtype: {dtype} ({reason})")
    if cfg.bench:
        return bench(cfg, device, dtype if dtype != "float32" else "bfloat16")
    # TF32 matmuls on CUDA: training does not need full float32 accuracy (a no-op elsewhere)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device_type == "cuda"
    # --- data: rank 0 prepares it (or finds it cached) and tells the other ranks where it is; it also
    # downloads GPT-2's weights, once, while they wait
    pretrained = GPT.from_pretrained(cfg.init_from, cfg.data_dir) if master and gpt2 else None
    shared = [prepare_data(cfg, kind) if master else None]
    if ddp:
        dist.broadcast_object_list(shared)
    folder, meta = shared[0]
    if min(meta["train_tokens"], meta["val_tokens"]) <= cfg.block_size:
        raise ValueError(f"--block_size={cfg.block_size} needs more data than {meta['train_tokens']} train and "
                         f"{meta['val_tokens']} val tokens: a larger dataset or a smaller --block_size")
    data = {s: np.memmap(os.path.join(folder, f"{s}.bin"), meta["dtype"], "r") for s in ("train", "val")}
    tok = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    common = dict(tokenizer=tok.to_dict(), train_config=dataclasses.asdict(dataclasses.replace(cfg, tokenizer=kind)))
    # --- model: from scratch, from our last checkpoint, or from OpenAI's GPT-2
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP copies rank 0's weights anyway)
    start, best_val, val_loss, best_path = 0, float("inf"), float("nan"), os.path.join(cfg.out_dir, "best.pt")
    ctx = torch.autocast(device_type, getattr(torch, dtype), enabled=dtype != "float32")  # float32: a no-op
    if cfg.init_from == "resume":
        raw_model, ckpt = resumed[0].to(device), resumed[1]
        start, best_val = ckpt["step"], ckpt["best_val_loss"]
    elif cfg.init_from == "scratch":
        raw_model = GPT(GPTConfig(**{**model_args, "vocab_size": tok.vocab_size})).to(device)
    else:
        raw_model = (pretrained or GPT.from_pretrained(cfg.init_from, cfg.data_dir)).to(device)
    if raw_model.config.vocab_size != tok.vocab_size or cfg.block_size > raw_model.config.block_size:
        raise ValueError(f"the model ({raw_model.config}) does not fit --block_size={cfg.block_size} or the "
                         f"{tok.vocab_size} token ids of the data; use the data and tokenizer it was trained on")
    # --- optimizer, loss scaling, compile, DDP
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")  # float16 gradients underflow without
    if cfg.init_from == "resume":  # (the scaler's state is empty unless the run used float16)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt.get("scaler") or scaler.state_dict())
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if cfg.compile:  # compiling fails at the first call (no C++ compiler, an unsupported device): make it now
        try:
            with ctx:
                model(*get_batch(data["val"], cfg.batch_size, cfg.block_size, (2,), device))
        except Exception as e:
            raise RuntimeError(f"--compile failed on {device}: {repr(e)[:200]}; drop --compile") from None
    if ddp:  # averages the gradients across processes in backward; we save and evaluate raw_model
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    accum, decay_iters = cfg.grad_accum // world, cfg.lr_decay_iters if cfg.lr_decay_iters >= 0 else cfg.max_iters
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    peak = cfg.peak_flops or peak_flops_for(device, dtype)
    if master:
        print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step = "
              f"{cfg.batch_size} sequences x {cfg.block_size} tokens x {accum} micro-steps x {world} process(es); "
              f"MFU against {peak / 1e12:.2f} TFLOP/s per device")
    # --- the loop: evaluate and save every eval_interval steps, log every log_interval steps
    losses, step, t_start = [], start, time.time()
    try:  # the finally tears the process group down even when a rank fails
        while True:
            last = step >= cfg.max_iters  # >=: resuming a finished run just evaluates
            if master and (step % cfg.eval_interval == 0 or last):
                ev = estimate_loss(raw_model, data, cfg.batch_size, cfg.block_size, cfg.eval_iters, device, ctx)
                # bits per byte = bits per token x tokens per byte of text: comparable across tokenizers
                bpb = {s: ev[s] / math.log(2) * meta[f"{s}_tokens"] / meta[f"{s}_bytes"] for s in ev}
                print(f"step {step}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f} "
                      f"(bits per byte: train {bpb['train']:.3f}, val {bpb['val']:.3f})")
                story, val_loss = sample_story(raw_model, tok, cfg.sample_tokens, device, ctx, cfg.seed), ev["val"]
                print("" if last else f"sample: {story}\n")
                if val_loss < best_val:
                    best_val = val_loss
                    save_checkpoint(best_path, raw_model, step=step, val_loss=val_loss, **common)
                save_checkpoint(ckpt_path, raw_model, step=step, val_loss=val_loss, best_val_loss=best_val,
                                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), **common)
            if last:
                break
            t0, lr = time.time(), get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, decay_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # dropout's randomness is a pure function of (seed, step, rank) too: resuming needs no RNG state
            torch.manual_seed(cfg.seed + 1_000_003 * step + rank)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                # rank r's micro-step m is micro-batch m * world + r: the same global batch for any world size
                key = (0, cfg.seed, step, micro * world + rank)
                x, y = get_batch(data["train"], cfg.batch_size, cfg.block_size, key, device)
                # no_sync: only the last micro-step all-reduces the gradients; the others just accumulate
                with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
                    with ctx:
                        loss = model(x, y)[1] / accum  # the mean over micro-batches, not the sum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            if ddp:  # log the mean over the global batch (gloo has no AVG: SUM, then divide)
                dist.all_reduce(loss_sum)
                loss_sum /= world
            loss_value = loss_sum.item()  # waits for the device, so the timing below is honest
            if not math.isfinite(loss_value):
                raise RuntimeError(f"the loss is {loss_value} at step {step}: training diverged. {ckpt_path} keeps "
                                   f"the last good state; lower --learning_rate and continue with --init_from=resume")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            step += 1  # at once: from here on, a Ctrl-C saves these weights with this count
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            if master and (step - 1) % cfg.log_interval == 0:
                dt = time.time() - t0
                eta = divmod(round(dt * (cfg.max_iters - step)), 60)  # (min, s) at this pace, evaluations aside
                mfu, bar = raw_model.estimate_mfu(tokens_per_step, dt, peak * world), "#" * (20 * step // cfg.max_iters)
                print(f"step {step - 1:5d}/{cfg.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | {1000 * dt:.0f} ms"
                      f" | {tokens_per_step / dt:,.0f} tok/s | mfu {100 * mfu:.1f}% | [{bar:<20}] eta "
                      f"{eta[0]}m{eta[1]:02d}s", flush=True)
        dist.barrier() if ddp else None  # no rank tears the group down while another still talks to it
    except KeyboardInterrupt:
        if master:  # the weights are those after `step` optimizer steps
            save_checkpoint(ckpt_path, raw_model, step=step, val_loss=val_loss, best_val_loss=best_val,
                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), **common)
            print(f"\ninterrupted at step {step}: saved {ckpt_path}; continue with --init_from=resume")
        return dict(losses=losses, step=step, ckpt_path=ckpt_path, interrupted=True)
    finally:
        if ddp:  # free the DDP wrapper (a reference cycle, so gc) first: it holds the process group
            del model
            gc.collect()
            dist.destroy_process_group()
    if master:
        print(f"done: {step - start} steps in {time.time() - t_start:.0f} s; val loss {val_loss:.4f} (best "
              f"{best_val:.4f}); saved {ckpt_path} and {best_path}\n\n{story}")
    return dict(losses=losses, val_loss=val_loss, best_val_loss=best_val, step=step, ckpt_path=ckpt_path)

if __name__ == "__main__":
    raise SystemExit(130 if main(parse_args(TrainConfig)).get("interrupted") else 0)  # 130: stopped by Ctrl-C
