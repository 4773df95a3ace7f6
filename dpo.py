"""DPO and GRPO: tune a finetuned GPT on preferences, or on a reward, against a frozen copy.

What you learn here (LLM101n chapter 15, Build a LLM from Scratch's DPO chapter): how much
more the policy likes a response than the frozen reference does, beta * (log pi(y|x) -
log ref(y|x)), acts as a reward, and a logistic loss on the chosen-minus-rejected reward
trains the policy directly: no reward model, no sampling. The key equation (DPO):
    loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]).
The RL half (--method=grpo) samples a group of stories per prompt from the policy, scores
each with a program (bpe.py's checker) and raises the log-probs of those that beat their
group: A_i = (r_i - mean(r)) / std(r); loss = -min(ratio A, clip(ratio) A) + kl_coef * KL.
How to run:
    python dpo.py                  # ~5 min on a 2-core CPU: out-sft/ckpt.pt, its stories
    python dpo.py --loss=ipo --beta=0.5 --out_dir=out-ipo   # or --loss=cdpo, --loss=simpo
    python dpo.py --method=grpo --out_dir=out-grpo         # RL: the checkers reward
    python dpo.py --init_from=gpt2 --dataset=raschka --learning_rate=5e-6 --min_lr=5e-7
Depends on: gpt.py, bpe.py. Reads out-sft/ckpt.pt and data/stories/instruct.json; writes
out-dpo/ckpt.pt and out-dpo/eval.json (the before/after table).
References (arXiv): DPO 2305.18290; IPO 2310.12036; Mitchell 2023, a note on DPO with
noisy preferences (cDPO); SimPO 2405.14734; DeepSeekMath (GRPO) 2402.03300; PPO 1707.06347.
"""
import copy
import dataclasses
import math
import os
import random
import re
import time

import torch
import torch.nn.functional as F

from bpe import (Tokenizer, end_of_turn, instruct_records, make_examples, pass_rates, read_records,
                 record_messages, render_conversation, reply_problems, split_records)
from gpt import (UserError, collate, download, get_lr, heldout_loss, progress_bar,
                 refuse_overwrite, refuse_torchrun, require_positive, respond, run,
                 save_checkpoint, save_json, start_finetuning, user_input)

@dataclasses.dataclass
class DpoConfig:
    """Preference-tune a finetuned GPT; every field is a flag: --loss=ipo --beta=0.5"""
    # I/O
    ckpt_path: str = "out-sft/ckpt.pt"  # the start and the reference (from finetune.py)
    init_from: str = ""  # '' = ckpt_path; a Hub name (gpt2, Qwen/...) or folder
    out_dir: str = "out-dpo"  # ckpt.pt (the best checkpoint) and eval.json go here
    overwrite: bool = False  # replace a checkpoint already in out_dir (else an error)
    data_dir: str = "data"  # downloads; train.py wrote stories/instruct.json here
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    # pairs
    dataset: str = "stories"  # stories, raschka (preference JSON) or a .json/.jsonl file
    pairs: str = "both"  # stories: offline (corruptions), onpolicy (own samples), both
    samples: int = 4  # onpolicy: stories sampled per prompt; the best and worst pair up
    prompts: int = 128  # onpolicy, both: the training prompts the model samples for
    template: str = ""  # the chat template; '' = the one the checkpoint was tuned with
    val_size: int = 100  # held-out prompts (stories) or pairs: they pick the checkpoint
    test_size: int = 400  # held-out prompts and pairs for the before/after table
    # loss
    loss: str = "dpo"  # dpo, cdpo (label smoothing), ipo, simpo (no reference)
    beta: float = 0.1  # the reward's scale (simpo: typically 2.0)
    label_smoothing: float = 0.1  # cdpo: the chance that a pair's label is flipped
    gamma: float = 0.5  # simpo: the margin the length-normalised reward gap must clear
    nll_weight: float = 2.0  # + this x the chosen responses' per-token loss (RPO)
    # grpo: sampling and the checker's reward instead of pairs
    method: str = "dpo"  # dpo (a preference loss on pairs) or grpo (samples, a reward)
    group_size: int = 8  # grpo: stories per prompt; each is judged against its group
    prompts_per_step: int = 8  # grpo: prompts per sampling round
    inner_steps: int = 2  # grpo: optimizer steps on each round's samples (PPO's epochs)
    clip: float = 0.2  # grpo: pi / pi_old is clipped to [1 - clip, 1 + clip]; inf = never
    kl_coef: float = 0.04  # grpo: the weight of the k3 KL penalty to the reference
    temperature: float = 1.0  # grpo: the sampling temperature
    unfinished_penalty: float = 0.5  # grpo: taken off the reward of a story that never ends
    # training
    max_iters: int = 150  # optimizer steps; -1 = epochs x batches per epoch
    epochs: int = 1  # passes over the pairs, when max_iters is -1
    batch_size: int = 8  # pairs per step (16 sequences in one forward pass)
    learning_rate: float = 0.0  # peak, after warmup; 0 = 3e-5 (dpo) or 3e-4 (grpo)
    min_lr: float = -1.0  # the cosine ends here; -1 = learning_rate / 10
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay of matrices
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    eval_interval: int = 25  # steps between held-out evaluations (and saves when better)
    log_interval: int = 10  # steps between log lines, with the rewards
    max_new_tokens: int = 200  # the longest story sampled or answered
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 1337  # the split, the corruptions, the samples, the batch order

