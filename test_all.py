"""Every test of the project, in curriculum order, offline and deterministic.

Run:  python test_all.py            (all tests, one line each, ends with "N passed, M failed")
      python test_all.py bpe        (only tests whose name contains "bpe")
      python test_all.py cuda       (the CUDA self-check, ~2 min on a GPU; skipped without one)
      python -m pytest test_all.py -q
The whole file takes 3 to 5 minutes on a 2-core CPU. Tests that need real data from $BUILDLLM_DATA
(GPT-2's vocabulary files, tinyshakespeare) skip when it is absent; nothing here uses the network.
Files are written only into temporary directories.
"""
import ast
import base64
import collections
import contextlib
import copy
import dataclasses
import glob
import http.server
import inspect
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from collections import Counter
from unittest import mock

import numpy as np
import regex
import requests
import tiktoken
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# optional real data (GPT-2's vocabulary files, tinyshakespeare): a folder named by BUILDLLM_DATA
SHARED = os.environ.get("BUILDLLM_DATA", os.path.join(os.path.dirname(HERE), "shared", "data"))
sys.path.insert(0, HERE)
# the models here are tiny: a second thread only adds synchronisation, which is slow on a busy machine
torch.set_num_threads(1)
import bigram  # noqa: E402  (the scripts under test, importable from this folder)
import bpe  # noqa: E402
import gpt  # noqa: E402
import micrograd  # noqa: E402

def assert_close(a, b, tol, what):
    """Assert two tensors/arrays/numbers agree within tol, reporting the max abs difference."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert diff <= tol, f"{what}: max abs diff {diff:.3e} > {tol:.1e}"

def shared_file(*parts):
    """Path of a file in the BUILDLLM_DATA folder, or skip the test when it is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        raise unittest.SkipTest(f"{path} not found; set BUILDLLM_DATA to a folder that has it")
    return path

def raises(exc_type, fn, *args, match="", **kwargs):
    """Assert fn(*args) raises exc_type whose message contains `match`; return the message."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        assert match.lower() in str(e).lower(), f"message {str(e)!r} lacks {match!r}"
        return str(e)
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {exc_type.__name__}")

# -----------------------------------------------------------------------------
# bigram.py

def _main_on_words(words, **overrides):
    # run bigram.main on a word list written to a temporary file (the tests never download names.txt)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "words.txt")
        with open(path, "w") as f:
            f.write("\n".join(words) + "\n")
        cfg = dict(data=path, max_iters=10, log_interval=0, num_samples=1) | overrides
        return bigram.main(bigram.BigramConfig(**cfg))

def test_bigram_counts_nll_hand_computed():
    """Corpus ["ab", "b"], chars ".ab", add-1. Bigrams: .a ab b. .b b. -> counts row '.': a 1, b 1;
    row a: b 1; row b: '.' 2. Add 1 to each of the 3 columns: P(a|.) = P(b|.) = 2/5, P(b|a) = 2/4,
    P(.|b) = 3/5. NLL = -(2 ln(2/5) + ln(1/2) + 2 ln(3/5)) / 5 = 0.70948."""
    X, Y = bigram.build_dataset(["ab", "b"], ".ab", 1)
    assert X.flatten().tolist() == [0, 1, 2, 0, 2] and Y.tolist() == [1, 2, 0, 2, 0]
    N, P = bigram.count_bigrams(X, Y, 3, 1.0)
    assert N.tolist() == [[0, 1, 1], [0, 0, 1], [2, 0, 0]]
    expected = -(2 * math.log(2 / 5) + math.log(1 / 2) + 2 * math.log(3 / 5)) / 5
    assert_close(torch.nn.functional.cross_entropy(P[X[:, -1]].log(), Y), expected, 1e-6, "counts NLL")
    assert_close(expected, 0.709476, 1e-6, "the docstring's number")

def test_bigram_neural_reaches_counts_nll():
    """Ten copies of "ab": whatever the split, 9 train words give P(a|.) = P(b|a) = P(.|b) = (9+1)/(9+3),
    so the counts NLL is ln(1.2) on train and val; the neural bigram must get within 0.01 of it."""
    torch.manual_seed(0)
    result = _main_on_words(["ab"] * 10)
    for split in (0, 1):
        assert_close(result["counts"][split], math.log(1.2), 1e-6, "counts NLL")
        assert_close(result["neural"][split], result["counts"][split], 0.01, "neural vs counts NLL")
    # the same on the two-word corpus of the hand-computed test, through train() directly
    X, Y = bigram.build_dataset(["ab", "b"], ".ab", 1)
    model = bigram.NeuralBigram(3)
    prior = lambda: -1.0 * torch.nn.functional.log_softmax(model.W, dim=1).sum() / len(Y)
    bigram.train(model, X, Y, 200, 0.5, prior=prior)
    with torch.no_grad():
        assert_close(torch.nn.functional.cross_entropy(model(X), Y), 0.709476, 0.01, "neural NLL on the tiny corpus")

def test_bigram_mlp_beats_bigram_offline():
    result = _main_on_words(bigram.NAMES, n_hidden=32, n_embd=8, max_iters=2000)
    assert result["mlp"][1] < result["counts"][1] - 0.02, f"MLP val NLL not below the bigram's: {result}"
    assert abs(result["neural"][1] - result["counts"][1]) < 0.01, result

def test_bigram_sampling_reproducible():
    chars = "." + "".join(sorted(set("".join(bigram.NAMES))))
    X, Y = bigram.build_dataset(bigram.NAMES, chars, 1)
    _, P = bigram.count_bigrams(X, Y, len(chars), 1.0)
    logits_fn = lambda X: P[X[:, -1]].log()
    first = bigram.sample(logits_fn, chars, 1, 20, seed=7)
    assert first == bigram.sample(logits_fn, chars, 1, 20, seed=7)
    assert first != bigram.sample(logits_fn, chars, 1, 20, seed=8)
    assert all(set(w) <= set(chars[1:]) for w in first)

def test_bigram_bad_data_raises():
    # a user's mistake ends the run with one line: SystemExit("bigram.py: error: ...")
    raises(SystemExit, bigram.load_words, "/no/such/words.txt", match="bigram.py: error: --data")
    raises(SystemExit, bigram.main, bigram.BigramConfig(data="/no/such/words.txt", val_frac=1.5, max_iters=0),
           match="invalid --val_frac=1.5, --max_iters=0:")  # only the bad flags are named
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dots.txt")
        with open(path, "w") as f:
            f.write("a.b\ncd\n")
        raises(SystemExit, bigram.load_words, path, match="'.'")

def _standalone_flags(module, config_class, argv):
    # a standalone script's own parse_args: (config or exit code, stdout + stderr)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
        try:
            return module.parse_args(config_class, argv), out.getvalue()
        except SystemExit as e:
            return e.code, out.getvalue()

def test_bigram_flags():
    cfg, _ = _standalone_flags(bigram, bigram.BigramConfig, ["--max_iters=5", "--smoothing", "0.5"])
    assert (cfg.max_iters, cfg.smoothing, cfg.data) == (5, 0.5, "names"), cfg
    for bad in (["--max_iter=5"], ["--max_iters=5.5"], ["--max=5"]):  # misspelled, mistyped, abbreviated
        assert _standalone_flags(bigram, bigram.BigramConfig, bad)[0] == 2, bad
    code, text = _standalone_flags(bigram, bigram.BigramConfig, ["-h"])
    text = " ".join(text.split())  # argparse wraps lines
    assert code == 0 and "--n_hidden int MLP hidden tanh units (default: 64)" in text, text

def test_bigram_offline_falls_back_to_built_in_names():
    saved = bigram.NAMES_URL, bigram.NAMES_PATH
    with tempfile.TemporaryDirectory() as tmp:
        # no network (requests fails to connect): --data=names falls back to the built-in NAMES
        offline = mock.patch.object(bigram.requests, "get", side_effect=bigram.requests.ConnectionError("offline"))
        try:
            bigram.NAMES_PATH = os.path.join(tmp, "names.txt")
            with offline:
                assert bigram.load_words("names") == bigram.NAMES
            # online: streamed into names.txt.part, then renamed; the next call reads the cache
            response = mock.MagicMock()
            response.__enter__.return_value.iter_content.return_value = [b"ann\nbo", b"b\n"]
            with mock.patch.object(bigram.requests, "get", return_value=response), \
                    contextlib.redirect_stderr(io.StringIO()):
                assert bigram.load_words("names") == ["ann", "bob"]
            assert os.listdir(tmp) == ["names.txt"] and bigram.load_words("names") == ["ann", "bob"]
        finally:
            bigram.NAMES_URL, bigram.NAMES_PATH = saved

# -----------------------------------------------------------------------------
# micrograd.py

def _torch_grads(fn, values):
    # value and gradients of fn at values, by torch autograd in float64
    xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
    out = fn(*xs)
    out.backward()
    return out.item(), [x.grad.item() for x in xs]

def _ours(fn, values):
    xs = [micrograd.Value(v) for v in values]
    out = fn(*xs)
    out.backward()
    return out.data, [x.grad for x in xs]

# every op, shared sub-expressions (h is used three times, a twice in one product), constants on either side
EXPRESSIONS = [
    lambda a, b: a * a + b,
    lambda a, b: (a + b) * (a - b) / (b * b + 1),
    lambda a, b: (a * b).tanh() + (a - b).relu() + (-a).relu() + b.sigmoid() * a.exp(),
    lambda a, b: (a * a + 1).log() + (b ** 3) / 2 - 3 / (a * a + 0.5) + 2 - b + (a * a + 2) ** 0.5,
    lambda a, b: (lambda h: h * h.tanh() + h.exp() * 0.1 - (h ** -2))(a * b + 1.5),
    lambda a, b: (a * 50).sigmoid() + (b * -800).sigmoid() + (-b).sigmoid() + 1 / b - a / 3,
]

def test_micrograd_matches_torch_fixed_expressions():
    for k, fn in enumerate(EXPRESSIONS):
        for values in [(0.7, -1.3), (-0.4, 2.1), (1.9, 0.35)]:
            ours, ref = _ours(fn, values), _torch_grads(fn, values)
            assert_close(ours[0], ref[0], 1e-9, f"value of expression {k} at {values}")
            assert_close(ours[1], ref[1], 1e-9, f"gradients of expression {k} at {values}")

def test_micrograd_matches_torch_random_graphs():
    worst = micrograd.check_against_torch(seed=0, n_graphs=150)
    assert worst < 1e-9, f"max relative difference to torch {worst:.2e}"

def test_micrograd_finite_differences():
    fn, values, h = EXPRESSIONS[3], [0.6, -0.9], 1e-6
    _, grads = _ours(fn, values)
    for i in range(2):
        up, down = list(values), list(values)
        up[i] += h
        down[i] -= h
        numeric = (fn(*map(micrograd.Value, up)).data - fn(*map(micrograd.Value, down)).data) / (2 * h)
        assert_close(grads[i], numeric, 1e-6, f"d/dx{i} vs central difference")

def test_micrograd_zero_grad_accumulation_and_deep_graphs():
    model = micrograd.MLP(2, [16, 16, 1], seed=0)
    assert len(model.parameters()) == (2 + 1) * 16 + (16 + 1) * 16 + (16 + 1) * 1 == 337
    out = model([0.5, -1.0])
    out.backward()
    first = [p.grad for p in model.parameters()]
    assert any(g != 0 for g in first)
    out.backward()  # a second backward adds the same gradients again
    assert_close([p.grad for p in model.parameters()], [2 * g for g in first], 1e-12, "accumulated grads")
    model.zero_grad()
    assert all(p.grad == 0.0 for p in model.parameters())
    # two losses sharing the inner node h, each with its own backward: the leaves get the sum, as in torch
    ours = [micrograd.Value(0.3), micrograd.Value(-1.2)]
    ref = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.3, -1.2)]
    for (a, b), kw in ((ours, {}), (ref, {"retain_graph": True})):
        h = (a * b).tanh()
        (h * 2).backward(**kw)
        (h * h + a).backward()
    assert_close([x.grad for x in ours], [t.grad.item() for t in ref], 1e-12, "two backward passes")
    x = micrograd.Value(0.5)
    y = x
    for _ in range(20000):  # far deeper than Python's recursion limit
        y = y + x * 0.0001
    y.backward()
    assert_close(x.grad, 3.0, 1e-9, "gradient through a 20000-deep chain")

def test_micrograd_invalid_ops_raise():
    raises(ValueError, micrograd.Value(0.0).log, match="non-positive")
    raises(ValueError, micrograd.Value(-2.0).log, match="non-positive")
    raises(TypeError, lambda: micrograd.Value(2.0) ** micrograd.Value(3.0), match="exponent")
    raises(ValueError, lambda: micrograd.Value(-2.0) ** 0.5, match="negative base")
    assert_close((micrograd.Value(-2.0) ** 3).data, -8.0, 0, "integer power of a negative base")
    for p in (0.5, -1, 0):  # at 0: an infinite slope, a division by zero, an undefined slope
        raises(ValueError, lambda: micrograd.Value(0.0) ** p, match="no finite derivative")
    raises(SystemExit, micrograd.main, micrograd.MicrogradConfig(noise=-1.0),
           match="micrograd.py: error: invalid --noise=-1.0; need --n_samples >= 2, --noise >= 0")

def test_micrograd_flags():
    """Booleans go through a converter (type=bool would read "False" as True); bare --check is True."""
    for argv, check in (([], False), (["--check"], True), (["--check=False"], False), (["--check", "yes"], True),
                        (["--check=0"], False)):
        cfg, _ = _standalone_flags(micrograd, micrograd.MicrogradConfig, argv + ["--n_hidden=4"])
        assert (cfg.check, cfg.n_hidden) == (check, 4), (argv, cfg)
    code, text = _standalone_flags(micrograd, micrograd.MicrogradConfig, ["--check=maybe"])
    assert code == 2 and "expected True or False, got 'maybe'" in text, text
    code, text = _standalone_flags(micrograd, micrograd.MicrogradConfig, ["-h"])
    assert code == 0 and "(default: False)" in text and "--noise float" in text, text

def test_micrograd_trains_to_full_accuracy():
    result = micrograd.main(micrograd.MicrogradConfig(n_samples=50, n_hidden=8, max_iters=100, log_interval=100))
    assert result["accuracy"] == 1.0 and result["loss"] < 0.1, result

# -----------------------------------------------------------------------------
# bpe.py

BPE_TEXT = ("The quick brown fox can't jump over 1234 lazy dogs!\n\n  def f(x):\n\treturn x**2  # square\n"
            "naïve café, Ünïcödé 東京タワー 🤖🚀 e\u0301 \u0915\u094d\u0937 ...   \n\n\n" * 3)

def bpe_varied_texts(seed):
    rng = random.Random(seed)
    pools = ["abc xyz ", "  \n\t", "éüñ\u0301\u0308", "東京語中文", "😀🤖👍🏽",
             "{}();=+-'\"0123456789", "<|endo"]
    texts = [BPE_TEXT, "", " ", "\n", "a", "    x   \n\n  y\t\t z   ", "it's we'll I'M 12345678 x²"]
    return texts + ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 80))) for _ in range(200)]

def test_bpe_wikipedia_example():
    """Wikipedia's example: aa -> Z=256, then ab -> Y=257 (ties go to the smaller pair), then ZY -> X=258."""
    tok = bpe.Tokenizer().train("aaabdaaabac", 259, pattern="none", special_tokens=())
    assert tok.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}, tok.merges
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99] and tok.pieces([258, 100]) == [b"aaab", b"d"]

def test_bpe_incremental_matches_naive():
    """A recount-everything reference over every chunk (not deduplicated), written here: identical merges."""
    def naive(text, n_merges, pattern):
        words, merges = [list(c.encode()) for c in regex.findall(pattern, text)], []
        for new_id in range(256, 256 + n_merges):
            counts = Counter(p for w in words for p in zip(w, w[1:]))
            merges.append(min(counts, key=lambda p: (-counts[p], p)))  # the documented tie rule: smallest pair
            for k, w in enumerate(words):
                words[k] = []
                for x in w:  # merge left to right: "aaa" with (a, a) -> [N, a]
                    if words[k] and (words[k][-1], x) == merges[-1]:
                        words[k][-1] = new_id
                    else:
                        words[k].append(x)
        return merges
    text = "".join(bpe_varied_texts(1)) + open(os.path.join(HERE, "bpe.py"), encoding="utf-8").read()[:4000]
    for pattern in ("gpt2", "gpt4"):
        tok = bpe.Tokenizer().train(text, 400, pattern=pattern, special_tokens=())
        assert list(tok.merges) == naive(text, 144, bpe.SPLIT_PATTERNS[pattern]), pattern

def test_bpe_python_matches_tiktoken():
    texts, mixed = bpe_varied_texts(2), "a<|endoftext|>b <|endoftext|><|endoftext|>"
    for pattern in ("gpt2", "gpt4", "none"):
        tok = bpe.Tokenizer().train("".join(texts[:100]), 600, pattern=pattern)
        enc = tok.to_tiktoken()
        for text in texts + ["".join(texts[100:])]:
            assert tok.encode(text) == enc.encode(text), (pattern, text)
        assert tok.encode(mixed, allowed_special="all") == enc.encode(mixed, allowed_special="all")
        assert tok.encode(mixed, allowed_special="none") == enc.encode_ordinary(mixed)

