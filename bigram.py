"""Character-level models of names: bigram counts, the same bigram as a net, an MLP.

What you learn: a language model gives P(next char | previous chars) and is scored by the
average negative log-likelihood (NLL) of held-out words. Add-k smoothed bigram counts are
the exact optimum of the NLL plus k pseudo-counts of every bigram, so a one-layer net
trained by gradient descent on that objective reaches the same NLL. A longer context with
learned embeddings (Bengio et al. 2003) then beats both.

How to run (CPU, under a minute; --data takes any file with one word per line):
    python bigram.py              # makemore's names.txt (built-in names when offline)
    python bigram.py --data=words.txt --block_size=5 --n_hidden=200 --max_iters=30000
Depends on: nothing from this repo; downloads names.txt once into data/ with requests.
References: Bengio et al., "A Neural Probabilistic Language Model", JMLR 2003; makemore
"""
import argparse
import dataclasses
import inspect
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
    """Fit three character-level language models to a list of words, compare NLLs."""
    # data
    data: str = "names"  # "names" (makemore's names.txt) or a file, one word a line
    val_frac: float = 0.1  # fraction of the words held out to measure validation NLL
    # model
    smoothing: float = 1.0  # add-k: k pseudo-counts of every bigram (> 0, often 0.1-1)
    block_size: int = 3  # MLP context length in characters
    n_embd: int = 10  # MLP embedding size per character
    n_hidden: int = 64  # MLP hidden tanh units
    # optimizer
    bigram_iters: int = 200  # full-batch AdamW steps of the neural bigram
    bigram_lr: float = 0.5  # its initial learning rate
    max_iters: int = 10000  # MLP AdamW steps on minibatches
    batch_size: int = 64  # MLP examples per step
    learning_rate: float = 1e-2  # MLP initial learning rate; both decay linearly to 10%
    weight_decay: float = 0.2  # decoupled MLP weight decay; names.txt likes less
    log_interval: int = 2000  # print the MLP training loss every this many steps
    # sampling and system
    num_samples: int = 8  # words sampled from each model
    top_bigrams: int = 10  # most frequent bigrams listed under the heat-map
    seed: int = 1337  # seeds the split, the MLP init and batches, and the sampling

NAMES_URL = "https://raw.githubusercontent.com/karpathy/makemore/master/names.txt"
NAMES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data/names.txt")
# the offline fallback when names.txt cannot be downloaded: common first names
NAMES = """emma liam olivia noah ava william sophia james isabella oliver mia benjamin
amelia elijah harper lucas evelyn mason abigail logan emily alexander elizabeth ethan
mila jacob ella michael avery daniel sofia henry camila jackson aria sebastian scarlett
aiden victoria matthew madison samuel luna david grace joseph chloe carter penelope owen
layla wyatt riley john zoey jack nora luke lily jayden eleanor dylan hannah grayson
lillian levi addison isaac aubrey gabriel ellie julian stella mateo natalie anthony zoe
jaxon leah lincoln hazel joshua violet christopher aurora andrew savannah theodore audrey
caleb brooklyn ryan bella asher claire nathan skylar thomas lucy leo paisley isaiah
everly charles anna josiah caroline hudson nova christian genesis hunter emilia connor
kennedy eli samantha ezra maya aaron willow landon naomi adrian aaliyah jonathan elena
nolan sarah jeremiah ariana easton allison elias gabriella colton alice cameron madelyn
carson cora robert ruby angel eva maverick serenity nicholas autumn dominic adeline
greyson hailey adam gianna ian valentina austin isla santiago eliana jordan quinn cooper
ivy brayden sadie roman piper evan lydia ezekiel alexa xavier josephine jose emery jace
julia jameson delilah leonardo arianna bryson vivian axel kaylee everett sophie kayden
madeline miles peyton declan clara weston hadley micah melanie wesley mackenzie luca
reagan vincent liliana damian jade zachary katherine silas isabelle gavin natalia chase
maria kai athena emmett arya harrison taylor nathaniel faith kingston rose cole kylie
tyler alexandra bennett mary bentley margaret ryker lyla tristan ashley brandon eliza
kevin brianna luis bailey george andrea ashton jasmine braxton melody ryder iris ivan
isabel diego norah maxwell annabelle max valeria carlos emerson kaiden kayla juan alyssa
maddox juliana justin charlotte waylon esther calvin ariel giovanni cecilia jonah valerie
abel alina jesus molly amir reese king lilly beau parker camden morgan alex sydney jasper
eloise malachi trinity brody daisy jude kimberly blake lauren emmanuel genevieve eric
sara brooks arabella elliot harmony antonio elise abraham teagan timothy alexis finn
london rhett laila edward lucia august diana xander juliette alan sienna dean josie
lorenzo amara bryce jocelyn victor daniela milo rachel miguel summer hayden alana graham
brooke grant catherine zion amy tucker rosalie jesse ember joel rowan richard joanna
patrick paige emiliano rebecca nicolas ana dawson sawyer myles""".split()