RASCHKA_PREFERENCE = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                      "04_preference-tuning-with-dpo/instruction-data-with-preference.json")

# -----------------------------------------------------------------------------
# the lesson: sequence log-probabilities and the preference losses

def token_logprobs(logits, targets):
    # each target's log-probability under logits (B, T, V): (B, T); 0 where it is -100
    return -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                            ignore_index=-100, reduction="none").view(targets.shape)

def sequence_logprobs(logits, targets):
    """Per row of (B, T) targets: the summed log-probability of the trained tokens (the
    response and its stop token: targets != -100) and their count. -> ((B,), (B,))."""
    return token_logprobs(logits, targets).sum(1), (targets != -100).sum(1)

def preference_loss(kind, pc, pr, rc, rr, nc, nr, beta, label_smoothing=0.0, gamma=0.0):
    """Per pair: the loss of the policy's log-probs pc (chosen), pr (rejected) against the
    reference's rc, rr; nc, nr count the tokens. -> (loss, chosen reward, rejected reward)."""
    if kind == "simpo":  # no reference; rewards are length-normalised log-probs
        # -log sigmoid(beta * (pc / nc - pr / nr) - gamma)
        reward_c = beta * pc / nc
        reward_r = beta * pr / nr
        return -F.logsigmoid(reward_c - reward_r - gamma), reward_c, reward_r
    reward_c = beta * (pc - rc)
    reward_r = beta * (pr - rr)
    h = (pc - rc) - (pr - rr)  # how much more than the reference the policy prefers chosen
    if kind == "dpo":  # -log sigmoid(beta * h): ln 2 at the start, 0 as h grows
        loss = -F.logsigmoid(beta * h)
    elif kind == "cdpo":  # a label flipped with probability eps: the loss bottoms out
        # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        loss = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    else:  # ipo: (h - 1 / (2 beta))^2, a target margin instead of an ever-growing one
        loss = (h - 1 / (2 * beta)) ** 2
    return loss, reward_c, reward_r

def score(model, pairs, pad_id, device, ctx):
    """The chosen and the rejected responses' sequence log-probs and token counts, in one
    forward pass over 2B rows. -> (chosen logp, rejected logp, chosen n, rejected n)."""
    x, y = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id, device)
    with ctx:
        logits = model(x)[0]
    logp, n = sequence_logprobs(logits, y)
    B = len(pairs)
    return logp[:B], logp[B:], n[:B], n[B:]

@torch.no_grad()
def reference_logprobs(ref, pairs, batch_size, pad_id, device, ctx):
    # the frozen reference scores every pair once: (N, 2) log-probs, chosen then rejected
    out = [torch.stack(score(ref, pairs[i:i + batch_size], pad_id, device, ctx)[:2], 1)
           for i in range(0, len(pairs), batch_size)]
    return torch.cat(out)