# GPT-2's split pattern as OpenAI published it (encoder.py), written out here rather than taken from bpe.py
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def test_bpe_gpt2_matches_tiktoken():
    """Our GPT-2 (encoder.json + vocab.bpe) vs tiktoken built offline from whisper's gpt2.tiktoken."""
    with open(shared_file("gpt2", "gpt2.tiktoken"), "rb") as f:
        ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in f if line.strip())}
    ref = tiktoken.Encoding(name="gpt2_ref", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256})
    gpt2_dir, vocab_bpe = os.path.dirname(shared_file("gpt2", "encoder.json")), shared_file("gpt2", "vocab.bpe")
    tok = bpe.Tokenizer.gpt2(gpt2_dir)
    with open(shared_file("tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        shakespeare = f.read()[:200_000]
    for text in [shakespeare] + bpe_varied_texts(3):
        assert tok.encode(text) == ref.encode(text) and tok.decode(ref.encode(text)) == text, text[:80]
    assert tok.to_tiktoken().encode(shakespeare) == ref.encode(shakespeare)
    eot = "Hello<|endoftext|> world<|endoftext|>"
    assert tok.encode(eot, allowed_special="all") == ref.encode(eot, allowed_special="all")
    assert tok.encode(eot, allowed_special="all")[1] == tok.special_tokens["<|endoftext|>"] == 50256
    raises(ValueError, ref.encode, eot, match="endoftext")
    raises(ValueError, tok.encode, eot, match="allowed_special")
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(os.path.join(tmp, "gpt2.json"))
        back = bpe.Tokenizer.load(os.path.join(tmp, "gpt2.json"))
        assert back.vocab == tok.vocab and back.encode(shakespeare[:5000]) == ref.encode(shakespeare[:5000])
        shutil.copy(os.path.join(gpt2_dir, "encoder.json"), tmp)
        with open(vocab_bpe, encoding="utf-8") as f:
            open(os.path.join(tmp, "vocab.bpe"), "w", encoding="utf-8").write("".join(f.readlines()[:1000]))
        raises(ValueError, bpe.Tokenizer.gpt2, tmp, match="corrupt")  # a truncated vocab.bpe

def test_bpe_round_trip_unicode():
    tok, rng = bpe.Tokenizer().train(BPE_TEXT, 300, pattern="gpt4"), random.Random(0)
    alphabet = "ab Z\n\t  \u0301\u0308éß東京語😀🏽👍\U0001F9D1\u200d"
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) + " " * rng.randint(0, 40)
        assert tok.decode(tok.encode(s)) == s, repr(s)

def test_bpe_decode_of_a_split_character():
    tok = bpe.Tokenizer()
    ids = tok.encode("€")  # 3 bytes, 3 ids
    assert len(ids) == 3 and tok.decode(ids[:2]) == "\ufffd" and tok.decode(ids[1:]) == "\ufffd\ufffd"
    assert tok.pieces(ids[:1]) == [b"\xe2"]

def test_bpe_special_tokens():
    tok = bpe.Tokenizer().train(BPE_TEXT, 300, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert tok.special_tokens == {"<|endoftext|>": 298, "<|pad|>": 299} and tok.vocab_size == 300
    raises(ValueError, tok.encode, "x<|pad|>", match="<|pad|>")
    assert tok.encode("x<|pad|>", allowed_special={"<|pad|>"})[-1] == 299
    raises(ValueError, tok.encode, "<|pad|><|endoftext|>", allowed_special={"<|pad|>"}, match="<|endoftext|>")
    assert tok.encode("<|pad|><|endoftext|>", allowed_special="all") == [299, 298]

def test_bpe_bad_inputs():
    tok = bpe.Tokenizer()
    raises(ValueError, tok.train, BPE_TEXT, 256, match="vocab_size>=257")
    raises(ValueError, tok.train, "ab", 300, match="too large")
    raises(ValueError, tok.train, BPE_TEXT, 300, special_tokens=("<|a|>", "<|a|>"), match="distinct")
    raises(ValueError, tok.train, BPE_TEXT, 300, special_tokens=("",), match="non-empty")
    raises(ValueError, tok.train, BPE_TEXT, 300, pattern="gpt3", match="gpt4")
    raises(ValueError, tok.decode, [72, 999], match="999")

def test_bpe_bad_train_files():
    # bpe.py's main turns what a user can get wrong into one line: SystemExit("bpe.py: error: ...")
    with tempfile.TemporaryDirectory() as tmp:
        raises(SystemExit, bpe.main, bpe.BpeConfig(train=os.path.join(tmp, "nope.txt")), match="no such file")
        for name, content in (("latin1.txt", "café\n".encode("latin-1")), ("empty.txt", b"")):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content)
            for bench in (False, True):
                raises(SystemExit, bpe.main, bpe.BpeConfig(train=os.path.join(tmp, name), bench=bench),
                       match="not UTF-8" if content else "empty")
        tiny = os.path.join(tmp, "tiny.txt")
        open(tiny, "w").write("ab ab\n")
        with contextlib.redirect_stdout(io.StringIO()):
            for flags, expected in ((dict(vocab_size=5000), "too large"), (dict(vocab_size=100), "vocab_size>=257"),
                                    (dict(pattern="gpt3"), "use one of")):
                for bench in (False, True):
                    raises(SystemExit, bpe.main, bpe.BpeConfig(train=tiny, bench=bench, **flags), match=expected)
            raises(SystemExit, bpe.main, bpe.BpeConfig(tokenizer=os.path.join(tmp, "none.json")), match="--train=FILE")
            with mock.patch.object(bpe.requests, "get", side_effect=requests.ConnectionError("offline")):
                raises(SystemExit, bpe.main, bpe.BpeConfig(tokenizer="gpt2", gpt2_dir=tmp), match="--gpt2_dir")

def test_bpe_flags():
    cfg, _ = _standalone_flags(bpe, bpe.BpeConfig, ["--bench", "--vocab_size=300", "--text=a=b c"])
    assert (cfg.bench, cfg.vocab_size, cfg.text) == (True, 300, "a=b c"), cfg
    assert _standalone_flags(bpe, bpe.BpeConfig, ["--vocab=300"])[0] == 2  # no abbreviations
    code, text = _standalone_flags(bpe, bpe.BpeConfig, ["-h"])
    assert code == 0 and "(default: 'tok.json')" in text and "(default: 1024)" in text, text

# Hugging Face tokenizer files (bpe.Tokenizer.from_pretrained, to_hf, save_pretrained) and chat templates.
# The reference values below were produced once, by hand, in a separate environment with tokenizers 0.23.3
# and transformers 5.25.0 (never imported here); each constant says which call made it.
import unicodedata  # noqa: E402  (Qwen's NFC, which tiktoken lacks)

BPE_HF_TRAIN_TEXT = ("The quick brown fox can't jump over 1234 lazy dogs! It's 2024, and we'll see 3.14159.\n\n"
                 "  def forward(self, x):\n\treturn self.weight * x**2  # the square, then 100%\n"
                 "naïve café, Ünïcödé, 東京タワー 東京 中文 🤖🚀👍🏽 e\u0301 ...   \n\n\n"
                 "Once upon a time there was a little cat named Tom, who loved the sunny garden.\n") * 4
BPE_HF_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_HF_QWEN2_SPLIT = BPE_HF_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

def _bpe_hf_tokenizer_json(layout):
    """A tiny tokenizer.json in the layout of GPT-2, Llama 3, SmolLM2 or Qwen2, written here from a
    bpe.py-trained vocab (not by bpe.py's to_hf): bytes spelled in GPT-2's alphabet (OpenAI's
    bytes_to_unicode), ids laid out as that family does, its pre_tokenizer and specials."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = dict(zip(printable + [b for b in range(256) if b not in printable],
                        [chr(b) for b in printable] + [chr(256 + k) for k in range(68)]))
    pattern = {"gpt2": "gpt2", "llama3": BPE_HF_LLAMA3_SPLIT, "smollm": "smollm", "qwen2": BPE_HF_QWEN2_SPLIT}[layout]
    trained = bpe.Tokenizer().train(BPE_HF_TRAIN_TEXT, 420, pattern=pattern, special_tokens=())
    spell = {i: "".join(alphabet[b] for b in trained.vocab[i]) for i in trained.vocab}
    first = {"smollm": [f"<|special_{k}|>" for k in range(17)]}.get(layout, [])  # SmolLM2: specials 0..16
    order = first + [alphabet[b] for b in alphabet] + [spell[i] for i in range(256, 420)]
    if layout == "llama3":  # whole words no merge makes: ignore_merges keeps them one token
        order += ["Hello", "\u0120world", "\u0120apples"]
    vocab = {s: i for i, s in enumerate(order)}
    merges = [f"{spell[a]} {spell[b]}" for a, b in trained.merges]
    if layout == "llama3":  # tokens that several pairs make: a second pair right after the first
        for k, (a, b) in reversed(list(enumerate(trained.merges))):
            whole = spell[a] + spell[b]
            other = [(whole[:j], whole[j:]) for j in range(1, len(whole)) if whole[:j] != spell[a]]
            other = [pair for pair in other if pair[0] in vocab and pair[1] in vocab
                     and vocab[pair[0]] < vocab[whole] and vocab[pair[1]] < vocab[whole]]
            if other:
                merges.insert(k + 1, " ".join(other[0]))
    added = {"gpt2": ["<|endoftext|>"], "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                                     "<|end_header_id|>", "<|eot_id|>"],
             "smollm": [], "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]}[layout]
    added_tokens = [{"id": k, "content": s, "special": True} for k, s in enumerate(first)]
    added_tokens += [{"id": len(vocab) + k, "content": s, "special": not s.startswith("<t") and "/t" not in s}
                     for k, s in enumerate(added)]
    for t in added_tokens:
        t.update(single_word=False, lstrip=False, rstrip=False, normalized=False)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    pre = {"gpt2": dict(byte_level, use_regex=True),
           "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                            dict(byte_level, use_regex=True)]}}
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
             "ignore_merges": layout == "llama3", "vocab": vocab, "merges": merges}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
            "normalizer": {"type": "NFC"} if layout == "qwen2" else None,
            "pre_tokenizer": pre.get(layout, {"type": "Sequence", "pretokenizers": [split, byte_level]}),
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                                "trim_offsets": True, "use_regex": True}, "model": model}

def _bpe_hf_folder(folder, layout, config=None):
    # a model folder: _bpe_hf_tokenizer_json(layout) as tokenizer.json, and config as tokenizer_config.json
    os.makedirs(folder)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(_bpe_hf_tokenizer_json(layout), f, ensure_ascii=False)
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return folder

BPE_HF_TEXTS = ["Hello world! It's 2024: 1234567 apples, x!!1, a  1,  123 and 3.14159.",
            "def f(x):\n\treturn x**2  # square\n\n\n    if a != b:  print('ok')\r\n",
            "naïve café é Ünïcödé 東京タワー 中文 🤖🚀👍🏽 🧑‍💻   \n  \t end",
            "<|endoftext|>a<|im_start|>user\nHi<|im_end|>\n<think>\n\n</think> <|eot_id|>  <|special_3|>z",
            "   leading and trailing   ",
            "",
            "x²+y³=z¹ ½ Ⅻ ٣٤٥",
            "Ǻ ẛ̣ Å"]
# tokenizers.Tokenizer.from_file(<_bpe_hf_tokenizer_json(layout) written to a file>).encode(text,
# add_special_tokens=False).ids for each of BPE_HF_TEXTS
BPE_HF_IDS = {
    "gpt2": [[39, 276, 75, 78, 264, 78, 81, 75, 67, 0, 409, 313, 408, 19, 25, 397, 19, 20, 21, 22, 261, 79, 79, 341, 82,
         11, 273, 0, 0, 16, 11, 261, 220, 270, 11, 220, 397, 383, 296, 13, 319, 320, 24, 13],
        [67, 331, 272, 7, 87, 315, 198, 197, 402, 351, 273, 316, 17, 220, 293, 377, 390, 268, 198, 269, 220, 220,
         72, 69, 261, 220, 0, 28, 299, 25, 220, 220, 79, 81, 72, 77, 83, 7, 6, 78, 74, 6, 8, 201, 198],
        [401, 266, 393, 300, 374, 415, 328, 372, 407, 403, 120, 416, 365, 417, 367, 364, 363, 306, 100, 239, 158,
         222, 362, 240, 119, 269, 220, 198, 269, 197, 300, 343],
        [420, 64, 27, 91, 72, 76, 62, 82, 83, 265, 83, 91, 29, 84, 82, 68, 81, 198, 39, 72, 27, 91, 72, 76, 62, 333,
         67, 91, 29, 198, 27, 83, 71, 72, 77, 74, 29, 198, 198, 27, 14, 83, 71, 72, 77, 74, 29, 220, 27, 91, 68, 78,
         83, 62, 72, 67, 91, 29, 220, 220, 27, 91, 82, 79, 68, 66, 72, 64, 75, 62, 18, 91, 29, 89],
        [269, 263, 68, 64, 67, 72, 77, 70, 383, 256, 81, 64, 72, 75, 72, 77, 70, 269, 220],
        [],
        [87, 126, 110, 10, 88, 126, 111, 28, 89, 126, 117, 220, 126, 121, 220, 158, 227, 104, 220, 149, 96, 149, 97,
         149, 98],
        [32, 136, 232, 374, 220, 157, 118, 249, 136, 96, 304, 227]],
    "llama3": [[420, 421, 0, 408, 312, 220, 325, 19, 25, 220, 322, 18, 19, 20, 21, 22, 422, 11, 272, 0, 0, 16, 11, 262,
         220, 220, 16, 11, 220, 220, 322, 18, 386, 220, 18, 13, 323, 16, 326, 13],
        [67, 336, 271, 7, 87, 315, 198, 407, 356, 272, 316, 17, 220, 293, 380, 393, 261, 198, 269, 220, 220, 72, 69,
         262, 220, 0, 28, 297, 25, 220, 220, 79, 81, 72, 77, 83, 7, 6, 78, 74, 6, 8, 201, 198],
        [401, 267, 396, 298, 377, 414, 333, 375, 406, 402, 120, 415, 368, 416, 370, 367, 366, 304, 100, 239, 158,
         222, 365, 240, 119, 269, 220, 198, 269, 197, 298, 348],
        [27, 91, 338, 67, 78, 69, 83, 68, 87, 83, 91, 29, 64, 27, 91, 72, 76, 62, 82, 83, 266, 83, 91, 29, 84, 82,
         68, 81, 198, 39, 72, 27, 91, 72, 76, 62, 338, 67, 91, 29, 198, 27, 83, 71, 72, 77, 74, 29, 261, 27, 14, 83,
         71, 72, 77, 74, 29, 220, 427, 220, 220, 27, 91, 82, 79, 68, 66, 72, 64, 75, 62, 18, 91, 29, 89],
        [269, 264, 68, 64, 67, 72, 77, 70, 386, 256, 81, 64, 72, 75, 72, 77, 70, 269, 220],
        [],
        [87, 126, 110, 10, 88, 126, 111, 28, 89, 126, 117, 220, 126, 121, 220, 158, 227, 104, 220, 149, 96, 149, 97,
         149, 98],
        [32, 136, 232, 377, 220, 157, 118, 249, 136, 96, 302, 227]],
    "smollm": [[56, 292, 92, 95, 281, 95, 98, 92, 84, 17, 415, 327, 237, 34, 32, 34, 36, 42, 237, 33, 34, 35, 36, 37, 38,
         39, 278, 96, 96, 350, 99, 28, 289, 17, 17, 33, 28, 278, 286, 33, 28, 286, 33, 34, 35, 392, 237, 35, 30, 33,
         36, 33, 37, 41, 30],
        [84, 340, 288, 24, 104, 329, 215, 214, 409, 360, 289, 330, 34, 237, 309, 435, 285, 215, 286, 237, 237, 89,
         86, 278, 237, 17, 45, 313, 42, 237, 237, 96, 98, 89, 94, 100, 24, 23, 95, 91, 23, 25, 218, 215],
        [408, 283, 402, 314, 383, 421, 430, 414, 410, 137, 422, 374, 423, 434, 320, 117, 256, 175, 239, 371, 257,
         136, 286, 237, 215, 286, 214, 314, 352],
        [44, 108, 342, 84, 95, 86, 100, 85, 104, 100, 108, 46, 81, 44, 108, 89, 93, 79, 99, 100, 282, 100, 108, 46,
         101, 99, 85, 98, 215, 56, 89, 44, 108, 89, 93, 79, 342, 84, 108, 46, 215, 44, 100, 88, 89, 94, 91, 46, 215,
         215, 44, 31, 100, 88, 89, 94, 91, 46, 237, 44, 108, 85, 95, 100, 79, 89, 84, 108, 46, 286, 3, 106],
        [286, 280, 85, 81, 84, 89, 94, 87, 392, 273, 98, 81, 89, 92, 89, 94, 87, 286, 237],
        [],
        [104, 143, 127, 27, 105, 143, 128, 45, 106, 143, 134, 237, 143, 138, 237, 175, 244, 121, 237, 166, 113, 166,
         114, 166, 115],
        [49, 153, 249, 383, 237, 174, 135, 266, 153, 113, 318, 244]],
    "qwen2": [[39, 275, 75, 78, 265, 78, 81, 75, 67, 0, 401, 312, 220, 17, 15, 17, 19, 25, 220, 16, 17, 18, 19, 20, 21,
         22, 262, 79, 79, 339, 82, 11, 272, 0, 0, 16, 11, 262, 220, 220, 16, 11, 220, 220, 16, 17, 18, 379, 220, 18,
         13, 16, 19, 16, 20, 24, 13],
        [67, 329, 271, 7, 87, 416, 400, 349, 272, 316, 17, 220, 293, 373, 386, 261, 198, 269, 220, 220, 72, 69, 262,
         220, 0, 28, 297, 25, 220, 220, 79, 81, 72, 77, 83, 7, 6, 78, 74, 6, 8, 201, 198],
        [394, 267, 389, 220, 283, 407, 419, 399, 395, 120, 408, 361, 409, 363, 360, 359, 304, 100, 239, 158, 222,
         358, 240, 119, 269, 220, 198, 269, 197, 298, 341],
        [420, 64, 421, 84, 82, 68, 81, 198, 39, 72, 422, 198, 423, 261, 424, 220, 27, 91, 68, 78, 83, 62, 72, 67,
         91, 29, 220, 220, 27, 91, 82, 79, 68, 66, 72, 64, 75, 62, 18, 91, 29, 89],
        [269, 264, 68, 64, 67, 72, 77, 70, 379, 256, 81, 64, 72, 75, 72, 77, 70, 269, 220],
        [],
        [87, 126, 110, 10, 88, 126, 111, 28, 89, 126, 117, 220, 126, 121, 220, 158, 227, 104, 220, 149, 96, 149, 97,
         149, 98],
        [131, 118, 220, 157, 118, 249, 136, 96, 302, 227]],
}

def test_bpe_hf_layouts_equal_tokenizers_ids():
    """GPT-2, Llama 3 (Split regex, ignore_merges, two pairs making one token, specials after the vocab), SmolLM2
    (17 specials first, Digits) and Qwen2 (NFC, non-special added tokens): ids as `tokenizers` gives them, and
    as tiktoken gives them from to_tiktoken (after NFC: tiktoken has no normalizer)."""
    with tempfile.TemporaryDirectory() as tmp:
        for layout, expected in BPE_HF_IDS.items():
            tok = bpe.Tokenizer.from_pretrained(_bpe_hf_folder(os.path.join(tmp, layout), layout))
            enc = tok.to_tiktoken()
            for text, ids in zip(BPE_HF_TEXTS, expected):
                assert tok.encode(text, allowed_special="all") == ids, (layout, text)
                normalized = unicodedata.normalize("NFC", text) if tok.nfc else text
                assert enc.encode(normalized, allowed_special="all") == ids, (layout, text)
                assert tok.decode(ids) == normalized, (layout, text)
            assert tok.vocab_size == max(tok.vocab) + 1 == len(tok.vocab), (layout, tok.vocab_size)
        assert tok.nfc and tok.special_tokens["<think>"] == 423, "Qwen2: every added token is matched"
        smollm = bpe.Tokenizer.from_pretrained(os.path.join(tmp, "smollm"))
        assert smollm.pattern == "smollm" and smollm.special_tokens["<|special_0|>"] == 0 and smollm.byte_ids[33] == 17
        llama = bpe.Tokenizer.from_pretrained(os.path.join(tmp, "llama3"))
        assert llama.encode("Hello") == [llama.whole[b"Hello"]] == [420], "ignore_merges: a token no merge makes"
        assert len(llama.merges) == 166 and len(set(llama.merges.values())) == 164, "two pairs make one token twice"

def test_bpe_hf_folder_is_what_checkpoints_and_the_cli_name():
    with tempfile.TemporaryDirectory() as tmp:
        folder = _bpe_hf_folder(os.path.join(tmp, "llama3"), "llama3")
        tok = bpe.Tokenizer.from_pretrained(folder)
        assert tok.to_dict() == {"pretrained": folder} and tok.chat_template is None
        for again in (bpe.Tokenizer.from_dict(tok.to_dict()), bpe.Tokenizer.from_saved(folder),
                      bpe.Tokenizer.from_saved({"pretrained": folder})):
            assert again.encode(BPE_HF_TEXTS[0]) == BPE_HF_IDS["llama3"][0]
        with contextlib.redirect_stdout(io.StringIO()):
            shown = bpe.main(bpe.BpeConfig(tokenizer=folder, text=BPE_HF_TEXTS[3]))
        assert shown["ids"] == BPE_HF_IDS["llama3"][3]
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(BPE_HF_CHAT_TEMPLATES["llama3"])  # where newer transformers save the template
        assert bpe.Tokenizer.from_pretrained(folder).chat_template["end"] == "<|eot_id|>"

def test_bpe_hf_files_that_are_not_byte_level_bpe():
    """BERT's WordPiece, T5's Unigram, byte_fallback, a missing or corrupt file: one clear error each."""
    wordpiece = {"normalizer": {"type": "BertNormalizer"}, "pre_tokenizer": {"type": "BertPreTokenizer"},
                 "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": {"[UNK]": 0, "a": 1}}}
    unigram = {"normalizer": {"type": "Precompiled"}, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"},
               "model": {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}}
    fallback = _bpe_hf_tokenizer_json("gpt2")
    fallback["model"]["byte_fallback"] = True
    not_bytes = _bpe_hf_tokenizer_json("gpt2")
    del not_bytes["model"]["vocab"]["\u0120"]  # the space (GPT-2's 'Ġ') has no token
    with tempfile.TemporaryDirectory() as tmp:
        raises(FileNotFoundError, bpe.Tokenizer.from_pretrained, tmp, match="tokenizer.json")
        path = os.path.join(tmp, "tokenizer.json")
        cases = [(wordpiece, "a WordPiece model, the BertNormalizer normalizer, its pre_tokenizer"),
                 (unigram, "a Unigram model"), (fallback, "byte_fallback"), (not_bytes, "not byte-level BPE")]
        for obj, named in cases:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(obj, f)
            msg = raises(ValueError, bpe.Tokenizer.from_pretrained, tmp, match=named)
            assert "GPT-2, Llama 3, SmolLM2" in msg, msg
        with open(path, "w", encoding="utf-8") as f:
            f.write('{"model": {"type": "BPE", "vocab": {')
        raises(ValueError, bpe.Tokenizer.from_pretrained, tmp, match="not valid JSON")

# The chat templates (tokenizer_config.json's "chat_template") of HuggingFaceTB/SmolLM2-360M-Instruct,
# Qwen/Qwen2.5-0.5B-Instruct, Qwen3 (thinking on or off), meta-llama/Meta-Llama-3-8B-Instruct, Llama-3.1-8B-Instruct
# and Llama-3.2-1B-Instruct, verbatim from public copies of those files (several agree for each)
BPE_HF_CHAT_TEMPLATES = {
    "smollm2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>syste"
        "m\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|"
        "im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_"
        "generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "qwen25": ("{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
        "        {{- messages[0]['content'] }}\n    {%- else %}\n"
        "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
        "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou a"
        "re provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
        "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
        "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\"
        "\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
        "    {%- if messages[0]['role'] == 'system' %}\n"
        "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
        "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|i"
        "m_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
        "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role"
        " == \"assistant\" and not message.tool_calls) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
        "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
        "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
        "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
        "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
        "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
        "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
        "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
        "    {%- elif message.role == \"tool\" %}\n"
        "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
        "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
        "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
        "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
        "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"),
    "qwen3": ("{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
        "        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n"
        "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are pro"
        "vided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
        "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
        "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\"
        "\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
        "    {%- if messages[0].role == 'system' %}\n"
        "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n"
        "{%- endif %}\n{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
        "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
        "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not(message."
        "content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
        "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n"
        "    {%- endif %}\n{%- endfor %}\n{%- for message in messages %}\n"
        "    {%- if message.content is string %}\n        {%- set content = message.content %}\n    {%- else %}\n"
        "        {%- set content = '' %}\n    {%- endif %}\n"
        "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
        "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
        "    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n"
        "        {%- if message.reasoning_content is string %}\n"
        "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
        "            {%- if '</think>' in content %}\n"
        "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-"
        "1].lstrip('\\n') %}\n                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
        "            {%- endif %}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n"
        "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
        "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '"
        "\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n"
        "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
        "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
        "        {%- endif %}\n        {%- if message.tool_calls %}\n"
        "            {%- for tool_call in message.tool_calls %}\n"
        "                {%- if (loop.first and content) or (not loop.first) %}\n"
        "                    {{- '\\n' }}\n                {%- endif %}\n"
        "                {%- if tool_call.function %}\n"
        "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
        "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
        "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
        "                    {{- tool_call.arguments }}\n                {%- else %}\n"
        "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
        "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
        "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
        "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
        "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
        "        {{- content }}\n        {{- '\\n</tool_response>' }}\n"
        "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
        "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}"),
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>"
        "' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.in"
        "dex0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generati"
        "on_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "llama31": ("{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
        "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n"
        "{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n"
        "{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
        "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
        "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
        "\n{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
        "{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n"
        "{%- endif %}\n{%- if builtin_tools is defined %}\n"
        "    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}"
        "\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
        "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
        "{%- if tools is not none and not tools_in_user_message %}\n"
        "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a "
        "function call.\" }}\n"
        "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and "
        "its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n"
        "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n"
        "{#- Custom tools are passed in a user message with some extra guidance #}\n"
        "{%- if tools_in_user_message and not tools is none %}\n"
        "    {#- Extract the first user message so we can plug it in here #}\n"
        "    {%- if messages | length != 0 %}\n"
        "        {%- set first_user_message = messages[0]['content']|trim %}\n"
        "        {%- set messages = messages[1:] %}\n    {%- else %}\n"
        "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user messa"
        "ge!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
        "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
        "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
        "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and "
        "its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n"
        "    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n"
        "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
        "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | tri"
        "m + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n"
        "        {%- if not message.tool_calls|length == 1 %}\n"
        "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
        "        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n"
        "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n"
        "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
        "                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n"
        "                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n"
        "            {{- \")\" }}\n        {%- else  %}\n"
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n"
        "            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n"
        "        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n"
        "            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n"
        "        {%- endif %}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
        "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
        "        {%- if message.content is mapping or message.content is iterable %}\n"
        "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
        "        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"),
    "llama32": ("{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
        "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n"
        "{%- endif %}\n{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
        "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n"
        "        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n"
        "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
        "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
        "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n"
        "\n{#- System message #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
        "{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n"
        "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
        "{%- if tools is not none and not tools_in_user_message %}\n"
        "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a "
        "function call.\" }}\n"
        "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and "
        "its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n"
        "{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n"
        "{#- Custom tools are passed in a user message with some extra guidance #}\n"
        "{%- if tools_in_user_message and not tools is none %}\n"
        "    {#- Extract the first user message so we can plug it in here #}\n"
        "    {%- if messages | length != 0 %}\n"
        "        {%- set first_user_message = messages[0]['content']|trim %}\n"
        "        {%- set messages = messages[1:] %}\n    {%- else %}\n"
        "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user messa"
        "ge!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
        "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
        "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
        "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and "
        "its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n"
        "        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n"
        "    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n"
        "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
        "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | tri"
        "m + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n"
        "        {%- if not message.tool_calls|length == 1 %}\n"
        "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
        "        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n"
        "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n"
        "        {{- tool_call.arguments | tojson }}\n        {{- \"}\" }}\n        {{- \"<|eot_id|>\" }}\n"
        "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
        "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
        "        {%- if message.content is mapping or message.content is iterable %}\n"
        "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
        "        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"),
}
BPE_HF_CHATS = {  # (messages, add_generation_prompt)
    "user": ([{"role": "user", "content": "Hi there"}], True),
    "system_user": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a cat."}], True),
    "two_turns": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a cat."},
                   {"role": "assistant", "content": "Tom."}, {"role": "user", "content": " Another? "},
                   {"role": "assistant", "content": " Felix!\n"}], False),
    "no_system": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False),
}
# transformers' tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=...,
# date_string="05 Mar 2025") with tok.chat_template = BPE_HF_CHAT_TEMPLATES[name] (Qwen3 with a generation prompt:
# enable_thinking=False, as bpe.py renders it; Llama 3.1 "nodate": without date_string)
BPE_HF_RENDERED = {
    "smollm2/user": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "smollm2/system_user": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a cat.<|im_end|>\n<|im_start|>assistant\n",
    "smollm2/two_turns": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a cat.<|im_end|>\n<|im_start|>assistant\n"
        "Tom.<|im_end|>\n<|im_start|>user\n Another? <|im_end|>\n<|im_start|>assistant\n Felix!\n<|im_end|>\n",
    "smollm2/no_system": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n",
    "qwen25/user": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen25/system_user": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a cat.<|im_end|>\n<|im_start|>assistant\n",
    "qwen25/two_turns": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a cat.<|im_end|>\n<|im_start|>assistant\n"
        "Tom.<|im_end|>\n<|im_start|>user\n Another? <|im_end|>\n<|im_start|>assistant\n Felix!\n<|im_end|>\n",
    "qwen25/no_system": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n",
    "qwen3/user": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "qwen3/system_user": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a cat.<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n\n</think>\n\n",
    "qwen3/two_turns": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a cat.<|im_end|>\n<|im_start|>assistant\n"
        "Tom.<|im_end|>\n<|im_start|>user\n Another? <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        " Felix!\n<|im_end|>\n",
    "qwen3/no_system": "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\ny<|im_end|>\n",
    "llama3/user": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama3/system_user": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Name a cat.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama3/two_turns": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Name a cat.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Tom.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Another?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nFelix!<|eot_id|>",
    "llama3/no_system": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "x<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\ny<|eot_id|>",
    "llama31/user": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama31/system_user": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Name a cat.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama31/two_turns": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Name a cat.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Tom.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Another?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nFelix!<|eot_id|>",
    "llama31/no_system": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "x<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\ny<|eot_id|>",
    "llama32/user": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama32/system_user": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Name a cat.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama32/two_turns": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Name a cat.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Tom.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Another?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nFelix!<|eot_id|>",
    "llama32/no_system": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 05 Mar 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "x<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\ny<|eot_id|>",
    "llama31/user/nodate": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}

def test_bpe_hf_chat_templates_render_as_transformers():
    """from_pretrained reads each real template's family, default system message, dated system turn and bos
    without Jinja; render_conversation's text is apply_chat_template's, and its ids are those of the whole text."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, template in BPE_HF_CHAT_TEMPLATES.items():
            layout = "llama3" if "llama" in name else "qwen2"
            config = {"chat_template": template, "bos_token": "<|begin_of_text|>" if layout == "llama3" else None}
            tok = bpe.Tokenizer.from_pretrained(_bpe_hf_folder(os.path.join(tmp, name), layout, config))
            for chat, (messages, _) in BPE_HF_CHATS.items():
                ids, mask = bpe.render_conversation(tok, messages, tok.chat_template, date_string="05 Mar 2025")
                text = BPE_HF_RENDERED[f"{name}/{chat}"]
                assert tok.decode(ids) == text, (name, chat)
                assert ids == tok.encode(text, allowed_special="all"), (name, chat)
        today = time.strftime("%d %b %Y")  # Llama 3.2 dates its system turn today, 3.1 on a fixed day
        ids, _ = bpe.render_conversation(tok, BPE_HF_CHATS["user"][0], tok.chat_template)
        assert tok.decode(ids) == BPE_HF_RENDERED["llama32/user"].replace("05 Mar 2025", today)
        llama31 = bpe.Tokenizer.from_pretrained(os.path.join(tmp, "llama31"))
        ids, _ = bpe.render_conversation(llama31, BPE_HF_CHATS["user"][0], llama31.chat_template)
        assert llama31.decode(ids) == BPE_HF_RENDERED["llama31/user/nodate"]

def test_bpe_hf_chat_mask_stops_and_typed_specials():
    with tempfile.TemporaryDirectory() as tmp:
        qwen = bpe.Tokenizer.from_pretrained(_bpe_hf_folder(os.path.join(tmp, "q"), "qwen2",
                                                        {"chat_template": BPE_HF_CHAT_TEMPLATES["qwen3"]}))
        llama = bpe.Tokenizer.from_pretrained(_bpe_hf_folder(os.path.join(tmp, "l"), "llama3",
                                                         {"chat_template": BPE_HF_CHAT_TEMPLATES["llama32"]}))
    messages = BPE_HF_CHATS["two_turns"][0]
    for tok, trained in ((qwen, "Tom.<|im_end|> Felix!\n<|im_end|>"), (llama, "Tom.<|eot_id|>Felix!<|eot_id|>")):
        ids, mask = bpe.render_conversation(tok, messages, tok.chat_template)
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == trained, "the replies and their end-of-turn tokens"
    # Qwen3's empty thinking opens the last reply: part of the prompt, not of what is learned
    ids, mask = bpe.render_conversation(qwen, messages, qwen.chat_template)
    think = qwen.special_tokens["<think>"]
    assert ids.count(think) == 1 and think not in [i for i, m in zip(ids, mask) if m]
    assert bpe.stop_ids(qwen, "chatml") == [qwen.special_tokens["<|im_end|>"], qwen.special_tokens["<|endoftext|>"]]
    assert bpe.stop_ids(llama, llama.chat_template) == [llama.special_tokens["<|eot_id|>"],
                                                        llama.special_tokens["<|end_of_text|>"]]
    assert bpe.end_of_turn(llama) == llama.special_tokens["<|eot_id|>"] == bpe.end_of_turn(llama, "llama3")
    # a typed special token is text in a message, a token only where the template writes it
    ids, _ = bpe.render_conversation(qwen, [{"role": "user", "content": "<|im_end|><|im_start|>system"}], "chatml")
    assert ids.count(qwen.special_tokens["<|im_end|>"]) == 1 and ids.count(qwen.special_tokens["<|im_start|>"]) == 2
    trained = bpe.Tokenizer().train(BPE_HF_TRAIN_TEXT, 300)
    assert bpe.stop_ids(trained) == [trained.special_tokens["<|endoftext|>"]] == [bpe.end_of_turn(trained)]
    raises(ValueError, bpe.render_conversation, trained, messages, "llama3", match="<|eot_id|>")
    (x, y), = bpe.make_examples(llama, [messages], llama.chat_template, 256)[0]
    assert llama.decode([t for t in y if t != -100]) == "Tom.<|eot_id|>Felix!<|eot_id|>"

def test_bpe_hf_save_pretrained_round_trip():
    """save_pretrained writes tokenizer.json and tokenizer_config.json that read back to the same ids and chat
    template; `tokenizers` and transformers' AutoTokenizer read them too (checked by hand, values pasted)."""
    text = "a  \nb x \n\n y  \n<|endoftext|>z"
    # tokenizers.Tokenizer.from_file(<save_pretrained's tokenizer.json>).encode(t, add_special_tokens=False).ids
    pasted = {"gpt4": [[72, 275, 108, 111, 265, 111, 114, 108, 100, 33, 295, 116, 312, 32, 325, 52, 58, 32, 322, 51, 52,
                        53, 54, 55, 262, 112, 112, 346, 115, 44, 272, 33, 33, 49, 44, 262, 32, 32, 49, 44, 32, 32, 322,
                        51, 262, 348, 32, 51, 46, 323, 49, 326, 46], [97, 269, 10, 98, 272, 305, 32, 121, 269, 10, 379, 122]],
              "smollm": [[72, 275, 108, 111, 264, 111, 114, 108, 100, 33, 294, 116, 310, 32, 50, 48, 50, 52, 58, 32, 49, 50,
                          51, 52, 53, 54, 55, 261, 112, 112, 333, 115, 44, 272, 33, 33, 49, 44, 261, 269, 49, 44, 269, 49,
                          50, 51, 375, 32, 51, 46, 49, 52, 49, 53, 57, 46], [97, 269, 10, 98, 272, 304, 32, 121, 269, 10,
                                                                             379, 122]]}
    # AutoTokenizer.from_pretrained(<the folder>).apply_chat_template(BPE_HF_CHATS["two_turns"][0], tokenize=False)
    rendered = {"phi3": ("<|system|>\nBe brief.\n<|user|>\nName a cat.\n<|assistant|>\nTom.<|endoftext|><|user|>\n"
                         " Another? \n<|assistant|>\n Felix!\n<|endoftext|>"),
                "alpaca": ("Be brief.\n\n### Instruction:\nName a cat.\n\n### Response:\nTom.<|endoftext|>"
                           "### Instruction:\n Another? \n\n### Response:\n Felix!\n<|endoftext|>")}
    messages = BPE_HF_CHATS["two_turns"][0]
    with tempfile.TemporaryDirectory() as tmp:
        for pattern, template in (("gpt4", "phi3"), ("smollm", "alpaca"), ("gpt2", "phi3"), ("none", "alpaca")):
            tok = bpe.Tokenizer().train(BPE_HF_TRAIN_TEXT, 380, pattern=pattern)
            folder = os.path.join(tmp, pattern)
            tok.save_pretrained(folder, template)
            assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer_config.json"], "no .tmp left"
            back = bpe.Tokenizer.from_pretrained(folder)
            for t in BPE_HF_TEXTS + [text]:
                assert back.encode(t, allowed_special="all") == tok.encode(t, allowed_special="all"), (pattern, t)
            if pattern in pasted:
                assert [tok.encode(t, allowed_special="all") for t in (BPE_HF_TEXTS[0], text)] == pasted[pattern]
            ids, _ = bpe.render_conversation(back, messages, back.chat_template)
            assert ids == bpe.render_conversation(tok, messages, template)[0]
            assert tok.decode(ids) == rendered[template], (pattern, template)
            config = json.load(open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8"))
            assert config["eos_token"] == config["bos_token"] == config["pad_token"] == "<|endoftext|>"
            tokenizer = json.load(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8"))
            assert tokenizer["model"]["type"] == "BPE" and tokenizer["added_tokens"][0]["id"] == 379
        # a Hugging Face tokenizer and its template, through our files and back
        config = {"chat_template": BPE_HF_CHAT_TEMPLATES["llama32"], "bos_token": "<|begin_of_text|>"}
        llama = bpe.Tokenizer.from_pretrained(_bpe_hf_folder(os.path.join(tmp, "llama"), "llama3", config))
        llama.save_pretrained(os.path.join(tmp, "again"), llama.chat_template)
        again = bpe.Tokenizer.from_pretrained(os.path.join(tmp, "again"))
        assert again.chat_template == llama.chat_template and again.whole == llama.whole
        assert [again.encode(t, allowed_special="all") for t in BPE_HF_TEXTS] == BPE_HF_IDS["llama3"]
        ids, _ = bpe.render_conversation(again, messages, again.chat_template, date_string="05 Mar 2025")
        assert again.decode(ids) == BPE_HF_RENDERED["llama32/two_turns"]
        raises(ValueError, tok.save_pretrained, os.path.join(tmp, "x"), "chatml", match="<|im_end|>")

def test_bpe_hf_gpt2_round_trip():
    gpt2 = bpe.Tokenizer.gpt2(os.path.dirname(shared_file("gpt2", "encoder.json")))
    with open(shared_file("tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        shakespeare = f.read()[:20_000]
    with tempfile.TemporaryDirectory() as tmp:
        gpt2.save_pretrained(tmp)
        back = bpe.Tokenizer.from_pretrained(tmp)
    assert back.pattern == "gpt2" and back.encode(shakespeare) == gpt2.encode(shakespeare)
    assert back.encode("Hello<|endoftext|>", allowed_special="all") == [15496, 50256]

def test_bpe_corrupt_tokenizer_files():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tok.json")
        raises(FileNotFoundError, bpe.Tokenizer.load, path, match="--train")
        bpe.Tokenizer().train(BPE_TEXT, 300).save(path)
        good = open(path, encoding="utf-8").read()
        for bad in (good[: len(good) // 2], good.replace('"merges": [', '"merges": {'), "[]",
                    good.replace('"version": 1', '"version": 7'), good.replace('[\n', '[\n[5000, 1],\n')):
            open(path, "w", encoding="utf-8").write(bad)
            raises(ValueError, bpe.Tokenizer.load, path, match="re-create")

def test_bpe_offline_gpt2_names_the_files_and_the_flag():
    with tempfile.TemporaryDirectory() as tmp:
        with mock.patch.object(bpe.requests, "get", side_effect=requests.ConnectionError("offline")):
            msg = raises(RuntimeError, bpe.Tokenizer.gpt2, tmp, match="encoder.json")
        needed = ("vocab.bpe", bpe.GPT2_URL + "encoder.json", bpe.GPT2_URL + "vocab.bpe", tmp, "--gpt2_dir")
        assert all(s in msg for s in needed), msg

def test_bpe_cli_trains_saves_and_shows():
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in.txt"), os.path.join(tmp, "tok.json")
        open(src, "w", encoding="utf-8").write(BPE_TEXT * 5)
        with contextlib.redirect_stdout(io.StringIO()):
            result = bpe.main(bpe.BpeConfig(train=src, vocab_size=350, out=out, pattern="gpt4"))
        assert result["bytes_per_token"] > 1.5
        tok, ref = bpe.Tokenizer.load(out), bpe.Tokenizer().train(BPE_TEXT * 5, 350, pattern="gpt4")
        assert (tok.merges, tok.vocab, tok.special_tokens, tok.pattern) == \
            (ref.merges, ref.vocab, ref.special_tokens, ref.pattern)
        with contextlib.redirect_stdout(io.StringIO()):
            shown = bpe.main(bpe.BpeConfig(tokenizer=out, text="naïve 🤖<|endoftext|>"))
        assert shown["ids"] == ref.encode("naïve 🤖<|endoftext|>", allowed_special="all")

def test_bpe_from_saved_reads_what_checkpoints_store():
    """A checkpoint's tokenizer entry is a bpe.py dict, 'gpt2' or a tok.json path; anything else is
    a clear error."""
    tok = bpe.Tokenizer().train("the cat sat on the mat, and the dog ate the hat. " * 30, 270)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(os.path.join(tmp, "tok.json"))
        for saved in (tok.to_dict(), os.path.join(tmp, "tok.json")):
            again = bpe.Tokenizer.from_saved(saved)
            assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    raises(ValueError, bpe.Tokenizer.from_saved, 42, match="neither")
    raises(ValueError, bpe.Tokenizer.from_saved, {"version": 9}, match="not a valid tokenizer")
    gpt2_dir = os.path.dirname(shared_file("gpt2", "encoder.json"))
    assert bpe.Tokenizer.from_saved("gpt2", gpt2_dir).encode("Hello") == [15496]

# -----------------------------------------------------------------------------
# gpt.py

from gpt import GPT, GPTConfig

def tiny_config(**kw):
    return GPTConfig(**{**dict(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, bias=True), **kw})

MODERN = dict(rope=True, rmsnorm=True, swiglu=True, n_kv_head=2)

def test_gpt_param_count_124m():
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808, model.num_params()

def test_gpt_config_validation():
    raises(ValueError, GPTConfig, n_embd=30, n_head=4, match="divisible by n_head")
    raises(ValueError, GPTConfig, n_head=12, n_kv_head=5, match="n_kv_head")
    raises(ValueError, GPTConfig, n_layer=0, match="n_layer")
    raises(ValueError, GPTConfig, dropout=1.5, match="dropout")
    model = GPT(tiny_config())
    raises(ValueError, model, torch.zeros(1, 17, dtype=torch.long), match="block_size")

def test_gpt_attention_matches_manual_softmax():
    for n_kv_head in (0, 2, 1):  # plain, grouped-query, multi-query
        torch.manual_seed(0)
        model = GPT(tiny_config(n_kv_head=n_kv_head)).eval()
        attn, x = model.transformer.h[0].attn, torch.randn(2, 7, 32)
        q, k, v = attn.qkv(x)
        k, v = (t.repeat_interleave(4 // (n_kv_head or 4), dim=1) for t in (k, v))  # (B, nh, T, hs)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))             # (B, nh, T, T)
        scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
        assert_close(attn(x), attn.c_proj(y), 1e-5, f"sdpa vs manual attention, n_kv_head={n_kv_head}")

def test_gpt_decode_attention_by_hand_matches_the_fused_kernel():
    """Attention written out for one query per row = scaled_dot_product_attention with the same
    mask, plain, grouped-query and multi-query; a decode step of 8 rows in bfloat16 on the CPU takes
    that path, and its logits stay within bfloat16's rounding of the fused kernel's."""
    real = gpt.decode_by_hand
    for n_kv_head in (0, 2, 1):
        torch.manual_seed(0)
        attn = GPT(tiny_config(n_kv_head=n_kv_head)).eval().transformer.h[0].attn
        q = torch.randn(3, 4, 1, 8)
        k, v = torch.randn(2, 3, n_kv_head or 4, 9, 8).unbind(0)
        mask = torch.rand(3, 1, 1, 9) > 0.4
        mask[..., -1] = True  # the new token always sees itself
        ys = []
        for by_hand in (True, False):
            with mock.patch.object(gpt, "decode_by_hand", lambda q: by_hand), torch.no_grad():
                ys.append(attn.attend(q, k, v, mask))
        assert_close(ys[0], ys[1], 1e-6, f"by hand vs fused, n_kv_head={n_kv_head}")
    rows = torch.zeros(8, 4, 1, 8, dtype=torch.bfloat16)
    assert real(rows) and not real(rows[:4]) and not real(rows.float())
    assert not real(torch.zeros(8, 4, 2, 8, dtype=torch.bfloat16)), "a prefill is fused"
    model = GPT(tiny_config(**MODERN)).eval()
    idx = torch.randint(0, 97, (8, 12))
    runs = []
    for by_hand in (True, False):  # teacher-forced: 6 prompt tokens, then 6 decode steps
        taken = []

        def decide(q, by_hand=by_hand):  # the real rule, or never; each answer is recorded
            taken.append(by_hand and real(q))
            return taken[-1]
        with mock.patch.object(gpt, "decode_by_hand", decide), torch.autocast("cpu", torch.bfloat16):
            cache = [gpt.KVCache(12) for _ in model.transformer.h]
            steps = [model.prefill(idx[:, :6], torch.zeros(8, dtype=torch.long), cache)]
            for t in range(6, 12):
                steps.append(model.forward_cached(idx[:, t:t + 1], cache, torch.full((8, 1), t),
                                                  torch.ones(8, 1, 1, t + 1, dtype=torch.bool)))
        runs.append(torch.stack(steps))
        assert sum(taken) == (12 if by_hand else 0), f"{sum(taken)} layer steps by hand"
    assert_close(runs[0], runs[1], 0.05, "bfloat16 decode logits, by hand vs fused")

def test_gpt_causal_every_variant():
    for extra in [{}, dict(rope=True), dict(rmsnorm=True), dict(swiglu=True), dict(n_kv_head=1), MODERN]:
        torch.manual_seed(0)
        model = GPT(tiny_config(**extra)).eval()
        idx = torch.randint(0, 97, (2, 16))
        changed = idx.clone()
        changed[:, 9] = (changed[:, 9] + 1) % 97
        a, b = model(idx)[0], model(changed)[0]
        assert_close(a[:, :9], b[:, :9], 1e-6, f"logits before the changed token, {extra}")
        assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4, f"the change had no effect, {extra}"

def test_gpt_initial_loss_near_ln_vocab():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=1000))
    idx, targets = torch.randint(0, 1000, (8, 16)), torch.randint(0, 1000, (8, 16))
    loss = model(idx, targets)[1].item()
    assert abs(loss - math.log(1000)) < 0.1, loss
    targets[:, :8] = -100  # ignored positions do not count
    logits = model(idx)[0]
    expect = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 1000), targets[:, 8:].reshape(-1))
    assert_close(model(idx, targets)[1], expect, 1e-6, "loss with -100 targets")

def test_gpt_overfits_one_batch_every_variant():
    for extra in [{}, MODERN, dict(rope=True), dict(rmsnorm=True), dict(swiglu=True), dict(n_kv_head=4)]:
        torch.manual_seed(0)
        model = GPT(tiny_config(**extra))
        opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), "cpu")
        idx = torch.randint(0, 97, (2, 16))
        for _ in range(60):
            loss = model(idx[:, :-1], idx[:, 1:])[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.05, f"{extra}: loss {loss.item()}"

def test_gpt_optimizer_groups():
    model = GPT(tiny_config())
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()

def test_gpt_flops_and_mfu_by_hand():
    model = GPT(tiny_config())
    # by hand for tiny_config: 29,088 parameters, less the 16 x 32 position table (no multiplications), 6 FLOPs
    # each, plus attention's 12 L C T = 12 x 2 x 32 x 16
    assert model.num_params() == 29_088 and model.flops_per_token() == 6 * (29_088 - 512) + 12 * 2 * 32 * 16
    assert model.estimate_mfu(100, 2.0, model.flops_per_token() * 100) == 0.5

def hf_gpt2_tensors(model):
    # the Hugging Face GPT-2 layout: no "transformer." prefix, Conv1D weights stored (in, out), mask buffers
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        name = name.removeprefix("transformer.")
        out[name] = t.t().contiguous() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else t
        if name.endswith("attn.c_attn.bias"):
            out[name.replace("c_attn.bias", "bias")] = torch.ones(1, 1, 16, 16).tril()
    return out

def write_safetensors(path, tensors, corrupt=None):
    # a tiny writer: 8-byte header length, JSON header, raw little-endian data
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = dict(dtype={torch.float32: "F32"}[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + len(raw)])
        blobs.append(raw)
        offset += len(raw)
    if corrupt:
        corrupt(header)
    head = __import__("json").dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))

def test_gpt_from_pretrained_safetensors_round_trip():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    with tempfile.TemporaryDirectory() as d:
        write_safetensors(os.path.join(d, "model.safetensors"), hf_gpt2_tensors(model))
        gpt.save_json(os.path.join(d, "config.json"), gpt.hf_layout(model)[0])
        loaded = gpt.from_pretrained(d).eval()
        assert torch.equal(gpt.from_pretrained(os.path.join(d, "model.safetensors"))(idx := torch.randint(
            0, 97, (2, 16)))[0], loaded(idx)[0]), "the file's path loads as its folder does"
    assert_close(loaded(idx)[0], model(idx)[0], 0, "logits after loading")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight, "weight tying lost after loading"
    # by name: config.json and the weights come from the Hub into data/<name>/ (download faked here)
    def fake_download(url, path, sha256=""):
        fetched.append(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if path.endswith("config.json"):
            gpt.save_json(path, gpt.hf_layout(model4)[0])
        elif path.endswith("index.json"):
            raise gpt.UserError("404: GPT-2 comes in one file, not in shards")
        else:
            write_safetensors(path, hf_gpt2_tensors(model4))
        return path
    fetched, model4 = [], GPT(tiny_config(n_embd=128, n_head=4)).eval()
    with tempfile.TemporaryDirectory() as d, mock.patch.object(gpt, "download", fake_download):
        loaded = gpt.from_pretrained("gpt2-medium", data_dir=d).eval()
    hub = "https://huggingface.co/gpt2-medium/resolve/main/"
    assert fetched == [hub + "config.json", hub + gpt.SHARDS, hub + "model.safetensors"], fetched
    assert loaded.config.n_head == 4 and torch.equal(loaded(idx)[0], model4(idx)[0]), loaded.config

HF_CONFIGS = {  # tiny models in each Hugging Face layout that from_pretrained reads
    "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=64, n_positions=32,
                 n_embd=32, n_layer=2, n_head=4, n_inner=None, activation_function="gelu_new",
                 layer_norm_epsilon=1e-5),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
                  tie_word_embeddings=True, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0, original_max_position_embeddings=16)),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=64, hidden_size=32,
                  intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                  tie_word_embeddings=False),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=64, hidden_size=32,
                  intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
                  tie_word_embeddings=True, attention_bias=False),
}

