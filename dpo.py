"""DPO and GRPO: align a finetuned GPT with preferences, or with a reward, against a frozen copy.

What you learn here (LLM101n chapter 15, Build a LLM from Scratch's DPO chapter): how much more the
policy likes a response than the frozen reference does, beta * (log pi(y|x) - log ref(y|x)), acts
as a reward, and a logistic loss on the chosen-minus-rejected reward trains the policy directly: no
reward model, no sampling. The key equation (DPO):
    loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]).
And the RL half (--method=grpo): sample a group of stories per prompt from the policy itself, score
each with a program (the story checker), and raise the log-probs of those that beat their group:
    A_i = (r_i - mean(r)) / std(r);  loss = -min(ratio A, clip(ratio) A) + kl_coef * KL(pi || ref).
How to run:
    python dpo.py                      # ~3.5 min on a 2-core CPU: out-sft/ckpt.pt, its own stories
    python dpo.py --loss=ipo --beta=0.5 --out_dir=out-ipo       # or --loss=cdpo, --loss=simpo
    python dpo.py --method=grpo --out_dir=out-grpo             # ~8.5 min
    python dpo.py --method=grpo --bench     # sampling: the KV cache, its fused kernel, no cache
    python dpo.py --init_from=gpt2 --dataset=raschka --learning_rate=5e-6 --min_lr=5e-7
Depends on: gpt.py, bpe.py (the template, the story checker, the training loop). Reads
out-sft/ckpt.pt from finetune.py and data/stories/instruct.json from train.py; writes
out-dpo/ckpt.pt and out-dpo/eval.json (the before/after table).
References: Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290; Azar et al.
2023, IPO, arXiv:2310.12036; Mitchell 2023, a note on DPO with noisy preferences (cDPO); Meng et
al. 2024, SimPO, arXiv:2405.14734; Shao et al. 2024, DeepSeekMath (GRPO), arXiv:2402.03300;
Schulman et al. 2017, PPO, arXiv:1707.06347.
"""
import copy
import dataclasses
import os
import random
import re
import time

import torch
import torch.nn.functional as F

from bpe import (STOP, Tokenizer, constraints_met, fetch, instruct_records, make_examples,
                 read_records, record_messages, render_conversation, split_records,
                 story_problems)
import gpt
from gpt import (collate, fit, heldout_loss, refuse_overwrite, refuse_torchrun,
                 require_positive, respond, run_main, save_checkpoint, save_json,
                 start_finetuning)