# -----------------------------------------------------------------------------
# preference pairs: (prompt messages, chosen text, rejected text)

def corrupt(record, other, fault):
    """The record's reply with one fault, or None: 'before' is the story as it was before
    the request (a refinement not done), 'drift' renames the hero halfway to other's,
    'word' swaps a required word for one of other's, 'other' is other's reply."""
    check = record["check"]
    messages = record["messages"]
    reply = messages[-1]["content"]
    if fault == "before":
        return messages[-3]["content"] if len(messages) > 2 else None
    if fault == "drift" and check.get("hero") and other["check"].get("hero"):
        half = len(reply) // 2
        new = other["check"]["hero"]
        return reply[:half] + re.sub(rf"\b{check['hero']}\b", new, reply[half:])
    if fault == "word" and check.get("words") and other["check"].get("words"):
        fresh = [w for w in other["check"]["words"] if not re.search(rf"\b{w}\b", reply, re.I)]
        old = rf"\b{re.escape(check['words'][0])}\b"
        return re.sub(old, fresh[0], reply, flags=re.I) if fresh else None
    return other["messages"][-1]["content"] if fault == "other" else None

def story_pairs(records, seed):
    """Offline pairs: chosen is a record's own reply, rejected a corruption its checker
    rejects (the faults rotate; a record that none of them breaks is skipped)."""
    rng = random.Random(seed)
    pairs = []
    for k, record in enumerate(records):
        other = records[(k + 1 + rng.randrange(max(1, len(records) - 1))) % len(records)]
        faults = ["before", "drift", "word", "other"]
        for fault in faults[k % 4:] + faults[:k % 4]:
            rejected = corrupt(record, other, fault) if other is not record else None
            if rejected and reply_problems(rejected, record["check"]):
                pairs.append((record["messages"][:-1], record["messages"][-1]["content"],
                              rejected))
                break
    return pairs

@torch.no_grad()
def onpolicy_pairs(model, tok, records, prompts, k, max_new_tokens, ctx, seed):
    """The model's own mistakes as pairs: k stories sampled for each record's prompt (ids)
    and ranked by story_reward (below); the best and the worst pair up if they differ."""
    model.eval()
    stop = end_of_turn(tok)
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    pairs = []
    for i in range(0, len(records), 16):  # 16 prompts x k samples in one batch
        with ctx:
            new = model.generate([p for p in prompts[i:i + 16] for _ in range(k)],
                                 max_new_tokens, 1.0, eot_id=stop, generator=generator)
        for j, record in enumerate(records[i:i + 16]):
            stories = [tok.decode(ids).strip() for ids in new[j * k:(j + 1) * k]]
            ranked = sorted(stories, key=lambda s: story_reward(s, record))
            if story_reward(ranked[-1], record) > story_reward(ranked[0], record):
                pairs.append((record_messages(record)[:-1], ranked[-1], ranked[0]))
    print(f"on-policy pairs: {len(pairs)} of {len(records)} prompts x {k} stories differ")
    return pairs

def file_pairs(path, allow_ties=False):
    """Pairs from a JSON/JSONL file of {prompt | instruction (+ input), chosen, rejected};
    allow_ties skips records whose chosen == rejected (Raschka's has 6 of 1,100)."""
    def problem(r):  # what is wrong with one record, or ''
        if not isinstance(r, dict):
            return "is not a JSON object"
        texts = [r.get("prompt", r.get("instruction")), r.get("chosen"), r.get("rejected")]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            return "lacks a non-empty prompt, chosen or rejected"
        if texts[1] == texts[2] and not allow_ties:
            return "has chosen == rejected: nothing to prefer"
        return ""
    schema = "each record needs a prompt (or instruction), chosen and rejected strings"
    records = read_records(path, problem, schema)
    pairs = []
    for r in [r for r in records if r["chosen"] != r["rejected"]]:
        prompt = dict(instruction=r.get("prompt", r.get("instruction")), input=r.get("input", ""))
        pairs.append((record_messages(prompt), r["chosen"], r["rejected"]))
    return pairs