def hf_shapes(family):
    c = HF_CONFIGS[family]
    if family == "gpt2":
        C, L, V = c["n_embd"], c["n_layer"], c["vocab_size"]
        shapes = {"wte.weight": (V, C), "wpe.weight": (c["n_positions"], C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
        for i in range(L):  # Conv1D weights are (in, out)
            for name, shape in [("ln_1", (C,)), ("ln_2", (C,)), ("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)),
                                ("mlp.c_fc", (C, 4 * C)), ("mlp.c_proj", (4 * C, C))]:
                shapes[f"h.{i}.{name}.weight"] = shape
                shapes[f"h.{i}.{name}.bias"] = (shape[-1],)
        return shapes
    C, H, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hs = c.get("head_dim", C // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hs, c["num_key_value_heads"] * hs
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, C)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                       p + "self_attn.q_proj.weight": (q, C), p + "self_attn.k_proj.weight": (kv, C),
                       p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, q),
                       p + "mlp.gate_proj.weight": (H, C), p + "mlp.up_proj.weight": (H, C),
                       p + "mlp.down_proj.weight": (C, H)})
        if family == "qwen2":
            shapes.update({p + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", q), ("k", kv), ("v", kv))})
        if family == "qwen3":
            shapes.update({p + "self_attn.q_norm.weight": (hs,), p + "self_attn.k_norm.weight": (hs,)})
    return shapes

def seeded_hf_folder(folder, family):
    # weights from a closed form (sines), not a random generator, so any torch makes the same ones;
    # norms near 1, everything else of size 0.3
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for k, (name, shape) in enumerate(sorted(hf_shapes(family).items())):
        x = torch.arange(math.prod(shape), dtype=torch.float64)
        w = torch.sin(x * (0.37 + 0.013 * k) + k).reshape(shape)
        norm = name.endswith("norm.weight") or (family == "gpt2" and "ln_" in name and name.endswith("weight"))
        tensors[name] = (1 + 0.2 * w if norm else 0.3 * w).float()
    gpt.write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    gpt.save_json(os.path.join(folder, "config.json"), HF_CONFIGS[family])
    return tensors

HF_IDS = [[3, 17, 42, 5, 9, 60, 1, 33, 12, 7, 50, 21]]

# logits[0, -1, :6], logits[0, 4, 6:12] and the sum of all logits of each seeded model on HF_IDS, as
# transformers 5.25 computed them (float32, by hand in a scratch venv: AutoModelForCausalLM.from_pretrained on
# the folder seeded_hf_folder wrote, then model(ids).logits)
TRANSFORMERS_LOGITS = {
    "gpt2": ([-4.05675, 3.46085, 0.79956, -4.21335, 3.16586, 1.23379],
             [4.36415, -4.67794, 0.03852, 4.64169, -4.40707, -0.49396], -0.187),
    "llama": ([1.43499, 0.46997, -0.73229, -1.56488, -1.60749, -0.8386],
              [0.36029, 1.34008, 1.64337, 1.11705, 0.02683, -1.07694], 10.1593),
    "qwen2": ([0.31789, -0.29333, -0.75648, -0.83774, -0.49609, 0.09599],
              [-0.68434, -0.71508, -0.38483, 0.13969, 0.59369, 0.74798], -4.8033),
    "qwen3": ([-0.24509, -0.27247, -0.16231, 0.0298, 0.20686, 0.27949],
              [0.22669, 0.13723, -0.0215, -0.16938, -0.23176, -0.17713], -8.5286),
}

def test_gpt_from_pretrained_matches_transformers():
    ids = torch.tensor(HF_IDS)
    for family, (last, middle, total) in TRANSFORMERS_LOGITS.items():
        with tempfile.TemporaryDirectory() as d:
            seeded_hf_folder(d, family)
            model = gpt.from_pretrained(d).eval()
            with torch.no_grad():
                logits = model(ids)[0][0]
            assert_close(logits[-1, :6], last, 2e-4, f"{family}: last position's logits")
            assert_close(logits[4, 6:12], middle, 2e-4, f"{family}: position 4's logits")
            assert_close(logits.sum(), total, 5e-3, f"{family}: all logits' sum")
            # exported again in its own layout and read back: the same model
            gpt.save_pretrained(model, os.path.join(d, "again"))
            again = gpt.from_pretrained(os.path.join(d, "again")).eval()
            assert json.load(open(os.path.join(d, "again", "config.json")))["architectures"] == \
                HF_CONFIGS[family]["architectures"], family
            assert torch.equal(again(ids)[0], model(ids)[0]), f"{family}: logits after export"

def test_gpt_save_pretrained_round_trips_every_shape():
    # GPT-2-shaped (with and without biases) and Llama-shaped models; transformers, by hand, loaded the
    # Llama-shaped and bias-free GPT-2-shaped folders with logits equal to ours (max diff < 1e-5)
    shapes = [dict(), dict(bias=False), dict(MODERN, bias=False), dict(MODERN, bias=False, qkv_bias=True,
              tie_embeddings=False), dict(MODERN, bias=False, qk_norm=True, head_size=16, rope_theta=1e6),
              dict(MODERN, bias=False, rope_scaling=(8.0, 1.0, 4.0, 8), mlp_hidden=40, norm_eps=1e-6)]
    idx = torch.randint(0, 97, (2, 16))
    for extra in shapes:
        torch.manual_seed(0)
        model = GPT(tiny_config(**extra)).eval()
        with tempfile.TemporaryDirectory() as d:
            gpt.save_pretrained(model, d)
            raises(gpt.UserError, gpt.save_pretrained, model, d, match="--overwrite")
            assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"], os.listdir(d)
            loaded = gpt.from_pretrained(d).eval()
        assert_close(loaded(idx)[0], model(idx)[0], 1e-5, f"logits after save_pretrained, {extra}")
    raises(gpt.UserError, gpt.hf_layout, GPT(tiny_config(rope=True)), match="no layout")
    # bfloat16 stays bfloat16, on disk and back
    model = GPT(tiny_config(**MODERN, bias=False)).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as d:
        gpt.save_pretrained(model, d)
        loaded = gpt.from_pretrained(d)
        assert loaded.transformer.wte.weight.dtype == torch.bfloat16 and loaded.rope_cos.dtype == torch.float32
        assert gpt.from_pretrained(d, dtype=torch.float32).transformer.wte.weight.dtype == torch.float32

def test_gpt_from_pretrained_bad_inputs():
    with tempfile.TemporaryDirectory() as d:
        tensors = seeded_hf_folder(d, "llama")
        config = dict(HF_CONFIGS["llama"], architectures=["MambaForCausalLM"])
        gpt.save_json(os.path.join(d, "config.json"), config)
        raises(gpt.UserError, gpt.from_pretrained, d, match="LlamaForCausalLM")
        gpt.save_json(os.path.join(d, "config.json"), HF_CONFIGS["llama"])
        # shards: two files and their index; one missing is named
        names = sorted(tensors)
        os.remove(os.path.join(d, "model.safetensors"))
        gpt.write_safetensors(os.path.join(d, "a.safetensors"), {k: tensors[k] for k in names[:9]})
        gpt.write_safetensors(os.path.join(d, "b.safetensors"), {k: tensors[k] for k in names[9:]})
        weight_map = {k: "a.safetensors" if i < 9 else "b.safetensors" for i, k in enumerate(names)}
        gpt.save_json(os.path.join(d, gpt.SHARDS), {"weight_map": weight_map})
        ids = torch.tensor(HF_IDS)
        assert_close(gpt.from_pretrained(d).eval()(ids)[0][0, -1, :6], TRANSFORMERS_LOGITS["llama"][0], 2e-4,
                     "logits from shards")
        os.remove(os.path.join(d, "b.safetensors"))
        raises(gpt.UserError, gpt.from_pretrained, d, match="shard")
    raises(gpt.UserError, gpt.check_fits, 10 ** 18, match="GB free")
    with mock.patch.dict(os.environ, {"HF_ENDPOINT": "http://127.0.0.1:9"}):  # nothing listens there
        raises(gpt.UserError, gpt.from_pretrained, "no/such-folder-here", match="could not download")

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    # a Hub stand-in: files under /<org>/<name>/resolve/main/, and Range requests, which resuming needs
    def do_GET(self):
        path = os.path.join(self.server.root, self.path.split("/resolve/main/")[-1])
        if not os.path.isfile(path):
            return self.send_error(404)
        data = open(path, "rb").read()
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))[1])
        self.server.requests.append((os.path.basename(path), start))
        self.server.tokens.add(self.headers.get("Authorization"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass

def test_gpt_hub_download_shards_and_resumes():
    with tempfile.TemporaryDirectory() as hub, tempfile.TemporaryDirectory() as data:
        tensors = seeded_hf_folder(hub, "qwen2")
        names = sorted(tensors)
        os.remove(os.path.join(hub, "model.safetensors"))
        for part, chunk in (("1", names[:10]), ("2", names[10:])):
            gpt.write_safetensors(os.path.join(hub, f"m-{part}.safetensors"), {k: tensors[k] for k in chunk})
        gpt.save_json(os.path.join(hub, gpt.SHARDS), {"weight_map": {k: "m-1.safetensors" if k in names[:10]
                                                                     else "m-2.safetensors" for k in names}})
        for file in ("tokenizer.json", "tokenizer_config.json"):
            gpt.save_json(os.path.join(hub, file), {})
        # half of the second shard arrived before the connection dropped
        folder = os.path.join(data, "org", "tiny")
        os.makedirs(folder)
        whole = open(os.path.join(hub, "m-2.safetensors"), "rb").read()
        with open(os.path.join(folder, "m-2.safetensors.part"), "wb") as f:
            f.write(whole[:len(whole) // 2])
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        server.root, server.requests, server.tokens = hub, [], set()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            env = {"HF_ENDPOINT": url, "HF_TOKEN": "hf_sekret"}  # a gated model's token goes to the Hub
            with mock.patch.dict(os.environ, env), contextlib.redirect_stderr(io.StringIO()):
                model = gpt.from_pretrained("org/tiny", data_dir=data).eval()
                with mock.patch.dict(os.environ, {"HF_ENDPOINT": "https://hub.example"}):
                    gpt.download(url + "/x/resolve/main/config.json", os.path.join(data, "config.json"))
        finally:
            server.shutdown()
            server.server_close()
        assert ("m-2.safetensors", len(whole) // 2) in server.requests, server.requests
        assert server.tokens == {"Bearer hf_sekret", None}, "the token goes to the Hub's host alone"
        assert open(os.path.join(folder, "m-2.safetensors"), "rb").read() == whole
        assert_close(model(torch.tensor(HF_IDS))[0][0, -1, :6], TRANSFORMERS_LOGITS["qwen2"][0], 2e-4,
                     "logits of the downloaded shards")

def test_gpt_safetensors_rejects_corrupt_files():
    tensors = hf_gpt2_tensors(GPT(tiny_config()))
    cases = [
        (lambda h: h["wte.weight"].update(data_offsets=[0, 10**9]), "offsets"),
        (lambda h: h["wpe.weight"].update(dtype="F12"), "unknown dtype"),
        (lambda h: h["wpe.weight"].update(shape=4), "shape 4 and offsets"),
        (lambda h: h.pop("ln_f.weight"), "missing tensors ['transformer.ln_f.weight']"),
        (lambda h: h.update({"h.0.extra": h.pop("ln_f.bias")}), "unexpected"),
    ]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        gpt.save_json(os.path.join(d, "config.json"), gpt.hf_layout(GPT(tiny_config()))[0])
        for corrupt, message in cases:
            write_safetensors(path, tensors, corrupt)
            raises(ValueError, gpt.from_pretrained, d, match=message)
        shaped = dict(tensors, **{"ln_f.weight": torch.ones(31), "ln_f.bias": torch.ones(32)})
        write_safetensors(path, shaped)
        raises(ValueError, gpt.from_pretrained, d, match="ln_f.weight has shape (31,)")
        write_safetensors(path, dict(tensors, **{"h.0.attn.c_attn.weight": torch.ones(2, 32, 96)}))
        raises(ValueError, gpt.from_pretrained, d, match="h.0.attn.c_attn.weight has shape (2, 32, 96)")
        gpt.save_json(os.path.join(d, "config.json"), {"architectures": ["GPT2LMHeadModel"], "n_heads": 4})
        raises(ValueError, gpt.from_pretrained, d, match="does not describe a GPT2LMHeadModel")
        with open(path, "wb") as f:
            f.write((10**6).to_bytes(8, "little") + b"{}")
        raises(ValueError, gpt.from_pretrained, d, match="past the end")
        for header in (b"{nope", b"[1]", b'"abc"'):
            with open(path, "wb") as f:
                f.write(len(header).to_bytes(8, "little") + header)
            raises(ValueError, gpt.from_pretrained, d, match="not a valid JSON object")

def test_gpt_checkpoint_round_trip():
    torch.manual_seed(0)
    model = GPT(tiny_config(**MODERN)).eval()
    with tempfile.TemporaryDirectory() as d:
        path = gpt.save_checkpoint(os.path.join(d, "ckpt.pt"), model, step=7, tokenizer={"merges": [[1, 2]]})
        assert not [f for f in os.listdir(d) if f != "ckpt.pt"], "a temporary file was left behind"
        loaded, ckpt = gpt.load_checkpoint(path)
        idx = torch.randint(0, 97, (2, 16))
        assert_close(loaded.eval()(idx)[0], model(idx)[0], 0, "logits after a checkpoint round trip")
        assert ckpt["step"] == 7 and ckpt["tokenizer"] == {"merges": [[1, 2]]}
        assert loaded.lm_head.weight is loaded.transformer.wte.weight

def test_gpt_bad_checkpoints_are_clear_errors():
    with tempfile.TemporaryDirectory() as d:
        path = gpt.save_checkpoint(os.path.join(d, "ckpt.pt"), GPT(tiny_config()), step=7)
        raw = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(raw[: len(raw) // 2])
        raises(ValueError, gpt.load_checkpoint, path, match="truncated")
        torch.save({"weights": torch.ones(2)}, path)
        raises(ValueError, gpt.load_checkpoint, path, match="not a buildllm checkpoint")
        torch.save({"version": 1, "model_config": {"n_layers": 2}, "model": {}}, path)
        raises(ValueError, gpt.load_checkpoint, path, match="does not fit this gpt.py")
        torch.save({"version": 0, "model_config": {}, "model": {}}, path)
        raises(ValueError, gpt.load_checkpoint, path, match="version 0")
        raises(gpt.UserError, gpt.load_checkpoint, os.path.join(d, "nope.pt"), match="train.py")

class FakeResponse:
    # stands in for requests.get(...): serves data[start:] for a "Range: bytes=start-" header
    def __init__(self, data, headers):
        start = int(headers["Range"][6:-1]) if "Range" in headers else 0
        self.status_code, self.body = (206 if start else 200), data[start:]
        self.headers = {"content-length": str(len(self.body))}
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def raise_for_status(self):
        pass
    def iter_content(self, size):
        return [self.body[i:i + 7] for i in range(0, len(self.body), 7)]

def test_gpt_download_resumes_an_interrupted_file():
    # one feature: a download that arrives complete and intact, or not at all
    data = bytes(range(256)) * 4
    fake = lambda url, stream, timeout, headers: FakeResponse(data, headers)
    with tempfile.TemporaryDirectory() as d, mock.patch.object(gpt.requests, "get", side_effect=fake), \
            contextlib.redirect_stderr(io.StringIO()):
        path = os.path.join(d, "sub", "file.bin")
        os.makedirs(os.path.dirname(path))
        with open(path + ".part", "wb") as f:
            f.write(data[:100])  # an interrupted earlier download
        assert open(gpt.download("http://x/file.bin", path), "rb").read() == data
        assert not os.path.exists(path + ".part")
    with tempfile.TemporaryDirectory() as d, \
            mock.patch.object(gpt.requests, "get", side_effect=requests.ConnectionError("offline")):
        msg = raises(gpt.UserError, gpt.download, "http://x/f.bin", os.path.join(d, "f.bin"), match="http://x/f.bin")
        assert os.path.join(d, "f.bin") in msg

def test_gpt_parse_args_flags():
    cfg = gpt.parse_args(kvcache.KVCacheConfig, ["--top_k=5", "--temperature", "0.5", "--prompt=a=b c"])
    assert (cfg.top_k, cfg.temperature, cfg.prompt) == (5, 0.5, "a=b c")
    for bad in (["--top_kk=5"], ["--top_k=5.5"], ["--top=5"]):
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                gpt.parse_args(kvcache.KVCacheConfig, bad)
            raise AssertionError(f"{bad} was accepted")
        except SystemExit as e:
            assert e.code == 2 and "--max_new_tokens int" in err.getvalue(), "the usage lists the valid flags"
    raises(ValueError, gpt.main, gpt.parse_args(gpt.DemoConfig, ["--max_new_tokens=-3"]), match="must not be negative")

def test_gpt_pick_device():
    assert gpt.pick_device("cpu") == "cpu"
    for bad in ("cpu:1", "cpu:", "gpu", "cuda:x"):
        raises(ValueError, gpt.pick_device, bad, match="cuda:N")
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "device_count", lambda: 2):
        assert gpt.pick_device("auto") == "cuda" and gpt.pick_device("cuda:1") == "cuda:1"
        raises(ValueError, gpt.pick_device, "cuda:2", match="not available")
        raises(ValueError, gpt.pick_device, "cuda:", match="not available")
    # emulated bf16 (pre-Ampere GPUs) does not count as native: auto then picks float16 + GradScaler
    with mock.patch.object(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation):
        assert gpt.setup_precision("cuda")[0] == "float16"
    assert gpt.setup_precision("mps")[0] == "float32"

def test_gpt_precision_choice():
    assert gpt.choose_precision("cpu", "auto", bf16=True)[0] == "bfloat16"
    assert gpt.choose_precision("cpu", "auto", bf16=False)[0] == "float32"
    assert gpt.choose_precision("cuda", "auto", bf16=True)[0] == "bfloat16"
    assert gpt.choose_precision("cuda", "auto", bf16=False)[0] == "float16"  # + GradScaler in train.py
    assert gpt.choose_precision("mps", "auto", bf16=True)[0] == "float32"  # MPS is not a CPU
    assert gpt.choose_precision("cpu", "bfloat16")[0] == "bfloat16"  # asked for: allowed, just slow without AMX
    raises(ValueError, gpt.choose_precision, "cpu", "float16", match="GradScaler")  # no scaler outside CUDA
    raises(ValueError, gpt.choose_precision, "mps", "bfloat16", match="float32")
    raises(ValueError, gpt.choose_precision, "cuda", "bfloat16", bf16=False, match="float16")
    raises(ValueError, gpt.choose_precision, "cpu", "fp8", match="auto")

def test_gpt_setup_precision_gives_the_autocast_context():
    dtype, reason, ctx = gpt.setup_precision("cpu", "float32")
    assert dtype == "float32" and isinstance(ctx, contextlib.nullcontext), (dtype, ctx)
    dtype, reason, ctx = gpt.setup_precision("cpu", "bfloat16")
    with ctx:
        y = torch.nn.Linear(4, 4)(torch.ones(1, 4))
    assert dtype == "bfloat16" and y.dtype == torch.bfloat16, (dtype, y.dtype)

def _help_text(config_class):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            gpt.parse_args(config_class, ["-h"])
        except SystemExit:
            pass
    return out.getvalue()

def test_gpt_parse_args_help_shows_defaults_and_comments():
    text = " ".join(_help_text(train.TrainConfig).split())  # argparse wraps lines
    assert "--n_layer int transformer blocks (default: 4)" in text, text[:1000]
    assert "--dataset str stories (offline)" in text and "(default: 'stories')" in text

def test_gpt_parse_args_rejects_a_misspelled_flag():
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            gpt.parse_args(train.TrainConfig, ["--max_iter=3"])
            raise AssertionError("--max_iter was accepted")
        except SystemExit as e:
            assert e.code == 2
    assert "unrecognized arguments: --max_iter=3" in err.getvalue(), err.getvalue()
    assert gpt.parse_args(train.TrainConfig, ["--compile"]).compile is True  # a bare bool flag

def test_gpt_run_turns_a_user_error_into_one_line():
    def bad_value(cfg):
        raise gpt.UserError("--max_new_tokens=-1 must not be negative")
    with mock.patch.object(sys, "argv", ["gpt.py"]):
        try:
            gpt.run(bad_value, gpt.DemoConfig)
            raise AssertionError("no exit")
        except SystemExit as e:
            assert e.code == "gpt.py: error: --max_new_tokens=-1 must not be negative", e.code

def test_gpt_run_keeps_the_traceback_of_a_bug():
    # any other exception, a plain ValueError included, is a bug: it propagates with its traceback
    with mock.patch.object(sys, "argv", ["gpt.py"]):
        raises(ValueError, gpt.run, lambda cfg: int("x"), gpt.DemoConfig, match="invalid literal")
        raises(ZeroDivisionError, gpt.run, lambda cfg: 1 / 0, gpt.DemoConfig)

def test_gpt_user_input_makes_library_errors_one_line():
    # bpe.py (standalone) and GPTConfig raise plain errors; about a user's input they are UserErrors
    def fail(error):
        with gpt.user_input():
            raise error
    for error in (ValueError("n_embd=30 is not divisible"), FileNotFoundError("no tok.json"),
                  RuntimeError("could not download encoder.json")):
        raises(gpt.UserError, fail, error, match=str(error))
    raises(KeyError, fail, KeyError("a bug"))  # anything else keeps its traceback

def test_gpt_format_config_is_readable():
    text = gpt.format_config(train.TrainConfig())
    lines = text.splitlines()
    assert "n_layer = 4" in text and len(lines) > 5 and max(map(len, lines)) <= 120, text

def test_gpt_load_checkpoint_says_what_it_loaded():
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        path = gpt.save_checkpoint(os.path.join(tmp, "ckpt.pt"), GPT(tiny_config()), step=7, val_loss=1.5,
                                   train_config={"dataset": "stories"})
        gpt.load_checkpoint(path)
    assert out.getvalue().strip() == f"checkpoint {path}: step 7, dataset stories, val loss 1.5000", out.getvalue()

def test_gpt_refuse_torchrun():
    with mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}):
        raises(gpt.UserError, gpt.refuse_torchrun, "dpo.py", match="dpo.py runs in one process")
    gpt.refuse_torchrun("dpo.py")

def _tiny_models():
    # a GPT-2-style and a Llama-style (rope, RMSNorm, SwiGLU, grouped-query with 2 kv heads) tiny model
    torch.manual_seed(0)
    shape = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return [GPT(GPTConfig(**shape)).eval(),
            GPT(GPTConfig(**shape, bias=False, rope=True, rmsnorm=True, swiglu=True, n_kv_head=2)).eval()]

def _naive_generate(model, prompt, steps):
    # the window rule spelled out with the plain forward pass: the whole history until it passes
    # block_size tokens, then its last block_size // 2; returns the greedy tokens and every step's logits
    bs = model.config.block_size
    window, tokens, logits = (prompt if len(prompt) <= bs else prompt[-(bs // 2):]), [], []
    for _ in range(steps):
        with torch.no_grad():
            logits.append(model(torch.tensor([window]))[0][0, -1])
        tokens.append(int(logits[-1].argmax()))
        window = window + tokens[-1:]
        if len(window) > bs:
            window = window[-(bs // 2):]
    return tokens, logits

def test_gpt_cached_generate_matches_cache_free():
    """Greedy with the cache = the cache-free forward token for token, logits within 1e-5 at every
    step, GPT-2 and Llama style, batch 1 and a batch of 3 left-padded prompts of lengths 5, 11, 2;
    the use_cache=False path gives the same tokens."""
    for model in _tiny_models():
        prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 11, 2)]
        for batch in (prompts[:1], prompts):
            seen = []
            outs = model.generate(batch, 12, temperature=0,
                                  on_token=lambda step, ids, logits: seen.append(logits.clone()))
            assert outs == model.generate(batch, 12, temperature=0, use_cache=False), "use_cache=False"
            for b, p in enumerate(batch):
                tokens, logits = _naive_generate(model, p, 12)
                assert outs[b] == tokens, f"row {b}: cached {outs[b]} != cache-free {tokens}"
                assert_close(torch.stack([s[b] for s in seen]), torch.stack(logits), 1e-5, f"row {b} logits")

def test_gpt_generate_window_slides():
    """Past block_size (32) the cached run equals its naive definition: prompts of 20 and 40 tokens,
    40 new tokens, so the window slides several times, for learned and rotary positions."""
    for model in _tiny_models():
        for n in (20, 40):
            prompt, seen = torch.randint(0, 97, (n,)).tolist(), []
            out = model.generate([prompt], 40, temperature=0,
                                 on_token=lambda step, ids, logits: seen.append(logits[0].clone()))
            tokens, logits = _naive_generate(model, prompt, 40)
            assert out[0] == tokens, f"prompt {n}: {out[0]} != {tokens}"
            assert_close(torch.stack(seen), torch.stack(logits), 1e-5, f"prompt {n} logits")

def test_gpt_generate_batch_slides_together():
    """When a batch's longest history would pass block_size, every row keeps its last 16 tokens."""
    for model in _tiny_models():
        prompts, seen = [torch.randint(0, 97, (n,)).tolist() for n in (5, 20, 12)], []
        outs = model.generate(prompts, 45, temperature=0,
                              on_token=lambda step, ids, logits: seen.append(logits.clone()))
        windows, tokens = [list(p) for p in prompts], [[] for _ in prompts]
        for step in range(45):
            with torch.no_grad():
                logits = torch.stack([model(torch.tensor([w]))[0][0, -1] for w in windows])
            assert_close(seen[step], logits, 1e-5, f"batch step {step} logits")
            for w, out, token in zip(windows, tokens, logits.argmax(-1).tolist()):
                w.append(token)
                out.append(token)
            if max(map(len, windows)) > 32:
                windows = [w[-16:] for w in windows]
        assert outs == tokens, f"batch: {outs} != {tokens}"

def test_gpt_generate_edges():
    """0 new tokens gives empty rows; with block_size 1 every step sees the last token only; an empty
    prompt is an error."""
    assert _tiny_models()[0].generate([[1, 2, 3], [4]], 0) == [[], []]
    one, seen = GPT(GPTConfig(vocab_size=97, block_size=1, n_layer=1, n_head=2, n_embd=16)).eval(), []
    out = one.generate([[5, 6, 7]], 4, temperature=0,
                       on_token=lambda step, ids, logits: seen.append(logits[0].clone()))[0]
    for step, window in enumerate([[7]] + [[t] for t in out[:-1]]):
        with torch.no_grad():
            assert_close(seen[step], one(torch.tensor([window]))[0][0, -1], 1e-5, f"block_size 1, step {step}")
    raises(ValueError, one.generate, [[1], []], 3, match="empty prompt")

def test_gpt_generate_never_samples_padding_rows():
    # a vocabulary padded past the tokenizer (GPT-2's 50,304, Qwen's): ids >= vocab_used have no
    # token, so generate never picks one, even sampling near-uniformly (temperature 5)
    for model in _tiny_models():
        model.vocab_used = 90  # of 97 rows
        out = model.generate([[1, 2, 3]] * 4, 30, temperature=5.0, generator=torch.Generator().manual_seed(0))
        assert max(max(row) for row in out) < 90, out

def test_gpt_kv_cache_stores_only_kv_heads():
    """The cache of n_kv_head=2 of 4 heads holds half the keys and values of plain attention."""
    sizes = []
    for model in _tiny_models():
        cache = [gpt.KVCache(32) for _ in model.transformer.h]
        model.prefill(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, dtype=torch.long), cache)
        sizes.append(sum(c.k.numel() + c.v.numel() for c in cache))
        assert cache[0].k.shape == (3, model.config.n_kv_head or 4, 32, 8) and cache[0].length == 5
    assert sizes[0] == 2 * sizes[1], f"plain {sizes[0]} vs grouped {sizes[1]} cached numbers"

def test_gpt_generate_stops_each_row_at_eot():
    """Each row stops at its own first (fake) <|endoftext|>, left out; the other rows are unchanged."""
    model = _tiny_models()[0]
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 7)]
    reference = model.generate(prompts, 10, temperature=0)
    eot = reference[0][4]
    outs = model.generate(prompts, 10, temperature=0, eot_id=eot)
    for b in range(2):
        cut = reference[b].index(eot) if eot in reference[b] else 10
        assert outs[b] == reference[b][:cut], f"row {b}: {outs[b]} vs {reference[b]} cut at eot {eot}"

def test_gpt_generate_sampling_seeded_top_k_top_p():
    """A seed reproduces a sample; top_k=1 is greedy; top-p keeps the smallest set reaching p on
    [0.05, 0.5, 0.15, 0.3]: p=0.8 keeps 0.5 + 0.3, p=0.81 adds 0.15."""
    model = _tiny_models()[1]
    prompts = [[1, 2, 3], [4, 5]]
    draw = lambda seed, **kw: model.generate(prompts, 12, temperature=1.0,
                                             generator=torch.Generator().manual_seed(seed), **kw)
    assert draw(0, top_p=0.9) == draw(0, top_p=0.9), "the same seed gave different samples"
    assert draw(0) != draw(1), "different seeds gave the same 24 tokens"
    assert draw(0, top_k=1) == model.generate(prompts, 12, temperature=0), "top_k=1 differs from greedy"
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert_close(gpt.top_p_filter(probs, 0.8), [[0, 0.625, 0, 0.375]], 1e-6, "top_p=0.8")
    assert_close(gpt.top_p_filter(probs, 0.81), torch.tensor([[0, 0.5, 0.15, 0.3]]) / 0.95, 1e-6, "top_p=0.81")
    ids = gpt.sample(probs.log().expand(1000, 4), top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {1, 3}, f"top_p=0.8 drew {set(ids.tolist())}"

# -----------------------------------------------------------------------------
# train.py

import train  # noqa: E402
from train import generate_stories  # noqa: E402

def test_train_stories_deterministic_and_distinct():
    texts = lambda n, seed: [train.render(s) for s in generate_stories(n, seed)]
    stories = texts(500, 1)
    assert stories == texts(500, 1), "same seed gave different stories"
    assert stories[:100] == texts(100, 1), "a smaller n is not a prefix"
    overlap = set(stories) & set(texts(500, 2))
    assert len(overlap) < 50, f"seeds 1 and 2 share {len(overlap)} of 500 stories"
    stories = texts(20000, 0)
    assert len(set(stories)) == 20000, f"only {len(set(stories))} distinct stories of 20000"
    # real variety, not 20000 near-copies: many distinct sentences and words
    sentences = {s for story in stories[:2000] for s in re.split(r"(?<=[.!?]) ", story)}
    vocab = {w for story in stories for w in re.findall(r"[a-z]+", story.lower())}
    assert len(sentences) > 1000 and len(vocab) > 300, f"{len(sentences)}, {len(vocab)}"

def test_train_stories_words_occur_and_text_is_plain():
    for s in generate_stories(2000, seed=3):
        story, summary, words = train.render(s), s["summary"], s["words"]
        assert len(words) == 3, f"expected 3 words, got {words}"
        for word in words:
            assert re.search(rf"\b{re.escape(word)}\b", story, re.I), f"{word!r} not in {story!r}"
        assert summary.count(".") == 1 and summary.endswith(".") and "\n" not in summary, summary
        assert 6 <= len(re.findall(r"[.!?]", story)) <= 25, f"odd length: {story!r}"
        assert s["label"] in {arc[0] for arc in train.COMPILED_ARCS}, s["label"]
        text = story + summary
        assert all(32 <= ord(ch) < 127 or ch == "\n" for ch in text), f"non-ASCII in {text!r}"
        assert not re.search(r"[{}<>]|  ", text), f"template leak in {text!r}"

def conversations(n, seed, heldout_from=None):
    # instruct.json's records as write_stories makes them: the last ones round-robin over the kinds
    rng = random.Random(seed)
    heldout_from = n if heldout_from is None else heldout_from
    return [train.conversation(rng, s, train.KINDS[k % len(train.KINDS)] if k >= heldout_from else None,
                               k >= heldout_from) for k, s in enumerate(generate_stories(n, seed))]

def corruptions(record):
    # hand-made wrong replies for a record's request: each must fail its checker
    check, messages = record["check"], record["messages"]
    reply = messages[-1]["content"]
    hero = check.get("hero")
    out = []
    if hero:  # the hero's name swapped: everywhere, in the last paragraph, halfway (a known cast)
        other = next(n for n in bpe.GIRLS if n not in check.get("cast", []) + [hero])
        out.append(re.sub(rf"\b{hero}\b", other, reply))
        cut = reply.rfind("\n") + 1 if "cast" not in check else len(reply) // 2
        out.append(reply[:cut] + re.sub(rf"\b{hero}\b", other, reply[cut:]))
    for word in check.get("words", []) + check.get("who", []) + [check.get("word")] * bool(check.get("word")):
        out.append(re.sub(rf"\b{word}\b", "thing", reply, flags=re.I))  # a required word dropped
    if check["kind"] in ("rename", "shorter", "add_word", "ending", "title"):
        out.append(messages[-3]["content"])  # the request ignored: the story as it was
    if check["kind"] == "title":
        out.append(reply.split("\n", 1)[1] + "\n" + reply.split("\n")[0])  # the title last
    if check["kind"] == "continue":
        out.append(messages[-3]["content"] + "\n" + reply)  # the whole story again
    if check["kind"] == "offtopic":
        out.append("Once upon a time, there was a cat named Tom. " * 3)  # a random story
    return [wrong for wrong in out if wrong != reply]

def test_train_conversations_of_every_kind_pass_their_checkers_and_corruptions_fail():
    records = conversations(1200, seed=5, heldout_from=1000)
    kinds = collections.Counter(r["check"]["kind"] for r in records)
    assert set(kinds) == set(train.KINDS) and min(kinds.values()) > 40, kinds
    assert sum(len(r["messages"]) == 6 for r in records) > 50, "no third turns"
    for r in records:
        assert not bpe.record_problem(r), (bpe.record_problem(r), r)
        reply = r["messages"][-1]["content"]
        assert bpe.reply_problems(reply, r["check"]) == [], (bpe.reply_problems(reply, r["check"]), r)
        for wrong in corruptions(r):
            assert bpe.reply_problems(wrong, r["check"]), ("a corruption passed", wrong, r["check"])
    assert bpe.pass_rates([r["messages"][-1]["content"] for r in records], records)["all"] == 1.0
    # the classify task reads the first story of each record that tells one
    labelled = [r for r in records if "arc" in r]
    assert len(labelled) > 1000 and all(r["messages"][1]["content"].count(".") > 4 for r in labelled)

def test_train_conversations_hold_their_last_phrasing_out_for_the_test_set():
    records = conversations(1200, seed=6, heldout_from=1000)
    held_out = {k: v[-1].split("{")[0] for k, v in train.REFINE.items()}
    held_out.update(create=train.ASK[-1])
    for r in records:
        kind, request = r["check"]["kind"], r["messages"][-2]["content"]
        request = request[next(len(t) for t in sorted(train.THANKS, key=len, reverse=True) if request.startswith(t)):]
        if kind in held_out:
            assert request.startswith(held_out[kind]) == r["heldout"], (r["heldout"], request)
        if kind == "offtopic":
            held = [re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(q)), request) for q in train.QUESTIONS[-3:]]
            assert any(held) == r["heldout"], request
    train_r, val_r, test_r = bpe.split_records(records, 50, 100, 0)
    assert len(test_r) == 100 and all(r["heldout"] for r in test_r) and not any(r["heldout"] for r in train_r + val_r)
    assert [r["check"]["kind"] for r in test_r[:8]] == train.KINDS, "the test set is not balanced"

def test_train_three_turn_conversations_train_every_reply():
    records = [r for r in conversations(300, seed=8) if len(r["messages"]) == 6][:5]
    tok = bpe.Tokenizer().train(_text_of(records), 300)
    for r in records:
        ids, mask = bpe.render_conversation(tok, r["messages"])
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        replies = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert trained == "".join(reply + "<|endoftext|>" for reply in replies), trained
        prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
        assert all(m["content"] in prompt for m in r["messages"] if m["role"] == "user")

def test_train_stories_plans_and_edits_precede_their_stories():
    with tempfile.TemporaryDirectory() as tmp:
        texts = {}
        for plans in (0.0, 0.5, 1.0):
            train.write_stories(tmp, 400, 7, plans)
            with open(os.path.join(tmp, "train.txt")) as f, open(os.path.join(tmp, "val.txt")) as g:
                texts[plans] = [d.strip("\n") for d in (f.read() + g.read()).split(train.EOT)][:-1]
        by_story = {train.render(s): s for s in generate_stories(400, seed=7)}
        assert len(texts[0.5]) == 400 and set(texts[0.0]) == set(by_story), "plans=0 is not the plain stories"
        planned = [d for d in texts[0.5] if d.startswith(("Words: ", "Story:\n"))]
        assert 150 < len(planned) < 250, f"{len(planned)} of 400 planned at plans=0.5"
        edits = [d for d in texts[1.0] if d.startswith("Story:\n")]
        assert 150 < len(edits) < 250, f"{len(edits)} of 400 edits at plans=1"
        for doc in texts[1.0]:
            if doc in edits:  # "Story:\n<story>\nChange: <request>\nStory:\n<the changed story>"
                story, change, _ = re.fullmatch(r"Story:\n(.*)\nChange: (.*)\nStory:\n(.*)", doc, re.S).groups()
                assert story in by_story and change.split(" ")[0] in [v[0].split(" ")[0] for v in train.REFINE.values()], doc
                continue
            # "Words: a, b, c\nSummary: ...\nStory:\n<the story>", the plan of the story after it
            head, story = doc.split("\nStory:\n")
            words, summary = head.removeprefix("Words: ").split("\nSummary: ")
            s = by_story[story]
            assert words.split(", ") == s["words"] and summary == s["summary"], doc
        with open(os.path.join(tmp, "instruct.json")) as f:
            records = json.load(f)
        assert len(records) == 200 and sum(r["heldout"] for r in records) == 50, len(records)
        raises(gpt.UserError, train.check_config, train.TrainConfig(plans=1.5), "bpe", 1, False,
               match="--plans=1.5")

def tiny(tmp, **kw):
    # a model that trains in about a second on 200 synthetic stories, in float32 for exact comparisons
    args = dict(out_dir=os.path.join(tmp, "out"), data_dir=os.path.join(tmp, "data"), num_stories=200,
                vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4, max_iters=8,
                eval_interval=4, eval_iters=2, log_interval=1, sample_tokens=8, warmup_iters=2,
                learning_rate=1e-2, min_lr=1e-3, device="cpu", dtype="float32")
    return train.TrainConfig(**{**args, **kw})

def test_train_lr_schedule_known_values():
    # warmup reaches lr at step warmup-1; the cosine is halfway at the midpoint; flat min_lr after
    lr = lambda step: gpt.get_lr(step, 1.0, 0.1, 10, 110)
    assert_close([lr(0), lr(9), lr(10), lr(60), lr(110), lr(500)], [0.1, 1.0, 1.0, 0.55, 0.1, 0.1], 1e-12, "lr")

def test_train_tiny_run_then_checkpoint_reloads_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny(tmp, max_iters=30, eval_interval=30)
        out = train.main(cfg)
        assert out["losses"][-1] < out["losses"][0] - 0.5, f"loss did not fall: {out['losses']}"
        # the saved weights give exactly the logged val loss on the same fixed eval batches
        model, ckpt = gpt.load_checkpoint(out["ckpt_path"])
        data = {s: np.memmap(os.path.join(tmp, "data", "stories", f"{s}.bin"), dtype=np.uint16, mode="r")
                for s in ("train", "val")}
        again = train.estimate_loss(model, data, cfg.batch_size, cfg.block_size, cfg.eval_iters, "cpu",
                                    torch.autocast("cpu", enabled=False))
        assert again["val"] == out["val_loss"], f"{again['val']} != {out['val_loss']}"
        assert ckpt["step"] == 30 and ckpt["train_config"]["n_embd"] == 32 and "optimizer" in ckpt
        tok = bpe.Tokenizer.load(os.path.join(tmp, "data", "stories", "tokenizer.json"))
        assert ckpt["tokenizer"]["merges"] == [list(m) for m in tok.merges], "checkpoint tokenizer differs"
        # the instruct conversations: each reference reply passes its own checker
        with open(os.path.join(tmp, "data", "stories", "instruct.json")) as f:
            records = json.load(f)
        assert len(records) == 100, f"{len(records)} instruct records, expected 50% of 200"
        assert bpe.pass_rates([r["messages"][-1]["content"] for r in records], records)["all"] == 1.0

def test_train_resume_reproduces_uninterrupted_run():
    # dropout and accumulation on, so the RNG and the data position both matter
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(dropout=0.1, grad_accum=2, lr_decay_iters=8)
        full = train.main(tiny(tmp, **kw))["losses"]
        first = train.main(tiny(tmp, max_iters=4, out_dir=os.path.join(tmp, "b"), **kw))["losses"]
        second = train.main(tiny(tmp, init_from="resume", out_dir=os.path.join(tmp, "b"), **kw))["losses"]
        assert first + second == full, f"{first} + {second} != {full}"
        # Ctrl-C in the middle of step 5 (between its two micro-batches) saves the state after 5 steps
        real = train.get_batch
        def interrupt(data, batch_size, block_size, key, device):
            if key[0] == 0 and key[2:] == (5, 1):
                raise KeyboardInterrupt
            return real(data, batch_size, block_size, key, device)
        with mock.patch.object(train, "get_batch", interrupt):
            raises(SystemExit, train.main, tiny(tmp, out_dir=os.path.join(tmp, "c"), **kw))
        saved = torch.load(os.path.join(tmp, "c", "ckpt.pt"), weights_only=True)
        assert saved["step"] == 5, saved["step"]
        # resume takes the data, its order and the batches from the checkpoint, not from these flags
        other = dict(kw, grad_accum=4, num_stories=300, seed=99, vocab_size=400, batch_size=2, block_size=16)
        rest = train.main(tiny(tmp, init_from="resume", out_dir=os.path.join(tmp, "c"), **other))["losses"]
        assert rest == full[5:], f"{rest} != {full[5:]}"

def test_train_shards_read_back_and_bad_headers_are_clear():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s_train_000001.bin")
        train.write_shard(path, list(range(1000)))
        shard = train.read_shard(path)
        assert isinstance(shard, np.memmap) and shard.tolist() == list(range(1000)), "a copy, or other ids"
        raw = open(path, "rb").read()
        for bad, message in [(b"\0" * 4 + raw[4:], "not a version-1 token shard"),
                             (raw[:4] + (2).to_bytes(4, "little") + raw[8:], "not a version-1"),
                             (raw[:-10], "truncated"), (b"xy", "not a version-1")]:
            with open(path, "wb") as f:
                f.write(bad)
            raises(gpt.UserError, train.read_shard, path, match=message)

def test_train_shard_batches_partition_ranks_and_skip_tails():
    # three shards of consecutive ids; micro-batches of 2 x 4 tokens (9 read: x and y shifted by one)
    shards = [np.arange(0, 20), np.arange(100, 117), np.arange(200, 209)]  # 2, 2 and 1 micro-batches
    starts = [int(train.shard_batch(shards, 2, 4, g, "cpu")[0][0, 0]) for g in range(7)]
    assert starts == [0, 8, 100, 108, 200, 0, 8], "in order, each tail skipped, then round again"
    x, y = train.shard_batch(shards, 2, 4, 1, "cpu")
    assert x.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]] and y.tolist() == [[9, 10, 11, 12], [13, 14, 15, 16]]
    # two ranks with grad_accum=4: step s, micro m, rank r reads micro-batch 4 s + 2 m + r: every one once
    seen = sorted(4 * s + 2 * m + r for s in range(3) for m in range(2) for r in range(2))
    assert seen == list(range(12))

def _shard_folder(tmp, name="corpus"):
    folder = os.path.join(tmp, name)
    os.makedirs(folder)
    ids = np.random.default_rng(0).integers(0, 280, size=6000)
    train.write_shard(os.path.join(folder, "x_val_000000.bin"), ids[:1000])
    train.write_shard(os.path.join(folder, "x_train_000001.bin"), ids[1000:3600])
    train.write_shard(os.path.join(folder, "x_train_000002.bin"), ids[3600:])
    return folder

def test_train_on_shards_resumes_mid_shard_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        folder = _shard_folder(tmp)
        tokenizer = os.path.join(tmp, "tok.json")
        bpe.Tokenizer().train("a few words to learn from 0123456789 " * 20, 280).save(tokenizer)
        kw = dict(dataset=folder, tokenizer=tokenizer, grad_accum=2, max_iters=12, lr_decay_iters=12)
        full = train.main(tiny(tmp, **kw))["losses"]  # 12 steps x 2 x 128 tokens: past the first shard
        first = train.main(tiny(tmp, out_dir=os.path.join(tmp, "b"), **dict(kw, max_iters=5)))["losses"]
        second = train.main(tiny(tmp, init_from="resume", out_dir=os.path.join(tmp, "b"), **kw))["losses"]
        assert first + second == full, f"{first} + {second} != {full}"
        # a folder of text files becomes shards, in data/<name>-shards/, with the run's tokenizer: once,
        # then again when a file or the tokenizer changes (a non-UTF-8 file: one line)
        texts = os.path.join(tmp, "texts")
        os.makedirs(texts)
        for i in range(2):
            with open(os.path.join(texts, f"{i}.txt"), "w") as f:
                f.write("".join(f"a few words {j} to learn from<|endoftext|>" for j in range(300)))
        shards = os.path.join(tmp, "data", "texts-shards")
        cfg = tiny(tmp, dataset=texts, tokenizer=tokenizer, max_iters=1, out_dir=os.path.join(tmp, "t"))
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(cfg)
            written = sorted(os.listdir(shards))
            assert written == ["meta.json", "shard_train_000001.bin", "shard_val_000000.bin"], written
            stamp = os.stat(os.path.join(shards, "shard_val_000000.bin")).st_mtime_ns
            train.main(dataclasses.replace(cfg, overwrite=True))
            assert os.stat(os.path.join(shards, "shard_val_000000.bin")).st_mtime_ns == stamp, "not reused"
            with open(os.path.join(texts, "0.txt"), "a") as f:
                f.write("Once more.<|endoftext|>")
            train.main(dataclasses.replace(cfg, overwrite=True))
            assert os.stat(os.path.join(shards, "shard_val_000000.bin")).st_mtime_ns != stamp, "not redone"
        val = train.read_shard(os.path.join(shards, "shard_val_000000.bin"))
        assert bpe.Tokenizer.load(tokenizer).decode(val[:8].tolist()).startswith("a few words 0"), "document 0 validates"
        with open(os.path.join(texts, "1.txt"), "wb") as f:
            f.write("caf\xe9".encode("latin-1"))
        raises(gpt.UserError, train.prepare_shards, cfg, bpe.Tokenizer.load(tokenizer).to_tiktoken(), match="not UTF-8")

def test_train_gpt2_recipe_flags_run_a_few_steps():
    # the README's GPT-2 (124M) command, its shape shrunk: shards, GPT-2's tokenizer, the vocab padded to 50,304
    gpt2_dir = os.path.dirname(shared_file("gpt2", "encoder.json"))
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    command = re.search(r"torchrun --standalone [^`]*?--dataset=fineweb10B.*?--out_dir=\S+", readme, re.S)[0]
    flags = command.replace("\\\n", " ").split("train.py")[1].split()
    recipe = gpt.parse_args(train.TrainConfig, flags)
    assert (recipe.vocab_size, recipe.learning_rate, recipe.warmup_iters, recipe.max_iters) == (50304, 6e-4, 715, 19073)
    assert recipe.batch_size * recipe.block_size * recipe.grad_accum == 524288, "0.5M tokens a step"
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "shards")
        os.makedirs(folder)
        ids = np.random.default_rng(2).integers(0, 50257, size=4000)
        train.write_shard(os.path.join(folder, "f_val_000000.bin"), ids[:1000])
        train.write_shard(os.path.join(folder, "f_train_000001.bin"), ids[1000:])
        small = dict(dataset=folder, shards=1, n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=2,
                     grad_accum=2, max_iters=3, eval_interval=3, eval_iters=1, warmup_iters=1, compile=False,
                     dtype="float32", device="cpu", eval_hellaswag=0, gpt2_dir=gpt2_dir, data_dir=tmp,
                     out_dir=os.path.join(tmp, "out"), sample_tokens=4)
        with contextlib.redirect_stdout(io.StringIO()):
            out = train.main(dataclasses.replace(recipe, **small))
        model, ckpt = gpt.load_checkpoint(out["ckpt_path"], verbose=False)
        assert model.config.vocab_size == 50304 and all(map(math.isfinite, out["losses"]))

