"""Byte-level BPE: the tokenizer every later script uses, pure Python, exact for GPT-2.

What you learn: text becomes UTF-8 bytes, then ids, by repeatedly merging the most
frequent adjacent pair into a new token (Sennrich et al.); a split regex first cuts text
into chunks so merges stay inside words. Training is fast because each distinct chunk is
counted once and a merge recounts only the chunks holding its pair. The key idea:
encoding applies the learned merges (a, b) -> id in the order they were learned. Then
the text side every finetuning script shares: the chat template (a conversation as ids
and a loss mask), the storyteller's checkers, and instruction records read and split.
The same class reads a Hugging Face tokenizer.json (Llama 3, Qwen) and writes one.
How to run:
  python bpe.py                                   # offline demo: trains on this file
  python bpe.py --train=text.txt --vocab_size=4096 --out=tok.json  # bytes per token
  python bpe.py --tokenizer=tok.json --text="Hi"  # or gpt2, or a Hugging Face folder
  python bpe.py --bench                   # incremental vs naive, Python vs tiktoken
Depends on: nothing from this repo. References: Sennrich et al. 2016, arXiv:1508.07909;
Radford et al. 2019, Language Models are Unsupervised Multitask Learners (GPT-2); tiktoken
"""
import argparse
import dataclasses
import hashlib
import heapq
import inspect
import json
import os
import random
import re
import sys
import time
import unicodedata
from collections import Counter, defaultdict

import regex
import requests
import tiktoken

@dataclasses.dataclass
class BpeConfig:
    """Train, inspect or benchmark a byte-level BPE tokenizer."""
    # what to run, I/O
    train: str = ""  # UTF-8 text to train on ('' = offline demo on this source file)
    out: str = "tok.json"  # where --train writes the tokenizer (readable JSON)
    tokenizer: str = ""  # 'gpt2', a tok.json or a Hugging Face folder: show --text
    bench: bool = False  # time train (incremental, naive) and encode (Python, tiktoken)
    text: str = "Hello world! Tokens 🤖 naïve 東京 <|endoftext|>"  # what to show
    gpt2_dir: str = "data/gpt2"  # holds encoder.json and vocab.bpe (downloaded if missing)
    # tokenizer
    vocab_size: int = 1024  # 256 bytes + merges + <|endoftext|>; GPT-2 has 50257
    pattern: str = "gpt2"  # split regex before BPE: 'gpt2', 'gpt4' (cl100k) or 'none'

# merges never cross a chunk boundary: " dog" in " dog." and " dog," is one chunk
SPLIT_PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
             r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
    "none": "",  # one chunk: the textbook example (slow on long texts)
    # SmolLM2's: digits are cut out one by one before GPT-2's regex runs, so whitespace
    # before a digit is a chunk of its own ("a  1" -> "a", "  ", "1")
    "smollm": (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
               r"""|\s+(?=\p{N})|\s+(?!\S)|\s+"""),
}
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}

# -----------------------------------------------------------------------------
# building blocks: merging a pair, counting chunks, fetching and reading files

def merge(ids, pair, new_id):
    """Replace pair left to right: merge([1, 2, 2, 1, 2], (1, 2), 9) -> [9, 2, 9]."""
    out = []
    i = 0
    while i < len(ids):
        hit = ids[i] == pair[0] and i + 1 < len(ids) and ids[i + 1] == pair[1]
        out.append(new_id if hit else ids[i])
        i += 2 if hit else 1
    return out

def count_words(text, pattern, specials):
    """Each distinct chunk as a word of bytes, and its count: count_words("a a a",
    SPLIT_PATTERNS["gpt2"], []) -> ([[97], [32, 97]], [1, 2]) ("a" once, " a" twice)."""
    # special tokens are cut out first, so no merge learns a piece of "<|endoftext|>"
    parts = re.split("|".join(map(re.escape, specials)), text) if specials else [text]
    counts = Counter()
    for part in parts:
        counts.update(regex.findall(pattern, part) if pattern else [part])
    return [list(chunk.encode("utf-8")) for chunk in counts], list(counts.values())

def fetch(url, path, sha256="", instead="--dataset=path/to/file"):
    """Download url to path once, checked if sha256 is given; offline, name `instead`."""
    if os.path.exists(path):
        return path
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            r.raise_for_status()
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path + ".part", "wb") as f:
                for block in r.iter_content(1 << 20):
                    digest.update(block)
                    f.write(block)
                    print(f"\r{url}: {f.tell() / 1e6:.1f} MB", end="", file=sys.stderr)
        print(file=sys.stderr)
    except requests.RequestException as e:
        raise RuntimeError(f"could not download {url} ({type(e).__name__}); save it as "
                           f"{path} yourself, or pass {instead}") from None
    if sha256 and digest.hexdigest() != sha256:
        raise RuntimeError(f"{url} arrived corrupted (sha256 mismatch); run again")
    os.replace(path + ".part", path)  # path is either absent or complete
    return path

def read_json(path, fix):
    """A JSON file's object; a missing or corrupt file raises, naming it and the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSON errors, bad UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}); it may be truncated: "
                         f"{fix}") from None

def byte_alphabet():
    """GPT-2's bytes-to-unicode: byte -> the character spelling it in vocab files; the
    188 printable bytes spell themselves, the other 68 chr(256 + k) (the space is 'Ġ')."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(rest)}

# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """Byte-level BPE. Tokenizer() has the 256 bytes; train(), load(), gpt2() add merges.
    pattern is a name in SPLIT_PATTERNS or a split regex (from_pretrained's)."""
    def __init__(self, pattern="gpt2", byte_order=range(256), merges=(), special_tokens=()):
        if pattern not in SPLIT_PATTERNS and re.fullmatch(r"\w*", pattern):
            raise ValueError(f"pattern={pattern!r} is unknown; use one of {list(SPLIT_PATTERNS)}")
        if sorted(byte_order) != list(range(256)):
            raise ValueError("byte_order must list each byte 0..255 exactly once")
        self.pattern = pattern
        self._split = regex.compile(SPLIT_PATTERNS.get(pattern, pattern) or r"[\s\S]+")
        self.vocab = {i: bytes([b]) for i, b in enumerate(byte_order)}  # id -> bytes
        self.byte_ids = {b: i for i, b in enumerate(byte_order)}  # GPT-2 permutes bytes
        self.merges = {}  # (id_a, id_b) -> new id, which is also the merge's priority
        self.ranks = self.merges  # pair -> priority (from_pretrained's differ from ids)
        self.whole = {}  # bytes -> id: chunks kept whole (Llama 3's ignore_merges)
        self.nfc = False  # Qwen normalizes text to NFC first
        self.folder = ""  # the Hugging Face folder read from ('' = none)
        self.chat_template = None  # that folder's chat template, as a dict
        for a, b in merges:
            if a not in self.vocab or b not in self.vocab or (a, b) in self.merges:
                raise ValueError(f"merge [{a}, {b}] repeats or uses an id not defined before it")
            self.merges[a, b] = len(self.vocab)
            self.vocab[len(self.vocab)] = self.vocab[a] + self.vocab[b]
        self.special_tokens = {}  # str -> id after the merges (GPT-2's eot: 50256)
        for s in special_tokens:
            if not isinstance(s, str) or not s or s in self.special_tokens:
                raise ValueError(f"special tokens must be distinct non-empty strings, "
                                 f"got {special_tokens!r}")
            self.special_tokens[s] = len(self.vocab)
            self.vocab[len(self.vocab)] = s.encode("utf-8")
        self.vocab_size = len(self.vocab)
        self._cache = {}  # chunk -> ids

    def train(self, text, vocab_size, pattern="gpt2", special_tokens=("<|endoftext|>",),
              verbose=False):
        """Learn vocab_size - 256 - len(special_tokens) merges, ties going to the
        smallest pair (id_a, id_b): train("aaabdaaabac", 259, "none", ()) learns
        (97, 97) -> 256, (97, 98) -> 257 and (256, 257) -> 258."""
        self.__init__(pattern, range(256), [], special_tokens)  # checks both arguments
        specials = list(self.special_tokens)
        n_merges = vocab_size - self.vocab_size
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} leaves no room for 256 bytes and "
                             f"{specials}; pass vocab_size>={self.vocab_size}")
        # 1. each distinct chunk is a word with a count: " the" may occur 10,000 times
        words, counts = count_words(text, SPLIT_PATTERNS.get(pattern, pattern), specials)
        # 2. count adjacent pairs (weighted by word count), and which words hold each
        stats = defaultdict(int)  # pair -> count
        where = defaultdict(set)  # pair -> the words holding it
        for i, word in enumerate(words):
            for pair in zip(word, word[1:]):
                stats[pair] += counts[i]
                where[pair].add(i)
        # 3. a heap of (-count, pair) pops the most frequent pair, ties to the smallest;
        # a changed count gets a fresh entry, and stale ones are skipped as they come
        heap = [(-n, pair) for pair, n in stats.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < n_merges:
            if not heap:
                most = vocab_size - n_merges + len(merges)
                raise ValueError(f"vocab_size={vocab_size} is too large: this text allows "
                                 f"{len(merges)} merges; pass vocab_size<={most} or more text")
            neg_count, pair = heapq.heappop(heap)
            if stats[pair] != -neg_count:
                continue  # stale entry: the count changed after it was pushed
            merges.append(pair)
            new_id = 255 + len(merges)
            # 4. touch only the words holding the pair: their old pairs out, the new in
            delta = defaultdict(int)  # pair -> change of its count
            for i in where.pop(pair):
                old = words[i]
                new = merge(old, pair, new_id)
                if len(new) == len(old):
                    continue  # an earlier merge took this pair; where[] still lists it
                for p in zip(old, old[1:]):
                    delta[p] -= counts[i]
                for p in zip(new, new[1:]):
                    delta[p] += counts[i]
                    where[p].add(i)
                words[i] = new
            for p, change in delta.items():
                stats[p] += change
                if change and stats[p] > 0:
                    heapq.heappush(heap, (-stats[p], p))
            if verbose and len(merges) % 200 == 0:
                print(f"merge {len(merges)}/{n_merges}: {pair} -> {new_id} ({-neg_count} times)")
        self.__init__(pattern, range(256), merges, specials)
        return self

    def _encode_chunk(self, chunk):
        data = chunk.encode("utf-8")
        if data in self.whole:  # a chunk that is a token is that token, as in tiktoken
            return [self.whole[data]]
        ids = [self.byte_ids[b] for b in data]
        while len(ids) >= 2:
            # apply the earliest-learned merge present (lowest rank), as training did
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break  # no merge applies any more
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def encode(self, text, allowed_special="none_raise"):
        """str -> ids. As in tiktoken, a special token in text raises unless allowed:
        allowed_special is 'all', a set, 'none' (as plain text) or 'none_raise'."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set()
        if not isinstance(allowed_special, str):  # a set of tokens
            allowed = set(allowed_special) & set(self.special_tokens)
        for s in self.special_tokens:
            if allowed_special != "none" and s in text and s not in allowed:
                raise ValueError(f"text contains the special token {s!r}, which is not "
                                 f"allowed: pass allowed_special={{{s!r}}} or 'all' to "
                                 f"encode it as its id, or 'none' to encode it as text")
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        parts = [text]
        if allowed:  # split on allowed specials; the group keeps them, at odd positions
            parts = re.split(f"({'|'.join(map(re.escape, allowed))})", text)
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # an allowed special token
                ids.append(self.special_tokens[part])
                continue
            for chunk in self._split.findall(part):
                if chunk not in self._cache:  # a word seen before costs one dict lookup
                    self._cache[chunk] = self._encode_chunk(chunk)
                ids.extend(self._cache[chunk])
        return ids

    def pieces(self, ids):
        """The bytes behind each id: pieces([72, 105, 226]) -> [b'H', b'i', b'\\xe2']."""
        if unknown := [i for i in ids if i not in self.vocab]:
            raise ValueError(f"unknown ids {unknown[:5]}; the ids are 0..{len(self.vocab) - 1}")
        return [self.vocab[i] for i in ids]

    def decode(self, ids):
        """ids -> str; bytes that are not UTF-8 (a split character) become U+FFFD."""
        return b"".join(self.pieces(ids)).decode("utf-8", errors="replace")

    def to_tiktoken(self, name="bpe"):
        """The same tokenizer as a tiktoken.Encoding: identical ids at Rust speed (Qwen's
        NFC is not in it: normalize the text first)."""
        specials = set(self.special_tokens.values())
        ranks = {self.vocab[i]: i for i in self.vocab if i not in specials}  # rank = id
        assert len(ranks) + len(specials) == len(self.vocab), "two tokens, the same bytes"
        made = [self.merges[pair] for pair in sorted(self.ranks, key=self.ranks.get)]
        if made != sorted(made):  # tiktoken merges by the rank of what a merge makes
            raise ValueError("this tokenizer's merge priorities do not follow its ids, as "
                             "tiktoken needs; encode with the Tokenizer itself")
        return tiktoken.Encoding(name=name, pat_str=self._split.pattern,
                                 mergeable_ranks=ranks, special_tokens=self.special_tokens)

    def to_dict(self):
        """Plain types, so a checkpoint can carry it (torch.load(weights_only=True)); a
        Hugging Face tokenizer is its folder."""
        if self.folder:
            return {"pretrained": self.folder}
        return {"version": 1, "pattern": self.pattern,
                "special_tokens": list(self.special_tokens),
                "byte_order": [self.vocab[i][0] for i in range(256)],
                "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_dict(cls, obj, source="the tokenizer"):
        """Inverse of to_dict; anything malformed raises a ValueError with the fix."""
        if isinstance(obj, dict) and "pretrained" in obj:
            return cls.from_pretrained(obj["pretrained"])
        try:
            if obj["version"] != 1:
                raise ValueError(f"version is {obj['version']!r}, this code reads 1")
            return cls(obj["pattern"], obj["byte_order"], obj["merges"], obj["special_tokens"])
        except (ValueError, KeyError, TypeError, IndexError) as e:
            problem = f"{type(e).__name__}: {e}"
            raise ValueError(f"{source} is not a valid tokenizer ({problem}); re-create "
                             f"it: python bpe.py --train=FILE --out=tok.json") from None

    def save(self, path):
        """Readable JSON: pattern, specials, the bytes of ids 0..255, a merge a line."""
        obj = self.to_dict()
        merges = ",\n".join(f"[{a}, {b}]" for a, b in obj.pop("merges", []))
        head = json.dumps(obj, ensure_ascii=False)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(head[:-1] + ', "merges": [\n' + merges + "\n]}\n")
        os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a file

    @classmethod
    def load(cls, path):
        """Read a file from save(); a missing or corrupt one raises with the fix."""
        fix = (f"re-create it: `python bpe.py --train=FILE --out={path}`, or pass "
               f"--tokenizer=gpt2 or a Hugging Face model folder")
        return cls.from_dict(read_json(path, fix), path)

    @classmethod
    def gpt2(cls, dir="data/gpt2"):
        """GPT-2's exact tokenizer: encoder.json and vocab.bpe in dir (fetched if missing)."""
        both = (f"--gpt2_dir=DIR, a folder holding encoder.json "
                f"({GPT2_URL}encoder.json) and vocab.bpe ({GPT2_URL}vocab.bpe)")
        for name, sha256 in GPT2_FILES.items():
            fetch(GPT2_URL + name, os.path.join(dir, name), sha256, instead=both)
        order = list(byte_alphabet())  # ids 0..255: the 188 printable bytes, then the 68
        try:
            with open(os.path.join(dir, "encoder.json"), encoding="utf-8") as f:
                encoder = json.load(f)
            with open(os.path.join(dir, "vocab.bpe"), encoding="utf-8") as f:
                lines = f.read().split("\n")[1:-1]  # skip "#version: 0.2" and the end
            # vocab.bpe line i, "left right" in GPT-2's alphabet, makes id 256 + i
            merges = [[encoder[s] for s in line.split(" ")] for line in lines]
            tok = cls("gpt2", order, merges, ["<|endoftext|>"])
            if tok.vocab_size != len(encoder):  # e.g. a truncated vocab.bpe
                raise ValueError(f"vocab.bpe's {len(lines)} merges do not fit {len(encoder)} ids")
        except (ValueError, KeyError, TypeError) as e:
            problem = f"{type(e).__name__}: {e}"
            raise ValueError(f"the GPT-2 files in {dir} are corrupt ({problem}); delete "
                             f"encoder.json and vocab.bpe there, then retry") from None
        return tok

    @classmethod
    def from_saved(cls, saved, gpt2_dir="data/gpt2"):
        """A checkpoint's tokenizer from its "tokenizer" key: 'gpt2', to_dict()'s, a
        tok.json or a Hugging Face folder (holding tokenizer.json)."""
        if saved == "gpt2":
            return cls.gpt2(gpt2_dir)
        if isinstance(saved, dict):
            return cls.from_dict(saved, "the checkpoint's tokenizer")
        if isinstance(saved, str):  # a folder, else a tok.json (or the error naming the fix)
            load = cls.from_pretrained if os.path.isdir(saved) else cls.load
            return load(saved)
        raise ValueError(f"the checkpoint's tokenizer {str(saved)[:60]!r} is neither 'gpt2', "
                         f"a bpe.py dict, a tok.json nor a folder; retrain with train.py")

    # --- Hugging Face files in and out (their helpers: "Hugging Face tokenizers" below)

    @classmethod
    def from_pretrained(cls, folder):
        """A Hugging Face model folder's tokenizer.json: byte-level BPE (GPT-2, Llama 3,
        SmolLM2, Qwen) with the ids `tokenizers` gives; tok.chat_template is the folder's
        chat template as a dict (None without one)."""
        path = os.path.join(folder, "tokenizer.json")
        obj = read_json(path, "pass a model folder that holds it, or download it again")
        model = obj.get("model") or {}
        normalizer = (obj.get("normalizer") or {}).get("type")
        pattern = hf_split_pattern(obj.get("pre_tokenizer"))
        options = ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix")
        bad = [f"a {model.get('type')} model"] if model.get("type", "BPE") != "BPE" else []
        bad += [f"the {normalizer} normalizer"] if normalizer not in (None, "NFC") else []
        bad += [] if pattern else ["its pre_tokenizer"]
        bad += [option for option in options if model.get(option)]
        if bad:
            raise ValueError(f"{path} has {', '.join(bad)}, which bpe.py does not read: only "
                             f"byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2, Qwen)")
        # token strings spell bytes in GPT-2's alphabet, a merge's priority is its line
        # (Llama 3 makes some tokens from two pairs), the added tokens are specials
        ids = model.get("vocab", {})
        to_byte = {c: b for b, c in byte_alphabet().items()}
        tok = cls(pattern)
        try:
            specials = {t["content"]: t["id"] for t in obj.get("added_tokens", [])}
            tok.vocab = {i: bytes(to_byte[c] for c in s) for s, i in ids.items()
                         if s not in specials}
            tok.byte_ids = {b: ids[c] for b, c in byte_alphabet().items()}
            pairs = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
            tok.merges = {(ids[a], ids[b]): ids[a + b] for a, b in pairs}
            tok.ranks = {(ids[a], ids[b]): rank for rank, (a, b) in enumerate(pairs)}
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not byte-level BPE ({type(e).__name__}: {e}); "
                             f"only GPT-2, Llama 3, SmolLM2 and Qwen's are read") from None
        tok.vocab |= {i: s.encode("utf-8") for s, i in specials.items()}
        tok.special_tokens = specials
        tok.vocab_size = max(tok.vocab) + 1
        if model.get("ignore_merges"):
            tok.whole = {tok.vocab[i]: i for i in ids.values()}
        tok.nfc = normalizer == "NFC"
        tok.folder = folder
        tok.chat_template = hf_chat_template(folder)
        return tok

    def to_hf(self, template="phi3"):
        """(tokenizer.json, tokenizer_config.json) as dicts: the same ids from
        `tokenizers`, and a chat template transformers renders as render_conversation
        does (one read from a model folder is written back as it came); template None: a
        base model's, with no chat template, ending at the end of a text."""
        spec = chat_spec(template, self) if template else {  # a base model: a text's ends
            "end": next((s for s in TEXT_ENDS if s in self.special_tokens), STOP),
            "bos": "<|begin_of_text|>" if "<|begin_of_text|>" in self.special_tokens else None}
        alphabet = byte_alphabet()
        spelled = {i: "".join(alphabet[b] for b in self.vocab[i]) for i in self.vocab}
        specials = set(self.special_tokens.values())
        vocab = {spelled[i]: i for i in self.vocab if i not in specials}
        if len(vocab) + len(specials) != len(self.vocab):
            raise ValueError("two tokens have the same bytes; tokenizer.json cannot hold that")
        merges = [[spelled[a], spelled[b]] for a, b in sorted(self.ranks, key=self.ranks.get)]
        added = [{"id": i, "content": s, "special": True, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False} for s, i in self.special_tokens.items()]
        # the split: GPT-2's regex is ByteLevel's own; SmolLM2 first cuts out each digit;
        # Hugging Face's regex engine reads "{1,3}+" as a repeat, "$" as a line's end
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": self.pattern in ("gpt2", "smollm")}
        split = self._split.pattern.replace("{1,3}+", "{1,3}").replace("$", r"\z")
        first = {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated",
                 "invert": False}
        if self.pattern == "smollm":
            first = {"type": "Digits", "individual_digits": True}
        pre = {"type": "Sequence", "pretokenizers": [first, byte_level]}
        model = {"type": "BPE", "vocab": vocab, "merges": merges,
                 "ignore_merges": bool(self.whole)}
        tokenizer = {"version": "1.0", "added_tokens": added,
                     "normalizer": {"type": "NFC"} if self.nfc else None,
                     "pre_tokenizer": byte_level if self.pattern == "gpt2" else pre,
                     "decoder": byte_level, "model": model}
        pad = STOP if STOP in self.special_tokens else spec["end"]
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": spec["end"],
                  "bos_token": spec["bos"] or pad, "pad_token": pad,
                  "clean_up_tokenization_spaces": False}
        if template:
            data = json.dumps({k: v for k, v in spec.items() if v is not None}, ensure_ascii=False)
            config["chat_template"] = spec["jinja"] or "{%- set t = " + data + " %}" + CHAT_JINJA
        return tokenizer, config

    def save_pretrained(self, folder, template="phi3"):
        """to_hf(template)'s two files in folder, for AutoTokenizer and llama.cpp."""
        files = zip(["tokenizer.json", "tokenizer_config.json"], self.to_hf(template))
        os.makedirs(folder, exist_ok=True)
        for name, obj in files:
            path = os.path.join(folder, name)
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=1)
            os.replace(path + ".tmp", path)  # atomic: a crash never leaves half a file