@dataclasses.dataclass
class DpoConfig:
    """Preference-tune a finetuned GPT; every field is a flag: --loss=ipo --beta=0.5"""
    # I/O
    ckpt_path: str = "out-sft/ckpt.pt"  # the policy's start and the reference, from finetune.py
    init_from: str = ""  # '' = ckpt_path; gpt2, gpt2-medium, ... or a .safetensors: OpenAI's GPT-2
    out_dir: str = "out-dpo"  # ckpt.pt (the best checkpoint) and eval.json go here
    overwrite: bool = False  # replace a checkpoint already in out_dir (else that is an error)
    data_dir: str = "data"  # downloads are cached here; train.py wrote stories/instruct.json
    gpt2_dir: str = "data/gpt2"  # GPT-2's tokenizer files, for --init_from=gpt2
    # pairs
    dataset: str = "stories"  # stories, raschka (preference JSON), or a prompt/chosen/rejected file
    pairs: str = "both"  # stories: offline (corruptions), onpolicy (the model's own samples), both
    samples: int = 4  # onpolicy: stories sampled per prompt; the best and the worst make a pair
    prompts: int = 400  # onpolicy, both: the training prompts (sampled for, and corrupted)
    template: str = ""  # the chat template; '' = the one the checkpoint was finetuned with
    val_size: int = 100  # held-out records: prompts (stories) or pairs that pick the best checkpoint
    test_size: int = 200  # held-out records: prompts and pairs for the before/after table
    # loss
    loss: str = "dpo"  # dpo, cdpo (label smoothing), ipo, simpo (no reference)
    beta: float = 0.1  # the reward's scale (simpo: typically 2.0)
    label_smoothing: float = 0.1  # cdpo: the chance that a pair's label is flipped
    gamma: float = 0.5  # simpo: the margin the length-normalised reward gap must clear
    nll_weight: float = 2.0  # + this x the chosen responses' per-token loss (RPO): they stay likely
    # grpo: --method=grpo samples stories and learns from the checker's reward instead of pairs
    method: str = "dpo"  # dpo (a preference loss on pairs) or grpo (sampling and a reward)
    group_size: int = 8  # grpo: stories sampled per prompt; each is judged against its group
    prompts_per_step: int = 8  # grpo: prompts per sampling round
    inner_steps: int = 2  # grpo: optimizer steps on each round's samples (PPO's epochs)
    clip: float = 0.2  # grpo: pi / pi_old is clipped to [1 - clip, 1 + clip]; inf = never
    kl_coef: float = 0.04  # grpo: the weight of the k3 KL penalty to the reference; 0 = none
    temperature: float = 1.0  # grpo: the sampling temperature
    unfinished_penalty: float = 0.5  # grpo: taken off the reward of a story that never stops
    bench: bool = False  # grpo: time one sampling round with and without the KV cache, and exit
    # training
    max_iters: int = 150  # optimizer steps; -1 = epochs x batches per epoch
    epochs: int = 1  # passes over the pairs, when max_iters is -1
    batch_size: int = 8  # pairs per step (16 sequences in one forward pass)
    learning_rate: float = 0.0  # peak, after warmup; 0 = per method: 1e-4 (dpo), 3e-4 (grpo)
    min_lr: float = -1.0  # the cosine ends here; -1 = learning_rate / 10
    warmup_iters: int = 20  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decay of matrices
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 = off
    eval_interval: int = 25  # steps between held-out evaluations (and saves when it improves)
    log_interval: int = 10  # steps between log lines, with the rewards
    max_new_tokens: int = 200  # the longest greedy response in the table
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    seed: int = 1337  # the split, the corruptions, the batch order

RASCHKA_PREFERENCE = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                      "04_preference-tuning-with-dpo/instruction-data-with-preference.json")
LOSSES = ("dpo", "cdpo", "ipo", "simpo")

# -----------------------------------------------------------------------------
# preference pairs: (prompt messages, chosen text, rejected text)

def corrupt(record, other, kind):
    """The true story of record with one documented fault, or None when that fault cannot be
    made: 'word' swaps every use of a required word for a required word of other, 'hero' renames
    the hero (the summary's first name) to other's hero, 'ending' takes other's last paragraph."""
    story = record["output"]
    if kind == "word":
        present = [w for w in record["words"] if w not in other["words"]]
        fresh = [w for w in other["words"] if not re.search(rf"\b{w}\b", story, re.IGNORECASE)]
        if not present or not fresh:
            return None
        return re.sub(rf"\b{re.escape(present[0])}\b", fresh[0], story, flags=re.IGNORECASE)
    if kind == "hero":
        hero = re.findall(r"\b[A-Z][a-z]+\b", record["summary"])[:1]
        new = [n for n in re.findall(r"\b[A-Z][a-z]+\b", other["summary"]) if n not in story]
        return re.sub(rf"\b{hero[0]}\b", new[0], story) if hero and new else None
    return "\n".join(story.split("\n")[:-1] + other["output"].split("\n")[-1:])

def story_pairs(records, seed):
    """Offline pairs from held-out story records: chosen is the true story, rejected a corruption
    that the checker rejects (the kinds rotate; a record none of them breaks is skipped)."""
    rng = random.Random(seed)
    pairs = []
    for k, record in enumerate(records):
        other = records[(k + 1 + rng.randrange(max(1, len(records) - 1))) % len(records)]
        kinds = ["word", "hero", "ending"]
        for kind in kinds[k % 3:] + kinds[:k % 3]:
            rejected = corrupt(record, other, kind) if other is not record else None
            if rejected and story_problems(rejected, record["words"], record["summary"]):
                pairs.append((record_messages(record)[:-1], record["output"], rejected))
                break
    return pairs