def pair_examples(tok, pairs, template, block_size):
    """Each (prompt, chosen, rejected) rendered once, as masked examples ((x, y) chosen,
    (x, y) rejected); a pair with a response outside the window is dropped."""
    out = []
    for prompt, chosen, rejected in pairs:
        chats = [prompt + [{"role": "assistant", "content": t}] for t in (chosen, rejected)]
        examples, dropped, _ = make_examples(tok, chats, template, block_size)
        if not dropped:
            out.append(tuple(examples))
    return out

# -----------------------------------------------------------------------------
# GRPO: sample a group of stories per prompt, reward each, push up the better ones

def story_reward(reply, record):
    """GRPO's reward in [0, 1]: 1 for a reply its checker passes, a third less for each
    problem it finds (a missing word, a changed name, no title, ...); 0 for too few
    sentences or a loop (one distinct word in three): a list or a refrain never pays."""
    words = re.findall(r"[A-Za-z']+", reply.lower())
    problems = reply_problems(reply, record["check"])
    if len(set(words)) < len(words) / 3 or not words or "too few sentences" in problems:
        return 0.0
    return max(0.0, 1 - len(problems) / 3)

def group_advantages(rewards, group_size, eps=1e-4):
    """(r - mean) / (std + eps) within each group of group_size rewards: a sample rises by
    beating its siblings, so equal rewards (or a group of one: std 0) teach nothing."""
    r = rewards.view(-1, group_size)
    std = r.std(1, correction=0, keepdim=True)
    return ((r - r.mean(1, keepdim=True)) / (std + eps)).flatten()

def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip, kl_coef):
    """The GRPO objective, a mean over the response tokens (mask (B, T); DAPO's token
    mean). ratio = pi / pi_old; PPO's -min(ratio A, clip(ratio, 1 - clip, 1 + clip) A)
    stops a token's gradient once its ratio passes the clip in the advantage's direction;
    k3 = ref/pi - log(ref/pi) - 1 >= 0 estimates KL(pi || ref) without bias. kl_coef=0 and
    clip=inf leave REINFORCE with the group mean as baseline (nanochat's).
    -> (loss, mean k3, the share of clipped tokens)."""
    ratio = torch.exp(logp - old_logp)                                      # (B, T)
    adv = advantages[:, None]
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    log_r = ref_logp - logp
    k3 = torch.exp(log_r) - log_r - 1
    n = mask.sum()
    loss = ((kl_coef * k3 - surrogate) * mask).sum() / n
    clipped = (((ratio - 1).abs() > clip) & mask).sum() / n
    return loss, (k3 * mask).sum() / n, clipped