# -----------------------------------------------------------------------------
# the chat template: a conversation as token ids and a loss mask, for every later script

# Our templates add no tokens: role headers are plain text, and an assistant turn ends
# with STOP, which every tokenizer here has and a pretrained model reads as "the text
# ends here" (so stopping is generate(eot_id=STOP)). A Hugging Face model's template has
# its own special tokens (<|im_end|> ends a turn). "{}" stands for a message's content.
STOP = "<|endoftext|>"
CHAT_TEMPLATES = {
    # Phi-3's role markers as text (Raschka's exercise 7.1): short, stories fit 256 tokens
    "phi3": dict(system="<|system|>\n{}\n", user="<|user|>\n{}\n",
                 assistant="<|assistant|>\n", default_system=None),
    # Alpaca's layout, as in Raschka's chapter 7; its system line is always there
    "alpaca": dict(system="{}\n\n", user="### Instruction:\n{}\n\n", assistant="### Response:\n",
                   default_system="Below is an instruction that describes a task. Write a "
                                  "response that appropriately completes the request."),
    # ChatML (SmolLM2, Qwen): from_pretrained adds the model's default system message
    "chatml": dict(system="<|im_start|>system\n{}<|im_end|>\n",
                   user="<|im_start|>user\n{}<|im_end|>\n",
                   assistant="<|im_start|>assistant\n", end="<|im_end|>", after="\n",
                   stops=["<|endoftext|>"]),
    # Llama 3: contents are trimmed; 3.1 and 3.2 always open with a dated system turn
    "llama3": dict(bos="<|begin_of_text|>", trim=True, end="<|eot_id|>",
                   system="<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
                   user="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                   assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
                   stops=["<|eom_id|>", "<|end_of_text|>"]),
}
# a template's other keys: text first, the system message a conversation without one
# gets (None: none), text before the first system message's ({date}: today, as date
# formats it), the token ending an assistant turn and text after it, trimmed contents,
# text after the last assistant header (Qwen3's empty <think></think>), more stop tokens,
# and the Jinja text of a template read from a model folder
TEMPLATE_DEFAULTS = dict(bos="", default_system=None, system_prefix="", date="%d %b %Y",
                         end=STOP, after="", trim=False, think="", stops=[], jinja=None)