# -----------------------------------------------------------------------------
# data: words -> (context, next char) examples

def fetch_names(path):
    # names.txt (228 kB) streamed into path.part with progress, renamed when complete
    with requests.get(NAMES_URL, stream=True, timeout=30) as r:
        r.raise_for_status()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".part", "wb") as f:
            for chunk in r.iter_content(1 << 16):
                f.write(chunk)
                print(f"\rnames.txt: {f.tell() // 1000} kB", end="", file=sys.stderr)
    print(file=sys.stderr)
    os.replace(path + ".part", path)

def load_words(data):
    """The words of a text file, one a line. data='names' reads names.txt (downloaded on
    first use; offline it returns the built-in NAMES); any other value is a path."""
    path = NAMES_PATH if data == "names" else data
    if data == "names" and not os.path.exists(path):
        try:
            fetch_names(path)
        except requests.RequestException as e:
            print(f"could not download {NAMES_URL} ({type(e).__name__}); using the "
                  f"{len(NAMES)} built-in names. For names.txt, save it as {path}")
            return NAMES
    if not os.path.isfile(path):
        raise SystemExit(f"bigram.py: error: --data={data}: no such file; pass "
                         f"--data=names or a file with one word per line")
    with open(path, encoding="utf-8") as f:
        words = [line.strip() for line in f if line.strip()]
    if len(words) < 2 or any("." in w for w in words):
        raise SystemExit(f"bigram.py: error: --data={data}: need 2+ words and no '.' in "
                         f"them ('.' marks word boundaries)")
    return words

def build_dataset(words, chars, block_size):
    """(X, Y): each char of each word (and the '.' after it) as its index in Y, and the
    block_size chars before it ('.'-padded) in X: build_dataset(["ab"], ".ab", 2) ->
    X = [[0, 0], [0, 1], [1, 2]], Y = [1, 2, 0]."""
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
    """(N, P), both (V, V): N[i, j] = how often char j follows the last context char i;
    P[i, j] = (N[i, j] + k) / (N[i].sum() + V k) is the add-k smoothed P(j | i)."""
    N = torch.zeros(V, V).index_put_((X[:, -1], Y), torch.ones(len(Y)), accumulate=True)
    return N, (N + smoothing) / (N + smoothing).sum(1, keepdim=True)

class NeuralBigram(nn.Module):
    """logits = one_hot(last char) @ W = W[last char]; softmax(W[i]) = P(next | i)."""
    def __init__(self, V):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(V, V))  # logits 0: uniform
    def forward(self, X):
        return F.one_hot(X[:, -1], len(self.W)).float() @ self.W

class MLP(nn.Module):
    """Bengio et al. 2003: embed the context chars, concatenate, tanh, logits."""
    def __init__(self, V, block_size, n_embd, n_hidden):
        super().__init__()
        self.wte = nn.Embedding(V, n_embd)
        self.c_fc = nn.Linear(block_size * n_embd, n_hidden)
        self.lm_head = nn.Linear(n_hidden, V)
    def forward(self, X):
        emb = self.wte(X)  # (B, T) -> (B, T, C)
        h = torch.tanh(self.c_fc(emb.flatten(1)))  # (B, T*C) -> (B, n_hidden)
        return self.lm_head(h)  # (B, V)

def train(model, X, Y, steps, lr, batch_size=0, weight_decay=0.0, prior=None,
          log_interval=0, seed=0):
    """AdamW on the mean NLL (+ prior()) of random minibatches (batch_size=0: all), with
    lr decaying linearly to 10%."""
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
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

# -----------------------------------------------------------------------------
# helpers: samples, a look at the counts, the flags

@torch.no_grad()
def sample(logits_fn, chars, block_size, num_samples, seed, max_len=30):
    """num_samples words, each drawn one char at a time from softmax(logits_fn(context))
    until '.'; the same seed gives the same words."""
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
    # rows: first char, columns: next char, darker = more frequent (log scale)
    shades = " .:-=+*#%@"
    level = (N.log1p() / N.log1p().max() * (len(shades) - 1)).round().long().tolist()
    lines = ["  " + " ".join(chars)]
    lines += [a + " " + " ".join(shades[s] for s in row) for a, row in zip(chars, level)]
    counts, idx = N.flatten().topk(min(top, N.numel()))  # flat index i: N[i // V, i % V]
    pairs = [f"{chars[i // len(chars)]}{chars[i % len(chars)]} {n:.0f}"
             for n, i in zip(counts.tolist(), idx.tolist())]
    return "\n".join(lines + ["most frequent: " + ", ".join(pairs)])