@torch.no_grad()
def rollout(model, ref, prompts, group_size, max_new_tokens, reward_fn, stop, ctx, generator,
            temperature=1.0, penalty=0.5):
    """group_size completions of each prompt (token ids), each rewarded reward_fn(k, ids)
    (less penalty if it never stops) and scored under the reference. -> a dict of (B, T)
    x, y, ref, the (B,) advantages and the logged numbers."""
    model.eval()
    room = model.config.block_size - max(map(len, prompts))  # one pass scores it all
    max_new_tokens = max(1, min(max_new_tokens, room))
    with ctx:
        new = model.generate([p for p in prompts for _ in range(group_size)], max_new_tokens,
                             temperature=temperature, eot_id=stop, generator=generator)
    rows = []
    rewards = []
    for i, ids in enumerate(new):
        stopped = len(ids) < max_new_tokens  # generate cuts the stop token off
        prompt = prompts[i // group_size]
        full = prompt + ids + [stop] * stopped
        rows.append((full[:-1], [-100] * (len(prompt) - 1) + full[len(prompt):]))
        rewards.append(reward_fn(i // group_size, ids) - penalty * (not stopped))
    device = model.lm_head.weight.device
    x, y = collate(rows, 0, device)  # pads are never attended to by real tokens or trained
    with ctx:
        ref_logp = token_logprobs(ref(x)[0], y)
    rewards = torch.tensor(rewards, device=device)
    groups = rewards.view(-1, group_size)
    return dict(x=x, y=y, ref=ref_logp, advantages=group_advantages(rewards, group_size),
                reward=rewards.mean().item(), length=sum(map(len, new)) / len(new),
                no_signal=(groups == groups[:, :1]).all(1).float().mean().item())

# -----------------------------------------------------------------------------
# helpers used by main: the data, the measurements, the flags

@dataclasses.dataclass
class Split:  # one split's data, all built before training starts
    records: list  # story records (the checker's words and summary); [] for a pair file
    prompts: list  # prompts rendered once: token ids that end with the assistant header
    pairs: list  # ((x, y) chosen, (x, y) rejected), each rendered once
    ref: torch.Tensor = None  # (len(pairs), 2): the frozen reference's log-probs

def build_data(cfg, model, tok, template, ctx):
    """(train, val, test) Splits, split as finetune.py splits the same records (the same
    test prompts), each prompt and pair rendered once. On the stories, offline pairs in
    every split and, for DPO, the model's own among the training ones (--pairs)."""
    with user_input():  # bpe.py's errors for a missing or malformed file: one line
        if cfg.dataset == "stories":
            items = instruct_records("stories", cfg.data_dir)
        elif cfg.dataset == "raschka":
            path = os.path.join(cfg.data_dir, "preference",
                                "instruction-data-with-preference.json")
            items = file_pairs(download(RASCHKA_PREFERENCE, path), allow_ties=True)
        else:
            items = file_pairs(cfg.dataset)
        train, val, test = split_records(items, cfg.val_size, cfg.test_size, cfg.seed)
    if cfg.max_iters > 0:  # one pass over the records the steps use is enough
        train = train[:cfg.max_iters * max(cfg.batch_size, cfg.prompts_per_step)]
    block = model.config.block_size
    if cfg.dataset != "stories":  # pairs, and the test prompts for the table
        prompts = [render_conversation(tok, p, template)[0] for p, _, _ in test]
        train, val, test = [pair_examples(tok, p, template, block) for p in (train, val, test)]
        return [Split([], [], train), Split([], [], val), Split([], prompts, test)]
    sampling = cfg.method == "dpo" and cfg.pairs != "offline"
    data = []
    for k, records in enumerate([train, val, test]):
        prompts = [render_conversation(tok, record_messages(r)[:-1], template)[0] for r in records]
        pairs = []
        if k == 0 and sampling:  # the model's best and worst reply, for the first prompts
            pairs = onpolicy_pairs(model, tok, records[:cfg.prompts], prompts[:cfg.prompts],
                                   cfg.samples, cfg.max_new_tokens, ctx, cfg.seed)
        if k > 0 or (cfg.method == "dpo" and cfg.pairs != "onpolicy"):
            pairs += story_pairs(records, cfg.seed + k)  # held-out pairs are all offline
        data.append(Split(records, prompts, pair_examples(tok, pairs, template, block)))
    return data

def summarize(losses, reward_c, reward_r, kl):
    # the logged numbers of a batch or a held-out set, from per-pair tensors
    return dict(loss=losses.mean().item(), chosen=reward_c.mean().item(),
                rejected=reward_r.mean().item(),
                accuracy=(reward_c > reward_r).float().mean().item(),
                margin=(reward_c - reward_r).mean().item(), kl=kl.mean().item())

def show(s):
    return (f"rewards/chosen {s['chosen']:.3f} | rewards/rejected {s['rejected']:.3f} | "
            f"accuracy {s['accuracy']:.1%} | margin {s['margin']:.3f} | kl {s['kl']:.4f}")

@torch.no_grad()
def pair_metrics(model, split, cfg, pad_id, device, ctx):
    """Loss, rewards, reward accuracy and margin over a split's pairs, and a KL estimate:
    the mean per-token log-ratio of policy to reference on the chosen responses."""
    model.eval()
    parts = []
    for i in range(0, len(split.pairs), cfg.batch_size):
        pc, pr, nc, nr = score(model, split.pairs[i:i + cfg.batch_size], pad_id, device, ctx)
        rc, rr = split.ref[i:i + cfg.batch_size].unbind(1)
        loss, reward_c, reward_r = preference_loss(cfg.loss, pc, pr, rc, rr, nc, nr,
                                                   cfg.beta, cfg.label_smoothing, cfg.gamma)
        parts.append(torch.stack([loss, reward_c, reward_r, (pc - rc) / nc]))
    return summarize(*torch.cat(parts, 1))

def mean_reward(stories, records):  # None without story records
    return sum(map(story_reward, stories, records)) / len(records) if records else None

def evaluate(cfg, model, tok, val, device, ctx):
    """What picks the checkpoint, lower is better: on the stories minus the mean reward of
    the greedy stories for the val prompts (the task itself), else the val pairs' loss."""
    stop = end_of_turn(tok)
    if cfg.method == "dpo":
        stats = pair_metrics(model, val, cfg, stop, device, ctx)
        print(f"held-out pairs: loss {stats['loss']:.4f} | {show(stats)}")
        if not val.records:
            return stats["loss"]
    stories = respond(model, tok, val.prompts, cfg.max_new_tokens, stop, ctx)
    reward = mean_reward(stories, val.records)
    print(f"held-out prompts: mean reward {reward:.3f}")
    return -reward

def measure(cfg, model, tok, test, device, ctx):
    """A column of the before/after table: the test pairs' accuracy, margin and KL; the
    greedy replies' pass rates and reward; what DPO costs the chosen responses' loss."""
    stop = end_of_turn(tok)
    stories = respond(model, tok, test.prompts, cfg.max_new_tokens, stop, ctx)
    lengths = [len(tok.encode(s, allowed_special="none")) for s in stories]
    chosen = [c for c, _ in test.pairs]
    passes = pass_rates(stories, test.records) if test.records else {}
    return dict(pair_metrics(model, test, cfg, stop, device, ctx), passes=passes,
                reward=mean_reward(stories, test.records),
                chosen_loss=heldout_loss(model, chosen, cfg.batch_size, stop, device, ctx),
                response_tokens=sum(lengths) / len(lengths))

def check_config(cfg):
    for flag, allowed in [("loss", ("dpo", "cdpo", "ipo", "simpo")), ("method", ("dpo", "grpo")),
                          ("pairs", ("offline", "onpolicy", "both"))]:
        if getattr(cfg, flag) not in allowed:
            raise UserError(f"--{flag}={getattr(cfg, flag)!r} is unknown; use one of "
                            f"{', '.join(allowed)}")
    if cfg.pairs != "offline" and cfg.samples < 2:
        raise UserError(f"--samples={cfg.samples}: on-policy pairs need at least 2 stories "
                        f"per prompt (or pass --pairs=offline)")
    if not cfg.beta > 0 or not 0 <= cfg.label_smoothing < 0.5:  # "not > 0" refuses nan
        raise UserError(f"--beta={cfg.beta} must be > 0 (dpo: about 0.1) and "
                        f"--label_smoothing={cfg.label_smoothing} in [0, 0.5)")
    if cfg.method == "grpo" and (cfg.dataset != "stories" or not cfg.clip > 0):
        raise UserError("--method=grpo needs --dataset=stories (the checker is the reward) "
                        "and --clip > 0")
    require_positive(cfg, "batch_size", "eval_interval", "log_interval", "val_size",
                     "test_size", "prompts", "group_size", "prompts_per_step",
                     "inner_steps", "max_new_tokens")
    learning_rate = cfg.learning_rate or {"dpo": 3e-5, "grpo": 3e-4}[cfg.method]
    min_lr = learning_rate / 10 if cfg.min_lr < 0 else cfg.min_lr
    return dataclasses.replace(cfg, learning_rate=learning_rate, min_lr=min_lr)

# -----------------------------------------------------------------------------
# the training loop: DPO steps on batches of pairs, GRPO steps on sampled rounds

def train(cfg, model, ref, tok, train_data, val, device, ctx, ckpt_path, meta):
    """AdamW, warmup then a cosine, the gradient norm clipped. DPO: the preference loss on
    batches of pairs; GRPO: a round of stories sampled for prompts_per_step prompts, then
    inner_steps steps on it. The model ends at its best evaluation, saved at ckpt_path."""
    stop = end_of_turn(tok)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (0.9, 0.999), torch.device(device).type)
    scaler = torch.amp.GradScaler(enabled=cfg.dtype == "float16")  # float16 underflows
    grpo = cfg.method == "grpo"
    repeat = cfg.inner_steps if grpo else 1  # a GRPO round serves inner_steps steps
    size = cfg.prompts_per_step if grpo else cfg.batch_size
    n = len(train_data.records if grpo else train_data.pairs)
    per_epoch = math.ceil(n / size) * repeat
    steps = cfg.max_iters if cfg.max_iters > 0 else cfg.epochs * per_epoch
    rng = random.Random(cfg.seed)
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed)
    print(f"training: {steps} steps ({per_epoch} per epoch)")
    best = float("inf")
    t_start = time.time()
    for step in range(steps + 1):
        if step % cfg.eval_interval == 0 or step == steps:
            held_out = evaluate(cfg, model, tok, val, device, ctx)
            print(f"step {step}: val loss {held_out:.4f}")
            if step == 0 or held_out < best:  # a copy in memory, and the checkpoint
                best = held_out
                best_state = copy.deepcopy(model.state_dict())
                save_checkpoint(ckpt_path, model, step=step, val_loss=held_out, **meta)
        if step == steps:
            break
        t0 = time.time()
        if step % per_epoch == 0:  # a new epoch: the indices in a fresh order
            order = rng.sample(range(n), n)
        first = (step % per_epoch) // repeat * size  # (GRPO: one round, repeat steps)
        batch = order[first:first + size]
        if cfg.method == "dpo":
            model.train()
            pairs = [train_data.pairs[i] for i in batch]
            pc, pr, nc, nr = score(model, pairs, stop, device, ctx)
            rc, rr = train_data.ref[batch].unbind(1)
            pair_loss, reward_c, reward_r = preference_loss(
                cfg.loss, pc, pr, rc, rr, nc, nr, cfg.beta, cfg.label_smoothing, cfg.gamma)
            # RPO's NLL term (Pang et al. 2024): DPO alone may lower the chosen responses
            loss = pair_loss.mean() + cfg.nll_weight * (-pc / nc).mean()
            tokens = int((nc + nr).sum())
            log = step % cfg.log_interval == 0
            if log:
                detail = show(summarize(pair_loss, reward_c, reward_r, (pc - rc) / nc))
        else:
            inner = step % repeat
            if inner == 0:  # a new round: sample, reward, score under the reference
                records = [train_data.records[i] for i in batch]
                sampled = rollout(model, ref, [train_data.prompts[i] for i in batch],
                                  cfg.group_size, cfg.max_new_tokens,
                                  lambda k, ids: story_reward(tok.decode(ids), records[k]),
                                  stop, ctx, generator, cfg.temperature,
                                  cfg.unfinished_penalty)
            model.train()
            mask = sampled["y"] != -100
            with ctx:
                logp = token_logprobs(model(sampled["x"])[0], sampled["y"])
            if inner == 0:  # the policy has not moved since it sampled: pi_old, ratio 1
                old_logp = logp.detach()
            loss, kl, clipped = grpo_loss(logp, old_logp, sampled["ref"],
                                          sampled["advantages"], mask, cfg.clip, cfg.kl_coef)
            tokens = int(mask.sum())
            # log at a round's last step, off pi_old: the clipped share shows it moved
            log = inner == repeat - 1 and (step + 1) % cfg.log_interval < repeat
            if log:
                detail = (f"reward {sampled['reward']:.3f} | no-signal groups "
                          f"{sampled['no_signal']:.0%} | kl {kl.item():.4f} | clipped "
                          f"{clipped.item():.1%} | length {sampled['length']:.0f}")
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = get_lr(step, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters, steps)
        for group in optimizer.param_groups:  # the update below takes this learning rate
            group["lr"] = lr
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss.item()  # waits for the device, so the step time is honest
        dt = time.time() - t0
        if log:
            bar = progress_bar(step + 1, steps, (time.time() - t_start) / (step + 1))
            print(f"step {step:5d}/{steps} | loss {train_loss:.4f} | lr {lr:.2e} | "
                  f"{1000 * dt:.0f} ms | {tokens / dt:,.0f} tok/s | {bar}\n  {detail}",
                  flush=True)
    model.load_state_dict(best_state)
    return time.time() - t_start

def main(cfg):
    refuse_torchrun("dpo.py")
    cfg = check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    refuse_overwrite(ckpt_path, cfg.overwrite)
    if not cfg.init_from and not os.path.isfile(cfg.ckpt_path):
        raise UserError(f"no checkpoint at {cfg.ckpt_path}; finetune one first with "
                        f"`python finetune.py` (it writes out-sft/ckpt.pt)")
    cfg, device, ctx, model, saved_tok = start_finetuning(cfg)
    template = cfg.template or "phi3"
    if not cfg.init_from and not cfg.template:  # the one the model was tuned with
        saved = torch.load(cfg.ckpt_path, "cpu", weights_only=True)
        template = saved.get("chat_template", template)
    with user_input():  # GPT-2's tokenizer files may be missing, offline
        tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    model.vocab_used = tok.vocab_size  # rows past the tokenizer's ids are never sampled
    template = tok.chat_template or template  # a Hub model's own
    tok.chat_template = template  # so end_of_turn(tok) below ends turns as it does
    with user_input():  # a template whose end token the tokenizer lacks
        end_of_turn(tok)
    # the reference: a frozen copy of the starting model, never trained (eval: no dropout)
    ref = copy.deepcopy(model).eval().requires_grad_(False)

    # --- all the data first: prompts and pairs, rendered once; the reference's log-probs
    data = build_data(cfg, model, tok, template, ctx)
    train_data, val, test = data
    if not ((train_data.pairs or cfg.method == "grpo") and val.pairs and test.pairs):
        raise UserError(f"no train, val or test pair: too few records, or none fits "
                        f"block_size={model.config.block_size}")
    print(f"pairs: {len(train_data.pairs)} train, {len(val.pairs)} val, "
          f"{len(test.pairs)} test ({cfg.dataset}); template "
          f"{template if isinstance(template, str) else 'of the model'}")
    for split in data:
        if split.pairs:
            split.ref = reference_logprobs(ref, split.pairs, cfg.batch_size,
                                           end_of_turn(tok), device, ctx)

    # --- before, training, after
    before = measure(cfg, model, tok, test, device, ctx)
    meta = dict(tokenizer=saved_tok, train_config=dataclasses.asdict(cfg), chat_template=template)
    seconds = train(cfg, model, ref, tok, train_data, val, device, ctx, ckpt_path, meta)
    after = measure(cfg, model, tok, test, device, ctx)
    rows = dict(before=before, after=after, test_pairs=len(test.pairs), train_seconds=seconds)
    print(f"done: {seconds:.0f} s of training; saved {ckpt_path}")
    name = cfg.loss if cfg.method == "dpo" else "grpo"
    print(f"{'held-out':28s} {'start':>10s} {name:>10s}")
    formats = dict(accuracy=".1%", margin=".3f", reward=".3f", chosen_loss=".4f",
                   response_tokens=".1f", kl=".4f")
    for key, fmt in formats.items():
        cells = ["-" if r[key] is None else format(r[key], fmt) for r in (before, after)]
        print(f"{key:28s} {cells[0]:>10s} {cells[1]:>10s}")
    for kind in before["passes"]:  # the checkers' pass rates, a row per kind of request
        print(f"{'passes: ' + kind:28s} {before['passes'][kind]:10.1%} "
              f"{after['passes'][kind]:10.1%}")
    save_json(os.path.join(cfg.out_dir, "eval.json"), rows)
    return dict(rows, ckpt_path=ckpt_path)

if __name__ == "__main__":
    run(main, DpoConfig)