def chat_spec(template, tok):
    # a template's name or dict -> all its keys, checked against the tokenizer
    named = isinstance(template, str)
    if named and template not in CHAT_TEMPLATES:
        raise ValueError(f"chat template {template!r} is unknown; use one of "
                         f"{list(CHAT_TEMPLATES)}")
    spec = TEMPLATE_DEFAULTS | (CHAT_TEMPLATES[template] if named else template)
    if spec["end"] not in tok.special_tokens:
        fits = [n for n, t in CHAT_TEMPLATES.items() if t.get("end", STOP) in tok.special_tokens]
        raise ValueError(f"the tokenizer has no {spec['end']} to end a turn with; train one "
                         f"with special_tokens=({spec['end']!r},) or use one of {fits}")
    return spec

def record_messages(record):
    """A record as a conversation: {instruction, input, output} (Alpaca's schema; output
    optional) -> a user turn (instruction, blank line, input) and an assistant turn (output);
    {messages: [...]} passes through."""
    if "messages" in record:
        return record["messages"]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if "output" in record:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages

def encode_turn(tok, before, content="", after=""):
    """Template text around a content -> ids, as Hugging Face tokenizes a rendered chat:
    special tokens count only in the template's text (a typed one in a content stays
    text), and the text between two of them is encoded in one piece."""
    specials = f"({'|'.join(map(re.escape, tok.special_tokens))})"
    head = re.split(specials, before)
    tail = re.split(specials, after)
    ids = []
    for k, part in enumerate(head[:-1] + [head[-1] + content + tail[0]] + tail[1:]):
        if k % 2:  # a special token of the template
            ids.append(tok.special_tokens[part])
        else:
            ids += tok.encode(part, allowed_special="none")
    return ids