PAIR_SCHEMA = ("each record needs a prompt (or instruction, with an optional input) and "
               "different, non-empty chosen and rejected strings")

def pair_problem(record, allow_ties=False):
    # what is wrong with one preference record, or '' when it is fine
    if not isinstance(record, dict):
        return "is not a JSON object"
    prompt = record.get("prompt", record.get("instruction"))
    chosen = record.get("chosen")
    rejected = record.get("rejected")
    if not all(isinstance(t, str) and t.strip() for t in (prompt, chosen, rejected)):
        return "lacks a non-empty prompt, chosen or rejected"
    if chosen == rejected and not allow_ties:
        return "has chosen == rejected: nothing to prefer"
    return ""

def file_pairs(path, allow_ties=False):
    """Pairs from a JSON/JSONL file of {prompt | instruction (+ input), chosen, rejected} records,
    each checked; with allow_ties, records whose chosen == rejected are skipped, not an error
    (Raschka's instruction-data-with-preference.json has 6 of 1,100)."""
    records = read_records(path, lambda r: pair_problem(r, allow_ties), PAIR_SCHEMA)
    ties = [k for k, r in enumerate(records) if r["chosen"] == r["rejected"]]
    if ties:
        print(f"{path}: skipped {len(ties)} records whose chosen == rejected: {ties[:10]}")
    pairs = []
    for r in [r for r in records if r["chosen"] != r["rejected"]]:
        prompt = {"instruction": r.get("prompt", r.get("instruction")), "input": r.get("input", "")}
        pairs.append((record_messages(prompt), r["chosen"], r["rejected"]))
    return pairs

@torch.no_grad()
def onpolicy_pairs(model, tok, records, template, k, max_new_tokens, ctx, seed):
    """The model's own mistakes as pairs: k stories sampled (temperature 1, the cached generate)
    for each record's prompt and scored by the checker; the best and the worst of each group make
    a pair when their rewards (story_reward, below) differ."""
    model.eval()
    stop = tok.special_tokens[STOP]
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(seed)
    pairs = []
    for i in range(0, len(records), 16):  # 16 prompts x k samples in one batch
        group = records[i:i + 16]
        prompts = [render_conversation(tok, record_messages(r)[:-1], template)[0] for r in group]
        with ctx:
            new = model.generate([p for p in prompts for _ in range(k)], max_new_tokens,
                                 temperature=1.0, eot_id=stop, generator=generator)
        for j, record in enumerate(group):
            stories = [tok.decode(ids).strip() for ids in new[j * k:(j + 1) * k]]
            ranked = sorted(stories, key=lambda s: story_reward(s, record))
            if story_reward(ranked[-1], record) > story_reward(ranked[0], record):
                pairs.append((record_messages(record)[:-1], ranked[-1], ranked[0]))
    print(f"on-policy pairs: {len(pairs)} of {len(records)} prompts x {k} stories differ in reward")
    return pairs

# -----------------------------------------------------------------------------
# the lesson: sequence log-probabilities and the preference losses

def token_logprobs(logits, targets):
    # each target's log-probability under logits (B, T, V): (B, T), 0 where the target is -100
    return -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                            reduction="none").view(targets.shape)

def sequence_logprobs(logits, targets):
    """Per row of (B, T) targets: the summed log-probability of the trained tokens (targets !=
    -100: the response and its stop token) and their count. -> (logp (B,), n (B,))."""
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
    elif kind == "cdpo":  # a label flipped with probability eps: the loss stops falling at a margin
        # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        loss = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                - label_smoothing * F.logsigmoid(-beta * h))
    else:  # ipo: (h - 1 / (2 beta))^2, a target margin instead of an ever-growing one
        loss = (h - 1 / (2 * beta)) ** 2
    return loss, reward_c, reward_r

# -----------------------------------------------------------------------------
# GRPO: sample a group of stories per prompt, reward each with the checker, push up the better

