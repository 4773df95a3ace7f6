"""Character-level language models of names: bigram counts, the same bigram as a neural net, an MLP.

What you learn: a language model gives P(next char | previous chars) and is scored by the average
negative log-likelihood (NLL) of held-out words. Add-k smoothed bigram counts are the exact optimum
of the NLL plus k pseudo-counts of every bigram, so a one-layer net trained by gradient descent on
that objective reaches the same NLL. A longer context with learned embeddings (Bengio et al. 2003)
then beats both.

How to run (CPU, under a minute; a GPU would not help models this small):
    python bigram.py              # makemore's names.txt (the built-in names when offline)
    python bigram.py --data=words.txt --block_size=5 --n_hidden=200 --max_iters=30000
                                  # any file with one word per line
Depends on: nothing from this repo; downloads names.txt once into data/ with requests.
References: Bengio et al., "A Neural Probabilistic Language Model", JMLR 2003; karpathy/makemore
"""
import argparse
import dataclasses
import difflib
import hashlib
import inspect
import linecache
import os
import random
import re
import sys

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclasses.dataclass
class BigramConfig:
    """Fit three character-level language models to a list of words and compare their NLL."""
    # I/O
    data: str = "names"  # "names" (names.txt, fetched into data/; built-in names offline) or a path
    # data
    val_frac: float = 0.1  # fraction of the words held out to measure validation NLL
    # model
    smoothing: float = 1.0  # add-k smoothing: k pseudo-counts of every bigram (> 0, often 0.1-1)
    block_size: int = 3  # MLP context length in characters
    n_embd: int = 10  # MLP embedding size per character
    n_hidden: int = 64  # MLP hidden tanh units
    # optimizer
    bigram_iters: int = 200  # full-batch AdamW steps of the neural bigram
    bigram_lr: float = 0.5  # its initial learning rate
    max_iters: int = 10000  # MLP AdamW steps on minibatches
    batch_size: int = 64  # MLP examples per step
    learning_rate: float = 1e-2  # MLP initial learning rate; both rates decay linearly to 10%
    weight_decay: float = 0.2  # decoupled MLP weight decay; names.txt likes less, 400 names more
    log_interval: int = 2000  # print the MLP training loss every this many steps
    # sampling and system
    num_samples: int = 8  # words sampled from each model
    top_bigrams: int = 10  # most frequent bigrams listed under the heat-map
    seed: int = 1337  # seeds the split, the MLP init and batches, and the sampling

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "names.txt")
# the offline fallback when names.txt cannot be downloaded: common first names, listed for this file
NAMES = """emma liam olivia noah ava william sophia james isabella oliver mia benjamin amelia elijah
harper lucas evelyn mason abigail logan emily alexander elizabeth ethan mila jacob ella michael
avery daniel sofia henry camila jackson aria sebastian scarlett aiden victoria matthew madison
samuel luna david grace joseph chloe carter penelope owen layla wyatt riley john zoey jack nora luke
lily jayden eleanor dylan hannah grayson lillian levi addison isaac aubrey gabriel ellie julian
stella mateo natalie anthony zoe jaxon leah lincoln hazel joshua violet christopher aurora andrew
savannah theodore audrey caleb brooklyn ryan bella asher claire nathan skylar thomas lucy leo
paisley isaiah everly charles anna josiah caroline hudson nova christian genesis hunter emilia
connor kennedy eli samantha ezra maya aaron willow landon naomi adrian aaliyah jonathan elena nolan
sarah jeremiah ariana easton allison elias gabriella colton alice cameron madelyn carson cora robert
ruby angel eva maverick serenity nicholas autumn dominic adeline greyson hailey adam gianna ian
valentina austin isla santiago eliana jordan quinn cooper ivy brayden sadie roman piper evan lydia
ezekiel alexa xavier josephine jose emery jace julia jameson delilah leonardo arianna bryson vivian
axel kaylee everett sophie kayden madeline miles peyton declan clara weston hadley micah melanie
wesley mackenzie luca reagan vincent liliana damian jade zachary katherine silas isabelle gavin
natalia chase maria kai athena emmett arya harrison taylor nathaniel faith kingston rose cole kylie
tyler alexandra bennett mary bentley margaret ryker lyla tristan ashley brandon eliza kevin brianna
luis bailey george andrea ashton jasmine braxton melody ryder iris ivan isabel diego norah maxwell
annabelle max valeria carlos emerson kaiden kayla juan alyssa maddox juliana justin charlotte waylon
esther calvin ariel giovanni cecilia jonah valerie abel alina jesus molly amir reese king lilly beau
parker camden morgan alex sydney jasper eloise malachi trinity brody daisy jude kimberly blake
lauren emmanuel genevieve eric sara brooks arabella elliot harmony antonio elise abraham teagan
timothy alexis finn london rhett laila edward lucia august diana xander juliette alan sienna dean
josie lorenzo amara bryce jocelyn victor daniela milo rachel miguel summer hayden alana graham
brooke grant catherine zion amy tucker rosalie jesse ember joel rowan richard joanna patrick paige
emiliano rebecca nicolas ana dawson sawyer myles""".split()