def render_conversation(tok, messages, template="phi3", date_string=""):
    """[{"role": "system" | "user" | "assistant", "content": str}, ...] -> (ids, mask);
    mask[i] is 1 where ids[i] is what finetuning learns: an assistant token or the token
    ending its turn (STOP). A conversation ending on a user turn ends with the assistant
    header, the prompt to complete. template: a name in CHAT_TEMPLATES or a dict like
    tok.chat_template; date_string: Llama 3.2's date ('' = today, as "%d %b %Y")."""
    spec = chat_spec(template, tok)
    first = messages[0]["role"] if messages else ""
    if spec["default_system"] is not None and first != "system":
        messages = [{"role": "system", "content": spec["default_system"]}] + list(messages)
    ids = []
    mask = []  # 1 where the token is trained
    def add(new_ids, trained=0):
        ids.extend(new_ids)
        mask.extend([trained] * len(new_ids))
    add(encode_turn(tok, spec["bos"]))
    for k, message in enumerate(messages):
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"a message has role {role!r}; use system, user, assistant")
        content = message["content"].strip() if spec["trim"] else message["content"]
        if k == 0 and role == "system":
            date = date_string or time.strftime(spec["date"])
            content = spec["system_prefix"].replace("{date}", date) + content
        if role == "assistant":
            think = spec["think"] if k == len(messages) - 1 else ""
            add(encode_turn(tok, spec["assistant"] + think))
            body = tok.encode(content, allowed_special="none")
            add(body + [tok.special_tokens[spec["end"]]], 1)
            add(encode_turn(tok, spec["after"]))
        else:
            before, after = spec[role].split("{}")
            add(encode_turn(tok, before, content, after))
    if messages[-1]["role"] != "assistant":
        add(encode_turn(tok, spec["assistant"] + spec["think"]))
    return ids, mask

def stop_ids(tok, template="phi3"):
    """The ids that end an assistant turn, for generate(eot_id=...): the template's end
    token first, then its other stop tokens that the tokenizer has."""
    spec = chat_spec(template, tok)
    ends = [spec["end"], *spec["stops"]]
    return [tok.special_tokens[s] for s in ends if s in tok.special_tokens]

TEXT_ENDS = (STOP, "<|end_of_text|>")  # ours, GPT-2's, SmolLM2's and Qwen's; Llama 3's

def text_ends(tok):
    """The ids that end a text (no chat): those of TEXT_ENDS the tokenizer has."""
    return [tok.special_tokens[s] for s in TEXT_ENDS if s in tok.special_tokens]

def end_of_turn(tok, template=None):
    """The id ending an assistant turn: template's, tok.chat_template's or STOP's."""
    return stop_ids(tok, template or tok.chat_template or "phi3")[0]

# -----------------------------------------------------------------------------
# Hugging Face tokenizers: tokenizer.json and tokenizer_config.json in bpe.py's terms