def story_reward(story, record):
    """GRPO's reward in [0, 1]: the share of the required words used times the share of the
    summary's characters named, so a story without its characters earns nothing; and 0 for text
    that is no story (under 40 words or 3 sentences, or under one distinct word in three), so
    a bare list of the required words, or one sentence repeated, does not pay."""
    words = re.findall(r"[A-Za-z']+", story)
    if (len(words) < 40 or len(re.findall(r"[.!?]", story)) < 3
            or len({w.lower() for w in words}) < len(words) / 3):
        return 0.0
    missing = set(story_problems(story, record["words"], record["summary"]))
    names = set(re.findall(r"\b[A-Z][a-z]+\b", record["summary"])) - set(record["words"])
    used = 1 - len(missing & set(record["words"])) / max(1, len(record["words"]))
    return used * (1 - len(missing & names) / max(1, len(names)))

def group_advantages(rewards, group_size, eps=1e-4):
    """(r - the group's mean) / (the group's std + eps) over each group_size consecutive rewards:
    a sample is pushed up by beating its siblings, so a group whose rewards are all equal (or a
    group of one: the std is the population one, 0) gives every sample 0 and teaches nothing."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + eps)).flatten()

def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip, kl_coef):
    """The per-token GRPO objective over response tokens (mask (B, T) True there), averaged over
    all of them (DAPO's token mean; the paper averages each sequence first, which favours short
    ones). ratio = pi / pi_old; the PPO surrogate -min(ratio A, clip(ratio, 1 - clip, 1 + clip) A)
    stops a token's gradient once its ratio has moved past the clip in the advantage's direction;
    k3 = ref/pi - log(ref/pi) - 1 >= 0 estimates KL(pi || ref) without bias (Schulman 2020).
    kl_coef=0 and clip=inf leave -ratio A, whose gradient at ratio 1 is REINFORCE with the group
    mean as baseline (what nanochat does). -> (loss, mean k3, the share of clipped tokens)."""
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
    """Sample group_size completions of each prompt (token ids) with the cached generate; reward
    completion ids of prompt k with reward_fn(k, ids), less penalty when it never stops; score
    them under the reference. -> a dict of (B, T) tensors x, y, ref, the (B,) advantages, and
    the logged numbers. The sampling policy's own log-probs (pi_old) are those of the first
    optimizer step on the round, before it changes anything: the trainer keeps them there."""
    model.eval()
    t0 = time.time()
    room = model.config.block_size - max(map(len, prompts))  # no sliding window: one pass scores it
    max_new_tokens = max(1, min(max_new_tokens, room))
    with ctx:
        new = model.generate([p for p in prompts for _ in range(group_size)], max_new_tokens,
                             temperature=temperature, eot_id=stop, generator=generator)
    seconds = time.time() - t0
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
    sampled = sum(map(len, new))
    return dict(x=x, y=y, ref=ref_logp, advantages=group_advantages(rewards, group_size),
                reward=rewards.mean().item(), tokens=sampled, tokens_per_s=sampled / seconds,
                no_signal=(groups == groups[:, :1]).all(1).float().mean().item(),
                length=sampled / len(new))

# -----------------------------------------------------------------------------
# helpers used by main: pairs as examples, scoring them in one pass, the measurements

def pair_examples(tok, pairs, template, block_size):
    """Each (prompt, chosen, rejected) as a pair of masked examples ((x, y) chosen, (x, y)
    rejected), by make_examples' rule; a pair with a response outside the window is dropped."""
    out = []
    for prompt, chosen, rejected in pairs:
        chats = [prompt + [{"role": "assistant", "content": text}] for text in (chosen, rejected)]
        examples, dropped, _ = make_examples(tok, chats, template, block_size)
        if not dropped:
            out.append(tuple(examples))
    return out

def score(model, pairs, pad_id, device, ctx):
    """Sequence log-probs of the chosen and the rejected responses of pairs, in one forward pass
    over 2B rows. -> (chosen logp, rejected logp, chosen tokens, rejected tokens), each (B,)."""
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