# -----------------------------------------------------------------------------
# data: words -> (context, next char) examples

# identical to gpt.download; copied so this file stands alone
def download(url, path, sha256=""):
    """Fetch url to path once: streamed with progress, resumed from path.part after an interruption,
    checked against sha256 when given, and renamed into place only when complete."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".part"
    done = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        with requests.get(url, stream=True, timeout=30, headers={"Range": f"bytes={done}-"}) as r:
            if r.status_code != 416:  # 416: nothing is left to fetch, the .part file is complete
                r.raise_for_status()
                if r.status_code != 206:  # 200: the server ignored Range, start over
                    done = 0
                total = done + int(r.headers.get("content-length", 0))
                with open(part, "ab" if done else "wb") as f:
                    for block in r.iter_content(1 << 20):
                        done += f.write(block)
                        print(f"\r{url}: {done / 1e6:.1f}/{total / 1e6:.1f} MB", end="",
                              file=sys.stderr)
                print(file=sys.stderr)
    except requests.RequestException as e:
        raise RuntimeError(f"could not download {url} ({type(e).__name__}); fetch it yourself and "
                           f"save it as {path} (a rerun resumes from {part})") from None
    if sha256:
        digest = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            os.remove(part)
            raise RuntimeError(f"{url} arrived corrupted (sha256 {digest.hexdigest()}, expected "
                               f"{sha256}); retry")
    os.replace(part, path)  # atomic: path is either absent or complete
    return path

def load_words(data):
    """The words of a text file, one per line. data='names' reads names.txt (downloaded on first
    use; offline it returns the built-in NAMES instead); any other value is a path."""
    path = NAMES_PATH if data == "names" else data
    if data == "names" and not os.path.exists(path):
        try:
            download(NAMES_URL, path)
        except RuntimeError as e:  # download()'s network error, with the fix in its message
            print(f"{e}.\nUsing the {len(NAMES)} built-in names instead. "
                  f"For names.txt offline, put it at {path}; or pass --data=path/to/words.txt")
            return NAMES
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data={data}: no such file; pass --data=names or a file with "
                                f"one word per line")
    with open(path, encoding="utf-8") as f:
        words = [line.strip() for line in f if line.strip()]
    if len(words) < 2 or any("." in w for w in words):
        raise ValueError(f"--data={data}: need 2+ words and no '.' in them "
                         f"('.' marks word boundaries)")
    return words

def build_dataset(words, chars, block_size):
    """(X, Y): for each char of each word, and for the end, the block_size chars before it
    ('.'-padded) and its index.
    build_dataset(["ab"], ".ab", 2) -> X = [[0, 0], [0, 1], [1, 2]], Y = [1, 2, 0]."""
    stoi = {c: i for i, c in enumerate(chars)}
    X = []
    Y = []
    for word in words:
        context = [0] * block_size
        for c in word + ".":
            X.append(context)
            Y.append(stoi[c])
            context = context[1:] + [stoi[c]]
    return torch.tensor(X).view(-1, block_size), torch.tensor(Y)  # (N, block_size), (N,)

# -----------------------------------------------------------------------------
# the models: bigram counts, the same bigram as a one-layer net, and Bengio's MLP

def count_bigrams(X, Y, V, smoothing):
    """(N, P), both (V, V): N[i, j] = how often char j follows char i (a bigram sees only the last
    context char), P[i, j] = (N[i, j] + k) / (N[i].sum() + V k), the add-k smoothed
    P(next = j | last = i)."""
    N = torch.zeros(V, V).index_put_((X[:, -1], Y), torch.ones(len(Y)), accumulate=True)
    return N, (N + smoothing) / (N + smoothing).sum(1, keepdim=True)

class NeuralBigram(nn.Module):
    """logits = one_hot(last char) @ W, so softmax(W[i]) = P(next | i): V x V numbers, as counts."""
    def __init__(self, V):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(V, V))  # all logits 0: the uniform distribution
    def forward(self, X):
        # (N, V) x (V, V) -> (N, V), the same as W[X[:, -1]]
        return F.one_hot(X[:, -1], len(self.W)).float() @ self.W

class MLP(nn.Module):
    """Bengio et al. 2003: embed each of the block_size context chars, concatenate, tanh, logits."""
    def __init__(self, V, block_size, n_embd, n_hidden):
        super().__init__()
        self.wte = nn.Embedding(V, n_embd)
        self.c_fc = nn.Linear(block_size * n_embd, n_hidden)
        self.lm_head = nn.Linear(n_hidden, V)
    def forward(self, X):
        emb = self.wte(X)  # (B, T) -> (B, T, C)
        h = torch.tanh(self.c_fc(emb.flatten(1)))  # (B, T*C) -> (B, n_hidden)
        return self.lm_head(h)  # (B, V)

def train(model, X, Y, steps, lr, batch_size=0, weight_decay=0.0, prior=None, log_interval=0,
          seed=0):
    """AdamW on the mean NLL (+ prior()) of random minibatches (batch_size=0: all), with lr decaying
    linearly to 10%."""
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()  # restored at the end
    torch.set_num_threads(1)  # as fast for tiny models, while 2 on a busy CPU can be 50x slower
    for step in range(steps):
        ix = torch.randint(0, len(Y), (batch_size,), generator=g) if batch_size else slice(None)
        loss = F.cross_entropy(model(X[ix]), Y[ix]) + (prior() if prior else 0.0)
        opt.param_groups[0]["lr"] = lr * (1 - 0.9 * step / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_interval and (step % log_interval == 0 or step == steps - 1):
            print(f"step {step:5d}/{steps} | loss {loss.item():.4f} | "
                  f"lr {opt.param_groups[0]['lr']:.2e}")
    torch.set_num_threads(threads)

# -----------------------------------------------------------------------------
# using a model (samples, a look at the counts), and the command-line flags

@torch.no_grad()
def sample(logits_fn, chars, block_size, num_samples, seed, max_len=30):
    """num_samples words, each drawn one char at a time from softmax(logits_fn(context)) until '.';
    the same seed gives the same words."""
    g = torch.Generator().manual_seed(seed)
    words = []
    for _ in range(num_samples):
        context = [0] * block_size
        word = ""
        while len(word) < max_len:
            probs = F.softmax(logits_fn(torch.tensor([context])), dim=-1)  # (1, V)
            ix = torch.multinomial(probs, 1, generator=g).item()
            if ix == 0:
                break
            word = word + chars[ix]
            context = context[1:] + [ix]
        words.append(word)
    return words

def heatmap(N, chars, top):
    # rows: first char, columns: next char, darker = more frequent (log scale); then the top bigrams
    shades = " .:-=+*#%@"
    level = (N.log1p() / N.log1p().max() * (len(shades) - 1)).round().long().tolist()
    lines = ["  " + " ".join(chars)]
    for a, row in zip(chars, level):
        lines.append(a + " " + " ".join(shades[s] for s in row))
    counts, idx = N.flatten().topk(min(top, N.numel()))
    pairs = []
    for n, i in zip(counts.tolist(), idx.tolist()):
        first, second = divmod(i, len(chars))  # the flat index of N[first, second]
        pairs.append(f"{chars[first]}{chars[second]} {n:.0f}")
    return "\n".join(lines + ["most frequent: " + ", ".join(pairs)])

# identical to gpt.parse_args; copied so this file stands alone
def parse_args(config_class, argv=None):
    """Fill a config dataclass from `--name=value` flags, one flag per field, typed by its default.
    parse_args(TrainConfig, ["--n_layer=4"]) -> TrainConfig(n_layer=4, ...). -h shows each flag's
    default and the comment beside its field; a misspelled flag or a value of the wrong type stops
    with exit code 2, naming the closest flag."""
    def to_bool(text):  # type=bool would turn "False" into True
        if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    # the comment beside each field (`n_layer: int = 4  # transformer blocks`) is its help text
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        if match := re.match(r"\s+(\w+): \w+ = .*?  # (.*)", line):
            comments[match[1]] = match[2].replace("%", "%%")  # argparse formats help with %
    parser = argparse.ArgumentParser(description=config_class.__doc__, allow_abbrev=False)
    for field in dataclasses.fields(config_class):
        kind = type(field.default)
        extra = {}
        if kind is bool:  # a bare boolean flag (`--bench`) means True
            kind = to_bool
            extra = dict(nargs="?", const=True)
        parser.add_argument(f"--{field.name}", type=kind, default=field.default,
                            metavar=type(field.default).__name__,
                            help=f"{comments.get(field.name, '')} (default: {field.default!r})",
                            **extra)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [f"--{field.name}" for field in dataclasses.fields(config_class)]
        close = difflib.get_close_matches(unknown[0].split("=")[0], flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return config_class(**vars(args))

# identical to gpt.run_main; copied so this file stands alone
def run_main(main, config_class, argv=None):
    """The entry point of every script: parse the flags, then return main(config). A mistake the
    user can fix, raised on purpose by a `raise` of ours (a bad value, a missing file), prints one
    line on stderr and exits with code 1; any other exception is a bug and keeps its traceback."""
    config = parse_args(config_class, argv)
    try:
        return main(config)
    except (ValueError, OSError, RuntimeError) as e:
        tb = e.__traceback__
        while tb.tb_next is not None:  # the frame that raised it
            tb = tb.tb_next
        path = tb.tb_frame.f_code.co_filename
        ours = os.path.dirname(os.path.abspath(path)) == os.path.dirname(os.path.abspath(__file__))
        if not ours or not linecache.getline(path, tb.tb_lineno).strip().startswith("raise "):
            raise
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    # --- setup: validate the flags before any work
    counts = ("block_size", "n_embd", "n_hidden", "bigram_iters", "max_iters", "batch_size")
    ok = {"val_frac": 0 < cfg.val_frac < 1, "smoothing": cfg.smoothing > 0,
          "top_bigrams": cfg.top_bigrams >= 0}
    for name in counts:
        ok[name] = getattr(cfg, name) >= 1
    bad = [f"--{name}={getattr(cfg, name)}" for name in ok if not ok[name]]
    if bad:
        raise ValueError(f"invalid {', '.join(bad)}: need 0 < val_frac < 1, smoothing > 0, "
                         f"top_bigrams >= 0, and {', '.join(counts)} >= 1")
    print(dataclasses.asdict(cfg))
    torch.manual_seed(cfg.seed)
    # --- data: a seeded shuffle, then the first val_frac of the words for validation
    words = load_words(cfg.data)
    chars = "." + "".join(sorted(set("".join(words))))  # '.' (index 0) starts and ends every word
    words = random.Random(cfg.seed).sample(words, len(words))
    n_val = max(1, int(len(words) * cfg.val_frac))
    Xtr, Ytr = build_dataset(words[n_val:], chars, cfg.block_size)
    Xva, Yva = build_dataset(words[:n_val], chars, cfg.block_size)
    print(f"{len(words)} words, {len(chars)} chars, {len(Ytr)} train / {len(Yva)} val examples")
    # --- model 1: counts with add-k smoothing
    N, P = count_bigrams(Xtr, Ytr, len(chars), cfg.smoothing)
    print(heatmap(N, chars, cfg.top_bigrams))
    # --- model 2: NLL + k pseudo-counts of every bigram (the prior) has exactly P as its minimum
    bigram = NeuralBigram(len(chars))
    prior = lambda: -cfg.smoothing * F.log_softmax(bigram.W, dim=1).sum() / len(Ytr)  # per example
    train(bigram, Xtr, Ytr, cfg.bigram_iters, cfg.bigram_lr, prior=prior)
    # --- model 3: the MLP, on minibatches
    mlp = MLP(len(chars), cfg.block_size, cfg.n_embd, cfg.n_hidden)
    print(f"MLP: {sum(p.numel() for p in mlp.parameters())} parameters")
    train(mlp, Xtr, Ytr, cfg.max_iters, cfg.learning_rate, cfg.batch_size, cfg.weight_decay,
          log_interval=cfg.log_interval, seed=cfg.seed)
    # --- results: each model maps contexts (N, block_size) to logits (N, V); log P serves as the
    # counts' logits, since softmax(log P) = P
    models = {"counts": lambda X: P[X[:, -1]].log(), "neural": bigram, "mlp": mlp}
    result = {}
    print(f"{'model':<8} {'train NLL':>9} {'val NLL':>9}   samples")
    for name, fn in models.items():
        with torch.no_grad():  # NLL = cross-entropy of logits and true next chars (nats per char)
            train_nll = F.cross_entropy(fn(Xtr), Ytr).item()
            val_nll = F.cross_entropy(fn(Xva), Yva).item()
        result[name] = (train_nll, val_nll)
        samples = sample(fn, chars, cfg.block_size, cfg.num_samples, cfg.seed)
        print(f"{name:<8} {train_nll:9.4f} {val_nll:9.4f}   {' '.join(samples)}")
    train_gap = result["neural"][0] - result["counts"][0]
    val_gap = result["neural"][1] - result["counts"][1]
    print(f"neural - counts: train {train_gap:+.5f}, val {val_gap:+.5f}")
    return result

if __name__ == "__main__":
    run_main(main, BigramConfig)