def hf_split_pattern(pre):
    """tokenizer.json's pre_tokenizer as a split pattern ('' where bpe.py has none):
    GPT-2's ByteLevel, SmolLM2's Digits then ByteLevel, Llama 3 and Qwen's Split."""
    *steps, last = (pre or {}).get("pretokenizers", [pre or {}])
    first = steps[0] if steps else {}
    own_regex = last.get("use_regex", True)  # ByteLevel's own split: GPT-2's regex
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space") or len(steps) > 1:
        return ""
    if not steps and own_regex:
        return "gpt2"
    if first == {"type": "Digits", "individual_digits": True} and own_regex:
        return "smollm"
    isolated = first.get("behavior") == "Isolated" and not first.get("invert")
    if first.get("type") == "Split" and isolated and not own_regex:
        return first.get("pattern", {}).get("Regex", "")
    return ""

def hf_chat_template(folder):
    """The folder's Jinja chat template (tokenizer_config.json's, or chat_template.jinja)
    as a template dict, read without Jinja: the family by its tokens, then its default
    system message and Llama's dated system turn; None for none or another family."""
    path = os.path.join(folder, "tokenizer_config.json")
    config = read_json(path, "download it again") if os.path.isfile(path) else {}
    text = config.get("chat_template") or ""
    if isinstance(text, list):  # named templates: the default one
        text = next((t["template"] for t in text if t.get("name") == "default"), "")
    path = os.path.join(folder, "chat_template.jinja")  # where newer transformers put it
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if text.startswith("{%- set t = "):  # to_hf's own: the dict itself
        ours = json.JSONDecoder().raw_decode(text, len("{%- set t = "))[0]
        return TEMPLATE_DEFAULTS | ours  # the keys that are None are left out of it
    if "<|im_start|>" in text:
        spec = TEMPLATE_DEFAULTS | CHAT_TEMPLATES["chatml"] | {"jinja": text}
        # a system turn written out whole is the default one ("\\n" is Jinja's escape)
        default = re.search(r"<\|im_start\|>system\\n([^'\"]*?)<\|im_end\|>", text)
        if default:
            spec["default_system"] = default.group(1).replace("\\n", "\n")
        if "<think>" in text:  # Qwen3 answers with its thinking left empty
            spec["think"] = "<think>\n\n</think>\n\n"
        return spec
    if "<|start_header_id|>" not in text:
        return None
    spec = TEMPLATE_DEFAULTS | CHAT_TEMPLATES["llama3"] | {"jinja": text}
    cutoff = re.search(r"Cutting Knowledge Date: ([^\\\"]*)", text)
    if cutoff:  # 3.1 and 3.2: always a system turn, dated today (3.1: a fixed day)
        fixed = re.search(r'set date_string = "([^"]*)"', text)
        if fixed and "strftime_now" not in text:
            spec["date"] = fixed.group(1)
        spec["default_system"] = ""
        spec["system_prefix"] = f"Cutting Knowledge Date: {cutoff.group(1)}\n"
        spec["system_prefix"] += "Today Date: {date}\n\n"
    return spec

# to_hf's chat_template for ours, after "{%- set t = <its dict> %}": transformers'
# apply_chat_template(messages, add_generation_prompt=True) renders render_conversation's
CHAT_JINJA = (
    "{%- if t.default_system is defined and messages[0]['role'] != 'system' %}"
    "{%- set messages = [{'role': 'system', 'content': t.default_system}] + messages %}"
    "{%- endif %}{{- t.bos }}{%- for message in messages %}"
    "{%- set content = message['content'] | trim if t.trim else message['content'] %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- t.assistant + content + t.end + t.after }}"
    "{%- else %}{{- t[message['role']] | replace('{}', content) }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- t.assistant }}{%- endif %}")

# -----------------------------------------------------------------------------
# the storyteller's checkers: each kind of request has a program that judges a reply, so
# finetune.py and dpo.py measure it and GRPO rewards it. The names are those train.py's
# stories draw from: a name a model writes is one of these, so a changed hero shows.
GIRLS = ("Lily Mia Sue Anna Emma Zoe Lucy Amy Ella Rose Kim Ava Sara Lena Nina Molly Ruby "
         "Grace Lola Hannah Chloe Daisy Jenny Maya Olivia Poppy Tina Wendy Holly Julia").split()
BOYS = ("Tom Ben Max Sam Tim Leo Jack Finn Jake Luke Noah Joe Dan Bob Ted Eli Owen Milo "
        "Oscar Henry Adam Peter Toby Ryan Oliver Hugo Ethan Felix Liam Kevin").split()
MOODS = {"happy": "happy smiled laughed fun hugged loved best proud glad".split(),
         "sad": "sad cried lonely gone alone tears never".split()}

def mood(paragraph):  # > 0 happy, < 0 sad: a count of the mood words
    words = re.findall(r"[a-z]+", paragraph.lower())
    return sum(w in MOODS["happy"] for w in words) - sum(w in MOODS["sad"] for w in words)

def story_problems(story, words, summary):
    """What a story for (words, summary) lacks, [] when nothing: each word, as a whole word
    in any case ("Ball." counts for "ball", "balloon" does not), and each character the
    summary names by a capital ("Lily" and "Tom" in "Lily lost her ball, and Tom found it")."""
    names = re.findall(r"\b[A-Z][a-z]+\b", summary)
    wanted = dict.fromkeys(list(words) + names)  # in order, once each
    return [w for w in wanted if not re.search(rf"\b{re.escape(w)}\b", story, re.IGNORECASE)]

def name_problems(reply, check):
    """The one check every story gets: its hero keeps one name from start to end. The
    hero is check["hero"] (else the first name written), named in the last paragraph too;
    other names must be the story's cast (check["cast"]), or for a new story one friend."""
    found = {m.start(): n for n in GIRLS + BOYS if (m := re.search(rf"\b{n}\b", reply))}
    names = [found[k] for k in sorted(found)]
    hero = check.get("hero") or (names[:1] or ["a hero"])[0]
    others = set(names) - {hero} - set(check.get("cast", []))
    problems = [] if hero in names else [f"no {hero}"]
    if "\n" in reply.strip() and not re.search(rf"\b{hero}\b", reply.strip().split("\n")[-1]):
        problems.append(f"{hero} is gone by the last paragraph")
    if len(others) > ("cast" not in check):
        problems.append(f"other names: {', '.join(sorted(others))}")
    return problems