def summarize(losses, reward_c, reward_r, kl):
    # the logged numbers of a batch or a held-out set, from per-pair tensors
    return dict(loss=losses.mean().item(), chosen=reward_c.mean().item(),
                rejected=reward_r.mean().item(), accuracy=(reward_c > reward_r).float().mean().item(),
                margin=(reward_c - reward_r).mean().item(), kl=kl.mean().item())

def show(stats):
    return (f"rewards/chosen {stats['chosen']:.3f} | rewards/rejected {stats['rejected']:.3f} | "
            f"accuracy {stats['accuracy']:.1%} | margin {stats['margin']:.3f} | kl {stats['kl']:.4f}")

@torch.no_grad()
def pair_metrics(model, pairs, ref_logps, cfg, pad_id, device, ctx):
    """Loss, rewards, reward accuracy and margin over held-out pairs, and a KL estimate: the mean
    per-token log-ratio of policy to reference on the chosen responses."""
    model.eval()
    parts = []
    for i in range(0, len(pairs), cfg.batch_size):
        pc, pr, nc, nr = score(model, pairs[i:i + cfg.batch_size], pad_id, device, ctx)
        rc, rr = ref_logps[i:i + cfg.batch_size].unbind(1)
        loss, reward_c, reward_r = preference_loss(cfg.loss, pc, pr, rc, rr, nc, nr, cfg.beta,
                                                   cfg.label_smoothing, cfg.gamma)
        parts.append(torch.stack([loss, reward_c, reward_r, (pc - rc) / nc]))
    return summarize(*torch.cat(parts, 1))

def prompt_reward(model, tok, records, template, max_new_tokens, ctx):
    """The mean story_reward of the greedy stories for held-out records' prompts (printed with the
    share that meet every constraint): on the stories, what picks either method's checkpoint."""
    prompts = [render_conversation(tok, record_messages(r)[:-1], template)[0] for r in records]
    stories = respond(model, tok, prompts, max_new_tokens, tok.special_tokens[STOP], ctx)
    reward = sum(story_reward(s, r) for s, r in zip(stories, records)) / len(records)
    print(f"held-out prompts: mean reward {reward:.3f} | constraints met "
          f"{constraints_met(stories, records):.1%}")
    return reward

def dpo_steps(cfg, model, ref, train_p, val_p, ref_val, stop, device, ctx, val_reward):
    """fit's callbacks for DPO: batches of training pair indices in a fresh order; the preference
    loss, the reference scoring each pair once, when its batch first comes; the held-out loss, or
    minus val_reward() where one is given (the stories: the task itself picks the checkpoint)."""
    cache = {}
    counter = [0]

    def batch_loss(batch):
        missing = [i for i in batch if i not in cache]
        if missing:
            new = reference_logprobs(ref, [train_p[i] for i in missing], len(missing), stop,
                                     device, ctx)
            cache.update(zip(missing, new))
        pc, pr, nc, nr = score(model, [train_p[i] for i in batch], stop, device, ctx)
        rc, rr = torch.stack([cache[i] for i in batch]).unbind(1)
        loss, reward_c, reward_r = preference_loss(cfg.loss, pc, pr, rc, rr, nc, nr, cfg.beta,
                                                   cfg.label_smoothing, cfg.gamma)
        # DPO alone may lower the chosen responses' likelihood too (only the gap counts): the NLL
        # term of RPO (Pang et al. 2024) holds them up
        objective = loss.mean() + cfg.nll_weight * (-pc / nc).mean()
        if counter[0] % cfg.log_interval == 0:
            print(show(summarize(loss.detach(), reward_c.detach(), reward_r.detach(),
                                 ((pc - rc) / nc).detach())))
        counter[0] += 1
        return objective, int((nc + nr).sum())

    def evaluate():
        stats = pair_metrics(model, val_p, ref_val, cfg, stop, device, ctx)
        print(f"held-out pairs: loss {stats['loss']:.4f} | {show(stats)}")
        return -val_reward() if val_reward else stats["loss"]

    rng = random.Random(cfg.seed)
    order = list(range(len(train_p)))

    def make_batches():
        rng.shuffle(order)
        return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    return make_batches, batch_loss, evaluate