def parse_args(config_class, argv=None):
    """gpt.parse_args, copied so this file stands alone: a config from --name=value
    flags, one per field, typed by its default; -h shows each default and comment."""
    def to_bool(text):  # type=bool would turn "False" into True
        if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
            raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    source = inspect.getsource(config_class)
    comments = dict(re.findall(r"\n\s+(\w+): \w+ = .*?  # (.*)", source))
    parser = argparse.ArgumentParser(description=config_class.__doc__, allow_abbrev=False)
    for field in dataclasses.fields(config_class):
        kind = type(field.default)
        help = comments.get(field.name, "").replace("%", "%%")  # argparse formats help with %
        extra = dict(type=kind)
        if kind is bool:  # a bare flag (`--bench`) means True
            extra = dict(type=to_bool, nargs="?", const=True)
        parser.add_argument(f"--{field.name}", default=field.default, metavar=kind.__name__,
                            help=f"{help} (default: {field.default!r})", **extra)
    return config_class(**vars(parser.parse_args(argv)))

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    # --- setup: validate the flags before any work
    counts = ("block_size", "n_embd", "n_hidden", "bigram_iters", "max_iters", "batch_size")
    ok = {"val_frac": 0 < cfg.val_frac < 1, "smoothing": cfg.smoothing > 0,
          "top_bigrams": cfg.top_bigrams >= 0}
    ok |= {name: getattr(cfg, name) >= 1 for name in counts}
    bad = [f"--{name}={getattr(cfg, name)}" for name in ok if not ok[name]]
    if bad:
        raise SystemExit(f"bigram.py: error: invalid {', '.join(bad)}: need 0 < val_frac "
                         f"< 1, smoothing > 0, top_bigrams >= 0, {', '.join(counts)} >= 1")
    print(dataclasses.asdict(cfg))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)  # tiny models: 2 on a busy CPU can be 50x slower
    # --- data: a seeded shuffle, then the first val_frac of the words for validation
    words = load_words(cfg.data)
    chars = "." + "".join(sorted(set("".join(words))))  # '.' (index 0) ends each word
    words = random.Random(cfg.seed).sample(words, len(words))
    n_val = max(1, int(len(words) * cfg.val_frac))
    Xtr, Ytr = build_dataset(words[n_val:], chars, cfg.block_size)
    Xva, Yva = build_dataset(words[:n_val], chars, cfg.block_size)
    print(f"{len(words)} words, {len(chars)} chars, {len(Ytr)} train and {len(Yva)} val examples")
    # --- model 1: counts with add-k smoothing
    N, P = count_bigrams(Xtr, Ytr, len(chars), cfg.smoothing)
    print(heatmap(N, chars, cfg.top_bigrams))
    # --- model 2: NLL + k pseudo-counts of every bigram (a prior) has its minimum at P
    bigram = NeuralBigram(len(chars))
    prior = lambda: -cfg.smoothing * F.log_softmax(bigram.W, dim=1).sum() / len(Ytr)
    train(bigram, Xtr, Ytr, cfg.bigram_iters, cfg.bigram_lr, prior=prior)
    # --- model 3: the MLP, on minibatches
    mlp = MLP(len(chars), cfg.block_size, cfg.n_embd, cfg.n_hidden)
    print(f"MLP: {sum(p.numel() for p in mlp.parameters())} parameters")
    train(mlp, Xtr, Ytr, cfg.max_iters, cfg.learning_rate, cfg.batch_size, cfg.weight_decay,
          log_interval=cfg.log_interval, seed=cfg.seed)
    # --- results: each model maps contexts to logits; the counts' logits are log P
    models = {"counts": lambda X: P[X[:, -1]].log(), "neural": bigram, "mlp": mlp}
    result = {}
    print(f"{'model':<8} {'train NLL':>9} {'val NLL':>9}   samples")
    for name, fn in models.items():
        with torch.no_grad():  # NLL: cross-entropy with the next chars, nats per char
            train_nll = F.cross_entropy(fn(Xtr), Ytr).item()
            val_nll = F.cross_entropy(fn(Xva), Yva).item()
        result[name] = (train_nll, val_nll)
        samples = sample(fn, chars, cfg.block_size, cfg.num_samples, cfg.seed)
        print(f"{name:<8} {train_nll:9.4f} {val_nll:9.4f}   {' '.join(samples)}")
    gap = [result["neural"][k] - result["counts"][k] for k in (0, 1)]
    print(f"neural - counts: train {gap[0]:+.5f}, val {gap[1]:+.5f}")
    return result

if __name__ == "__main__":
    main(parse_args(BigramConfig))