def test_train_write_shards_splits_every_id_into_full_shards():
    enc = bpe.Tokenizer().train("a few words to learn from 0123456789 " * 20, 280).to_tiktoken()
    docs = [f"doc {i} a few words" for i in range(500)]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "a.txt"), "w") as f:
            f.write("".join(d + "<|endoftext|>" for d in docs))
        with contextlib.redirect_stdout(io.StringIO()):
            train.write_shards(enc, [os.path.join(tmp, "a.txt")], tmp, shard_tokens=1000)
        names = sorted(n for n in os.listdir(tmp) if n.endswith(".bin"))
        sizes = [len(train.read_shard(os.path.join(tmp, n))) for n in names]
    ids = [len(enc.encode(d + "<|endoftext|>", allowed_special="all")) for d in docs]
    assert names[-1] == "shard_val_000000.bin" and set(sizes[:-2]) == {1000}, (names, sizes)
    assert sum(sizes) == sum(ids) and sizes[-1] == sum(ids[::100]), "every id once; documents 0, 100, ... validate"

def test_train_fetches_fineweb_shards_resuming_a_partial_one():
    with tempfile.TemporaryDirectory() as hub, tempfile.TemporaryDirectory() as tmp:
        ids = np.random.default_rng(1).integers(0, 50000, size=3000)
        train.write_shard(os.path.join(hub, "fineweb_val_000000.bin"), ids[:1000])
        train.write_shard(os.path.join(hub, "fineweb_train_000001.bin"), ids[1000:2000])
        train.write_shard(os.path.join(hub, "fineweb_train_000002.bin"), ids[2000:])
        folder = os.path.join(tmp, "fineweb10B")
        os.makedirs(folder)
        whole = open(os.path.join(hub, "fineweb_train_000002.bin"), "rb").read()
        with open(os.path.join(folder, "fineweb_train_000002.bin.part"), "wb") as f:
            f.write(whole[:700])
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
        server.root, server.requests, server.tokens = hub, [], set()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            cfg = train.TrainConfig(dataset="fineweb10B", shards=2, data_dir=tmp)
            with mock.patch.dict(os.environ, {"HF_ENDPOINT": url}), contextlib.redirect_stderr(io.StringIO()):
                shards, val = train.prepare_shards(cfg, None)
        finally:
            server.shutdown()
            server.server_close()
        assert ("fineweb_train_000002.bin", 700) in server.requests, server.requests
        assert [len(s) for s in shards] == [1000, 1000] and val.tolist() == ids[:1000].tolist()

def test_train_refuses_to_replace_another_run():
    with tempfile.TemporaryDirectory() as tmp:
        train.main(tiny(tmp, max_iters=2, eval_interval=2))
        raises(gpt.UserError, train.main, tiny(tmp, max_iters=2), match="--out_dir")
        assert train.main(tiny(tmp, max_iters=2, overwrite=True))["step"] == 2
        assert train.main(tiny(tmp, max_iters=3, init_from="resume"))["step"] == 3

def test_train_uses_a_bpe_tok_json():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tok.json")
        bpe.Tokenizer().train(" ".join(map(train.render, generate_stories(30, seed=5))), 280).save(path)
        out = train.main(tiny(tmp, tokenizer=path, max_iters=2))
        _, ckpt = gpt.load_checkpoint(out["ckpt_path"])
        assert ckpt["tokenizer"] == bpe.Tokenizer.load(path).to_dict(), "the checkpoint has another tokenizer"
        assert ckpt["model_config"]["vocab_size"] == 280

def test_train_ctrl_c_prints_the_full_resume_command():
    real = train.get_batch
    def interrupt(data, batch_size, block_size, key, device):
        if key[0] == 0 and key[2] == 2:
            raise KeyboardInterrupt
        return real(data, batch_size, block_size, key, device)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as out:
        cfg = tiny(tmp)
        with mock.patch.object(train, "get_batch", interrupt):
            assert raises(SystemExit, train.main, cfg) == "130", "Ctrl-C exits 130, as a shell expects"
        command = out.getvalue().split("continue with:\n")[1].split("\n")[0].split()
        assert command[:4] == ["python", "train.py", "--init_from=resume", f"--out_dir={cfg.out_dir}"], command
        resumed = gpt.parse_args(train.TrainConfig, command[2:])
        for field in dataclasses.fields(train.TrainConfig):
            if field.name not in (*train.RESUMED_FIELDS, "init_from", "overwrite"):
                assert getattr(resumed, field.name) == getattr(cfg, field.name), field.name
        train.main(resumed)
    assert "ckpt.pt: step 2," in out.getvalue(), out.getvalue()[-500:]  # load_checkpoint's line

def test_train_checkpoint_keeps_the_loss_scale():
    # float16 (CUDA) runs keep their loss scale across a resume; on a CPU the scaler is off: a stub records it
    with tempfile.TemporaryDirectory() as tmp:
        train.main(tiny(tmp, max_iters=2, eval_interval=2))
        path = os.path.join(tmp, "out", "ckpt.pt")
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["scaler"] == {}, ckpt["scaler"]  # disabled: nothing to keep
        ckpt["scaler"] = state = {"scale": 1024.0, "growth_factor": 2.0, "_growth_tracker": 3}
        torch.save(ckpt, path)
        loaded = []
        class Recorder(torch.amp.GradScaler):
            def load_state_dict(self, state_dict):
                loaded.append(state_dict)
        with mock.patch.object(torch.amp, "GradScaler", Recorder):
            train.main(tiny(tmp, init_from="resume", max_iters=3, eval_interval=2))
        assert loaded == [state], loaded

def test_train_ddp_two_processes_match_one():
    # same global batch: 2 processes x 1 micro-step (gloo on CPU) vs 1 process x 2 micro-steps
    with tempfile.TemporaryDirectory() as tmp:
        single = train.main(tiny(tmp, grad_accum=2, max_iters=6))["losses"]  # also prepares the data
        flags = [f"--{k}={v}" for k, v in vars(tiny(tmp, grad_accum=2, max_iters=6, overwrite=True)).items()]
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", *flags], cwd=HERE, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr[-2000:]
        ddp = [float(x) for x in re.findall(r"^step +\d+/6 \| loss ([\d.]+)", run.stdout, re.M)]
        assert len(ddp) == 6 and "2 process(es)" in run.stdout, run.stdout[-2000:]
        assert_close(ddp, single, 1e-3, "DDP vs single-process losses")

def _torchrun_train(cfg, nproc=2, timeout=120):
    # train.py under torchrun with cfg's fields as flags -> (the losses it logged, its stdout)
    flags = [f"--{k}={v}" for k, v in vars(cfg).items()]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={nproc}", "train.py", *flags], cwd=HERE, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+/\d+ \| loss ([\d.]+)", run.stdout, re.M)]
    assert f"{nproc} process(es)" in run.stdout, run.stdout[-2000:]
    return losses, run.stdout