def grpo_steps(cfg, model, ref, tok, train, template, ctx, val_reward):
    """fit's callbacks for GRPO: batches of (training record indices, inner step); a loss that
    samples a new round at inner step 0 and reuses it after; and an evaluation that returns minus
    val_reward(), the held-out prompts' mean reward (fit keeps the lowest)."""
    stop = tok.special_tokens[STOP]
    train_ids = [render_conversation(tok, record_messages(r)[:-1], template)[0] for r in train]
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    now = {}
    counter = [0]

    def make_batches():
        order = list(range(len(train)))
        rng.shuffle(order)
        rounds = [order[i:i + cfg.prompts_per_step] for i in range(0, len(order),
                                                                    cfg.prompts_per_step)]
        return [(r, k) for r in rounds for k in range(cfg.inner_steps)][::-1]  # fit pops the end

    def batch_loss(batch):
        chosen, inner = batch
        if inner == 0:
            now.update(rollout(model, ref, [train_ids[i] for i in chosen], cfg.group_size,
                               cfg.max_new_tokens,
                               lambda k, ids: story_reward(tok.decode(ids), train[chosen[k]]),
                               stop, ctx, generator, cfg.temperature, cfg.unfinished_penalty))
            model.train()
        mask = now["y"] != -100
        with ctx:
            logp = token_logprobs(model(now["x"])[0], now["y"])
        if inner == 0:  # the policy has not moved since it sampled: these are pi_old (ratio 1)
            now["old"] = logp.detach()
        loss, kl, clipped = grpo_loss(logp, now["old"], now["ref"], now["advantages"], mask,
                                      cfg.clip, cfg.kl_coef)
        # a line at the last inner step of a round that reaches a multiple of log_interval steps:
        # there the policy has moved off pi_old, and the share of clipped tokens shows it
        if inner == cfg.inner_steps - 1 and (counter[0] + 1) % cfg.log_interval < cfg.inner_steps:
            print(f"reward {now['reward']:.3f} | no-signal groups {now['no_signal']:.0%} | kl "
                  f"{kl.item():.4f} | clipped {clipped.item():.1%} | length {now['length']:.0f} | "
                  f"sampled {now['tokens_per_s']:,.0f} tok/s")
        counter[0] += 1
        return loss, int(mask.sum())

    return make_batches, batch_loss, lambda: -val_reward()

def bench_sampling(cfg, model, tok, records, template, ctx):
    # one GRPO round sampled three ways: the tokens/s with the KV cache (and attention by hand
    # where gpt.decode_by_hand says it pays), with the cache and the fused kernel only, without it
    stop = tok.special_tokens[STOP]
    prompts = [render_conversation(tok, record_messages(r)[:-1], template)[0]
               for r in records[:cfg.prompts_per_step] for _ in range(cfg.group_size)]
    speed = {}
    for name, use_cache, by_hand in [("cache", True, True), ("cache, fused attention", True, False),
                                     ("no cache", False, True)]:
        gpt.DECODE_BY_HAND = by_hand
        t0 = time.time()
        try:
            with ctx:
                new = model.generate(prompts, cfg.max_new_tokens, cfg.temperature, eot_id=stop,
                                     generator=torch.Generator().manual_seed(0),
                                     use_cache=use_cache)
        finally:
            gpt.DECODE_BY_HAND = True  # the rule is back, whatever happened
        speed[name] = sum(map(len, new)) / (time.time() - t0)
        print(f"{name}: {len(prompts)} stories, {speed[name]:,.0f} sampled tok/s")
    print(f"the cache samples {speed['cache'] / speed['no cache']:.1f}x faster than no cache, and "
          f"{speed['cache'] / speed['cache, fused attention']:.2f}x the fused kernel's tok/s")
    return speed