def reply_problems(reply, check):
    """What a reply to a request of kind check["kind"] gets wrong, [] when nothing."""
    kind = check["kind"]
    if kind == "offtopic":  # a short answer in character: no story
        short = len(reply.split()) <= 60 and "once upon" not in reply.lower()
        return [] if short and "stor" in reply.lower() else ["not a short word about stories"]
    lines = reply.strip().split("\n")
    title = lines[0] if kind == "title" else ""
    story = "\n".join(lines[1:]) if title else reply.strip()
    problems = name_problems(story, check)
    sentences = re.findall(r"[^.!?]*[A-Za-z][^.!?]*[.!?]+", story)
    if len(sentences) < (2 if kind == "continue" else 3):
        problems.append("too few sentences")
    words = len(story.split())
    if kind == "create":
        problems += story_problems(story, check["words"] + check["who"], check["summary"])
    elif kind == "rename" and re.search(rf"\b{check['old']}\b", story):
        problems.append(f"{check['old']} is still there")
    elif kind == "shorter" and words > 0.8 * check["length"]:
        problems.append("not shorter")
    elif kind == "add_word":
        problems += story_problems(story, [check["word"]], "")
    elif kind == "ending":  # the last paragraph's mood moved the asked way (sad: below 0)
        now = mood(story.split("\n")[-1])
        moved = now - mood(check["last"])
        if not (moved > 0 if check["mood"] == "happy" else moved < 0 and now < 0):
            problems.append(f"the ending is not {check['mood']}")
    elif kind == "title" and not (0 < len(title.split()) <= 8 and title[-1:] not in ".!?\""):
        problems.append("no title line")
    elif kind == "continue" and words > max(40, 0.8 * check["length"]):
        problems.append("not a new paragraph")
    return problems

def pass_rates(replies, records):
    """{kind: the share of replies its checker passes, ..., "all": of every reply, "names":
    of the story replies, the share whose hero keeps one name} for records with a check
    (train.py's instruct.json); None for others."""
    if not all("check" in r for r in records):
        return None
    passed = Counter()
    counts = Counter()
    for reply, record in zip(replies, records):
        check = record["check"]
        counts.update([check["kind"], "all"])
        ok = not reply_problems(reply, check)
        passed.update({check["kind"]: ok, "all": ok})
        if check["kind"] != "offtopic":
            counts["names"] += 1
            passed["names"] += not name_problems(reply, check)
    order = sorted(counts, key=lambda kind: kind in ("all", "names"))  # those two last
    return {kind: passed[kind] / counts[kind] for kind in order}

# -----------------------------------------------------------------------------
# instruction data: records -> conversations -> (inputs, targets), the prompt masked

RASCHKA = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
           "01_main-chapter-code/instruction-data.json")
RASCHKA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"

def record_problem(record):
    # what is wrong with one record, or '' when it is fine
    if not isinstance(record, dict):
        return "is not a JSON object"
    if "messages" not in record:
        fields = [record.get("instruction"), record.get("output"), record.get("input", "")]
        ok = all(isinstance(f, str) for f in fields)
        return "" if ok else "lacks a string instruction or output"
    messages = record["messages"]
    if not isinstance(messages, list):
        return "has a messages field that is not a list"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "has a message without a string content"
        if m.get("role") not in ("system", "user", "assistant"):
            return f"has a message with role {m.get('role')!r}"
    if [m["role"] for m in messages[-2:]] != ["user", "assistant"]:
        return "does not end with a user turn and then an assistant turn"
    return ""

RECORD_SCHEMA = ("each record needs instruction and output strings (input optional) or "
                 "messages ending with a user turn and an assistant turn")

def read_records(path, problem=record_problem, schema=RECORD_SCHEMA):
    """A JSON list, or JSONL lines, of records checked by problem(record) (by default
    RECORD_SCHEMA's); a malformed file or record is an error naming both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass --dataset=stories or a .json(l) file")
    where = ""
    try:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".jsonl"):
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                where = f" on line {n}"
                if line.strip():
                    records.append(json.loads(line))
        else:
            records = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON{where} ({e}); fix it (UTF-8 JSON) "
                         f"or download it again") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} holds no records; it needs a JSON list or JSONL: {schema}")
    for k, record in enumerate(records):
        if what := problem(record):
            raise ValueError(f"{path}: record {k} {what}; {schema}")
    return records

def instruct_records(dataset, data_dir="data"):
    """--dataset's records: stories (train.py's held-out instruct.json), alpaca (Raschka's
    1,100 instructions, downloaded once) or the path of a JSON/JSONL file."""
    if dataset == "stories":
        path = os.path.join(data_dir, "stories", "instruct.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: `python train.py` writes it "
                                    f"(held-out stories as instructions)")
        return read_records(path)
    if dataset == "alpaca":
        path = os.path.join(data_dir, "instruct", "instruction-data.json")
        return read_records(fetch(RASCHKA, path, RASCHKA_SHA256))
    return read_records(dataset)

def split_records(items, val_size, test_size, seed):
    """Shuffled with seed: (train, val, test), the last two of val_size and test_size;
    records marked "heldout" (train.py's unseen phrasings) are the test set alone."""
    heldout = [r for r in items if isinstance(r, dict) and r.get("heldout")]
    if heldout:
        rest = [r for r in items if not (isinstance(r, dict) and r.get("heldout"))]
        train, val, _ = split_records(rest, val_size, 0, seed)
        return train, val, heldout[:test_size]
    if len(items) <= val_size + test_size:
        raise ValueError(f"{len(items)} examples leave none to train on after "
                         f"val_size={val_size} and test_size={test_size}; lower them or add data")
    items = list(items)
    random.Random(seed).shuffle(items)
    n = val_size + test_size
    return items[n:], items[:val_size], items[val_size:n]

def make_examples(tok, conversations, template, block_size, mask_prompt=True):
    """(examples, dropped, cut): each conversation as (x, y), y[t] = the token after x[t]
    or -100 where nothing is learned (the prompt, with mask_prompt). Past block_size + 1
    tokens a response is cut (losing its stop token); with no trained token left, dropped.
    finetune.py writes this out as its lesson; lora.py and dpo.py call it (a test keeps the
    two equal)."""
    examples = []
    dropped = cut = 0
    for messages in conversations:
        ids, mask = render_conversation(tok, messages, template)
        if 1 not in mask[1:block_size + 1]:  # nothing to learn inside the window
            dropped += 1
            continue
        cut += len(ids) > block_size + 1
        if not mask_prompt:
            mask = [1] * len(ids)
        ids = ids[:block_size + 1]  # so x and y have at most block_size tokens
        y = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
        examples.append((ids[:-1], y))
    return examples, dropped, cut

# -----------------------------------------------------------------------------
# helpers used by main: the naive baseline, the benchmark, the flags

def train_naive(text, vocab_size, pattern):
    # the baseline: train()'s distinct words, but every pair is recounted after each merge
    words, counts = count_words(text, SPLIT_PATTERNS[pattern], ["<|endoftext|>"])
    merges = []
    for new_id in range(256, vocab_size - 1):
        stats = defaultdict(int)
        for word, n in zip(words, counts):
            for pair in zip(word, word[1:]):
                stats[pair] += n
        merges.append(min(stats, key=lambda p: (-stats[p], p)))  # most frequent, smallest
        words = [merge(word, merges[-1], new_id) for word in words]
    return merges

def timed(fn, *args, **kwargs):  # CPU seconds of this process: fair on a busy machine
    t0 = time.process_time()
    return fn(*args, **kwargs), time.process_time() - t0

def read_text(path):
    # the --train file, or this very file (offline), checked before any work
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"bpe.py: error: {path} is not UTF-8 ({e.reason}); convert it: "
                         f"iconv -f latin1 -t utf-8") from None
    if not text:
        raise SystemExit(f"bpe.py: error: {path} is empty: nothing to learn merges from")
    return text