def _fsdp_matches_ddp(tmp, nproc, tol=1e-4, **kw):
    """DDP for 6 steps; FSDP with activation checkpointing for 3, then an FSDP resume for 3 more:
    the same losses (2 micro-steps per rank: set_requires_gradient_sync), and the FSDP checkpoint,
    gathered onto rank 0, is an ordinary one (gpt.load_checkpoint) with DDP's weights and AdamW state
    within tol (the losses, logged to 4 decimals, within 2 tol)."""
    kw = dict(grad_accum=2 * nproc, max_iters=6, lr_decay_iters=6, eval_interval=3, n_layer=2, **kw)
    ddp_losses, _ = _torchrun_train(tiny(tmp, out_dir=os.path.join(tmp, "ddp"), **kw), nproc)
    out = os.path.join(tmp, "fsdp")
    first, _ = _torchrun_train(tiny(tmp, out_dir=out, fsdp=True, activation_checkpointing=True,
                                    **dict(kw, max_iters=3)), nproc)
    rest, _ = _torchrun_train(tiny(tmp, out_dir=out, fsdp=True, init_from="resume", **kw), nproc)
    assert len(ddp_losses) == 6, ddp_losses
    assert_close(first + rest, ddp_losses, 2 * tol, "FSDP (3 steps, then a resume) vs DDP losses")
    model, ckpt = gpt.load_checkpoint(os.path.join(out, "ckpt.pt"), verbose=False)
    ref = torch.load(os.path.join(tmp, "ddp", "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == ref["step"] == 6, (ckpt["step"], ref["step"])
    for name, tensor in ref["model"].items():
        assert_close(model.state_dict()[name], tensor.cpu(), tol, f"FSDP vs DDP weights: {name}")
    opt, ref_opt = ckpt["optimizer"], ref["optimizer"]
    assert [g["params"] for g in opt["param_groups"]] == [g["params"] for g in ref_opt["param_groups"]]
    assert sorted(opt["state"]) == sorted(ref_opt["state"]), "AdamW's state keyed by place, as DDP's"
    for k, state in ref_opt["state"].items():
        for key, tensor in state.items():
            assert_close(opt["state"][k][key].cpu(), tensor.cpu(), tol, f"AdamW {key} of parameter {k}")

def test_train_fsdp_matches_ddp_saves_an_ordinary_checkpoint_and_resumes():
    # FSDP2 on 2 CPU processes (gloo); without torchrun --fsdp is a one-line error
    raises(gpt.UserError, train.check_config, train.TrainConfig(fsdp=True), "bpe", 1, False,
           match="--fsdp=True: it must be False without torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        _fsdp_matches_ddp(tmp, 2)

def test_train_activation_checkpointing_changes_no_loss():
    # each block's forward runs again in backward, with the same dropout masks: the same numbers
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(max_iters=4, dropout=0.1, grad_accum=2)
        plain = train.main(tiny(tmp, **kw))["losses"]
        again = train.main(tiny(tmp, activation_checkpointing=True, overwrite=True, **kw))["losses"]
        assert again == plain, f"{again} != {plain}"

def _docs_file(tmp):
    path = os.path.join(tmp, "docs.txt")
    docs = [f"Story {i}: a cat named Tom sat on a mat {i % 7} times." for i in range(200)]
    with open(path, "w") as f:
        f.write("".join(d + "\n<|endoftext|>\n" for d in docs))
    return path, docs

def test_train_prepare_encodes_each_document_with_eot():
    with tempfile.TemporaryDirectory() as tmp:
        path, docs = _docs_file(tmp)
        folder, meta = train.prepare_data(tiny(tmp, dataset=path, vocab_size=280), "bpe")
        # the two .bin files decode back to the documents, each followed by <|endoftext|>
        tok = bpe.Tokenizer.load(os.path.join(folder, "tokenizer.json"))
        ids = np.concatenate([np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"])
                              for split in ("train", "val")])
        assert tok.decode(ids.tolist()) == "".join(d + "<|endoftext|>" for d in docs)
        assert meta["train_tokens"] + meta["val_tokens"] == len(ids)
        assert 0.08 < meta["val_tokens"] / len(ids) < 0.12, meta

def test_train_prepare_cache_reused_and_redone():
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _docs_file(tmp)
        cfg = tiny(tmp, dataset=path, vocab_size=280)
        folder, meta = train.prepare_data(cfg, "bpe")
        stamp = lambda: os.stat(os.path.join(folder, "train.bin")).st_mtime_ns
        before = stamp()
        assert train.prepare_data(cfg, "bpe")[1] == meta and stamp() == before, "cache not reused"
        assert train.prepare_data(tiny(tmp, dataset=path, vocab_size=290), "bpe")[1]["vocab_size"] == 290
        assert train.prepare_data(cfg, "byte")[1]["vocab_size"] == 257  # bytes + <|endoftext|>
        with open(path, "a") as f:
            f.write("One more story.\n")
        before = stamp()
        assert train.prepare_data(cfg, "bpe")[1]["val_tokens"] > meta["val_tokens"] and stamp() != before

def test_train_interrupted_rebuild_leaves_no_meta():
    # a rebuild that stops half-way (here: an error before val.bin) leaves no meta.json vouching for it
    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _docs_file(tmp)
        cfg = tiny(tmp, dataset=path, vocab_size=280)
        train.prepare_data(cfg, "bpe")
        real_encode = train.encode_split
        def fails_on_val(*args, **kwargs):
            if args[4].endswith("val.bin"):
                raise RuntimeError("stopped")
            return real_encode(*args, **kwargs)
        with mock.patch.object(train, "encode_split", fails_on_val):
            raises(RuntimeError, train.prepare_data, tiny(tmp, dataset=path, vocab_size=300), "bpe", match="stop")
        folder, meta = train.prepare_data(cfg, "bpe")  # vocab 280 again: prepared anew, so the files agree
        assert bpe.Tokenizer.load(os.path.join(folder, "tokenizer.json")).vocab_size == meta["vocab_size"] == 280

def test_train_plain_text_is_encoded_in_line_parts():
    # plain text (no <|endoftext|>) is encoded in parts of whole lines, about a piece each
    byte_tok, longest = bpe.Tokenizer().train("", 257), []
    class Spy:  # the tiktoken encoder, noting the longest text it is given
        def __init__(self, enc):
            self.enc = enc
        def encode_batch(self, texts, **kwargs):
            longest.extend(map(len, texts))
            return self.enc.encode_batch(texts, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        text = "".join(f"line {i}: the quick brown fox\n" for i in range(300))
        plain = os.path.join(tmp, "plain.txt")
        out = os.path.join(tmp, "plain.bin")
        with open(plain, "w") as f:
            f.write(text)
        n_tokens, _ = train.encode_split(Spy(byte_tok.to_tiktoken()), plain, 0, len(text), out, "uint16",
                                         piece=100)
        ids = np.fromfile(out, dtype=np.uint16).tolist()
    assert byte_tok.decode(ids) == text.strip() + "<|endoftext|>" and n_tokens == len(ids) == len(text)
    # a part: what was left (at most a piece) and a piece read (to a line's end), less its last line
    assert 100 < max(longest) <= 2 * 100 + 31, f"longest text encoded at once: {max(longest)} characters"

def test_train_flushed_document_keeps_its_eot():
    # a document written in parts keeps its <|endoftext|> when only whitespace follows, at once or later,
    # whether its text ends where a piece ends or not
    byte_tok = bpe.Tokenizer().train("", 257)
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "plain.txt")
        out = os.path.join(tmp, "plain.bin")
        for lines, gap in ((10, ""), (10, " " * 100), (6, ""), (6, "\n" * 150)):
            first = "".join(f"{i:04d} {'x' * 14}\n" for i in range(lines))  # 20 characters a line
            with open(plain, "w") as f:
                f.write(first + gap + "<|endoftext|>\nsecond\n<|endoftext|>\n")
            train.encode_split(byte_tok.to_tiktoken(), plain, 0, os.path.getsize(plain), out, "uint16",
                               piece=100)
            decoded = byte_tok.decode(np.fromfile(out, dtype=np.uint16).tolist())
            assert decoded == first.rstrip() + "<|endoftext|>second<|endoftext|>", (lines, repr(decoded))

def test_train_non_utf8_text_is_a_clear_error():
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "latin1.txt")
        with open(plain, "wb") as f:
            f.write("café au lait\n".encode("latin-1") * 50)
        raises(ValueError, train.prepare_data, tiny(tmp, dataset=plain), "byte", match="not UTF-8")

def test_train_misspelled_flag_exits_2():
    run = subprocess.run([sys.executable, "train.py", "--n_layers=3"], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 2 and "unrecognized arguments" in run.stderr, run.stderr

def test_train_bad_values_fail_before_any_data_work():
    with tempfile.TemporaryDirectory() as tmp:
        raises(ValueError, train.main, tiny(tmp, grad_accum=0), match="--grad_accum=0")
        raises(ValueError, train.main, tiny(tmp, n_embd=30, n_head=4), match="divisible")
        raises(ValueError, train.main, tiny(tmp, dataset="nope.txt"), match="existing")
        raises(ValueError, train.main, tiny(tmp, seed=-1), match="--seed=-1")
        raises(ValueError, train.main, tiny(tmp, init_from="gpt3"), match="safetensors")
        raises(gpt.UserError, train.main, tiny(tmp, init_from="resume"), match="no checkpoint")
        # GPT-2 brings its tokenizer and its 1024-token context: nothing else fits it
        raises(gpt.UserError, train.main, tiny(tmp, init_from="gpt2", block_size=2048), match="--block_size=2048")
        raises(gpt.UserError, train.main, tiny(tmp, init_from="gpt2", tokenizer="byte"), match="--tokenizer='byte'")
        assert not os.path.exists(os.path.join(tmp, "data")), "data was prepared before the checks"
        # a .safetensors file must be GPT-2's (by its config.json): train.py's data is in GPT-2's ids
        for family in ("gpt2", "llama"):
            seeded_hf_folder(os.path.join(tmp, family), family)
            cfg = train.TrainConfig(init_from=os.path.join(tmp, family, "model.safetensors"), out_dir=tmp)
            if family == "gpt2":
                train.check_config(cfg, "gpt2", 1, False)
            else:
                raises(gpt.UserError, train.check_config, cfg, "gpt2", 1, False, match="GPT-2 .safetensors")

def test_train_bad_optimizer_values_are_named():
    with tempfile.TemporaryDirectory() as tmp:
        raises(ValueError, train.main, tiny(tmp, min_lr=-1.0), match="--min_lr=-1.0")
        raises(ValueError, train.main, tiny(tmp, learning_rate=1e-4, min_lr=2e-4), match="to --learning_rate=0.0001")
        for name, bad in (("beta1", 1.5), ("beta2", -0.1), ("weight_decay", -0.1), ("grad_clip", -1.0)):
            raises(gpt.UserError, train.main, tiny(tmp, **{name: bad}), match=f"--{name}={bad}: it must")

def test_train_bench_refused_under_torchrun():
    with tempfile.TemporaryDirectory() as tmp:
        with mock.patch.dict(os.environ, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}):
            raises(ValueError, train.main, tiny(tmp, bench=True), match="--bench=True")

def test_train_too_little_data_is_a_clear_error():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "one_line.txt")
        with open(path, "w") as f:
            f.write("a single line of text, so the 90/10 split leaves nothing to validate on " * 20)
        raises(ValueError, train.main, tiny(tmp, dataset=path, tokenizer="byte"), match="needs more data")

def test_train_compile_failure_is_a_clear_error():
    # torch.compile fails lazily, at the first call (here: as without a C++ compiler); train.py calls the
    # model once before the loop, so the user gets one line naming the fix, not an inductor traceback
    def broken_compile(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in cpp_extension")
        return call
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(torch, "compile", broken_compile):
        raises(gpt.UserError, train.main, tiny(tmp, compile=True), match="drop --compile")

def test_train_nan_loss_stops_and_keeps_last_checkpoint():
    with tempfile.TemporaryDirectory() as tmp:
        raises(gpt.UserError, train.main, tiny(tmp, learning_rate=1e9, min_lr=0.0, grad_clip=0.0),
               match="diverged")
        _, ckpt = gpt.load_checkpoint(os.path.join(tmp, "out", "ckpt.pt"))
        assert ckpt["step"] in (0, 4) and all(torch.isfinite(t).all() for t in ckpt["model"].values())

class _Unigram(torch.nn.Module):
    """A fake model for HellaSwag: the same next-byte log-probs at every position, so a token's loss
    is known whatever precedes it: 1 for " " and "a", 3 for "b" (the other bytes share the rest)."""
    def __init__(self, block_size=64):
        super().__init__()
        self.config = GPTConfig(vocab_size=256, block_size=block_size)
        self.logp = torch.full((256,), math.log((1 - 2 * math.exp(-1) - math.exp(-3)) / 253))
        self.logp[[32, 97, 98]] = torch.tensor([-1.0, -1.0, -3.0])

    def forward(self, idx):
        return self.logp.expand(*idx.shape, 256), None

def test_train_hellaswag_acc_sums_and_acc_norm_averages_the_ending_losses():
    # the endings " aaaa", " b", " bb", " bbbbb" (the space is a token of its own here) have summed
    # losses 5, 4, 7, 16 and means 1, 2, 7/3, 16/6; the context's tokens (3 each) count in neither.
    # acc (the lowest sum) picks " b"; acc_norm (the lowest mean) picks " aaaa", the label
    example = dict(ctx="bbbbbbbb", endings=["aaaa", "b", "bb", "bbbbb"], label=0)
    tok = bpe.Tokenizer()  # the 256 bytes
    for block_size in (64, 6):  # 6: the rows are cropped from the left, into the context only
        x, y = gpt.collate(train.hellaswag_rows(tok, example, block_size), 0, "cpu")
        assert x.shape == (4, min(block_size, 13)), x.shape
        total, mean = train.completion_losses(_Unigram(block_size)(x)[0], y)
        assert_close(total, [5, 4, 7, 16], 1e-4, "summed losses")  # float32
        assert_close(mean, [1, 2, 7 / 3, 16 / 6], 1e-4, "mean losses")
    score = train.score_hellaswag(_Unigram(), tok, [example], "cpu", contextlib.nullcontext())
    assert score == dict(acc=0.0, acc_norm=1.0, n=1), score

def test_train_hellaswag_right_picks_counted_once_across_two_ranks():
    # the label is the cheapest ending (" aa": 3 in all, 1 a token) in 4 of 5 examples: acc = acc_norm
    # = 0.8. Two fake ranks score examples 1, 3 and 0, 2, 4; their all-reduce (here a sum over the two
    # calls: rank 1's right picks, 1 of 5, added to rank 0's) gives what one process gets
    examples = [dict(ctx=f"context {i}", endings=["bb", "ab", "aa", "bab"], label=2) for i in range(5)]
    examples[3]["label"] = 0
    tok = bpe.Tokenizer()
    evaluate = lambda **kw: train.score_hellaswag(_Unigram(), tok, examples, "cpu", contextlib.nullcontext(), **kw)
    single = evaluate()
    assert single == dict(acc=0.8, acc_norm=0.8, n=5), single
    seen = []
    real_rows = train.hellaswag_rows
    def rows(tok, example, block_size):
        seen.append(example["ctx"])
        return real_rows(tok, example, block_size)
    reduced = []
    def all_reduce(counts):
        if reduced:
            counts += reduced[0]
        reduced.append(counts.clone())
    with mock.patch.object(train, "hellaswag_rows", rows), mock.patch.object(train.dist, "all_reduce", all_reduce):
        assert evaluate(rank=1, world=2) == dict(acc=0.2, acc_norm=0.2, n=5)
        assert evaluate(rank=0, world=2) == single
    # rank 1 scores 1 and 3, then example 0 again uncounted: FSDP needs as many forwards on each rank
    assert seen == [f"context {i}" for i in (1, 3, 0, 0, 2, 4)], seen

def test_train_hellaswag_reader_names_the_file_and_line_of_a_bad_record():
    good = json.dumps(dict(ctx="A man sits.", endings=["He", "She", "It", "They"], label=3, ind=7)).encode()
    bad_lines = [b"", b"{not json", b"[1, 2]", b"\xff\xfe", json.dumps(dict(ctx="x", endings=["a"] * 3, label=0)).encode(),
                 json.dumps(dict(ctx="x", endings="abcd", label=0)).encode(),
                 json.dumps(dict(ctx="x", endings=list("abcd"), label=4)).encode(),
                 json.dumps(dict(ctx=1, endings=list("abcd"), label=0)).encode(),
                 json.dumps(dict(endings=list("abcd"), label=0)).encode()]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hellaswag_val.jsonl")
        for bad in bad_lines:
            with open(path, "wb") as f:
                f.write(good + b"\n" + bad + b"\n" + good + b"\n")
            raises(gpt.UserError, train.read_hellaswag, path, match=f"{path}, line 2: not a HellaSwag record")
        with open(path, "wb") as f:
            f.write(good + b"\r\n" + good + b"\r\n")  # Windows line ends are fine
        record = dict(ctx="A man sits.", endings=["He", "She", "It", "They"], label=3)
        assert train.read_hellaswag(path) == [record, record]
        open(path, "w").close()
        raises(gpt.UserError, train.read_hellaswag, path, match="holds no examples")

def _hellaswag_file(data_dir, n):
    # n examples where train.py looks for the validation set: nothing is downloaded
    path = os.path.join(data_dir, "hellaswag", "hellaswag_val.jsonl")
    os.makedirs(os.path.dirname(path))
    endings = ["She went home.", "The sun was hot.", "He had a ball.", "They played all day."]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps(dict(ctx=f"Once upon a time, Lily saw {i} cats.", endings=endings, label=i % 4)) + "\n")

def test_train_hellaswag_scored_at_each_evaluation_and_eval_only_exits_without_training():
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as printed:
        _hellaswag_file(os.path.join(tmp, "data"), 6)
        out = train.main(tiny(tmp, max_iters=4, eval_interval=2, eval_hellaswag=4))
        lines = re.findall(r"^step (\d): HellaSwag acc_norm [\d.]+, acc [\d.]+ \((\d) examples\)$",
                           printed.getvalue(), re.M)
        assert lines == [("0", "4"), ("2", "4"), ("4", "4")], printed.getvalue()[-1000:]
        with open(out["ckpt_path"], "rb") as f:
            saved = f.read()
        assert torch.load(io.BytesIO(saved), weights_only=True)["hellaswag"] == out["hellaswag"]
        # the same weights again, evaluated once: the same scores and val loss; nothing trained or written
        with contextlib.redirect_stdout(io.StringIO()) as once:
            again = train.main(tiny(tmp, init_from="resume", eval_only=True, eval_hellaswag=4))
        assert again["hellaswag"] == out["hellaswag"] and again["val_loss"] == out["val_loss"], again
        assert again["losses"] == [] and again["step"] == 4, again
        assert "step 4: HellaSwag" in once.getvalue() and "done:" not in once.getvalue(), once.getvalue()
        with mock.patch.object(train, "score_hellaswag", side_effect=KeyboardInterrupt):  # Ctrl-C saves nothing
            raises(SystemExit, train.main, tiny(tmp, init_from="resume", eval_only=True, eval_hellaswag=4))
        with open(out["ckpt_path"], "rb") as f:
            assert f.read() == saved, "--eval_only changed the checkpoint"
        whole = train.main(tiny(tmp, init_from="resume", eval_only=True, eval_hellaswag=100))
        assert whole["hellaswag"]["n"] == 6, whole["hellaswag"]  # the first 100: all there are
        other = os.path.join(tmp, "other")
        raises(gpt.UserError, train.main, tiny(tmp, out_dir=other, eval_only=True), match="--eval_only=True")
        raises(gpt.UserError, train.main, tiny(tmp, out_dir=other, eval_hellaswag=-1), match="--eval_hellaswag=-1")

def test_train_hellaswag_under_torchrun_matches_one_process():
    # 2 processes (gloo) score 4 and 3 of the 7 examples and sum their counts: one process's score
    with tempfile.TemporaryDirectory() as tmp:
        _hellaswag_file(os.path.join(tmp, "data"), 7)
        # grad_accum=2: a resumed run keeps it, and 2 processes need a multiple of 2
        one = train.main(tiny(tmp, max_iters=2, grad_accum=2, eval_hellaswag=7))["hellaswag"]
        cfg = tiny(tmp, init_from="resume", eval_only=True, eval_hellaswag=7)
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train.py", *[f"--{k}={v}" for k, v in vars(cfg).items()]],
                             cwd=HERE, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, run.stderr[-2000:]
        line = f"step 2: HellaSwag acc_norm {one['acc_norm']:.4f}, acc {one['acc']:.4f} (7 examples)"
        assert line in run.stdout and "2 process(es)" in run.stdout, run.stdout[-2000:]

# -----------------------------------------------------------------------------
# kvcache.py

import kvcache  # noqa: E402
from kvcache import KVCacheConfig, TextStream  # noqa: E402

def _kvcache_checkpoint(tmp):
    torch.manual_seed(0)
    tok = bpe.Tokenizer().train("once upon a time there was a cat. " * 20, 270)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    return gpt.save_checkpoint(os.path.join(tmp, "ckpt.pt"), model, tokenizer=tok.to_dict())

def test_kvcache_main_streams_batches_and_loops():
    """main on a tiny checkpoint: one streamed prompt, 2 prompts x 2 samples in a batch, two
    interactive turns; it names the checkpoint it loaded."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as printed:
        path = _kvcache_checkpoint(tmp)
        run = lambda **kw: kvcache.main(KVCacheConfig(ckpt_path=path, device="cpu", dtype="float32",
                                                      max_new_tokens=20, **kw))["tokens"]
        assert 0 < run(prompt="once") <= 20 and 0 < run(prompt="once|a cat", num_samples=2) <= 80
        with mock.patch("builtins.input", side_effect=["once", "upon", EOFError]):
            assert 0 < run(interactive=True) <= 40
    assert "--- sample 3\na cat" in printed.getvalue(), printed.getvalue()[-300:]
    speeds = re.findall(r"tok/s \(prefill included\), ([\d,.]+|nan) after each row's first", printed.getvalue())
    assert len(speeds) == 3 and float(speeds[1].replace(",", "")) > 0, printed.getvalue()[-300:]
    assert f"checkpoint {path}: step ?" in printed.getvalue(), printed.getvalue()[:500]
    assert "(2 of 2 heads kept)" in printed.getvalue(), printed.getvalue()[:500]

def test_kvcache_says_when_a_row_stopped_at_eot():
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as printed:
        path = _kvcache_checkpoint(tmp)
        cfg = KVCacheConfig(ckpt_path=path, device="cpu", dtype="float32", max_new_tokens=20)
        def stops_early(self, prompts, max_new_tokens, **kw):  # row 0 meets <|endoftext|> at once
            return [[] for _ in prompts]
        with mock.patch.object(GPT, "generate", stops_early):
            kvcache.main(cfg)
        assert "[stopped at <|endoftext|>]" in printed.getvalue(), printed.getvalue()[-300:]

def test_kvcache_refuses_a_missing_checkpoint():
    with tempfile.TemporaryDirectory() as tmp:
        raises(gpt.UserError, kvcache.main, KVCacheConfig(ckpt_path=os.path.join(tmp, "ckpt.pt")),
               match="python train.py")

def test_kvcache_refuses_torchrun():
    with mock.patch.dict(os.environ, {"WORLD_SIZE": "2"}):  # started by torchrun: one process only
        raises(gpt.UserError, kvcache.main, KVCacheConfig(), match="not torchrun")

def test_kvcache_bench_row_runs_on_a_tiny_model():
    # the benchmark's measuring code on a tiny model (its speed is measured by --bench, not here)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    free, cached, decode, mean_len = kvcache.bench_row(model, [[1, 2, 3], [4, 5]], 20)
    assert min(free, cached, decode) > 0, (free, cached, decode)
    assert mean_len == (sum(range(4, 17)) + sum(range(9, 15))) / 19, mean_len  # to 16, then from 9

def test_kvcache_stream_utf8():
    """Streaming one byte per token never prints half a character: the output is exactly the text."""
    class ByteTokenizer:
        decode = staticmethod(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    text, buffer = "héllo 😀 wörld ✓", io.StringIO()
    with contextlib.redirect_stdout(buffer):
        stream = TextStream(ByteTokenizer())
        for byte in text.encode("utf-8"):
            stream.push(byte)
        stream.push()
    assert buffer.getvalue() == text, f"streamed {buffer.getvalue()!r}"

# the server (--serve): continuous batching behind an OpenAI-compatible API

def _serving_model(block_size=48):
    # random weights scaled up, so greedy text varies instead of repeating one token
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)
    return model

BYTES_TOK = bpe.Tokenizer(special_tokens=("<|endoftext|>",))  # the 256 bytes and the stop token

@contextlib.contextmanager
def _server(model=None, tok=None, template="phi3", **kw):
    """A server on 127.0.0.1, a free port, in a thread; shut down (engine too) on the way out."""
    server = kvcache.make_server(model or _serving_model(), tok or BYTES_TOK, template, **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with mock.patch.object(kvcache.Handler, "log_message", lambda *args: None):
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", server
        finally:
            server.shutdown()
            server.engine.stop()
            server.server_close()
            thread.join(timeout=10)

def _post(url, path, timeout=20, **body):
    return requests.post(url + path, json=body, timeout=timeout)

def _sse(response):
    """The data fields of a server-sent event stream, read in raw pieces of 7 bytes, so events and
    UTF-8 characters arrive split, as they can over a network."""
    buffer = b""
    for piece in response.iter_content(chunk_size=7):
        buffer += piece
    events = buffer.decode("utf-8").split("\n\n")
    assert events[-1] == "" and all(e.startswith("data: ") for e in events[:-1]), events[-3:]
    return [e[len("data: "):] for e in events[:-1]]

def test_kvcache_engine_rows_joining_late_decode_as_if_alone():
    """Continuous batching: greedy requests that join the running batch at different steps, with
    prompts of different lengths, give exactly the tokens GPT.generate gives each one alone; rows
    leave as they finish (a request of 3 tokens beside ones of 25), and one runs to block_size."""
    model = _serving_model()
    engine = kvcache.Engine(model, [BYTES_TOK.special_tokens["<|endoftext|>"]], max_batch=3, max_queue=8)
    prompts = [[5, 6, 7], [9], list(range(20, 40)), [1, 2], list(range(100, 130))]
    budgets = [25, 3, 25, 10, 48]
    engine.stop()  # the test drives the steps itself, so the arrivals do not depend on timing
    requests_ = [kvcache.Request(BYTES_TOK, p, budget, temperature=0) for p, budget in zip(prompts, budgets)]
    waiting = list(requests_)
    widths = []
    with torch.inference_mode():
        while waiting or engine.rows:
            if waiting and len(engine.rows) < engine.max_batch:  # one arrival per step at most
                engine.join(waiting.pop(0))
            engine.leave_finished()
            if engine.rows:
                widths.append(len(engine.rows))
                engine.step()
                engine.leave_finished()
    texts = ["".join(iter(r.pieces.get_nowait, None)) for r in requests_]
    for prompt, budget, request, text in zip(prompts, budgets, requests_, texts):
        room = 48 - len(prompt) + 1  # the server ends a row at block_size; generate would slide on
        alone = model.generate([prompt], min(budget, room), temperature=0, eot_id=256)[0]
        assert text == BYTES_TOK.decode(alone), (prompt, text, BYTES_TOK.decode(alone))
    assert requests_[-1].finish == "length" and requests_[-1].tokens == 48 - 30 + 1, requests_[-1].tokens
    assert max(widths) == 3 and not engine.rows, (widths, engine.rows)

def test_kvcache_request_streams_whole_characters_and_cuts_at_stop():
    """Tokens arrive one byte at a time: every piece is whole characters, "data: ", blank lines and
    emoji arrive intact, and text after a stop string is never sent, not even its first letters."""
    text = "data: 🎉\n\nhé said ✓ END and more"
    request = kvcache.Request(BYTES_TOK, [0], 100, stop=["END", "zzz"])
    for byte in text.encode("utf-8"):
        if request.push(byte, {256}, full=False):
            break
    pieces = list(iter(request.pieces.get_nowait, None))
    assert "".join(pieces) == "data: 🎉\n\nhé said ✓ " and request.finish == "stop", pieces
    assert not any("\ufffd" in p for p in pieces) and not any("E" in p for p in pieces), pieces
    plain = kvcache.Request(BYTES_TOK, [0], 4)
    finished = [plain.push(b, {256}, full=False) for b in b"abcd"]
    assert finished == [False, False, False, True] and plain.finish == "length"

def test_kvcache_server_completions_chat_and_stream():
    """The API as the openai client uses it: models, a completion, a chat completion and its stream
    (chunks join to the same greedy text), usage and finish_reason; two concurrent greedy requests
    equal each run alone; the page is one self-contained HTML file that shows model text as text."""
    with _server() as (url, server):
        assert requests.get(url + "/v1/models", timeout=10).json()["data"][0]["object"] == "model"
        done = _post(url, "/v1/completions", prompt="Once upon", max_tokens=12, temperature=0).json()
        assert done["object"] == "text_completion" and done["choices"][0]["finish_reason"] in ("stop", "length")
        prompt_ids = [256] + BYTES_TOK.encode("Once upon")
        alone = BYTES_TOK.decode(server.engine.model.generate([prompt_ids], 12, temperature=0, eot_id=256)[0])
        assert done["choices"][0]["text"] == alone, (done, alone)
        assert done["usage"]["prompt_tokens"] == len(prompt_ids), done["usage"]
        messages = [{"role": "user", "content": "Tell me a story"}]
        chat = _post(url, "/v1/chat/completions", messages=messages, max_tokens=20, temperature=0).json()
        message = chat["choices"][0]["message"]
        assert chat["object"] == "chat.completion" and message["role"] == "assistant", chat
        with requests.post(url + "/v1/chat/completions", stream=True, timeout=20,
                           json=dict(messages=messages, max_tokens=20, temperature=0, stream=True)) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            events = _sse(r)
        assert events[-1] == "[DONE]", events[-2:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        joined = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert joined == message["content"], (joined, message["content"])
        assert chunks[-1]["choices"][0]["finish_reason"] == chat["choices"][0]["finish_reason"]
        assert chunks[-1]["usage"] == chat["usage"], (chunks[-1], chat["usage"])
        prompts = ["A cat sat", "The dog and the", "x"]
        alone = [_post(url, "/v1/completions", prompt=p, max_tokens=30, temperature=0).json() for p in prompts]
        together = [None] * len(prompts)
        def ask(i):
            together[i] = _post(url, "/v1/completions", prompt=prompts[i], max_tokens=30, temperature=0).json()
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        texts = lambda answers: [a["choices"][0]["text"] for a in answers]
        assert texts(together) == texts(alone), (texts(together), texts(alone))
        sampled = [_post(url, "/v1/completions", prompt="x", max_tokens=10, seed=3, top_p=0.9).json() for _ in range(2)]
        assert texts(sampled)[0] == texts(sampled)[1], "the same seed sampled different text"
        page = requests.get(url + "/", timeout=10)
        assert page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "textContent" in page.text and "innerHTML" not in page.text and "http" not in page.text

def test_kvcache_server_bad_input_answers_and_keeps_serving():
    """Each mistake gets its status and OpenAI's error shape naming the field; a slow client is
    timed out without blocking others; a client gone mid-stream leaves the batch; then a normal
    request still works."""
    with _server(api_key="sekret", max_queue=1) as (url, server):
        auth = {"Authorization": "Bearer sekret"}
        post = lambda path, body, **kw: requests.post(url + path, json=body, headers=auth, timeout=10, **kw)
        assert requests.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401
        too_long = "x" * (kvcache.LIMITS["message_chars"] + 1)
        cases = [
            ("/v1/completions", {"prompt": 3}, "prompt"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
            ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
            ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
            ("/v1/completions", {"prompt": "x", "temperature": True}, "temperature"),
            ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
            ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
            ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
            ("/v1/completions", {"prompt": "x" * 60}, "prompt"),  # 61 tokens, block_size 48
            ("/v1/chat/completions", {}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 501}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 7000}] * 5}, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ]
        for path, body, param in cases:
            r = post(path, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.status_code, r.text)
        assert requests.post(url + "/v1/completions", data=b"{", headers=auth, timeout=10).status_code == 400
        assert requests.post(url + "/v1/completions", data=b"[1]", headers=auth, timeout=10).status_code == 400
        # a body over the limit is refused from its Content-Length, before it is read
        big = socket.create_connection(server.server_address[:2])
        big.sendall(b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer sekret\r\n"
                    b"Content-Length: %d\r\n\r\n" % (2**20 + 1))
        big.settimeout(5)
        assert big.recv(20).startswith(b"HTTP/1.0 413"), "a body over 1 MB was not refused"
        big.close()
        # no Content-Length: an empty body, answered at once (not read until the timeout)
        bare = socket.create_connection(server.server_address[:2])
        bare.sendall(b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer sekret\r\n\r\n")
        bare.settimeout(5)
        assert bare.recv(20).startswith(b"HTTP/1.0 400"), "a body without a length was not refused"
        bare.close()
        assert requests.get(url + "/v1/nothing", timeout=10).status_code == 404
        wrong = requests.get(url + "/v1/completions", headers=auth, timeout=10)
        assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
        assert requests.delete(url + "/", timeout=10).status_code == 405
        # a client that never finishes its headers holds only its own thread, until the timeout
        with mock.patch.object(kvcache.Handler, "timeout", 1):
            slow = socket.create_connection(server.server_address[:2])
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Len")
            assert post("/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200
            slow.settimeout(5)
            assert slow.recv(100) == b"", "the slow client was not cut off"
            slow.close()
        # a client that leaves mid-stream: its row leaves the batch within a few (slowed) steps
        body = json.dumps({"prompt": "x", "max_tokens": 48, "stream": True}).encode()
        submitted = []
        submit = server.engine.submit
        step = server.engine.step
        with contextlib.ExitStack() as patches:
            patches.enter_context(mock.patch.object(server.engine, "submit",
                                                    lambda r: submit(r) or submitted.append(r)))
            patches.enter_context(mock.patch.object(server.engine, "step",
                                                    lambda: time.sleep(0.05) or step()))
            gone = socket.create_connection(server.server_address[:2])
            gone.sendall(b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer sekret\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            gone.settimeout(5)
            assert gone.recv(20).startswith(b"HTTP/1.0 200")
            gone.close()
            deadline = time.time() + 10
            while (not submitted[0].cancelled or server.engine.rows) and time.time() < deadline:
                time.sleep(0.01)
        assert not server.engine.rows, "the abandoned row is still decoding"
        assert submitted[0].cancelled and submitted[0].tokens < 30, submitted[0].tokens
        # a full queue: with the engine stopped, one waiting request fills it
        server.engine.stop()
        server.engine.submit(kvcache.Request(BYTES_TOK, [1], 1))
        full = post("/v1/completions", {"prompt": "x"})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1", full.status_code
        server.engine.waiting.get_nowait()
        server.engine = kvcache.Engine(server.engine.model, [256], 16, 1)
        assert post("/v1/completions", {"prompt": "x", "max_tokens": 3}).json()["usage"]["completion_tokens"] >= 1

PAGE_HARNESS = """
// just enough DOM for the page's script, and a fetch whose body arrives 3 bytes at a time, so that
// events and UTF-8 characters are split across reads
const elements = {};
const element = (id) => elements[id] ||= {value: "", textContent: "", children: [],
  appendChild(child) { this.children.push(child); return child; }};
globalThis.document = {getElementById: element, createElement: () => element(Math.random())};
const realFetch = fetch;
const sent = [];  // the request bodies the page posted
globalThis.fetch = async (path, options) => {
  sent.push(JSON.parse(options.body));
  const response = await realFetch(process.argv[2] + path, options);
  const bytes = new Uint8Array(await response.arrayBuffer());
  let at = 0;
  const read = async () => at >= bytes.length ? {done: true} : {done: false, value: bytes.slice(at, at += 3)};
  const json = async () => JSON.parse(new TextDecoder().decode(bytes));
  return {ok: response.ok, json, body: {getReader: () => ({read})}};
};
SCRIPT
element("input").value = "Tell me a story";
send({preventDefault() {}}).then(() => console.log(JSON.stringify(messages)));
"""

def test_kvcache_page_script_assembles_a_split_stream():
    """The chat page's own script, run by node (skipped without it) against the server: the reply
    it assembles from a stream cut into 3-byte reads is exactly the text, emoji and "data: " too."""
    node = shutil.which("node")
    if node is None:
        raise unittest.SkipTest("node is not installed; the page's script is checked with it")
    text = "data: 🎉 ok\n\nhé ✓ done"
    script = iter(list(text.encode("utf-8")) + [256])
    scripted = lambda *args: torch.tensor([next(script)])
    page = kvcache.PAGE
    harness = PAGE_HARNESS.replace("SCRIPT", page[page.index("<script>") + 8:page.index("</script>")])
    out = _run_page(node, harness, scripted, 128)
    assert json.loads(out)[-1] == {"role": "assistant", "content": text}, out

def _run_page(node, harness, scripted, block_size):
    # the page's script in node against a live server whose sampler is scripted: its stdout
    with (tempfile.TemporaryDirectory() as tmp, _server(_serving_model(block_size)) as (url, server),
          mock.patch.object(kvcache, "sample", scripted)):
        path = os.path.join(tmp, "page.js")
        with open(path, "w") as f:
            f.write(harness)
        run = subprocess.run([node, path, url], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-1000:]
    return run.stdout

EXAMPLES = ["Tell me a story about a brave little turtle named Max.", "Call the hero Leo instead.",
            "What happened next?"]

def test_kvcache_page_greets_with_examples_and_posts_the_whole_chat():
    """A new user sees example requests to click (a story, then refinements); the page's own script,
    run by node (that part skipped without it), sends a clicked one as a turn, and every request
    carries the whole `messages` list so far."""
    page = kvcache.PAGE
    assert '<p id="try">Try: ' in page and all(f"<button>{e}</button>" in page for e in EXAMPLES)
    assert "JSON.stringify({messages," in page and "innerHTML" not in page
    node = shutil.which("node")
    if node is None:
        raise unittest.SkipTest("node is not installed; the page's script is checked with it")
    replies = ["Max swam far. ✓", "Leo swam far."]
    script = iter([b for r in replies for b in list(r.encode("utf-8")) + [256]])
    scripted = lambda *args: torch.tensor([next(script)])
    buttons = "element('try').children = %s.map((textContent) => ({textContent}));\n" % json.dumps(EXAMPLES)
    click = "const click = (i) => element('try').children[i].onclick({preventDefault() {}});\n"
    harness = PAGE_HARNESS[:PAGE_HARNESS.index("SCRIPT")] + buttons + page[page.index("<script>") + 8:
                                                                           page.index("</script>")]
    harness += click + "click(0).then(() => click(1)).then(() => console.log(JSON.stringify(sent)));\n"
    sent = [body["messages"] for body in json.loads(_run_page(node, harness, scripted, 256))]
    first = {"role": "user", "content": EXAMPLES[0]}
    assert sent == [[first], [first, {"role": "assistant", "content": replies[0]},
                              {"role": "user", "content": EXAMPLES[1]}]], sent

def _chat(url, messages, stream, **body):
    """(reply, usage) of a chat completion, streamed or not."""
    body = dict(messages=messages, stream=stream, **body)
    with requests.post(url + "/v1/chat/completions", json=body, stream=stream, timeout=30) as r:
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()["choices"][0]["message"]["content"], r.json()["usage"]
        chunks = [json.loads(e) for e in _sse(r)[:-1]]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks), chunks[-1]["usage"]

def _generated_reply(model, messages, max_tokens):
    # the reference: GPT.generate, greedy and stopping at the stop token, on the rendered chat
    prompt = bpe.render_conversation(BYTES_TOK, messages, "phi3")[0]
    return BYTES_TOK.decode(model.generate([prompt], max_tokens, temperature=0, eot_id=256)[0])

def test_kvcache_server_three_turn_chat_equals_generate():
    """A three-turn conversation (user, assistant, user, assistant, user), sent whole each turn as the
    page does: each greedy reply, streamed or not, is exactly GPT.generate's on the rendered chat."""
    model = _serving_model(512)
    with _server(model) as (url, server):
        for stream in (False, True):
            messages = []
            for turn in EXAMPLES:
                messages.append({"role": "user", "content": turn})
                reply, usage = _chat(url, messages, stream, max_tokens=24, temperature=0)
                assert reply == _generated_reply(model, messages, 24), (stream, messages, reply)
                assert reply.strip() and usage["dropped_messages"] == 0, (reply, usage)
                messages.append({"role": "assistant", "content": reply})
            assert len(messages) == 6, messages

def test_kvcache_server_never_samples_padding_rows():
    # 300 rows, 257 ids in the tokenizer (Qwen's padding): at temperature 2 a padding id would come
    # up within a few tokens, and no tokenizer decodes it; the engine samples only vocab_used
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=48, n_layer=1, n_head=2, n_embd=32)).eval()
    model.vocab_used = BYTES_TOK.vocab_size
    with _server(model) as (url, server):
        done = _post(url, "/v1/completions", prompt="Once", max_tokens=40, temperature=2.0).json()
    assert done["choices"][0]["finish_reason"] in ("stop", "length"), done  # (the stop token may come)

def test_kvcache_server_survives_an_error_in_the_engine():
    # a bug in one step ends the requests in hand (finish_reason "error"), not the engine: the next
    # request is answered
    model = _serving_model()
    real, calls = model.forward_cached, []
    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in a decode step")
        return real(*args)
    model.forward_cached = flaky
    with _server(model) as (url, server), contextlib.redirect_stderr(io.StringIO()) as err:
        first = _post(url, "/v1/completions", prompt="Once", max_tokens=5).json()
        second = _post(url, "/v1/completions", prompt="Once", max_tokens=5).json()
    assert first["choices"][0]["finish_reason"] == "error" and "a bug in a decode step" in err.getvalue()
    assert second["usage"]["completion_tokens"] == 5, second

def test_kvcache_server_long_chat_drops_oldest_messages_and_refuses_empty_ones():
    """A chat longer than the window keeps its system message and drops the fewest oldest others that
    leave room for the reply, says how many in usage, and answers as GPT.generate does on what is
    kept; a single message too long for the window, or an empty one, is a 400 naming messages."""
    model = _serving_model(128)
    system = {"role": "system", "content": "You tell short stories."}
    others = [{"role": "user", "content": EXAMPLES[0]},
              {"role": "assistant", "content": "Max swam to the big blue sea and met a crab."},
              {"role": "user", "content": EXAMPLES[1]},
              {"role": "assistant", "content": "Leo met a crab."},
              {"role": "user", "content": EXAMPLES[2]}]
    rendered = lambda messages: len(bpe.render_conversation(BYTES_TOK, messages, "phi3")[0])
    assert rendered([system] + others) > 128, "the test chat must be longer than the window"
    with _server(model) as (url, server):
        for stream, max_tokens in [(False, 16), (True, 16), (False, 24), (True, 24)]:
            reply, usage = _chat(url, [system] + others, stream, max_tokens=max_tokens, temperature=0)
            dropped = usage["dropped_messages"]
            kept = [system] + others[dropped:]
            assert rendered(kept) <= 128 - max_tokens < rendered([system] + others[dropped - 1:]), usage
            # 24: the one more message would fit the window, not the reply's room as well
            assert dropped == {16: 3, 24: 4}[max_tokens] and usage["prompt_tokens"] == rendered(kept), usage
            assert reply == _generated_reply(model, kept, max_tokens), (stream, reply)
        # a max_tokens as big as the window reserves only half of it: a short chat stays whole
        short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": "Go"}]
        assert _chat(url, short, False, max_tokens=128)[1]["dropped_messages"] == 0
        cases = [([{"role": "user", "content": "x" * 200}], "last message"),
                 ([others[0], {"role": "assistant", "content": " \n"}, others[2]], "'messages[1].content' is empty"),
                 ([{"role": "user", "content": ""}], "'messages[0].content' is empty")]
        for messages, says in cases:
            r = requests.post(url + "/v1/chat/completions", json={"messages": messages}, timeout=10)
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "messages" and says in error["message"], r.text

def _ctrl_c_works():
    # run in the child before Python starts: a test runner started as a background job
    # (`python test_all.py &`) ignores SIGINT, and its children would inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)