def check_config(cfg):
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss={cfg.loss!r} is unknown; use one of {', '.join(LOSSES)}")
    if cfg.pairs not in ("offline", "onpolicy", "both"):
        raise ValueError(f"--pairs={cfg.pairs!r} is unknown; use offline, onpolicy or both")
    if cfg.pairs != "offline" and cfg.samples < 2:
        raise ValueError(f"--samples={cfg.samples}: on-policy pairs need at least 2 stories per "
                         f"prompt (or pass --pairs=offline)")
    if not cfg.beta > 0:  # "not > 0" refuses nan too
        raise ValueError(f"--beta={cfg.beta}: the reward scale must be > 0 (dpo: about 0.1)")
    if cfg.method not in ("dpo", "grpo"):
        raise ValueError(f"--method={cfg.method!r} is unknown; use dpo or grpo")
    if cfg.method == "grpo" and (cfg.dataset != "stories" or not cfg.clip > 0):
        raise ValueError("--method=grpo needs --dataset=stories (the checker is the reward) and "
                         "--clip > 0")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing={cfg.label_smoothing}: pass a value in [0, 0.5)")
    require_positive(cfg, "batch_size", "eval_interval", "log_interval", "val_size", "test_size",
                     "prompts", "group_size", "prompts_per_step", "inner_steps", "max_new_tokens")
    if cfg.max_iters == 0 or cfg.max_iters < -1:
        raise ValueError(f"--max_iters={cfg.max_iters}: pass a number of steps, or -1 for --epochs")
    if cfg.nll_weight < 0:
        raise ValueError(f"--nll_weight={cfg.nll_weight}: pass 0 (plain DPO) or more")
    # the peak learning rates the README's runs use for each method
    learning_rate = cfg.learning_rate or {"dpo": 1e-4, "grpo": 3e-4}[cfg.method]
    min_lr = learning_rate / 10 if cfg.min_lr < 0 else cfg.min_lr
    return dataclasses.replace(cfg, learning_rate=learning_rate, min_lr=min_lr)