def bench(cfg):
    path = cfg.train or os.path.abspath(__file__)  # offline: this file, repeated to 1 MB
    text = read_text(path)
    text = (text * (1_000_000 // len(text) + 1))[:1_000_000]
    tok, t_fast = timed(Tokenizer().train, text, cfg.vocab_size, cfg.pattern)
    naive, t_naive = timed(train_naive, text, cfg.vocab_size, cfg.pattern)
    # encoding starts with a cold cache: each distinct chunk is merged once
    ids, t_python = timed(tok.encode, text, allowed_special="all")
    ids_tiktoken, t_tiktoken = timed(tok.to_tiktoken().encode, text, allowed_special="all")
    mb = len(text.encode("utf-8")) / 1e6
    result = {"speedup": t_naive / t_fast, "same_merges": naive == list(tok.merges),
              "same_ids": ids == ids_tiktoken}
    print(f"{len(text):,} chars of {os.path.normpath(path)}, vocab_size={cfg.vocab_size}, "
          f"CPU seconds")
    print(f"train:  incremental {t_fast:.2f} s, naive {t_naive:.2f} s -> "
          f"{result['speedup']:.1f}x faster, identical merges: {result['same_merges']}")
    print(f"encode: Python {mb / t_python:.2f} MB/s, tiktoken {mb / t_tiktoken:.2f} MB/s, "
          f"identical ids: {result['same_ids']}")
    return result

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
        extra = dict(type=kind)
        if kind is bool:  # a bare flag (`--bench`) means True
            extra = dict(type=to_bool, nargs="?", const=True)
        help = comments.get(field.name, "").replace("%", "%%")  # argparse formats with %
        parser.add_argument(f"--{field.name}", default=field.default, metavar=kind.__name__,
                            help=f"{help} (default: {field.default!r})", **extra)
    return config_class(**vars(parser.parse_args(argv)))

# -----------------------------------------------------------------------------
# the run

def main(cfg):
    """Benchmark, show --text via --tokenizer, train on --train, or (no flags) the demo."""
    if cfg.train and not os.path.isfile(cfg.train):
        raise SystemExit(f"bpe.py: error: --train={cfg.train}: no such file; pass the path "
                         f"of a UTF-8 text file")
    # --- the benchmark, or a tokenizer: loaded, or trained on --train or this very file
    try:  # a missing or corrupt file, GPT-2's files offline, a vocab_size the text can't fill
        if cfg.bench:
            return bench(cfg)
        if cfg.tokenizer:  # 'gpt2', a tok.json or a Hugging Face folder
            tok = Tokenizer.from_saved(cfg.tokenizer, cfg.gpt2_dir)
        else:
            text = read_text(cfg.train or os.path.abspath(__file__))
            tok, seconds = timed(Tokenizer().train, text, cfg.vocab_size, cfg.pattern, verbose=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"bpe.py: error: {e}") from None
    result = {}
    if not cfg.tokenizer:
        n_tokens = len(tok.to_tiktoken().encode(text, allowed_special="all"))
        bytes_per_token = len(text.encode("utf-8")) / max(1, n_tokens)
        result = {"seconds": seconds, "bytes_per_token": bytes_per_token}
        print(f"trained {len(tok.merges)} merges on {len(text):,} chars in {seconds:.2f} s; "
              f"compression {bytes_per_token:.2f} bytes per token")
        if cfg.train:
            tok.save(cfg.out)
            print(f"wrote {cfg.out}")
    # --- the ids and pieces of --text (partial UTF-8 shown escaped), and the round trip
    ids = tok.encode(cfg.text, allowed_special="all")
    pieces = [p.decode("utf-8", errors="backslashreplace") for p in tok.pieces(ids)]
    print(f"{len(ids)} ids: {ids}")
    print(f"pieces: {pieces}")
    print(f"round trip ok: {tok.decode(ids) == cfg.text}")
    return result | {"ids": ids}

if __name__ == "__main__":
    main(parse_args(BpeConfig))