def test_kvcache_serve_from_the_command_line_then_ctrl_c():
    """`python kvcache.py --serve` on a tiny checkpoint prints its URL, answers a completion, and stops
    cleanly on Ctrl-C (SIGINT) with exit code 0."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _kvcache_checkpoint(tmp)
        flags = [f"--ckpt_path={path}", "--device=cpu", "--dtype=float32"]
        server = subprocess.Popen([sys.executable, "kvcache.py", *flags, "--serve", "--port=0"], cwd=HERE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=_ctrl_c_works)
        try:
            lines = iter(server.stdout.readline, "")
            url = next(line.split()[2] for line in lines if line.startswith("serving at "))
            done = requests.post(url + "v1/completions", json={"prompt": "once", "max_tokens": 5},
                                 timeout=20).json()
            assert done["usage"]["completion_tokens"] >= 1, done
            server.send_signal(signal.SIGINT)
            out, err = server.communicate(timeout=30)
        finally:
            server.kill()
        assert server.returncode == 0 and "stopped" in out and "Traceback" not in err, (out, err)

# -----------------------------------------------------------------------------
# finetune.py (and the chat template and story checker in bpe.py)

import finetune  # noqa: E402

def _chat_tokenizer():
    return bpe.Tokenizer().train("Once upon a time there was a cat named Tom. ### Response: " * 10, 290)

def test_bpe_chat_template_renders_the_documented_text():
    tok = _chat_tokenizer()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ids, _ = bpe.render_conversation(tok, chat, "alpaca")
    system = bpe.CHAT_TEMPLATES["alpaca"]["default_system"]
    assert tok.decode(ids) == f"{system}\n\n### Instruction:\nHi\n\n### Response:\nYo<|endoftext|>"
    ids, _ = bpe.render_conversation(tok, chat[:1] + chat + chat[:1], "phi3")
    assert tok.decode(ids) == "<|user|>\nHi\n<|user|>\nHi\n<|assistant|>\nYo<|endoftext|><|user|>\nHi\n<|assistant|>\n"
    raises(ValueError, bpe.render_conversation, tok, chat, "chatml", match="alpaca")
    raises(ValueError, bpe.render_conversation, tok, [{"role": "robot", "content": "x"}], match="role")
    # a user cannot type the stop token: it is encoded as plain text
    ids, _ = bpe.render_conversation(tok, [{"role": "user", "content": "<|endoftext|>"}], "phi3")
    assert tok.special_tokens["<|endoftext|>"] not in ids
    assert bpe.record_messages({"instruction": "Do", "input": "this", "output": "Done"}) == [
        {"role": "user", "content": "Do\n\nthis"}, {"role": "assistant", "content": "Done"}]

def test_bpe_chat_mask_marks_exactly_the_assistant_tokens_and_stop():
    tok = _chat_tokenizer()
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name a cat."},
            {"role": "assistant", "content": "Tom"}, {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Tom again"}]
    ids, mask = bpe.render_conversation(tok, chat, "alpaca")
    trained = [i for i, m in zip(ids, mask) if m]
    stop = tok.special_tokens["<|endoftext|>"]
    assert trained == tok.encode("Tom") + [stop] + tok.encode("Tom again") + [stop], tok.decode(trained)
    # the examples shift by one: y[t] is the token after x[t], -100 where nothing is learned
    (x, y), = bpe.make_examples(tok, [chat], "alpaca", 512)[0]
    assert x == ids[:-1] and [t for t in y if t != -100] == trained
    assert [t for t, m in zip(y, mask[1:]) if not m] == [-100] * (len(y) - len(trained))
    (x, y), = bpe.make_examples(tok, [chat], "alpaca", 512, mask_prompt=False)[0]
    assert y == ids[1:], "--mask_prompt=False trains on every token"

def test_finetune_examples_mask_the_prompt_and_the_padding():
    tok = _chat_tokenizer()
    records = [{"instruction": "Name a cat.", "output": "Tom"}, {"instruction": "Again?", "output": "Tom again"}]
    (x, y), long_one = finetune.chat_examples(tok, records, "alpaca", 512)[0]
    ids, mask = bpe.render_conversation(tok, bpe.record_messages(records[0]), "alpaca")
    assert x == ids[:-1] and y == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
    assert tok.decode([t for t in y if t != -100]) == "Tom<|endoftext|>", "the response and its stop token"
    assert finetune.chat_examples(tok, records, "alpaca", 512, mask_prompt=False)[0][0][1] == ids[1:]
    xb, yb = finetune.pad_batch([(x, y), long_one], 0, "cpu")
    pad = len(long_one[0]) - len(x)
    assert xb[0, len(x):].tolist() == [0] * pad and yb[0, len(y):].tolist() == [-100] * pad, "padding: no loss"
    assert torch.equal(yb[1], torch.tensor(long_one[1])) and xb.shape == yb.shape == (2, len(long_one[0]))

def test_finetune_examples_equal_the_ones_lora_and_dpo_train_on():
    # finetune.py writes the masking out as its lesson; lora.py and dpo.py take bpe.make_examples
    tok = _chat_tokenizer()
    records = [{"instruction": "cat " * k, "output": "Tom " * (3 * k)} for k in range(1, 30, 4)]
    for template, block_size, mask_prompt in [("phi3", 64, True), ("alpaca", 200, True), ("phi3", 40, False)]:
        conversations = [bpe.record_messages(r) for r in records]
        ours = finetune.chat_examples(tok, records, template, block_size, mask_prompt)
        theirs = bpe.make_examples(tok, conversations, template, block_size, mask_prompt)
        assert ours == theirs and ours[1] + ours[2] > 0, (template, block_size, ours[1:], theirs[1:])
        padded = zip(finetune.pad_batch(ours[0], 7, "cpu"), gpt.collate(ours[0], 7, "cpu"))
        assert all(torch.equal(a, b) for a, b in padded), "finetune.pad_batch = gpt.collate"

def test_finetune_long_examples_cut_the_response_never_the_prompt():
    tok = _chat_tokenizer()
    record = {"instruction": "cat " * 10, "output": "Tom " * 40}
    prompt = bpe.render_conversation(tok, bpe.record_messages(record)[:-1], "phi3")[0]
    examples, dropped, cut = finetune.chat_examples(tok, [record], "phi3", len(prompt) + 5)
    (x, y), = examples
    assert (dropped, cut) == (0, 1) and len(x) == len(prompt) + 5
    assert x[:len(prompt)] == prompt, "the prompt is kept whole"
    assert tok.special_tokens["<|endoftext|>"] not in y, "a cut response has no stop token"
    examples, dropped, cut = finetune.chat_examples(tok, [record], "phi3", len(prompt) - 3)
    assert (examples, dropped) == ([], 1), "a prompt that fills the window is dropped, not cut"

def test_finetune_loss_is_sum_over_trained_tokens_over_their_count():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=1, n_embd=8))
    x = torch.tensor([[0, 1, 2], [3, 4, 0]])
    y = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    logits, loss = model(x, y)  # the loop's loss: the model's own, on the masked targets
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 0, 1] + logp[0, 2, 2] + logp[1, 2, 4]) / 3
    assert_close(loss, expected, 1e-6, "masked loss")

def test_finetune_length_batches_cut_padding():
    lengths = [random.Random(k).randint(10, 200) for k in range(256)]
    batches = gpt.length_batches(lengths, 16, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(256)), "every example once"
    shuffled = random.Random(1).sample(range(256), 256)
    unsorted = [shuffled[i:i + 16] for i in range(0, 256, 16)]
    padding = lambda bs: 1 - sum(lengths) / sum(len(b) * max(lengths[i] for i in b) for b in bs)
    sorted_pad, random_pad = padding(batches), padding(unsorted)
    assert sorted_pad < 0.1 and random_pad > 0.4, (sorted_pad, random_pad)
    assert gpt.length_batches(lengths, 16, random.Random(0)) == batches, "seeded"

def test_bpe_story_checker_on_hand_made_stories():
    summary = "Lily lost her red ball, and her friend Tom helped her find it."
    check = lambda story: bpe.story_problems(story, ["ball", "looked", "red"], summary)
    assert check("Lily had a RED Ball. She looked; Tom's dog helped.") == []
    assert check("Lily had a red balloon. She looked. Tom helped.") == ["ball"], "a word inside another word"
    assert check("Lily had a red ball, and she looked.") == ["Tom"], "a character is missing"
    assert check("lily had a red ball. tom looked.") == [], "any case"
    assert check("") == ["ball", "looked", "red", "Lily", "Tom"]

def _tiny_finetune_setup(tmp, records, n_layer=2):
    # a tiny checkpoint whose tokenizer knows the records' words, and the records as a JSON file
    torch.manual_seed(0)
    text = " ".join(r["instruction"] + " " + r["output"] for r in records)
    tok = bpe.Tokenizer().train((text + " Below is an instruction ### Response ") * 5, 310)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=n_layer, n_head=2, n_embd=32))
    ckpt = gpt.save_checkpoint(os.path.join(tmp, "base.pt"), model, tokenizer=tok.to_dict())
    path = os.path.join(tmp, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return ckpt, path, tok

FOUR = [{"instruction": f"Name the {animal}.", "input": "", "output": name}
        for animal, name in [("cat", "Tom"), ("dog", "Rex the dog"), ("fox", "Fred"), ("owl", "Olive owl")]]

def test_finetune_overfits_four_examples():
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _, tok = _tiny_finetune_setup(tmp, FOUR)
        model, _ = gpt.load_checkpoint(ckpt, verbose=False)
        chats = [bpe.record_messages(r) for r in FOUR]
        examples = finetune.chat_examples(tok, FOUR, "phi3", 96)[0]
        cfg = finetune.FinetuneConfig(max_iters=150, batch_size=4, learning_rate=1e-2, min_lr=1e-3,
                                      warmup_iters=5, eval_interval=50, log_interval=1000, weight_decay=0.0,
                                      dtype="float32")
        pad = tok.special_tokens["<|endoftext|>"]
        result = finetune.train(cfg, model, list(model.parameters()), examples, examples, pad, "cpu",
                                contextlib.nullcontext())
        assert result["best_val_loss"] < 0.05 and result["best_step"] in (100, 150), result
        assert_close(gpt.heldout_loss(model, examples, 4, pad, "cpu", contextlib.nullcontext()),
                     result["best_val_loss"], 1e-6, "the model ends at its best weights")
        prompts = [bpe.render_conversation(tok, chat[:-1], "phi3")[0] for chat in chats]
        responses = gpt.respond(model, tok, prompts, 20, pad, contextlib.nullcontext())
        assert responses == [r["output"] for r in FOUR], responses

def test_finetune_train_layers_changes_only_the_last_block_and_norm():
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _, tok = _tiny_finetune_setup(tmp, FOUR, n_layer=3)
        model, _ = gpt.load_checkpoint(ckpt, verbose=False)
        clf = finetune.Classifier(model, ["a", "b"])
        params = finetune.freeze(model, 1) + list(clf.head.parameters())  # as classify() trains it
        before = {k: v.clone() for k, v in clf.state_dict().items()}
        optimizer = torch.optim.AdamW(params, lr=0.1)
        x, y = finetune.pad_batch([finetune.text_example(tok, "Name the cat. Tom", 1, 96)], 0, "cpu")
        clf(x, y)[1].backward()
        optimizer.step()
        changed = {k for k, v in clf.state_dict().items() if not torch.equal(v, before[k])}
        expected = {k for k in before if k.startswith(("gpt.transformer.h.2.", "gpt.transformer.ln_f", "head."))}
        assert changed == expected, sorted(changed ^ expected)
        assert len(finetune.freeze(model, -1)) == len(list(model.parameters())), "-1 trains all"
        raises(ValueError, finetune.freeze, model, 4, match="3 blocks")

def test_finetune_main_writes_checkpoint_with_template_and_table():
    records = [dict(r, check=dict(kind="create", hero=None, who=[], words=[r["output"]], summary=""))
               for r in FOUR * 3]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, path, _ = _tiny_finetune_setup(tmp, records)
        result = finetune.main(finetune.FinetuneConfig(
            ckpt_path=ckpt, dataset=path, out_dir=f"{tmp}/sft", template="phi3", val_size=2, test_size=2,
            max_iters=4, batch_size=4, eval_interval=2, max_new_tokens=5, device="cpu", dtype="float32"))
        saved = torch.load(result["ckpt_path"], weights_only=True)
        assert saved["chat_template"] == "phi3" and saved["train_config"]["dataset"] == path
        model, _ = gpt.load_checkpoint(result["ckpt_path"], verbose=False)  # a plain checkpoint
        table = json.load(open(f"{tmp}/sft/eval.json"))
        for row in ("base", "finetuned"):
            assert set(table[row]) == {"response_loss", "passes", "judge"}, table[row]
            assert set(table[row]["passes"]) == {"create", "all", "names"} and table[row]["judge"] is None
        assert len(table["samples"]) == 2 and table["test_examples"] == 2

def test_finetune_bad_data_is_a_clear_error():
    with tempfile.TemporaryDirectory() as tmp:
        def write(name, text):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
            return os.path.join(tmp, name)
        raises(ValueError, bpe.read_records, write("bad.json", "[{"), match="bad.json is not valid JSON")
        raises(ValueError, bpe.read_records, write("empty.json", "[]"), match="holds no records")
        raises(ValueError, bpe.read_records, write("x.json", '[{"instruction": "a"}]'), match="record 0 lacks")
        raises(ValueError, bpe.read_records, write("m.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'),
               match="does not end with a user turn and then an assistant turn")
        raises(ValueError, bpe.read_records, write("a.jsonl", '{"messages": [{"role": "assistant", "content": "a"}]}\n'),
               match="record 0 does not end with a user turn")
        chat = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
        assert len(bpe.read_records(write("ok.jsonl", chat + "\n" + chat))) == 2
        raises(ValueError, bpe.read_records, write("bad.jsonl", chat + chat + "{oops\n"), match="on line 3")
        with open(os.path.join(tmp, "latin1.json"), "wb") as f:
            f.write(b'[{"instruction": "caf\xe9", "output": "x"}]')
        raises(ValueError, bpe.read_records, os.path.join(tmp, "latin1.json"), match="UTF-8")
        raises(FileNotFoundError, bpe.read_records, f"{tmp}/none.json", match="--dataset=")
        raises(ValueError, finetune.read_labelled, write("l.tsv", "ham\thi\nspam no tab\n"), match="line 2")
        raises(ValueError, finetune.balanced_split, [("a", "ham"), ("b", "ham")], 0, match="one label")
        ckpt, _, _ = _tiny_finetune_setup(tmp, FOUR)
        few = write("few.tsv", "ham\thi\nham\tyo\nspam\twin\nspam\tcash\n")
        raises(ValueError, finetune.main, finetune.FinetuneConfig(ckpt_path=ckpt, task="classify", dataset=few,
               out_dir=f"{tmp}/few", device="cpu"), match="at least 10 texts of each label")
        os.makedirs(f"{tmp}/done")
        shutil.copy(ckpt, f"{tmp}/done/ckpt.pt")
        raises(gpt.UserError, finetune.main, finetune.FinetuneConfig(ckpt_path=ckpt, out_dir=f"{tmp}/done"),
               match="--overwrite")
        raises(gpt.UserError, finetune.main, finetune.FinetuneConfig(ckpt_path=ckpt, out_dir=f"{tmp}/no",
               data_dir=f"{tmp}/nodata", device="cpu"), match="python train.py")
        raises(ValueError, bpe.split_records, list(range(10)), 5, 5, 0, match="none to train")
        raises(ValueError, finetune.check_config, finetune.FinetuneConfig(template="vicuna"), match="alpaca")
        raises(ValueError, finetune.check_config, finetune.FinetuneConfig(task="chat"), match="instruct or classify")

def test_finetune_per_task_defaults_and_explicit_flags():
    sft = finetune.check_config(finetune.FinetuneConfig())
    cls = finetune.check_config(finetune.FinetuneConfig(task="classify"))
    assert (sft.train_layers, sft.max_iters, sft.learning_rate, sft.min_lr) == (-1, 1100, 2e-3, 2e-4), sft
    assert (cls.train_layers, cls.max_iters, cls.epochs, cls.learning_rate) == (1, -1, 10, 5e-4), cls
    mine = finetune.check_config(finetune.FinetuneConfig(task="classify", train_layers=-1, min_lr=0.0))
    assert (mine.train_layers, mine.min_lr) == (-1, 0.0), "a flag passed explicitly wins"
    epochs = finetune.check_config(finetune.FinetuneConfig(epochs=4))
    assert (epochs.epochs, epochs.max_iters) == (4, -1), "--epochs alone counts epochs, not the default steps"

def test_finetune_naive_bayes_baseline():
    train = [("win cash now", "spam"), ("free prize win", "spam"), ("see you at lunch", "ham"),
             ("lunch at noon", "ham")]
    assert finetune.naive_bayes(train, ["free cash", "see you at noon", "win lunch now"]) == ["spam", "ham", "spam"]

def test_finetune_classifier_pools_the_last_real_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    clf = finetune.Classifier(model, ["a", "b", "c"]).eval()
    rows = [([5, 6, 7], [-100, -100, 2]), ([8, 9, 10, 11, 12, 13], [-100] * 5 + [0])]
    alone = torch.cat([clf(torch.tensor([x]), torch.tensor([y]))[0] for x, y in rows])
    logits, loss = clf(*finetune.pad_batch(rows, 0, "cpu"))
    assert_close(logits, alone, 1e-6, "padded vs alone")
    assert_close(loss, torch.nn.functional.cross_entropy(alone, torch.tensor([2, 0])), 1e-6, "the labels' loss")

def test_finetune_classifier_overfits_and_round_trips():
    pairs = [(f"{w} {w} {w}", "spam" if w in ("win", "cash", "free") else "ham")
             for w in ["win", "cash", "free", "lunch", "mom", "home"] * 6]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, _, _ = _tiny_finetune_setup(tmp, FOUR)
        data = os.path.join(tmp, "sms.tsv")
        with open(data, "w") as f:
            f.writelines(f"{label}\t{text}\n" for text, label in pairs)
        cfg = finetune.FinetuneConfig(ckpt_path=ckpt, task="classify", dataset=data, out_dir=f"{tmp}/cls",
                                      max_iters=60, batch_size=8, learning_rate=1e-2, eval_interval=20,
                                      device="cpu", dtype="float32")
        result = finetune.main(cfg)
        assert result["train"] == 1.0 and result["test"] == 1.0 and result["naive_bayes_test"] == 1.0, result
        assert torch.load(result["ckpt_path"], weights_only=True)["classifier"]["labels"] == ["ham", "spam"]
        for text, label in pairs[:6]:  # the saved head and labels give the same predictions
            assert finetune.main(dataclasses.replace(cfg, classify_text=text))["label"] == label
        os.makedirs(f"{tmp}/lm")
        shutil.copy(ckpt, f"{tmp}/lm/ckpt.pt")  # a plain GPT checkpoint has no head
        raises(ValueError, finetune.main, dataclasses.replace(cfg, out_dir=f"{tmp}/lm", classify_text="x"),
               match="not a classifier")

def test_finetune_judge_scores_through_a_local_stand_in_server():
    asked = []
    class Judge(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body)
            reply = "85" if "Tom" in body["messages"][0]["content"] else "I cannot score this"
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        records = [{"instruction": "Name the cat.", "output": "Tom"}, {"instruction": "Name the dog.", "output": "Rex"}]
        assert finetune.judge(url, "llama3", records, ["Tom", "Max"]) == 85, "a reply without a number is left out"
        assert finetune.judge(url, "llama3", records[1:], ["Max"]) is None
        assert asked[0]["model"] == "llama3" and asked[0]["messages"][0]["role"] == "user"
        assert "Name the cat." in asked[0]["messages"][0]["content"], "the prompt reaches the judge"
    finally:
        server.shutdown()
        server.server_close()
    raises(gpt.UserError, finetune.judge, url, "llama3", records, ["c"], match="drop --judge_url")

def test_finetune_raschka_records_render_with_gpt2s_tokenizer():
    records = bpe.read_records(shared_file("instruct", "instruction-data.json"))
    tok = bpe.Tokenizer.gpt2(os.path.dirname(shared_file("gpt2", "encoder.json")))
    examples, dropped, cut = bpe.make_examples(tok, [bpe.record_messages(r) for r in records], "alpaca", 1024)
    assert len(records) == 1100 and len(examples) == 1100 and dropped == cut == 0
    ids, mask = bpe.render_conversation(tok, bpe.record_messages(records[0]), "alpaca")
    stop = tok.special_tokens["<|endoftext|>"]
    assert ids[-1] == stop == 50256 and tok.decode([i for i, m in zip(ids, mask) if m]) == records[0]["output"] + "<|endoftext|>"

def test_finetune_sms_spam_split_and_naive_bayes():
    pairs = finetune.read_labelled(shared_file("sms_spam", "SMSSpamCollection"))
    train, val, test = finetune.balanced_split(pairs, 1337)
    assert len(pairs) == 5574 and (len(train), len(val), len(test)) == (1045, 149, 300)
    assert Counter(label for _, label in train + val + test) == {"ham": 747, "spam": 747}
    guesses = finetune.naive_bayes(train, [text for text, _ in test])
    accuracy = sum(g == label for g, (_, label) in zip(guesses, test)) / len(test)
    assert accuracy > 0.94, f"naive Bayes test accuracy {accuracy:.2%}"

# -----------------------------------------------------------------------------
# lora.py

import lora  # noqa: E402

def _lora_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))

def _hub_folder(tmp, records):
    # a Hub-style folder (config.json, model.safetensors, tokenizer.json and tokenizer_config.json with
    # ChatML's template), as SmolLM2-Instruct ships it, but tiny and random
    text = " ".join(r["instruction"] + " " + r["output"] for r in records)
    tok = bpe.Tokenizer().train(text * 5, 290, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=4, n_embd=32, bias=False,
                          **MODERN))
    folder = os.path.join(tmp, "hub")
    gpt.save_pretrained(model, folder)
    tok.save_pretrained(folder, "chatml")
    return folder, model

def test_open_model_folder_through_every_script():
    records = [dict(r, check=dict(kind="create", hero=None, who=[], words=[r["output"]], summary=""))
               for r in FOUR * 3]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        folder, model = _hub_folder(tmp, records)
        path = os.path.join(tmp, "data.json")
        gpt.save_json(path, records)
        # kvcache.py answers a prompt as a user's message, in the model's own template, stopping at <|im_end|>
        result = kvcache.main(kvcache.KVCacheConfig(init_from=folder, prompt="Name the cat.", max_new_tokens=6,
                                                    temperature=0, device="cpu", dtype="float32"))
        tok = bpe.Tokenizer.from_saved(folder)
        assert tok.chat_template and result["tokens"] <= 6
        prompt = bpe.render_conversation(tok, [{"role": "user", "content": "Name the cat."}], tok.chat_template)[0]
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
        want = model.eval().generate([prompt], 6, temperature=0, eot_id=bpe.stop_ids(tok, tok.chat_template))[0]
        assert result["tokens"] == len(want)
        with _server(model, tok, tok.chat_template) as (url, server):  # the page's API: the same reply
            messages = [{"role": "user", "content": "Name the cat."}]
            chat = _post(url, "/v1/chat/completions", messages=messages, max_tokens=6, temperature=0).json()
        assert chat["choices"][0]["message"]["content"] == tok.decode(want), (chat, want)
        common = dict(init_from=folder, dataset=path, val_size=2, test_size=2, max_iters=2, batch_size=4,
                      eval_interval=2, max_new_tokens=4, device="cpu", dtype="float32")
        sft = finetune.main(finetune.FinetuneConfig(out_dir=f"{tmp}/sft", **common))
        saved = gpt.load_checkpoint(sft["ckpt_path"], verbose=False)[1]
        assert saved["tokenizer"] == folder, "a finetuned open model keeps its folder's tokenizer"
        lora.main(lora.LoraConfig(out_dir=f"{tmp}/lora", rank=2, **common))
        dpo_cfg = dict(common, dataset=path.replace(".json", "-pairs.json"))
        gpt.save_json(dpo_cfg["dataset"], [dict(r, chosen=r["output"], rejected="no") for r in records])
        dpo.main(dpo.DpoConfig(out_dir=f"{tmp}/dpo", **dpo_cfg))
        # quantize.py exports the finetuned model back into both formats
        quantize.main(quantize.QuantizeConfig(ckpt_path=sft["ckpt_path"], export="hf", out=f"{tmp}/hf"))
        again = gpt.from_pretrained(f"{tmp}/hf").eval()
        sft_model = gpt.load_checkpoint(sft["ckpt_path"], verbose=False)[0].eval()
        ids = torch.tensor([prompt])
        assert_close(again(ids)[0], sft_model(ids)[0], 1e-5, "logits of the re-exported model")
        assert bpe.Tokenizer.from_saved(f"{tmp}/hf").encode("Name the cat.") == tok.encode("Name the cat.")
        quantize.main(quantize.QuantizeConfig(ckpt_path=sft["ckpt_path"], export="gguf", out=f"{tmp}/m.gguf"))
        assert open(f"{tmp}/m.gguf", "rb").read(4) == b"GGUF"

def test_open_base_llama_folder_without_a_chat_template():
    """A base Llama 3 (no chat template, no <|endoftext|>): kvcache.py continues text, stopping at
    <|end_of_text|>, and refuses to serve a chat; finetune.py takes --template=llama3 and keeps the
    folder by its absolute path; quantize.py exports it without inventing a template."""
    specials = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>")
    text = " ".join(r["instruction"] + " " + r["output"] for r in FOUR)
    tok = bpe.Tokenizer().train(text * 5, 290, special_tokens=specials)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=4, n_embd=32,
                          bias=False, **MODERN))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        folder = os.path.join(tmp, "Base-0.5B")
        gpt.save_pretrained(model, folder)
        tok.save_pretrained(folder, None)
        assert "chat_template" not in gpt.read_json(os.path.join(folder, "tokenizer_config.json"))
        run = dict(init_from=folder, device="cpu", dtype="float32")
        kvcache.main(kvcache.KVCacheConfig(prompt="Name the cat.", max_new_tokens=4, temperature=0, **run))
        raises(gpt.UserError, kvcache.main, kvcache.KVCacheConfig(serve=True, **run), match="no chat template")
        path = os.path.join(tmp, "data.json")
        gpt.save_json(path, FOUR * 3)
        common = dict(template="llama3", val_size=2, test_size=2, max_iters=2, batch_size=4, eval_interval=2,
                      max_new_tokens=4, device="cpu", dtype="float32")
        sft = finetune.main(finetune.FinetuneConfig(dataset=path, out_dir=f"{tmp}/sft",
                                                    init_from=os.path.relpath(folder), **common))
        assert gpt.load_checkpoint(sft["ckpt_path"], verbose=False)[1]["tokenizer"] == folder
        lora.main(lora.LoraConfig(dataset=path, out_dir=f"{tmp}/lora", init_from=folder, rank=2, **common))
        pairs = os.path.join(tmp, "pairs.json")
        gpt.save_json(pairs, [dict(r, chosen=r["output"], rejected="no") for r in FOUR * 3])
        dpo.main(dpo.DpoConfig(dataset=pairs, out_dir=f"{tmp}/dpo", init_from=folder, **common))
        out = quantize.main(quantize.QuantizeConfig(init_from=folder, export="hf", out=f"{tmp}/hf"))
        assert "chat_template" not in gpt.read_json(os.path.join(out["out"], "tokenizer_config.json"))
        with contextlib.chdir(tmp):  # quantized into out/<the folder's name>, its dot kept
            quantize.main(quantize.QuantizeConfig(init_from=folder, max_new_tokens=2, device="cpu"))
            assert os.path.exists("out/Base-0.5B-int8.pt"), os.listdir("out")

def test_lora_output_unchanged_at_init_and_dropout_off_in_eval():
    model = _lora_model().eval()
    x = torch.randint(0, 64, (2, 10))
    before = model(x)[0]
    lora.apply_lora(model, "all", rank=4, alpha=8.0, dropout=0.5)
    assert_close(model.eval()(x)[0], before, 0.0, "B = 0: the model is unchanged")
    layer = lora.lora_layers(model)[0][2]
    torch.nn.init.normal_(layer.lora_B.weight)
    assert torch.equal(model(x)[0], model(x)[0]), "dropout is off in eval mode"
    assert not torch.equal(model.train()(x)[0], model(x)[0]), "and on in training"

def test_lora_shapes_names_and_trainable_count():
    model = _lora_model(swiglu=True)
    lora.apply_lora(model, "all", rank=4, alpha=8.0)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    a = model.transformer.h[0].attn.c_attn
    assert a.lora_A.weight.shape == (4, 16) and a.lora_B.weight.shape == (48, 4), "PEFT's (r, in) and (out, r)"
    # rank x (in + out) for each adapted layer: c_attn 16->48, attn.c_proj 16->16, c_gate and c_fc 16->64
    # (swiglu's hidden width 64), mlp.c_proj 64->16; two blocks
    expected = 2 * 4 * ((16 + 48) + (16 + 16) + 2 * (16 + 64) + (64 + 16))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert not model.transformer.wte.weight.requires_grad, "the tied embedding stays frozen"
    attn_only = lora.apply_lora(_lora_model(), "attn", rank=2, alpha=2.0)
    assert len(lora.lora_layers(attn_only)) == 4 and isinstance(attn_only.transformer.h[0].mlp.c_fc, torch.nn.Linear)

def test_lora_step_changes_only_a_and_b():
    model = lora.apply_lora(_lora_model(), "all", rank=4, alpha=8.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 64, (2, 10))
    model(x, x)[1].backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), changed

def test_lora_merge_equals_unmerged_and_unmerge_restores():
    model = lora.apply_lora(_lora_model(), "all", rank=4, alpha=8.0, rslora=True).eval()
    for _, _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        assert layer.scale == 8.0 / 2.0, "rsLoRA: alpha / sqrt(rank)"
    x = torch.randint(0, 64, (3, 12))
    unmerged = model(x)[0]
    layer = model.transformer.h[1].mlp.c_fc
    weight = layer.base.weight.clone()
    layer.merge()
    assert_close(model(x)[0], unmerged, 1e-5, "one layer merged")
    layer.unmerge()
    assert_close(layer.base.weight, weight, 1e-6, "unmerge restores the base weight")
    merged = lora.merge(model)
    assert not lora.lora_layers(merged) and isinstance(merged.transformer.h[0].attn.c_attn, torch.nn.Linear)
    assert_close(merged(x)[0], unmerged, 1e-5, "merged vs unmerged logits")
    assert set(merged.state_dict()) == set(_lora_model().state_dict()), "an ordinary GPT again"

def test_lora_adapter_round_trip_and_refusals():
    with tempfile.TemporaryDirectory() as tmp:
        base = _lora_model()
        fp = lora.fingerprint(base)
        tuned = lora.apply_lora(copy.deepcopy(base), "attn", rank=4, alpha=8.0).eval()
        for _, _, layer in lora.lora_layers(tuned):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        assert lora.fingerprint(tuned) == fp, "the fingerprint ignores the adapters"
        path = lora.save_adapter(f"{tmp}/adapter.pt", tuned, dict(rank=4, alpha=8.0, dropout=0.0,
                                 targets="attn", rslora=False), fp)
        x = torch.randint(0, 64, (2, 9))
        loaded = lora.load_adapter(path, copy.deepcopy(base), fp).eval()
        assert torch.equal(loaded(x)[0], tuned(x)[0]), "the adapter round trip"
        other = _lora_model(seed=1)
        raises(ValueError, lora.load_adapter, path, other, lora.fingerprint(other), match="another base model")
        wrapped = lora.apply_lora(copy.deepcopy(base), "attn", rank=2, alpha=8.0)
        raises(ValueError, lora.load_adapter, path, wrapped, fp, match="rank 4, alpha 8.0")
        with open(f"{tmp}/junk.pt", "wb") as f:
            f.write(b"not a checkpoint")
        raises(ValueError, lora.load_adapter, f"{tmp}/junk.pt", copy.deepcopy(base), fp, match="not a lora.py adapter")
        assert os.path.getsize(path) < 0.5 * os.path.getsize(gpt.save_checkpoint(f"{tmp}/full.pt", base))

def test_lora_bad_values_are_clear_errors():
    for kw, match in [(dict(rank=-1), "--rank=-1"), (dict(alpha=0.0), "alpha > 0"), (dict(targets="qkv"), "use one of attn"),
                      (dict(dropout=1.0), "--dropout=1.0")]:
        raises(ValueError, lora.check_config, lora.LoraConfig(**kw), match=match)
    raises(ValueError, lora.LoRALinear, torch.nn.Linear(4, 4), 0, 1.0, match="rank >= 1")
    raises(ValueError, lora.apply_lora, _lora_model(), "embedding", match="unknown")

def test_lora_main_trains_merges_and_ships_the_adapter():
    with tempfile.TemporaryDirectory() as tmp:
        records = [dict(r, check=dict(kind="create", hero=None, who=[], words=[r["output"]], summary=""))
                   for r in FOUR * 3]
        ckpt, path, tok = _tiny_finetune_setup(tmp, records)
        cfg = lora.LoraConfig(ckpt_path=ckpt, dataset=path, out_dir=f"{tmp}/lora", val_size=2, test_size=2,
                              max_iters=6, batch_size=4, eval_interval=3, max_new_tokens=5, device="cpu",
                              dtype="float32", targets="all", rank=2)
        result = lora.main(cfg)
        merged, saved = gpt.load_checkpoint(result["ckpt_path"], verbose=False)  # an ordinary checkpoint
        assert saved["lora"]["rank"] == 2 and saved["chat_template"] == "phi3"
        assert result["trainable"] < result["params"] and result["file_bytes"] < result["ckpt_bytes"]
        shipped = lora.main(dataclasses.replace(cfg, adapter=f"{tmp}/lora/adapter.pt"))
        assert_close(shipped["response_loss"], result["response_loss"], 1e-5, "adapter.pt onto its base = merged")
        raises(gpt.UserError, lora.main, cfg, match="--overwrite")
        val = bpe.split_records(records, 2, 2, cfg.seed)[1]
        val_ex = bpe.make_examples(tok, [bpe.record_messages(r) for r in val], "phi3", 96)[0]
        val_loss = gpt.heldout_loss(merged, val_ex, 4, 0, "cpu", contextlib.nullcontext())
        assert saved["step"] in (0, 3, 6) and abs(val_loss - saved["val_loss"]) < 1e-4, "the best adapter is kept"
        state = result["optimizer_bytes"] - 8 * result["trainable"]
        assert 0 <= state < 1000, "AdamW keeps two float32 numbers for each adapter weight (and a step count)"
        half = lora.main(dataclasses.replace(cfg, bf16_base=True, out_dir=f"{tmp}/half"))
        merged_half = gpt.load_checkpoint(half["ckpt_path"], verbose=False)[0]
        base_model = gpt.load_checkpoint(ckpt, verbose=False)[0]
        assert torch.equal(merged_half.transformer.wte.weight, base_model.transformer.wte.weight), \
            "--bf16_base merges into the float32 base, not its rounding"

# -----------------------------------------------------------------------------
# dpo.py

import dpo  # noqa: E402

def test_dpo_losses_at_the_start_and_on_hand_numbers():
    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -1.0])
    n = torch.tensor([5.0, 2.0])
    # policy == reference: every reward is 0, DPO and cDPO give ln 2, IPO (1 / (2 beta))^2
    for kind, value in [("dpo", math.log(2)), ("cdpo", math.log(2)), ("ipo", (1 / 0.2) ** 2)]:
        loss, rc, rr = dpo.preference_loss(kind, pc, pr, pc, pr, n, n, 0.1, 0.1, 0.5)
        assert_close(loss, torch.full((2,), value), 1e-6, kind)
        assert_close(rc, torch.zeros(2), 0, "rewards at the start")
    # by hand: h = (pc - rc) - (pr - rr) with the reference at -11 and -11, -2 and -2
    rc, rr = torch.tensor([-11.0, -2.0]), torch.tensor([-11.0, -2.0])
    h = torch.tensor([(-10 + 11) - (-12 + 11), (-3 + 2) - (-1 + 2)])  # [2, -2]
    sig = lambda z: 1 / (1 + torch.exp(-z))
    loss = dpo.preference_loss("dpo", pc, pr, rc, rr, n, n, 0.5)[0]
    assert_close(loss, -torch.log(sig(0.5 * h)), 1e-6, "dpo")
    loss = dpo.preference_loss("cdpo", pc, pr, rc, rr, n, n, 0.5, 0.2)[0]
    assert_close(loss, -0.8 * torch.log(sig(0.5 * h)) - 0.2 * torch.log(sig(-0.5 * h)), 1e-6, "cdpo")
    loss = dpo.preference_loss("ipo", pc, pr, rc, rr, n, n, 0.5)[0]
    assert_close(loss, (h - 1.0) ** 2, 1e-6, "ipo")
    loss, rc_, rr_ = dpo.preference_loss("simpo", pc, pr, None, None, n, torch.tensor([4.0, 1.0]), 2.0, gamma=0.5)
    assert_close(rc_, 2.0 * pc / n, 1e-6, "simpo's reward is length-normalised")
    assert_close(loss, -torch.log(sig(2.0 * (pc / n - pr / torch.tensor([4.0, 1.0])) - 0.5)), 1e-6, "simpo")

def test_dpo_gradient_matches_the_closed_form():
    pc, pr = torch.tensor([-4.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    rc, rr, beta = torch.tensor([-5.0]), torch.tensor([-2.5]), 0.3
    loss = dpo.preference_loss("dpo", pc, pr, rc, rr, None, None, beta)[0].sum()
    loss.backward()
    margin = (pc - rc) - (pr - rr)
    closed = -beta * torch.sigmoid(-beta * margin)  # d loss / d log pi(chosen); the rejected gets its negative
    assert_close(pc.grad, closed.detach(), 1e-6, "chosen gradient")
    assert_close(pr.grad, -closed.detach(), 1e-6, "rejected gradient")

def test_dpo_sequence_logprobs_ignore_prompt_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 1, 2, 3, 4, 5]])
    logp, n = dpo.sequence_logprobs(logits, targets)
    expected = logits.log_softmax(-1)[0, 2, 3] + logits.log_softmax(-1)[0, 3, 4]
    assert_close(logp[0], expected, 1e-5, "the trained tokens' sum") and n.tolist() == [2, 5]
    changed = logits.clone()
    changed[0, [0, 1, 4, 5]] = torch.randn(4, 11) * 10  # the prompt's and the padding's positions
    assert_close(dpo.sequence_logprobs(changed, targets)[0], logp, 1e-6, "masked positions do not count")

def _text_of(records):  # every message of the records: text to train a tokenizer on
    return " ".join(m["content"] for r in records for m in r["messages"])

def test_dpo_offline_pairs_reject_what_the_checker_rejects():
    records = conversations(300, seed=3)
    pairs = dpo.story_pairs(records, 0)
    assert len(pairs) >= 290, f"only {len(pairs)} of 300 records made a pair"
    by_chat = {json.dumps(r["messages"]): r for r in records}
    faults = Counter()
    for prompt, chosen, rejected in pairs:
        r = by_chat[json.dumps(prompt + [{"role": "assistant", "content": chosen}])]
        assert chosen == r["messages"][-1]["content"] and not bpe.reply_problems(chosen, r["check"])
        problems = bpe.reply_problems(rejected, r["check"])
        assert problems and rejected != chosen, "the rejected reply fails the checker"
        faults["name" if re.search(r"name|^no |gone", problems[0]) else "other"] += 1
    assert faults["name"] > 50 and faults["other"] > 50, faults

def test_dpo_onpolicy_pairs_rank_the_models_own_samples():
    records = [r for r in conversations(40, seed=7) if r["check"]["kind"] == "create"][:8]
    torch.manual_seed(0)
    tok = bpe.Tokenizer().train(_text_of(records), 350)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16))
    # an untrained model's samples all earn 0 from story_reward; a stand-in reward ranks them instead
    prompts = [bpe.render_conversation(tok, bpe.record_messages(r)[:-1], "phi3")[0] for r in records]
    with mock.patch.object(dpo, "story_reward", lambda story, record: len(story)):
        pairs = dpo.onpolicy_pairs(model, tok, records, prompts, 3, 30, contextlib.nullcontext(), 0)
        again = dpo.onpolicy_pairs(model, tok, records, prompts, 3, 30, contextlib.nullcontext(), 0)
    assert len(pairs) >= 6 and pairs == again, "seeded: the same pairs twice"
    prompts = [json.dumps(bpe.record_messages(r)[:-1]) for r in records]
    for prompt, chosen, rejected in pairs:
        assert json.dumps(prompt) in prompts and len(chosen) > len(rejected), "the best against the worst"

def test_dpo_bad_input_is_a_clear_error():
    with tempfile.TemporaryDirectory() as tmp:
        def write(records):
            path = os.path.join(tmp, "pairs.json")
            with open(path, "w") as f:
                json.dump(records, f)
            return path
        good = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}
        raschka = {"instruction": "Greet", "input": "Bob", "output": "Hi Bob", "chosen": "Hi, Bob!", "rejected": "What."}
        pairs = dpo.file_pairs(write([good, raschka]))
        assert len(pairs) == 2 and pairs[1][0] == [{"role": "user", "content": "Greet\n\nBob"}], pairs
        raises(ValueError, dpo.file_pairs, write([good, dict(good, chosen="")]), match="record 1 lacks")
        raises(ValueError, dpo.file_pairs, write([dict(good, rejected="Hi!")]), match="record 0 has chosen == rejected")
        raises(ValueError, dpo.file_pairs, write([{"prompt": "x", "chosen": "y"}]), match="record 0 lacks")
    raises(ValueError, dpo.check_config, dpo.DpoConfig(beta=0.0), match="--beta=0.0")
    raises(ValueError, dpo.check_config, dpo.DpoConfig(loss="kto"), match="use one of dpo")
    raises(ValueError, dpo.check_config, dpo.DpoConfig(samples=1), match="--samples=1")
    raises(gpt.UserError, dpo.check_config, dpo.DpoConfig(pairs="mixed"), match="use one of offline, onpolicy, both")

def test_dpo_learning_rate_is_per_method_unless_given():
    for method, lr in [("dpo", 3e-5), ("grpo", 3e-4)]:
        cfg = dpo.check_config(dpo.DpoConfig(method=method))
        assert (cfg.learning_rate, cfg.min_lr) == (lr, lr / 10), (method, cfg.learning_rate, cfg.min_lr)
    cfg = dpo.check_config(dpo.DpoConfig(method="grpo", learning_rate=1e-5, min_lr=0.0))
    assert (cfg.learning_rate, cfg.min_lr) == (1e-5, 0.0), "a flag passed explicitly wins"

def test_dpo_reads_raschkas_preference_data():
    path = shared_file("preference", "instruction-data-with-preference.json")
    raises(ValueError, dpo.file_pairs, path, match="record 122 has chosen == rejected")
    pairs = dpo.file_pairs(path, allow_ties=True)  # --dataset=raschka skips its 6 ties
    assert len(pairs) == 1094 and all(chosen != rejected for _, chosen, rejected in pairs)
    tok = bpe.Tokenizer.gpt2(os.path.dirname(shared_file("gpt2", "encoder.json")))
    assert len(dpo.pair_examples(tok, pairs[:50], "alpaca", 1024)) == 50

def test_dpo_main_trains_and_leaves_the_reference_unchanged():
    records = conversations(60, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(f"{tmp}/stories")
        with open(f"{tmp}/stories/instruct.json", "w") as f:
            json.dump(records, f)
        torch.manual_seed(0)
        tok = bpe.Tokenizer().train(_text_of(records), 400)
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=1024, n_layer=1, n_head=2, n_embd=32))
        ckpt = gpt.save_checkpoint(f"{tmp}/sft.pt", model, tokenizer=tok.to_dict(), chat_template="phi3")
        copies = []
        real_deepcopy = copy.deepcopy
        def spy(obj, *args):
            out = real_deepcopy(obj, *args)
            if isinstance(obj, torch.nn.Module):
                copies.append((out, real_deepcopy(out.state_dict())))
            return out
        cfg = dpo.DpoConfig(ckpt_path=ckpt, data_dir=tmp, out_dir=f"{tmp}/dpo", val_size=5, test_size=5,
                            max_iters=6, batch_size=4, eval_interval=3, learning_rate=1e-2, max_new_tokens=8,
                            prompts=20, device="cpu", dtype="float32")
        sampler = mock.patch.object(dpo, "onpolicy_pairs", wraps=dpo.onpolicy_pairs)
        renders = mock.patch.object(dpo, "render_conversation", wraps=dpo.render_conversation)
        with mock.patch.object(dpo.copy, "deepcopy", spy), sampler as sampled, renders as rendered:
            result = dpo.main(cfg)
        (_, _, prompts, *_), _ = sampled.call_args  # --pairs=both: the model's own pairs beside the offline
        assert sampled.call_count == 1 and prompts == dpo.split_records(records, 5, 5, cfg.seed)[0][:20]
        used = min(50, cfg.max_iters * max(cfg.batch_size, cfg.prompts_per_step))  # records reached
        assert rendered.call_count == used + 5 + 5, "each prompt rendered once: train, val, test"
        (ref, weights), = copies
        assert all(torch.equal(v, weights[k]) for k, v in ref.state_dict().items()), "the reference changed"
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        for row in ("before", "after"):
            assert set(result[row]) >= {"accuracy", "margin", "kl", "passes", "chosen_loss", "response_tokens"}
            assert set(result[row]["passes"]) <= {*train.KINDS, "all", "names"}, result[row]["passes"]
        assert_close(result["before"]["loss"], math.log(2), 1e-5, "the held-out DPO loss at the start")
        assert gpt.load_checkpoint(result["ckpt_path"], verbose=False)[1]["chat_template"] == "phi3"
        raises(gpt.UserError, dpo.main, cfg, match="--overwrite")
        # on the stories minus the val prompts' mean reward picks the checkpoint (evaluations at steps 0, 3, 6)
        with mock.patch.object(dpo, "evaluate", side_effect=[-0.1, -0.5, -0.2]):
            picked = dpo.main(dataclasses.replace(cfg, out_dir=f"{tmp}/dpo-picked"))
        assert gpt.load_checkpoint(picked["ckpt_path"], verbose=False)[1]["step"] == 3, "not the best reward"
        grpo = dataclasses.replace(cfg, method="grpo", out_dir=f"{tmp}/grpo", group_size=2, prompts_per_step=2,
                                   max_iters=4, eval_interval=2)
        result = dpo.main(grpo)
        assert set(result["after"]) >= {"passes", "reward", "chosen_loss", "kl"}
        assert gpt.load_checkpoint(result["ckpt_path"], verbose=False)[1]["train_config"]["method"] == "grpo"

def test_grpo_reward_pays_for_what_the_checker_passes():
    for r in conversations(60, seed=11):
        reply = r["messages"][-1]["content"]
        assert dpo.story_reward(reply, r) == 1.0, "every reference reply earns the whole reward"
        assert dpo.story_reward(f"{reply.split('.')[0]}. " * 30, r) == 0.0, "one sentence repeated"
        assert all(dpo.story_reward(wrong, r) < 1 for wrong in corruptions(r)), "a fault costs"
        words = r["check"].get("words")
        if words and r["check"]["kind"] == "create":
            assert dpo.story_reward(" ".join(words) + ".", r) == 0.0, "a bare list of the required words"
            fewer = re.sub(rf"\b{words[0]}\b", "thing", reply, flags=re.IGNORECASE)
            assert 0 < dpo.story_reward(fewer, r) < 1, "a missing word costs a part"

def test_grpo_advantages_vanish_without_a_signal():
    assert torch.equal(dpo.group_advantages(torch.tensor([0.3, 0.7, 0.1]), 1), torch.zeros(3))
    adv = dpo.group_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0]), 4)
    assert torch.equal(adv[:4], torch.zeros(4)), "equal rewards: no advantage"
    assert_close(adv[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]), 1e-3, "(r - mean) / std")
    torch.manual_seed(0)
    logits = torch.randn(8, 5, 12, requires_grad=True)
    y = torch.randint(0, 12, (8, 5))
    y[:, :2] = -100
    logp = dpo.token_logprobs(logits, y)
    loss = dpo.grpo_loss(logp, logp.detach(), logp.detach(), torch.zeros(8), y != -100, 0.2, 0.0)[0]
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits)), "no advantage, no policy gradient"

def test_grpo_clipped_objective_and_k3_by_hand():
    mask = torch.ones(1, 1, dtype=torch.bool)
    def grad_at(ratio, advantage, clip=0.2, kl_coef=0.0, ref=None):
        logp = torch.tensor([[-1.0]], requires_grad=True)
        old = torch.tensor([[-1.0 - math.log(ratio)]])
        ref = logp.detach() if ref is None else ref
        loss, kl, clipped = dpo.grpo_loss(logp, old, ref, torch.tensor([advantage]), mask, clip, kl_coef)
        loss.backward()
        return loss.item(), logp.grad.item(), kl.item(), clipped.item()
    for a in (2.0, -2.0):  # the first inner step: the ratio is 1, clipped == unclipped == -ratio A
        loss, grad, kl, clipped = grad_at(1.0, a)
        assert_close(loss, -a, 1e-6, "ratio 1")
        assert_close(grad, -a, 1e-6, "d(-ratio A)/dlogp = -A")
        assert kl == 0.0 and clipped == 0.0, "policy == reference: k3 is 0"
    assert grad_at(1.5, 1.0)[1] == 0.0, "past 1 + clip with A > 0: no gradient"
    assert grad_at(0.5, -1.0)[1] == 0.0, "below 1 - clip with A < 0: no gradient"
    assert_close(grad_at(1.5, -1.0)[1], 1.5, 1e-6, "the pessimistic side is not clipped")
    assert_close(grad_at(1.5, 1.0, clip=math.inf)[1], -1.5, 1e-6, "clip=inf: plain -ratio A")
    for d in (0.5, -0.5, 2.0):  # k3 = e^d - d - 1 with d = log ref - log pi: positive off zero
        kl = grad_at(1.0, 0.0, kl_coef=1.0, ref=torch.tensor([[-1.0 + d]]))[2]
        assert_close(kl, math.exp(d) - d - 1, 1e-6, "k3")
        assert kl > 0

def test_grpo_teaches_a_tiny_model_to_emit_the_rewarded_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=16))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    rewards = []
    for _ in range(12):
        r = dpo.rollout(model, ref, [[1, 2], [3]], 8, 6, lambda k, ids: ids.count(7) / len(ids), -1,
                        contextlib.nullcontext(), generator)
        rewards.append(r["reward"] + 0.5)  # never stops (no stop id): every sample pays 0.5
        assert r["length"] == 6 and r["x"].shape == (16, 7)
        model.train()
        for inner in range(2):
            logp = dpo.token_logprobs(model(r["x"])[0], r["y"])
            if inner == 0:  # pi_old: the policy that sampled, before this round's first step
                with torch.no_grad():
                    model.eval()
                    assert_close(logp, dpo.token_logprobs(model(r["x"])[0], r["y"]), 1e-5, "pi_old")
                    model.train()
                old = logp.detach()
            loss = dpo.grpo_loss(logp, old, r["ref"], r["advantages"], r["y"] != -100, 0.2, 0.01)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards

# -----------------------------------------------------------------------------
# quantize.py

import quantize  # noqa: E402

def test_quantize_rounding_error_is_at_most_half_a_scale():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    w[5, 9] = 1.5  # an outlier
    for dim, view in [(None, w), (1, w), (-1, quantize.grouped(w, 32))]:
        for bits in (8, 4):
            q, scale = quantize.quantize_absmax(view, bits, dim)
            assert q.abs().max() <= 2 ** (bits - 1) - 1
            assert ((quantize.dequantize(q, scale) - view).abs() <= scale / 2 * (1 + 1e-6)).all()
            assert torch.equal(scale, scale.bfloat16().float()), "scales are bfloat16 values"
            q, scale, zero = quantize.quantize_minmax(view, bits, dim)
            assert q.max() <= 2 ** bits - 1
            assert ((quantize.dequantize(q, scale, zero) - view).abs() <= scale / 2 * (1 + 1e-5)).all()
    errors = quantize.outlier_demo()
    assert errors["per tensor"] > 10 * errors["per channel"], errors
    raises(gpt.UserError, quantize.grouped, w, 48, match="--group_size=48 does not divide the input width 128")

def test_quantize_int4_packing_round_trips():
    u = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = quantize.pack_int4(u)
    assert packed.shape == (6, 5) and packed.dtype == torch.uint8
    assert torch.equal(quantize.unpack_int4(packed), u)
    assert quantize.pack_int4(torch.tensor([[3, 12]]))[0, 0] == 3 + 12 * 16, "low nibble first"

def test_quantize_kernels_equal_their_references():
    torch.manual_seed(0)
    for N, K, G in [(48, 64, 32), (50, 128, 64), (16, 256, 128)]:  # 50 rows: the int4 kernel pads to 64
        linear = torch.nn.Linear(K, N)
        x = torch.randn(3, 5, K)
        for layer in (quantize.Int8Linear(linear.weight, linear.bias),
                      quantize.Int4Linear(linear.weight, linear.bias, G)):
            what = f"{type(layer).__name__} {N}x{K}"
            scale = layer.scale if layer.scale.dim() == 1 else layer.scale.repeat_interleave(G, 1)
            q = layer.weight.float() if layer.weight.dtype == torch.int8 else (
                quantize.unpack_int4(layer.weight).float() - 8)
            w = q * (scale[:, None] if scale.dim() == 1 else scale)
            assert_close(layer(x), x @ w.t() + linear.bias, 1e-4, f"{what}: the float32 reference")
            layer.use_kernel = False
            reference = layer(x.bfloat16()).float()
            layer.use_kernel = True
            fast = layer(x.bfloat16()).float()
            assert fast.shape == (3, 5, N)
            assert (fast - reference).abs().max() <= 1e-2 * reference.abs().max(), f"{what}: the CPU kernel"

def _tiny_quantizable(seed=0, **config):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=70, block_size=32, n_layer=2, n_head=2, n_embd=64, **config)).eval()

def test_quantize_untied_model_keeps_its_own_embedding():
    # Llama 3.1 8B's kind: a head apart from the token embedding. --head=tied quantizes the head
    # alone; the embedding stays the float one it was (sharing the head's would be another model)
    model = _tiny_quantizable(tie_embeddings=False)
    idx = torch.randint(0, 70, (4, 32), generator=torch.Generator().manual_seed(1))
    wte = model.transformer.wte.weight.clone()
    q = quantize.quantize_model(copy.deepcopy(model), 8, 0, "tied")
    assert isinstance(q.transformer.wte, torch.nn.Embedding) and torch.equal(q.transformer.wte.weight, wte)
    assert isinstance(q.lm_head, quantize.Int8Linear)
    logits = model(idx)[0]
    error = (q(idx)[0] - logits).abs().max() / logits.abs().max()
    assert error < 0.02, f"relative logit error {error:.3f}"

def test_quantize_model_stays_close_to_float32():
    model = _tiny_quantizable()
    idx = torch.randint(0, 70, (4, 32), generator=torch.Generator().manual_seed(1))
    logits = model(idx)[0]
    prompt = [[1, 2, 3]]
    greedy = model.generate(prompt, 20, temperature=0.0)[0]
    for bits, group, bound in [(8, 0, 0.02), (4, 32, 0.25)]:  # measured 0.007 and 0.12
        for head in ("tied", "float"):
            q = quantize.quantize_model(copy.deepcopy(model), bits, group, head)
            assert all(not isinstance(m, torch.nn.Linear) for m in q.transformer.h.modules()), "every block Linear swapped"
            assert isinstance(q.lm_head, torch.nn.Linear) == (head == "float")
            if head == "tied":
                assert q.transformer.wte.table is q.lm_head, "one tensor for the head and the lookup"
            error = (q(idx)[0] - logits).abs().max() / logits.abs().max()
            assert error < bound, f"int{bits} {head}: relative logit error {error:.3f}"
            agree = sum(a == b for a, b in zip(q.generate(prompt, 20, temperature=0.0)[0], greedy))
            assert agree >= (18 if bits == 8 else 12), f"int{bits} {head}: {agree}/20 greedy tokens agree"

def test_quantize_bench_times_the_head_of_every_kind():
    model = _tiny_quantizable()
    for kind, head in [("float32", "tied"), ("bfloat16", "tied"), ("int8", "tied"), ("int4-g32", "tied"),
                       ("int8", "float")]:
        m = quantize.variant(model, kind, head)
        assert m.transformer.ln_f.weight.dtype == (torch.float32 if kind == "float32" else torch.bfloat16)
        gbs = quantize.head_speed(m, reps=2)
        assert math.isfinite(gbs) and gbs > 0, f"{kind} {head}: {gbs} GB/s"

def test_quantize_checkpoint_round_trip_and_size():
    model = _tiny_quantizable()
    idx = torch.randint(0, 70, (2, 16), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        float_path = gpt.save_checkpoint(f"{tmp}/float.pt", model, tokenizer="gpt2")
        for bits in (8, 4):
            q = quantize.quantize_model(copy.deepcopy(model), bits, 32)
            path = quantize.save_quantized(f"{tmp}/q{bits}.pt", q, bits, 32, "tied", tokenizer="gpt2")
            assert not os.path.exists(path + ".tmp")
            loaded, ckpt = quantize.load_quantized(path)
            assert torch.equal(loaded(idx)[0], q(idx)[0]), f"int{bits}: the loaded model's logits"
            assert ckpt["quantized"] == dict(bits=bits, group_size=32, head="tied")
            size = os.path.getsize(path)
            assert 0 <= size - quantize.tensor_bytes(q) < 40_000, f"int{bits}: {size} vs {quantize.tensor_bytes(q)}"
            raises(ValueError, gpt.load_checkpoint, path, match="quantize.py --load=")
        float_bytes = quantize.tensor_bytes(model)
        assert float_bytes / quantize.tensor_bytes(quantize.quantize_model(copy.deepcopy(model), 8)) > 3.5
        raises(gpt.UserError, quantize.load_quantized, float_path, match="is not a quantized checkpoint")
        raises(gpt.UserError, quantize.load_quantized, f"{tmp}/missing.pt", match="python quantize.py")

def test_quantize_reads_the_held_out_tokens_train_py_prepared():
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(f"{tmp}/mytext")
        np.arange(100, dtype=np.uint16).tofile(f"{tmp}/mytext/val.bin")
        with open(f"{tmp}/mytext/meta.json", "w") as f:
            json.dump({"dtype": "uint16"}, f)
        ckpt = {"train_config": {"dataset": "/somewhere/mytext.txt"}}  # a file: its folder is its stem
        windows = quantize.heldout_windows(ckpt, tmp, 8, 3)
        assert windows.tolist() == [list(range(0, 9)), list(range(45, 54)), list(range(91, 100))]
        assert quantize.heldout_windows({"train_config": {"dataset": "other"}}, tmp, 8, 3) is None

def test_quantize_main_writes_loads_and_samples():
    records = conversations(20, seed=4)
    tok = bpe.Tokenizer().train(_text_of(records), 300)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = gpt.save_checkpoint(f"{tmp}/ckpt.pt", model, tokenizer=tok.to_dict())
        cfg = quantize.QuantizeConfig(ckpt_path=ckpt, bits=4, group_size=32, max_new_tokens=5, device="cpu")
        result = quantize.main(cfg)
        assert os.path.exists(f"{tmp}/ckpt-int4-g32.pt") and result["model"].lm_head.weight.dtype == torch.uint8
        raises(gpt.UserError, quantize.main, cfg, match="--overwrite")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            loaded = quantize.main(quantize.QuantizeConfig(load=f"{tmp}/ckpt-int4-g32.pt", max_new_tokens=5, device="cpu"))
        assert re.search(r"\n\d+ tokens, [\d,.]+ tok/s after the first\n$", printed.getvalue())
        assert torch.equal(loaded["model"].lm_head.weight, result["model"].lm_head.weight)
        raises(gpt.UserError, quantize.main, dataclasses.replace(cfg, group_size=24, overwrite=True), match="does not divide")
    # Llama 3's tokenizer has no <|endoftext|>: the sample starts and stops at <|end_of_text|>
    tok = bpe.Tokenizer().train(_text_of(records), 300, special_tokens=("<|begin_of_text|>", "<|end_of_text|>"))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        ckpt = gpt.save_checkpoint(f"{tmp}/ckpt.pt", model, tokenizer=tok.to_dict())
        quantize.main(quantize.QuantizeConfig(ckpt_path=ckpt, prompt="", max_new_tokens=5, device="cpu"))
    raises(gpt.UserError, quantize.check_config, quantize.QuantizeConfig(bits=3), match="--bits=3")
    raises(gpt.UserError, quantize.check_config, quantize.QuantizeConfig(group_size=0), match="--group_size=0")

# -----------------------------------------------------------------------------
# ddp.py

import ddp  # noqa: E402

def _ddp_flags(tmp, **overrides):
    # a tiny model whose parameter count is odd (zero1 must pad it for 2 ranks), two micro-steps
    flags = dict(device="cpu", n_layer=1, n_head=3, n_embd=33, block_size=17, batch_size=8,
                 grad_accum=2, max_iters=5, bucket_mb=0.01, out_dir=os.path.join(tmp, "out"))
    return [f"--{k}={v}" for k, v in {**flags, **overrides}.items()]

def test_ddp_modes_match_torch_and_one_process():
    """One 2-process gloo launch of --bench: every mode from the same init, then the checkpoints
    are compared here, from outside: naive, bucketed and zero1 equal torch's DDP within 1e-6, and
    all equal one process trained on the whole global batch within 1e-5. The modes ran 2
    micro-steps of 2 sequences per rank, the single process one step of all 8: accumulation over
    micro-steps equals one step on the doubled batch. Also the bytes and the optimizer state."""
    with tempfile.TemporaryDirectory() as tmp:  # cwd=tmp: no data/stories, so the built-in text
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", os.path.join(HERE, "ddp.py"), "--bench",
                              *_ddp_flags(tmp)], cwd=tmp, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        ckpts = {m: torch.load(os.path.join(tmp, "out", m, "ckpt.pt"), weights_only=True)
                 for m in (*ddp.MODES, "single")}
        model, _ = gpt.load_checkpoint(os.path.join(tmp, "out", "zero1", "ckpt.pt"), verbose=False)
        n_params = model.num_params()
    for mode, ckpt in ckpts.items():
        for name, tensor in ckpt["model"].items():
            if mode in ("naive", "bucketed", "zero1"):
                assert_close(tensor, ckpts["torch"]["model"][name], 1e-6, f"{mode} vs torch: {name}")
            assert_close(tensor, ckpts["single"]["model"][name], 1e-5, f"{mode} vs 1 process: {name}")
    measured = {mode: ckpt["measured"] for mode, ckpt in ckpts.items()}
    assert measured["zero1"]["max_diff_torch"] <= 1e-6 and ckpts["zero1"]["world"] == 2, measured
    # a ring all-reduce sends 2(N-1)/N = 1 x the float32 gradients per rank; zero1's reduce-scatter
    # and all-gather half of the padded buffer each, as much (+ the padding)
    padding = measured["zero1"]["padding"]
    assert n_params % 2 == 1 and padding == 1, (n_params, padding)
    for mode in ("torch", "naive", "bucketed"):
        assert measured[mode]["sent_per_step"] == 4 * n_params, (mode, measured[mode])
    assert measured["zero1"]["sent_per_step"] == 4 * (n_params + padding), measured["zero1"]
    n_tensors = len(list(model.parameters()))
    assert measured["naive"]["calls_per_step"] == n_tensors, measured["naive"]
    assert 1 < measured["bucketed"]["calls_per_step"] == measured["bucketed"]["buckets"] < n_tensors
    assert measured["zero1"]["calls_per_step"] == 2 and measured["single"]["sent_per_step"] == 0
    # AdamW keeps two float32 moments per parameter; zero1 only for its half (+ step counters)
    full = measured["torch"]["optimizer_bytes"]
    assert 8 * n_params <= full <= 8 * n_params + 4 * n_tensors, full
    assert_close(measured["zero1"]["optimizer_bytes"] / full, 0.5, 0.01, "zero1 state / torch state")
    assert "| zero1 |" in run.stdout and "| 1024 |" in run.stdout, run.stdout[-2000:]
    assert "| gpt2-xl 1.5B | 24.92 |" in run.stdout and "zero1: 1 zeros of padding" in run.stdout, run.stdout[-2000:]

def test_ddp_bucket_plan():
    torch.manual_seed(0)
    params = list(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)).parameters())
    sizes = [p.nbytes for p in params]
    for cap in (1, 600, 5000, 1 << 30):
        plan = ddp.bucket_plan(params, cap)
        flat = [i for bucket in plan for i in bucket]
        assert flat == list(reversed(range(len(params)))), (cap, plan)  # each once, last first
        for bucket in plan:
            assert len(bucket) == 1 or sum(sizes[i] for i in bucket) <= cap, (cap, bucket)
    assert len(ddp.bucket_plan(params, 1)) == len(params) and len(ddp.bucket_plan(params, 1 << 30)) == 1
    kib = [torch.zeros(256), torch.zeros(256), torch.zeros(768)]  # 1, 1 and 3 KiB
    assert ddp.bucket_plan(kib, 2048) == [[2], [1, 0]]

def test_ddp_cost_model_known_values():
    # 2(N-1)/N x bytes / bandwidth: 1 GB at 1 GB/s takes 1 s on 2 GPUs, 1.5 s on 4; latency 2(N-1)x
    assert_close(ddp.ring_all_reduce_seconds(1e9, 2, 1e9, 0.0), 1.0, 1e-12, "ring, 2 GPUs")
    assert_close(ddp.ring_all_reduce_seconds(1e9, 4, 1e9, 1e-3), 1.5 + 6e-3, 1e-12, "ring, 4 GPUs")
    # ZeRO (Rajbhandari et al., figure 1): 16 bytes per parameter, then 4 + 12/N, 2 + 14/N, 16/N
    for stage, per_param in enumerate([16, 4 + 12 / 8, 2 + 14 / 8, 16 / 8]):
        assert_close(ddp.zero_bytes_per_gpu(1e6, stage, 8), per_param * 1e6, 1e-6, f"stage {stage}")
    shapes = {"gpt2 124M": (12, 12, 768), "gpt2-medium 355M": (24, 16, 1024),
              "gpt2-large 774M": (36, 20, 1280), "gpt2-xl 1.5B": (48, 25, 1600)}
    with torch.device("meta"):
        for name, (n_layer, n_head, n_embd) in shapes.items():
            n = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)).num_params()
            assert ddp.GPT2_PARAMS[name] == n, (name, n)

def test_ddp_without_torchrun_explains_how_to_start_it():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, os.path.join(HERE, "ddp.py")], capture_output=True,
                         text=True, timeout=60, env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("ddp.py: error: ") and len(run.stderr.strip().splitlines()) == 1
    assert "torchrun --standalone --nproc_per_node=2 ddp.py" in run.stderr, run.stderr

def test_ddp_bad_flags_fail_before_any_process_group():
    # as rank 0 of 2: every check comes before init_process_group, so nothing waits for rank 1
    with mock.patch.dict(os.environ, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}):
        message = raises(gpt.UserError, ddp.main, ddp.DDPConfig(batch_size=7, device="cpu"),
                         match="--batch_size=7 does not split into 2 processes")
        assert "e.g. --batch_size=8" in message, message
        raises(gpt.UserError, ddp.main, ddp.DDPConfig(batch_size=8, grad_accum=3, device="cpu"),
               match="pass a multiple of 6")
        raises(gpt.UserError, ddp.main, ddp.DDPConfig(mode="fsdp", device="cpu"), match="--mode='fsdp'")
        raises(gpt.UserError, ddp.main, ddp.DDPConfig(device="tpu"), match="--device=tpu")
        raises(gpt.UserError, ddp.main, ddp.DDPConfig(n_embd=30, n_head=4, device="cpu"), match="divisible")
        raises(gpt.UserError, ddp.main, ddp.DDPConfig(data="missing/train.bin", device="cpu"),
               match="python train.py")
        raises(gpt.UserError, ddp.main, ddp.DDPConfig(max_iters=0, device="cpu"), match="--max_iters=0")
    assert not torch.distributed.is_initialized()

# -----------------------------------------------------------------------------
# the whole path: train -> finetune -> dpo -> quantize -> serve, each on the last one's default output

def test_journey_from_nothing_to_a_served_chat_on_default_paths():
    """The README's path on a tiny configuration, in an empty folder: no step is told where the last
    one wrote (the default paths hand over), and the server answers a chat from the aligned model."""
    with (tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp),
          contextlib.redirect_stdout(io.StringIO()) as printed):
        fast = dict(device="cpu", dtype="float32")
        train.main(train.TrainConfig(num_stories=200, vocab_size=300, n_layer=1, n_head=2, n_embd=32,
                                     block_size=256, batch_size=2, max_iters=4, eval_interval=2,
                                     eval_iters=1, sample_tokens=4, warmup_iters=1, **fast))
        small = dict(val_size=4, test_size=4, max_iters=2, batch_size=2, eval_interval=1,
                     max_new_tokens=4, **fast)
        finetune.main(finetune.FinetuneConfig(**small))
        dpo.main(dpo.DpoConfig(**small))
        quantize.main(quantize.QuantizeConfig(ckpt_path="out-dpo/ckpt.pt", max_new_tokens=4,
                                              device="cpu"))
        assert sorted(glob.glob("out*/*.pt")) == ["out-dpo/ckpt-int8.pt", "out-dpo/ckpt.pt",
                                                  "out-sft/ckpt.pt", "out/best.pt", "out/ckpt.pt"]
        server = subprocess.Popen([sys.executable, os.path.join(HERE, "kvcache.py"), "--serve", "--port=0",
                                   "--device=cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=_ctrl_c_works)
        try:
            lines = iter(server.stdout.readline, "")
            url = next(line.split()[2] for line in lines if line.startswith("serving at "))
            chat = requests.post(url + "v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 8}).json()
        finally:
            server.send_signal(signal.SIGINT)
            server.communicate(timeout=30)
        assert chat["model"] == "out-dpo/ckpt.pt" and chat["usage"]["completion_tokens"] >= 1, chat
    assert "saved out/ckpt.pt" in printed.getvalue(), printed.getvalue()[-500:]

# -----------------------------------------------------------------------------
# the CUDA self-check: python test_all.py cuda (about two minutes on one GPU; without a GPU
# every test skips, and the multi-GPU ones skip on one GPU)

def need_gpus(n=1):
    if torch.cuda.device_count() < n:
        raise unittest.SkipTest(f"needs {n} CUDA GPU(s); this machine has {torch.cuda.device_count()}")
    torch.backends.cuda.matmul.allow_tf32 = False  # train.main turns TF32 on: comparisons want float32

def test_cuda_bfloat16_and_float16_training_lower_the_loss():
    need_gpus()
    dtypes = ["float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported(including_emulation=False) else [])
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:  # float16 through the GradScaler: its scale is kept in the checkpoint
            out = train.main(tiny(tmp, device="cuda", dtype=dtype, max_iters=20, eval_interval=20,
                                  overwrite=True))
            assert out["losses"][-1] < out["losses"][0] - 0.3, f"{dtype}: {out['losses']}"
            scaler = torch.load(out["ckpt_path"], weights_only=True)["scaler"]
            assert ("scale" in scaler) == (dtype == "float16"), f"{dtype}: scaler state {scaler}"

def test_cuda_fused_adamw_equals_the_for_loop_adamw():
    need_gpus()
    torch.manual_seed(0)
    model = GPT(tiny_config()).cuda()
    reference = copy.deepcopy(model)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cuda")
    assert all(group["fused"] for group in optimizer.param_groups), optimizer.param_groups
    params = list(reference.parameters())
    slow = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.99), foreach=False)
    x = torch.randint(0, 97, (4, 16), device="cuda")
    for _ in range(3):  # the same gradients into both: only the update rules differ
        model(x, x)[1].backward()
        for p, q in zip(model.parameters(), params):
            q.grad = p.grad.clone()
        for opt in (optimizer, slow):
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(model.named_parameters(), params):
        assert_close(p, q, 1e-5, f"fused vs for-loop AdamW: {name}")

def test_cuda_compiled_logits_equal_eager():
    need_gpus()
    torch.manual_seed(0)
    model = GPT(tiny_config()).cuda().eval()
    x = torch.randint(0, 97, (4, 16), device="cuda")
    with torch.no_grad():
        assert_close(torch.compile(model)(x)[0], model(x)[0], 1e-4, "compiled vs eager logits")

def test_cuda_flash_attention_equals_the_math_path():
    need_gpus()
    if torch.cuda.get_device_capability() < (8, 0):
        raise unittest.SkipTest("flash attention needs an Ampere or newer GPU")
    attention = torch.nn.attention
    torch.manual_seed(0)
    attn = gpt.CausalSelfAttention(GPTConfig(n_head=4, n_embd=256)).cuda().bfloat16()  # hs = 64
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16)
    out = {}
    for backend in (attention.SDPBackend.FLASH_ATTENTION, attention.SDPBackend.MATH):
        xb = x.clone().requires_grad_()
        with attention.sdpa_kernel(backend):  # only this kernel: an error if it cannot run
            y = attn(xb)
            y.float().pow(2).sum().backward()
        out[backend] = (y.float(), xb.grad.float())
    (y_flash, g_flash), (y_math, g_math) = out.values()
    assert_close(y_flash, y_math, 2e-2 * y_math.abs().max().item(), "flash vs math: output")
    assert_close(g_flash, g_math, 2e-2 * g_math.abs().max().item(), "flash vs math: gradient of x")

def test_cuda_cached_generation_equals_the_cache_free_path():
    need_gpus()
    for model in _tiny_models():  # past block_size (32): the window slides too
        model = model.cuda()
        prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 11, 2)]
        cached = model.generate(prompts, 40, temperature=0)
        assert cached == model.generate(prompts, 40, temperature=0, use_cache=False), "use_cache=False"

def test_cuda_fsdp_matches_ddp_on_one_gpu_and_on_all():
    need_gpus()
    for nproc in dict.fromkeys((1, torch.cuda.device_count())):
        with tempfile.TemporaryDirectory() as tmp:  # TF32 (train.py's on CUDA): looser than on a CPU
            _fsdp_matches_ddp(tmp, nproc, tol=1e-3, device="cuda", dtype="float32")
            # bfloat16 (MixedPrecisionPolicy) and compiled blocks: the loss falls
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            losses, _ = _torchrun_train(tiny(tmp, device="cuda", dtype="bfloat16" if bf16 else "float32",
                                             fsdp=True, compile=True, max_iters=20, eval_interval=20,
                                             grad_accum=nproc, out_dir=os.path.join(tmp, "bf16")),
                                        nproc, timeout=300)
            assert losses[-1] < losses[0] - 0.3, losses
    with (tempfile.TemporaryDirectory() as tmp,
          mock.patch.dict(os.environ, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})):
        raises(gpt.UserError, train.main, tiny(tmp, device="cuda", dtype="float16", fsdp=True),
               match="--fsdp runs in bfloat16 or float32")

def test_cuda_nccl_ddp_in_train_py_and_ddp_py():
    need_gpus(2)
    with tempfile.TemporaryDirectory() as tmp:  # train.py: 2 GPUs x 1 micro-step = 1 GPU x 2
        single = train.main(tiny(tmp, device="cuda", grad_accum=2, max_iters=6))["losses"]
        ddp_losses, _ = _torchrun_train(tiny(tmp, device="cuda", grad_accum=2, max_iters=6, overwrite=True))
        assert_close(ddp_losses, single, 1e-3, "nccl DDP vs single-GPU losses")
    with tempfile.TemporaryDirectory() as tmp:  # ddp.py's modes against torch's DDP, as on the CPU
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node=2", os.path.join(HERE, "ddp.py"), "--bench",
                              *_ddp_flags(tmp, device="cuda")], cwd=tmp, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        ckpts = {m: torch.load(os.path.join(tmp, "out", m, "ckpt.pt"), weights_only=True)
                 for m in (*ddp.MODES, "single")}
    for mode in ("naive", "bucketed", "zero1"):
        for name, tensor in ckpts[mode]["model"].items():
            assert_close(tensor, ckpts["torch"]["model"][name], 1e-5, f"{mode} vs torch on CUDA: {name}")
            assert_close(tensor, ckpts["single"]["model"][name], 1e-4, f"{mode} vs 1 GPU: {name}")

def test_cuda_gpt2_124m_tokens_per_second_and_mfu():
    """GPT-2 124M's shape (vocab 50304, 1024 tokens, 8 sequences a step) in bfloat16, eager and
    compiled, with fused AdamW: tokens/s and MFU against this GPU's measured matmul peak (an
    8192 x 8192 matmul), printed to the terminal (the runner hides a passing test's own output)."""
    need_gpus()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    (a @ a).sum().item()  # warm up
    t0 = time.time()
    for _ in range(10):
        b = a @ a
    b.sum().item()  # waits for the GPU
    peak = 10 * 2 * 8192 ** 3 / (time.time() - t0)
    del a, b
    x = torch.randint(0, 50304, (8, 1024), device="cuda")
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768)).cuda()
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda")
        step_model = torch.compile(model) if compiled else model
        times = []
        for _ in range(7):  # 2 warmup steps (compiling happens there), then 5
            t0 = time.time()
            with torch.autocast("cuda", dtype):
                loss = step_model(x, x)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.time() - t0)
        dt = min(times[2:])
        mfu = model.estimate_mfu(x.numel(), dt, peak)
        assert math.isfinite(loss.item()) and mfu > 0, (loss.item(), mfu)
        # the README's one-GPU figures: the recipe's 10B tokens, and the smoke run's 200 steps of 0.5M
        hours = 19073 * 2 ** 19 / (x.numel() / dt) / 3600
        print(f"\nGPT-2 124M on {torch.cuda.get_device_name()}, {str(dtype).removeprefix('torch.')} "
              f"{'compiled' if compiled else 'eager'}: {x.numel() / dt:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
              f"of the measured {peak / 1e12:.0f} TFLOP/s; on one such GPU the recipe's 19,073 steps "
              f"take {hours:.1f} h, the smoke run's 200 {hours / 19073 * 200 * 60:.0f} min (at 8 x 1024 "
              f"tokens a micro-batch, no evaluation)", file=sys.__stdout__, flush=True)
        del model, optimizer, step_model, loss