def main(cfg):
    refuse_torchrun("dpo.py")
    cfg = check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not cfg.bench:  # the benchmark writes nothing
        refuse_overwrite(ckpt_path, cfg.overwrite)
    if not cfg.init_from and not os.path.isfile(cfg.ckpt_path):
        raise FileNotFoundError(f"no checkpoint at {cfg.ckpt_path}; finetune one first with "
                                f"`python finetune.py` (it writes out-sft/ckpt.pt)")
    cfg, device, ctx, model, saved_tok = start_finetuning(cfg)
    template = cfg.template or "phi3"
    if not cfg.init_from and not cfg.template:  # the template the model was finetuned with
        saved = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
        template = saved.get("chat_template", "phi3")
    tok = Tokenizer.from_saved(saved_tok, cfg.gpt2_dir)
    # the reference: a frozen copy of the starting model, never trained (eval: no dropout)
    ref = copy.deepcopy(model).eval().requires_grad_(False)

    # --- pairs: finetune.py's split of the same records, so the test prompts are the same
    if cfg.dataset == "stories":
        records = instruct_records("stories", cfg.data_dir)
        splits = list(split_records(records, cfg.val_size, cfg.test_size, cfg.seed))
        if cfg.bench:
            return bench_sampling(cfg, model, tok, splits[0], template, ctx)
        sampling = cfg.method == "dpo" and cfg.pairs != "offline"  # held-out pairs stay offline
        if cfg.max_iters > 0:  # one pass over the pairs the steps use is enough to build
            splits[0] = splits[0][:cfg.max_iters * max(cfg.batch_size, cfg.prompts_per_step)]
        if sampling:
            splits[0] = splits[0][:cfg.prompts]
        pairs = [story_pairs(rs, cfg.seed + k) if k or cfg.method == "dpo" else []
                 for k, rs in enumerate(splits)]
        if sampling:  # training pairs from the model (both: beside the offline ones)
            sampled = onpolicy_pairs(model, tok, splits[0], template, cfg.samples,
                                     cfg.max_new_tokens, ctx, cfg.seed)
            pairs[0] = sampled + (pairs[0] if cfg.pairs == "both" else [])
        test_records = splits[2]
        prompts = [record_messages(r)[:-1] for r in test_records]
    else:
        path = cfg.dataset
        if cfg.dataset == "raschka":
            path = fetch(RASCHKA_PREFERENCE, os.path.join(cfg.data_dir, "preference",
                                                          "instruction-data-with-preference.json"))
        pairs = file_pairs(path, allow_ties=cfg.dataset == "raschka")
        pairs = list(split_records(pairs, cfg.val_size, cfg.test_size, cfg.seed))
        test_records = [dict(output=chosen) for _, chosen, _ in pairs[2]]
        prompts = [prompt for prompt, _, _ in pairs[2]]
    block = model.config.block_size
    stop = tok.special_tokens[STOP]
    train_p, val_p, test_p = [pair_examples(tok, p, template, block) for p in pairs]
    if not ((train_p or cfg.method == "grpo") and val_p and test_p):
        raise ValueError(f"no train, val or test pair: too few records, or none fits "
                         f"block_size={block}")
    print(f"pairs: {len(train_p)} train, {len(val_p)} val, {len(test_p)} test ({cfg.dataset}); "
          f"{cfg.method}, loss {cfg.loss}, beta {cfg.beta}, template {template}")
    ref_val = reference_logprobs(ref, val_p, cfg.batch_size, stop, device, ctx)
    ref_test = reference_logprobs(ref, test_p, cfg.batch_size, stop, device, ctx)
    prompt_ids = [render_conversation(tok, p, template)[0] for p in prompts]
    chosen_test = [c for c, _ in test_p]

    def table_row(model):  # pairs, constraints, what DPO costs in the chosen responses' loss
        stories = respond(model, tok, prompt_ids, cfg.max_new_tokens, stop, ctx)
        lengths = [len(tok.encode(s, allowed_special="none")) for s in stories]
        rewards = [story_reward(s, r) for s, r in zip(stories, test_records) if "words" in r]
        return dict(pair_metrics(model, test_p, ref_test, cfg, stop, device, ctx),
                    constraints=constraints_met(stories, test_records),
                    reward=sum(rewards) / len(rewards) if rewards else None,
                    chosen_loss=heldout_loss(model, chosen_test, cfg.batch_size, stop, device, ctx),
                    response_tokens=sum(lengths) / len(lengths))
    before = table_row(model)

    # --- training
    def save(step, loss):
        save_checkpoint(ckpt_path, model, step=step, val_loss=loss, tokenizer=saved_tok,
                        train_config=dataclasses.asdict(cfg), chat_template=template)

    def val_reward():  # the stories: the greedy stories for the val prompts pick the checkpoint
        return prompt_reward(model, tok, splits[1], template, cfg.max_new_tokens, ctx)
    if cfg.method == "grpo":
        steps = grpo_steps(cfg, model, ref, tok, splits[0], template, ctx, val_reward)
    else:
        steps = dpo_steps(cfg, model, ref, train_p, val_p, ref_val, stop, device, ctx,
                          val_reward if cfg.dataset == "stories" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    run = fit(cfg, model, params, *steps, save)
    after = table_row(model)

    # --- the before/after table
    rows = dict(before=before, after=after, test_pairs=len(test_p), train_seconds=run["seconds"])
    print(f"done: {run['seconds']:.0f} s of training; saved {ckpt_path}")
    print(f"{'held-out':28s} {'start':>10s} {'grpo' if cfg.method == 'grpo' else cfg.loss:>10s}")
    for key, fmt in [("accuracy", "{:10.1%}"), ("margin", "{:10.3f}"), ("constraints", "{:10.1%}"),
                     ("reward", "{:10.3f}"), ("chosen_loss", "{:10.4f}"),
                     ("response_tokens", "{:10.1f}"), ("kl", "{:10.4f}")]:
        cells = [rows[m][key] for m in ("before", "after")]
        text = " ".join("{:>10s}".format("-") if c is None else fmt.format(c) for c in cells)
        print(f"{key:28s} {text}")
    save_json(os.path.join(cfg.out_dir, "eval.json"), rows)
    return dict(rows, ckpt_path=ckpt_path)

if __name__ == "__main__":
    run_main(main, DpoConfig)