# -----------------------------------------------------------------------------
# repo-wide checks: import policy, copied helpers, line budgets

SCRIPTS = ["bigram.py", "micrograd.py", "bpe.py", "gpt.py", "train.py", "finetune.py", "lora.py", "dpo.py",
           "kvcache.py", "quantize.py", "ddp.py"]
# quantize.py's export: GGUF (llama.cpp's file) and Hugging Face folders. By hand, outside
# these tests, files that write_gguf made from the layouts below (GPT-2; Llama with llama3
# rope scaling; Qwen2; Qwen3; each in f32, f16, bf16 and q8_0) were read back with
# llama.cpp's own gguf-py 0.19 (gguf.GGUFReader): every key, its value type and every tensor
# came back equal to what llama.cpp's converter (convert_hf_to_gguf.py) makes of them, Q8_0
# within d / 2 of each weight (99% of blocks byte-equal to gguf-py's own Q8_0, the rest one
# step apart: ours rounds with the f16 scale it stores). And llama.cpp itself (llama-cpp-python
# 0.3.36, built from source) ran tiny gpt.py models exported by `quantize.py --export=gguf`
# (GPT-2, Llama with GQA and llama3 scaling, Qwen2, Qwen3, also via --init_from): f32 logits
# within 1e-5 of gpt.py's, GPT-2's too once its MLP is zero (ggml's CPU GELU is an f16 table);
# its tokenizer gave our ids for a 3,000-character text (gpt-2, llama-bpe, smollm) and its
# Jinja rendered our chat template.

def _read_gguf(path):
    # a GGUF v3 reader written from the spec -> (metadata, {key: type id, or (9, item type)},
    # {name: (ggml type, float32 values in torch's shape, Q8_0's block scales or None)})
    data = open(path, "rb").read()
    pos = 4
    def take(form):  # one little-endian number: u4 is a uint32, f4 a float32, ...
        nonlocal pos
        pos += np.dtype(form).itemsize
        return np.frombuffer(data, "<" + form, 1, pos - np.dtype(form).itemsize)[0].item()
    def string():
        nonlocal pos
        n = take("u8")
        pos += n
        return data[pos - n:pos].decode("utf-8")
    def value(kind):
        if kind == 8:
            return string()
        if kind == 9:
            item, n = take("u4"), take("u8")
            return [value(item) for _ in range(n)]
        return take({0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8",
                     12: "f8"}[kind])
    magic, version, n_tensors, n_kv = data[:4], take("u4"), take("u8"), take("u8")
    assert (magic, version) == (b"GGUF", 3), (magic, version)
    meta, types = {}, {}
    for _ in range(n_kv):
        key = string()
        kind = take("u4")
        types[key] = (9, np.frombuffer(data, "<u4", 1, pos)[0].item()) if kind == 9 else kind
        meta[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("u8") for _ in range(take("u4"))]
        infos.append((name, dims, take("u4"), take("u8")))
    align = meta["general.alignment"]
    start = pos + -pos % align
    tensors, end = {}, start
    for name, dims, kind, offset in infos:
        assert offset % align == 0, f"{name} at offset {offset}"
        n = math.prod(dims)
        nbytes = {0: 4 * n, 1: 2 * n, 30: 2 * n, 8: n // 32 * 34}[kind]
        raw = torch.frombuffer(bytearray(data[start + offset:start + offset + nbytes]), dtype=torch.uint8)
        shape = dims[::-1]  # the file lists sizes innermost first
        scales = None
        if kind == 8:  # Q8_0: blocks of an f16 scale then 32 int8
            blocks = raw.view(-1, 34)
            scales = blocks[:, :2].contiguous().view(torch.float16).float()  # (blocks, 1)
            values = (blocks[:, 2:].contiguous().view(torch.int8).float() * scales).reshape(shape)
        else:
            values = raw.view({0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[kind]).float().reshape(shape)
        tensors[name] = (kind, values, scales)
        end = max(end, start + offset + nbytes)
    assert 0 <= len(data) - end < align, f"{len(data) - end} bytes after the last tensor"
    return meta, types, tensors

def _hf_tokenizer(pre):
    # tokenizer.json and tokenizer_config.json as dicts: 256 bytes in GPT-2's alphabet, 4 merges
    # (as pairs: the newer file format), a special <|endoftext|> and a non-special <|user|>
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    alphabet = {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}
    vocab = {alphabet[b]: b for b in range(256)}
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["i", "n"]]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    added = [{"id": 260, "content": "<|endoftext|>", "special": True},
             {"id": 261, "content": "<|user|>", "special": False}]
    tokenizer_json = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added,
                      "pre_tokenizer": pre}
    tokenizer_config = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    return tokenizer_json, tokenizer_config

GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

def _split_pre(regex_text):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex_text}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

def _gpt2_layout(V=300, C=64, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    tensors = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C)}
    for i in range(2):
        for name, shape in [("ln_1", (C,)), ("attn.c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)), ("ln_2", (C,)),
                            ("mlp.c_fc", (C, 4 * C)), ("mlp.c_proj", (4 * C, C))]:  # Conv1D: (in, out)
            tensors[f"transformer.h.{i}.{name}.weight"] = r(*shape)
            tensors[f"transformer.h.{i}.{name}.bias"] = r(shape[-1])
    tensors.update({"transformer.ln_f.weight": 1 + r(C), "transformer.ln_f.bias": r(C)})
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=V, n_positions=T, n_embd=C,
                  n_layer=2, n_head=2, n_inner=None, layer_norm_epsilon=1e-5)
    return config, tensors

def _llama_layout(arch="Llama", V=300, C=64, H=4, KV=2, hs=16, F=96, tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05
    tensors = {"model.embed_tokens.weight": r(V, C)}
    for i in range(2):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": 1 + r(C), p + "self_attn.q_proj.weight": r(H * hs, C),
                        p + "self_attn.k_proj.weight": r(KV * hs, C), p + "self_attn.v_proj.weight": r(KV * hs, C),
                        p + "self_attn.o_proj.weight": r(C, H * hs), p + "post_attention_layernorm.weight": 1 + r(C),
                        p + "mlp.gate_proj.weight": r(F, C), p + "mlp.up_proj.weight": r(F, C),
                        p + "mlp.down_proj.weight": r(C, F)})
        if arch == "Qwen2":
            tensors.update({p + f"self_attn.{x}_proj.bias": r(n * hs) for x, n in [("q", H), ("k", KV), ("v", KV)]})
        if arch == "Qwen3":
            tensors.update({p + "self_attn.q_norm.weight": 1 + r(hs), p + "self_attn.k_norm.weight": 1 + r(hs)})
    tensors["model.norm.weight"] = 1 + r(C)
    if not tied:
        tensors["lm_head.weight"] = r(V, C)
    scaling = None
    if arch == "Llama":
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=64)
    config = dict(architectures=[arch + "ForCausalLM"], model_type=arch.lower(), vocab_size=V,
                  max_position_embeddings=128, hidden_size=C,
                  intermediate_size=F, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=KV,
                  head_dim=hs, rms_norm_eps=1e-6, rope_theta=500000.0, rope_scaling=scaling,
                  tie_word_embeddings=tied)
    return config, tensors

def _check_gguf_tensors(tensors, expected, dtype, what):
    # every tensor as expected: vectors f32 and exact; matrices in dtype, equal after the cast
    # (f32, f16, bf16) or within half their block's scale (q8_0)
    assert set(tensors) == set(expected), f"{what}: {sorted(set(tensors) ^ set(expected))}"
    for name, want in expected.items():
        kind, got, scales = tensors[name]
        assert got.shape == want.shape, f"{what} {name}: {tuple(got.shape)} vs {tuple(want.shape)}"
        if want.dim() == 1:
            assert kind == 0 and torch.equal(got, want), f"{what} {name}: a vector, f32 exactly"
        elif dtype == "q8_0":
            assert kind == 8, f"{what} {name}: ggml type {kind}"
            error = (got - want).reshape(-1, 32).abs()
            assert (error <= scales / 2 * (1 + 1e-6)).all(), f"{what} {name}: {(error / scales).max()} d"
            assert torch.allclose(scales.flatten(), (want.reshape(-1, 32).abs().amax(1) / 127).half().float())
        else:
            cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
            assert kind == quantize.GGUF_TYPES[dtype][0], f"{what} {name}: ggml type {kind}"
            assert torch.equal(got, want.to(cast).float()), f"{what} {name}: not the {dtype} cast"

def test_gguf_gpt2_reads_back_every_key_and_tensor():
    config, hf = _gpt2_layout()
    tokenizer_json, tokenizer_config = _hf_tokenizer(GPT2_PRE)
    expected = {"token_embd.weight": hf["transformer.wte.weight"], "position_embd.weight": hf["transformer.wpe.weight"],
                "output_norm.weight": hf["transformer.ln_f.weight"], "output_norm.bias": hf["transformer.ln_f.bias"]}
    for i in range(2):
        for ours, theirs in [("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                             ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]:
            weight = hf[f"transformer.h.{i}.{theirs}.weight"]
            expected[f"blk.{i}.{ours}.weight"] = weight if weight.dim() == 1 else weight.t()  # Conv1D: transposed
            expected[f"blk.{i}.{ours}.bias"] = hf[f"transformer.h.{i}.{theirs}.bias"]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, file_type in [("f32", 0), ("f16", 1), ("bf16", 32), ("q8_0", 7)]:
            path = quantize.write_gguf(f"{tmp}/story.gguf", config, hf, tokenizer_json, tokenizer_config, dtype)
            assert os.listdir(tmp) == ["story.gguf"], "the temp file was renamed"
            meta, types, tensors = _read_gguf(path)
            _check_gguf_tensors(tensors, expected, dtype, f"gpt2 {dtype}")
            # the token list: GPT-2's alphabet by id, the added tokens as text, then padding
            vocab = {i: s for s, i in tokenizer_json["model"]["vocab"].items()}
            tokens = [vocab[i] for i in range(260)] + ["<|endoftext|>", "<|user|>"] + [f"[PAD{i}]" for i in range(262, 300)]
            assert meta == {
                "general.architecture": "gpt2", "general.name": "story", "general.file_type": file_type,
                "general.quantization_version": 2, "general.alignment": 32,
                "gpt2.context_length": 32, "gpt2.embedding_length": 64, "gpt2.block_count": 2,
                "gpt2.feed_forward_length": 256, "gpt2.attention.head_count": 2, "gpt2.attention.head_count_kv": 2,
                "gpt2.vocab_size": 300, "gpt2.attention.layer_norm_epsilon": np.float32(1e-5).item(),
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": [1] * 260 + [3, 4] + [5] * 38,
                "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "i n"], "tokenizer.ggml.bos_token_id": 260,
                "tokenizer.ggml.eos_token_id": 260, "tokenizer.ggml.add_bos_token": False,
                "tokenizer.chat_template": tokenizer_config["chat_template"]}, meta
            # the value types llama.cpp reads them in: u32 (4), f32 (6), bool (7), string (8), arrays (9)
            assert types["gpt2.context_length"] == types["tokenizer.ggml.eos_token_id"] == 4
            assert types["gpt2.attention.layer_norm_epsilon"] == 6 and types["tokenizer.ggml.add_bos_token"] == 7
            assert types["tokenizer.ggml.tokens"] == (9, 8) and types["tokenizer.ggml.token_type"] == (9, 5)
    # q8_0 rows that are not whole blocks of 32 fall back to f16, as llama.cpp's converter does
    config, hf = _gpt2_layout(C=48)
    with tempfile.TemporaryDirectory() as tmp:
        quantize.write_gguf(f"{tmp}/m.gguf", config, hf, tokenizer_json, tokenizer_config, "q8_0")
        kinds = {name: t[0] for name, t in _read_gguf(f"{tmp}/m.gguf")[2].items()}
        assert kinds["token_embd.weight"] == 1 and kinds["blk.0.ffn_down.weight"] == 8, kinds

def test_gguf_llama_permutes_q_and_k_and_writes_rope_freqs():
    config, hf = _llama_layout()
    H, KV, hs = 4, 2, 16
    tokenizer_json, tokenizer_config = _hf_tokenizer(_split_pre(LLAMA3_SPLIT))
    with tempfile.TemporaryDirectory() as tmp:
        meta, _, tensors = _read_gguf(quantize.write_gguf(f"{tmp}/m.gguf", config, hf, tokenizer_json,
                                                          tokenizer_config, "f32"))
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["llama.rope.freq_base"] == 500000.0 and meta["llama.rope.dimension_count"] == hs
    assert meta["llama.attention.head_count_kv"] == KV and meta["llama.attention.key_length"] == hs
    assert meta["llama.feed_forward_length"] == 96 and "output.weight" in tensors
    # q/k, closed form: row 2i + j of a head in the file is Hugging Face's row j * hs/2 + i
    for name, heads in [("q", H), ("k", KV)]:
        theirs = hf[f"model.layers.1.self_attn.{name}_proj.weight"]
        ours = tensors[f"blk.1.attn_{name}.weight"][1]
        for h in range(heads):
            for i in range(hs // 2):
                for j in range(2):
                    assert torch.equal(ours[h * hs + 2 * i + j], theirs[h * hs + j * hs // 2 + i]), (name, h, i, j)
    # and the point of it: llama.cpp's rope (turning neighbours 2i, 2i + 1) on the permuted
    # q, k gives the attention scores that Hugging Face's (i, i + hs/2, gpt.apply_rope) gives
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3))
    cos, sin = gpt.rope_tables(hs, 5, 500000.0)                                    # (T, hs/2)
    def scores(q, k, rope):
        q = rope(q.view(1, 5, H, hs).transpose(1, 2))
        k = rope(k.view(1, 5, KV, hs).transpose(1, 2)).repeat_interleave(H // KV, 1)
        return q @ k.transpose(-2, -1)
    def interleaved(t):  # pairs (2i, 2i + 1) turned by angle i
        pairs = t.unflatten(-1, (hs // 2, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
    q_hf, k_hf = x @ hf["model.layers.1.self_attn.q_proj.weight"].t(), x @ hf["model.layers.1.self_attn.k_proj.weight"].t()
    q_gguf, k_gguf = x @ tensors["blk.1.attn_q.weight"][1].t(), x @ tensors["blk.1.attn_k.weight"][1].t()
    assert_close(scores(q_gguf, k_gguf, interleaved), scores(q_hf, k_hf, lambda t: gpt.apply_rope(t, cos, sin)),
                 1e-5, "attention scores, llama.cpp's rope vs Hugging Face's")
    # rope_freqs: llama.cpp divides each pair's frequency by it; as the converter computes it
    freqs = 1.0 / 500000.0 ** (torch.arange(0, hs, 2).float() / hs)
    want = []
    for freq in freqs.tolist():
        wavelength = 2 * math.pi / freq
        smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
        want.append(1.0 if wavelength < 64 / 4.0 else 8.0 if wavelength > 64 / 1.0 else 1 / ((1 - smooth) / 8.0 + smooth))
    kind, factors, _ = tensors["rope_freqs.weight"]
    assert kind == 0 and factors.shape == (hs // 2,)
    assert_close(factors, torch.tensor(want), 1e-5, "llama3 rope factors")
    assert factors[0] == 1.0 and factors[-1] == 8.0 and ((factors > 1) & (factors < 8)).any(), factors

def test_gguf_qwen_keeps_rotate_half_and_writes_head_sizes():
    with tempfile.TemporaryDirectory() as tmp:
        for arch, hs, tied in [("Qwen2", 16, True), ("Qwen3", 32, False)]:
            config, hf = _llama_layout(arch, hs=hs, tied=tied)
            tokenizer_json, tokenizer_config = _hf_tokenizer(_split_pre(QWEN2_SPLIT))
            meta, _, tensors = _read_gguf(quantize.write_gguf(f"{tmp}/m.gguf", config, hf, tokenizer_json,
                                                              tokenizer_config, "bf16"))
            a = arch.lower()
            assert meta["general.architecture"] == a and meta["tokenizer.ggml.pre"] == "qwen2"
            expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
            if not tied:
                expected["output.weight"] = hf["lm_head.weight"]
            for name, t in hf.items():  # no permutation: llama.cpp runs Qwen's rope as NEOX, rotate half
                if name.startswith("model.layers."):
                    expected[quantize.gguf_name(name)] = t
            _check_gguf_tensors(tensors, expected, "bf16", arch)
            assert ("blk.0.attn_q.bias" in tensors) == (arch == "Qwen2")
            assert ("blk.0.attn_q_norm.weight" in tensors) == (arch == "Qwen3")
            # Qwen3's heads (32) are wider than C / n_head (16): the head sizes are written
            assert meta[f"{a}.attention.key_length"] == meta[f"{a}.attention.value_length"] == hs
            assert "rope_freqs.weight" not in tensors and meta[f"{a}.rope.dimension_count"] == hs

def test_gguf_tokenizer_keys_and_refusals():
    names = {"gpt-2": GPT2_PRE, "llama-bpe": _split_pre(LLAMA3_SPLIT), "qwen2": _split_pre(QWEN2_SPLIT),
             "gpt-2 ": _split_pre(bpe.SPLIT_PATTERNS["gpt2"]), "llama-bpe ": _split_pre(bpe.SPLIT_PATTERNS["gpt4"]),
             "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, GPT2_PRE]}}
    for name, pre in names.items():
        assert quantize.gguf_pre({"pre_tokenizer": pre}) == name.strip(), (name, pre)
    raises(ValueError, quantize.gguf_pre, {"pre_tokenizer": None}, match="--pattern=gpt2 or gpt4")
    tokenizer_json, tokenizer_config = _hf_tokenizer(GPT2_PRE)
    keys = quantize.gguf_vocab(tokenizer_json, dict(tokenizer_config, eos_token="<|user|>"), 262)
    assert keys["tokenizer.ggml.merges"] == ["Ġ t", "h e", "Ġt he", "i n"] and keys["tokenizer.ggml.eos_token_id"] == 261
    assert len(keys["tokenizer.ggml.tokens"]) == 262 and keys["tokenizer.ggml.bos_token_id"] == 260
    assert keys["tokenizer.ggml.token_type"][258:] == [1, 1, 3, 4] and keys["tokenizer.ggml.tokens"][32:34] == ["Ġ", "!"]
    assert quantize.gguf_name("transformer.h.11.mlp.c_fc.bias") == "blk.11.ffn_up.bias"
    assert quantize.gguf_name("model.layers.2.self_attn.q_norm.weight") == "blk.2.attn_q_norm.weight"

def test_export_refuses_an_existing_file_and_bad_flags():
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = gpt.save_checkpoint(f"{tmp}/ckpt.pt", model, tokenizer="gpt2")
        for kind, existing in [("gguf", f"{tmp}/story.gguf"), ("hf", f"{tmp}/story/config.json")]:
            os.makedirs(os.path.dirname(existing), exist_ok=True)
            open(existing, "w").close()
            out = existing if kind == "gguf" else os.path.dirname(existing)
            cfg = quantize.QuantizeConfig(ckpt_path=ckpt, export=kind, out=out, device="cpu")
            raises(gpt.UserError, quantize.main, cfg, match="pass --overwrite to replace it")
            assert os.path.getsize(existing) == 0, "nothing was written"
    bad = [(dict(export="onnx"), "--export='onnx'"), (dict(export="gguf", export_dtype="q4_k"), "--export_dtype='q4_k'"),
           (dict(export="gguf", bits=4), "--bits: unused with --export='gguf'"),
           (dict(export="hf", load="q.pt"), "--load: unused with --export='hf'"),
           (dict(export="hf", export_dtype="q8_0"), "--export_dtype: unused with --export='hf'"),
           (dict(out="x.gguf"), "--out: unused with --export=''")]
    for flags, message in bad:
        raises(gpt.UserError, quantize.check_config, quantize.QuantizeConfig(**flags), match=message)
    quantize.check_config(quantize.QuantizeConfig(export="gguf", export_dtype="q8_0", out="x.gguf"))

def test_export_main_writes_a_gguf_file_and_a_hugging_face_folder():
    records = conversations(20, seed=4)
    tok = bpe.Tokenizer().train(_text_of(records), 300)
    torch.manual_seed(0)
    for shape in [dict(), dict(rope=True, rmsnorm=True, swiglu=True, bias=False, n_kv_head=1)]:
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=64, **shape))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = gpt.save_checkpoint(f"{tmp}/ckpt.pt", model, tokenizer=tok.to_dict(), chat_template="phi3")
            result = quantize.main(quantize.QuantizeConfig(ckpt_path=ckpt, export="gguf", device="cpu"))
            meta, _, tensors = _read_gguf(result["out"])
            assert result["out"] == f"{tmp}/ckpt-f16.gguf"
            assert meta["general.architecture"] == ("llama" if shape else "gpt2"), meta["general.architecture"]
            assert meta["tokenizer.ggml.tokens"][tok.special_tokens[bpe.STOP]] == bpe.STOP
            assert meta["tokenizer.ggml.eos_token_id"] == tok.special_tokens[bpe.STOP]
            assert_close(tensors["token_embd.weight"][1], model.transformer.wte.weight.detach(), 1e-3, "token_embd")
            out = quantize.main(quantize.QuantizeConfig(ckpt_path=ckpt, export="hf", out=f"{tmp}/hf", device="cpu"))
            assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out["out"]))

# the one budget table: caps in lines (wc -l), from the lesson-first issue (#32): each file's
# lesson plus the plumbing it cannot share. Five are 5% above that issue's caps, as it allows
# once its cuts are done: gpt.py 819 (780; it also reads GPT-2's safetensors defensively and
# hosts the finetuning plumbing three scripts share), bpe.py 630 (600; its own short fetch and
# flag parser, as a standalone file), kvcache.py 714 (680; the server keeps every OpenAI route
# and limit its README promises), finetune.py 504 (480) and dpo.py 567 (540): their training
# loops moved in from gpt.py. The storyteller issue (#33) then gave train.py 100 lines (the
# conversation generator), bpe.py 50 (the checkers), finetune.py and dpo.py 30 each; train.py
# 924 and bpe.py 714 are 5% above those (880, 680): the generator's phrasings, endings, titles
# and questions are one line per group, and bpe.py keeps the name banks every checker reads.
# The open-models issue (#34) gave gpt.py 100 lines, bpe.py 60 and quantize.py 100 (at most 5%
# more each: 965, 812, 546). Its version is over those, pending a decision (see the issue's
# note); each file was cut twice without squeezing, and what remains is tested capability:
# gpt.py 1036: the loader of four families (configs, names, Hub shards, memory check) and the
# writer of two layouts; bpe.py 971: tokenizer.json in and out (~150 lines) and three chat
# template families rendered token for token as transformers does (~110); quantize.py 600: the
# GGUF writer (~140 lines, a second lesson); kvcache.py 749 (714): chats in a Hub model's own
# template, its stop tokens, a context cap and an engine that outlives an error in a step;
# lora.py 361 (360): a line that keeps a Hub model's padding rows (Qwen's) from being sampled.
# The GPT-2 reproduction issue (#35) gives train.py 90 lines (1014). Its work in progress is
# over that, pending the same decision: train.py 1270: token shards (read, written from text,
# fetched, read in order by rank, rewritten when stale; ~145 lines), HellaSwag (~95) and FSDP2 with activation
# checkpointing (~80), each beside the story generator's appendix (~370 lines).
# test_all.py has no cap: a section per script instead
LINE_CAPS = {"bigram.py": 290, "micrograd.py": 300, "bpe.py": 971, "gpt.py": 1036, "train.py": 1270,
             "kvcache.py": 749, "finetune.py": 534, "lora.py": 361, "dpo.py": 597, "quantize.py": 600,
             "ddp.py": 400}

def present(files):
    return [f for f in files if os.path.exists(os.path.join(HERE, f))]

def test_repo_import_policy():
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy", "tiktoken", "requests"}
    for f in present(SCRIPTS):
        tree = ast.parse(open(os.path.join(HERE, f), encoding="utf-8").read())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        ours = mods & {s[:-3] for s in SCRIPTS}
        if f in ("bigram.py", "micrograd.py", "bpe.py", "gpt.py"):
            assert not ours, f"{f} imports {ours}; it must stand alone"
        else:
            assert ours <= {"gpt", "bpe"}, f"{f} imports {ours}; later scripts import only gpt and bpe"
        foreign = mods - ours - allowed - ({"regex"} if f == "bpe.py" else set())
        assert not foreign, f"{f} imports {foreign}: not a project dependency"

def _code_lines(path):
    # (line number, text) of a file's code, without blank lines, comments, imports and the
    # flag parser (the standalone files' one allowed copy)
    source = open(path, encoding="utf-8").read()
    parser = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "parse_args":
            parser |= set(range(node.lineno, node.end_lineno + 1))
    rows = []
    for i, line in enumerate(source.splitlines(), 1):
        text = " ".join(line.split())
        if text and not text.startswith(("#", "import ", "from ")) and i not in parser:
            rows.append((i, text))
    return rows

def test_repo_no_block_copied_between_scripts():
    """No run of 6 code lines stands in two scripts: shared plumbing lives in gpt.py or bpe.py.
    The one exception is the flag parser's short copy in each standalone file."""
    seen = {}
    for f in present(SCRIPTS):
        rows = _code_lines(os.path.join(HERE, f))
        for j in range(len(rows) - 5):
            seen.setdefault(tuple(text for _, text in rows[j:j + 6]), []).append((f, rows[j][0]))
    for run, places in seen.items():
        assert len({f for f, _ in places}) < 2, f"the same 6 lines in {places}: {run[0]!r} ..."

def test_repo_line_budgets():
    for f in present(list(LINE_CAPS)):
        n = sum(1 for _ in open(os.path.join(HERE, f), encoding="utf-8"))
        assert n <= LINE_CAPS[f], f"{f} has {n} lines, over its cap of {LINE_CAPS[f]}"

def _density_problems(source):
    # the house density rule: what squeezed code looks like, found in the syntax tree
    problems = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.IfExp) and isinstance(node.body, ast.IfExp) | isinstance(node.orelse, ast.IfExp):
            problems.append(f"line {line}: a nested conditional expression")
        if isinstance(node, ast.Compare) and len(node.ops) > 1:
            rising = all(isinstance(op, (ast.Lt, ast.LtE)) for op in node.ops)
            falling = all(isinstance(op, (ast.Gt, ast.GtE)) for op in node.ops)
            if not (rising or falling):  # a range like 0 <= x < 1 is fine; a >= 0 <= b is a rule
                problems.append(f"line {line}: a chained comparison used as a rule")
        if isinstance(node, ast.Expr) and isinstance(node.value, (ast.IfExp, ast.BoolOp)):
            problems.append(f"line {line}: an expression used as a statement")
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple) \
                and isinstance(node.value, ast.Tuple):
            names = lambda t: sorted(ast.unparse(e) for e in t.elts)
            if names(node.targets[0]) != names(node.value):  # a swap (a, b = b, a) is one idea
                problems.append(f"line {line}: several unrelated assignments on one line")
    return problems

def test_repo_density():
    """At most 5% of a script's lines over 100 characters and 12% at 90 or more (lines filled to
    the margin read badly), no backslash continuations, none of the squeezed constructs below."""
    for f in present(SCRIPTS):
        source = open(os.path.join(HERE, f), encoding="utf-8").read()
        lines = source.splitlines()
        long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
        assert len(long) <= 0.05 * len(lines), f"{f}: {len(long)} of {len(lines)} lines over 100: {long[:10]}"
        wide = [i + 1 for i, line in enumerate(lines) if len(line) >= 90]
        assert len(wide) <= 0.12 * len(lines), f"{f}: {len(wide)} of {len(lines)} lines at 90+: {wide[:10]}"
        backslashes = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith("\\")]
        assert not backslashes, f"{f}: backslash continuations on lines {backslashes}"
        problems = _density_problems(source)
        assert not problems, f"{f}: {problems[:5]}"

def test_repo_density_rule_finds_squeezed_code():
    squeezed = "a, b = 1, 2\nx = 1 if a else 2 if b else 3\nok = a >= 0 <= b\nprint() if a else None\n"
    assert len(_density_problems(squeezed)) == 4, _density_problems(squeezed)
    assert not _density_problems("a, b = b, a\nx = f()\ny, z = g()\nin_range = 0 <= x < 1\n")

def _run_script(script, *flags, cwd=HERE):
    return subprocess.Popen([sys.executable, os.path.join(HERE, script), *flags], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def test_repo_user_errors_are_one_line():
    """A new user's mistakes, each run as a subprocess: one line on stderr that names the problem,
    exit code 1, no traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        garbage = os.path.join(tmp, "garbage.bin")
        with open(garbage, "wb") as f:
            f.write(b"\x07not a checkpoint, a tokenizer or safetensors" * 3)
        garbage_json = os.path.join(tmp, "garbage.json")
        shutil.copy(garbage, garbage_json)
        empty = os.path.join(tmp, "empty.txt")
        open(empty, "w").close()
        data = [f"--data_dir={tmp}/data", f"--out_dir={tmp}/out"]
        cases = [  # (script, flags, what stderr must say)
            ("train.py", [*data, f"--dataset={tmp}/missing.txt"], "--dataset="),
            ("train.py", [*data, f"--dataset={empty}", "--tokenizer=byte"], "needs more data"),
            ("train.py", [*data, "--n_embd=30", "--n_head=4"], "not divisible"),
            ("train.py", [*data, "--device=tpu"], "--device=tpu is not available; use auto"),
            ("train.py", [*data, f"--tokenizer={garbage_json}"], "garbage.json"),
            ("train.py", [*data, "--init_from=resume"], "no checkpoint"),
            ("kvcache.py", [f"--ckpt_path={tmp}/missing.pt"], "python train.py"),
            ("finetune.py", [f"--ckpt_path={tmp}/missing.pt"], "python train.py"),
            ("finetune.py", ["--template=vicuna"], "use one of phi3, alpaca"),
            ("finetune.py", ["--task=classify", f"--out_dir={tmp}", "--classify_text=hi"], "no classifier at"),
            ("finetune.py", [f"--ckpt_path={garbage}"], "not a readable checkpoint"),
            ("lora.py", [f"--ckpt_path={tmp}/missing.pt", f"--out_dir={tmp}/lora"], "python train.py"),
            ("lora.py", ["--targets=qkv"], "use one of attn, mlp, all"),
            ("dpo.py", [f"--ckpt_path={tmp}/missing.pt", f"--out_dir={tmp}/dpo"], "python finetune.py"),
            ("dpo.py", ["--beta=-1"], "--beta=-1.0"),
            ("kvcache.py", [f"--ckpt_path={garbage}"], "not a readable checkpoint"),
            ("gpt.py", [f"--init_from={garbage}"], "header length"),
            ("gpt.py", [f"--init_from={tmp}/missing.safetensors"], "not found"),
            ("bpe.py", [f"--tokenizer={garbage}"], "not valid JSON"),
            ("bpe.py", [f"--train={tmp}/missing.txt"], "no such file"),
            ("bigram.py", [f"--data={tmp}/missing.txt"], "missing.txt"),
            ("micrograd.py", ["--noise=-1"], "--noise"),
            ("quantize.py", [f"--ckpt_path={tmp}/missing.pt"], "python train.py"),
            ("quantize.py", ["--bits=2"], "--bits=2"),
            ("quantize.py", [f"--load={garbage}"], "quantized checkpoint"),
        ]
        runs = [(script, flags, expected, _run_script(script, *flags, cwd=tmp))
                for script, flags, expected in cases if os.path.exists(os.path.join(HERE, script))]
        for script, flags, expected, run in runs:
            _, err = run.communicate(timeout=120)
            where = f"{script} {' '.join(flags)}: {err[-600:]}"
            assert run.returncode == 1 and "Traceback" not in err, where
            assert err.startswith(f"{script}: error: ") and expected in err, where
            assert len(err.strip().splitlines()) == 1, where

def test_repo_readme_commands_take_their_flags():
    """Every `python X.py --flag=value` the README shows (in code blocks and in the text) parses
    into its script's config: a renamed or removed flag cannot stay in the manual."""
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    lines = [re.sub(r"(^|\s)#.*", "", line) for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:python|torchrun) [^`]*\.py[^`]*)`", readme)
    checked = 0
    for line in lines:
        words = shlex.split(line)
        scripts = [w for w in words if w.endswith(".py") and w[:-3] in {s[:-3] for s in SCRIPTS}]
        if not scripts or "-h" in words or not words[0] in ("python", "torchrun"):
            continue
        module = __import__(scripts[0][:-3])
        config = next(v for k, v in vars(module).items() if k.endswith("Config") and k != "GPTConfig"
                      and dataclasses.is_dataclass(v) and v.__module__ == module.__name__)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                getattr(module, "parse_args", gpt.parse_args)(config, words[words.index(scripts[0]) + 1:])
            except SystemExit:
                raise AssertionError(f"README: `{line.strip()}`: {err.getvalue().strip()[-200:]}")
        checked += 1
    assert checked > 40, f"only {checked} commands found in the README"

def test_repo_ci_runs_the_readme_test_command():
    # CI must end with exactly the last command of the README's code block that runs the tests
    readme, ci = (open(os.path.join(HERE, f)).read() for f in ("README.md", ".ci/run"))
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "test_all" in b).strip().splitlines()
    assert block[-1] == "python test_all.py" == ci.strip().splitlines()[-1], f"{block} vs .ci/run"

# -----------------------------------------------------------------------------
# the runner (pytest finds the same test_* functions without it)

def failure_report(e):
    """Where a test failed: its line in this file and the values of the names on that line, so a bare
    `assert a == b` still shows a and b."""
    tb, frame = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == os.path.abspath(__file__):
            frame, lineno = tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next
    if frame is None:
        return ""
    source = open(os.path.abspath(__file__), encoding="utf-8").read().splitlines()[lineno - 1].strip()
    names = dict.fromkeys(re.findall(r"\b[A-Za-z_]\w*\b", source))
    values = [f"      {n} = {repr(frame.f_locals[n])[:200]}" for n in names if n in frame.f_locals
              and not callable(frame.f_locals[n]) and not inspect.ismodule(frame.f_locals[n])]
    return "\n".join([f"    at test_all.py:{lineno}: {source}", *values[:8]]) + "\n"

if __name__ == "__main__":
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    if pattern.startswith("-"):  # -h, or a flag meant for a script
        print("usage: python test_all.py [part of a test name, e.g. kvcache]")
        sys.exit(2)
    tests = [(n, f) for n, f in list(globals().items()) if n.startswith("test_") and callable(f) and pattern in n]
    if not tests:
        sys.exit(f"no test name contains {pattern!r}")
    counts = {"ok": 0, "FAIL": 0, "skip": 0}
    for name, fn in tests:
        t0, status, detail, output = time.time(), "ok", "", io.StringIO()
        try:  # a test's own prints are shown only when it fails
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                fn()
        except unittest.SkipTest as e:
            status, detail = "skip", f"  ({e})"
        except (Exception, SystemExit) as e:  # SystemExit: a script's main may exit; the run goes on
            status = "FAIL"
            detail = f"\n    {type(e).__name__}: {e}\n" + failure_report(e) + output.getvalue()[-2000:]
        counts[status] += 1
        print(f"{name:<52} {status:<4} {time.time() - t0:6.2f}s{detail}", flush=True)
    print(f"{counts['ok']} passed, {counts['FAIL']} failed" + (f", {counts['skip']} skipped" if counts["skip"] else ""))
    sys.exit(1 if counts["FAIL"] else 0)
