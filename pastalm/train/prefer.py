"""Stage 2: preference optimization on speed and quality with the BoNBoN objective, in rounds.

Per round and per lambda:
1. sample: `samples` annotated answers per prompt from the current model through the real interpreter
   (temperature sampling, one seed per sample), batched across prompts with the engine's `Batcher`; with
   `greedy_candidate`, sample 0 is the greedy answer instead (how `pasta eval` and the server decode), so that a
   greedy answer that runs into a limit can lose against a sampled one that ends. The baseline's sequential
   answer to each prompt (computed once) is the quality reference;
2. score: theoretical speedup + lambda * quality, quality being the judge's score against the reference
   (`lambda = inf`: quality first, speedup only breaks ties);
3. pairs: the best valid sample against the worst sample of each prompt; prompts whose best and worst tie, or
   without a valid sample, are skipped and counted. A sample is invalid when its annotation does not validate
   or its answer is empty: it may lose, never win;
4. train: the BoNBoN loss (`bonbon_loss`) on the pairs, through PEFT, continuing the adapter. Each answer is
   scored exactly as it was sampled: its decode trace (`Result.trace`, `lang.layout.trace_layout`) holds the
   token ids the engine chose, with the positions and masks it used, so a block cut by its budget gets no
   `</async>` it never wrote and a merged token stays one token (issue 15). Samples from before traces were kept
   are re-tokenized from their raw form in the layout's examples (`build_weighted`, as in stage 1). The reference model of a round is the
   model it starts from: its log-probabilities of both answers are computed before the round trains.

Every step writes JSONL next to its adapter and skips what is already there, so an interrupted run resumes.
Round 1 starts from the same adapter for every lambda, so its samples are drawn once and shared.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..lang.layout import IGNORE, ReservePolicy, trace_layout
from ..lang.render import validate
from .data import LayoutCollator, build_weighted
from .io import append_jsonl, read_jsonl


@dataclass
class PreferConfig:
    output: str
    from_adapter: str  # the adapter to start from (a folder, or a shipped one: 'pasta-stage1', 'pasta')
    prompts: str = "train"
    baseline_adapter: str = "baseline"  # model of the sequential reference answers
    model: str | None = None
    dtype: str = "bf16"
    samples: int = 4
    lambdas: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, math.inf])
    rounds: int = 1
    judge: str = "proxy"
    temperature: float = 0.8
    top_p: float = 0.95
    greedy_candidate: bool = False  # sample 0 is the greedy answer
    max_new_tokens: int = 320
    batch_requests: int = 16  # requests decoded together while sampling
    alpha: float = 0.5  # weight of the winner's likelihood term (1 - alpha on the IPO term)
    beta: float = 5.0  # IPO target: the log-ratio margin 1 / (2 beta) (0.1 nat per token with ipo_norm "mean")
    ipo_norm: str = "mean"  # log-ratios of the IPO term per token ("mean") or summed over the answer ("sum")
    lr: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 2  # pairs per step
    grad_accum: int = 2
    max_length: int = 640
    reserve_scale: float = 1.0
    layout: str = "reserve"  # "linear": sample and train in the layout vLLM runs (docs/spec.md section 3)
    seed: int = 0
    limit: int | None = None
    per_category: int | None = None
    system: str | None = None
    tie_eps: float = 1e-6

    def __post_init__(self):
        if self.ipo_norm not in ("mean", "sum"):
            raise ValueError(f"ipo_norm must be 'mean' or 'sum', not {self.ipo_norm!r}")
        if self.layout not in ("reserve", "linear"):
            raise ValueError(f"layout must be 'reserve' or 'linear', not {self.layout!r}")


# -- scoring and pairs ---------------------------------------------------------------------------------------------


def score_key(sample: dict, lam: float) -> tuple:
    """Sort key of a sample: valid before invalid, then speedup + lambda * quality (inf: quality, then speed)."""
    if math.isinf(lam):
        return (sample["valid"], sample["quality"], sample["theoretical_speedup"])
    return (sample["valid"], sample["theoretical_speedup"] + lam * sample["quality"])


def build_pairs(samples: list[dict], lam: float, eps: float = 1e-6) -> tuple[list[dict], dict]:
    """Best-vs-worst pairs per prompt, and counts of what was skipped (see the module docstring)."""
    by: dict[str, list[dict]] = {}
    for s in samples:
        by.setdefault(s["id"], []).append(s)
    pairs, stats = [], {"prompts": len(by), "pairs": 0, "skipped_tie": 0, "skipped_no_valid": 0,
                        "skipped_single": 0, "invalid_samples": sum(not s["valid"] for s in samples)}
    for pid, group in by.items():
        if len(group) < 2:
            stats["skipped_single"] += 1
            continue
        ranked = sorted(group, key=lambda s: score_key(s, lam))
        best, worst = ranked[-1], ranked[0]
        if not best["valid"]:
            stats["skipped_no_valid"] += 1
            continue
        kb, kw = score_key(best, lam), score_key(worst, lam)
        same = kb[0] == kw[0] and all(abs(a - b) <= eps for a, b in zip(kb[1:], kw[1:]))
        if same or best["raw"] == worst["raw"]:
            stats["skipped_tie"] += 1
            continue
        pair = {"id": pid, "prompt": best["prompt"], "winner": best["raw"], "loser": worst["raw"],
                "winner_key": list(kb), "loser_key": list(kw), "winner_sample": best["sample"],
                "loser_sample": worst["sample"]}
        if best.get("trace") and worst.get("trace"):
            pair.update(winner_trace=best["trace"], loser_trace=worst["trace"])
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    return pairs, stats


# -- the loss ------------------------------------------------------------------------------------------------------


def bonbon_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                nll_w: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """BoNBoN (Gui et al., 2024): alpha * NLL of the winner (mean per token) + (1 - alpha) * the IPO term
    (h - 1 / (2 beta))^2, where h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)] with the answers'
    log-probabilities over their labelled tokens, summed or (as the caller chooses, `ipo_norm`) per-token means.
    All inputs are per pair; returns the mean."""
    h = (logp_w - ref_w) - (logp_l - ref_l)
    ipo = (h - 1.0 / (2.0 * beta)) ** 2
    return (alpha * nll_w + (1.0 - alpha) * ipo).mean()


def ipo_logps(logits: torch.Tensor, labels: torch.Tensor, norm: str,
              owner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer: the log-probability the IPO term uses (per-token mean for norm "mean", sum for "sum") and the
    mean negative log-likelihood (the winner's likelihood term). Row i of the batch belongs to answer `owner[i]`
    (default: one row per answer); the linear layout splits an answer into one row per re-laid sync, and every
    answer token is labelled in exactly one of them, so an answer's log-probability is the sum over its rows."""
    summed, _ = sequence_logps(logits, labels)
    count = (labels != IGNORE).sum(-1).to(summed.dtype)
    if owner is not None:
        n = int(owner.max()) + 1
        summed = torch.zeros(n, dtype=summed.dtype, device=summed.device).index_add(0, owner, summed)
        count = torch.zeros(n, dtype=count.dtype, device=count.device).index_add(0, owner, count)
    nll = -summed / count.clamp(min=1)
    return (-nll if norm == "mean" else summed), nll


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed log-probability of the labelled tokens, and their mean negative log-likelihood."""
    lp = F.log_softmax(logits.float(), dim=-1)
    mask = labels != IGNORE
    tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    total = tok.sum(-1)
    return total, -total / mask.sum(-1).clamp(min=1)


# -- sampling ------------------------------------------------------------------------------------------------------


def sample_answers(engine, prompts: list[dict], cfg: PreferConfig, path: Path, judge, references: dict,
                   progress: bool = True) -> list[dict]:
    """`cfg.samples` answers per prompt (seeds 0..n-1 offset by cfg.seed; with `cfg.greedy_candidate` sample 0
    is greedy), judged against the reference; appended to `path`, skipping prompts already there."""
    from ..engine import GenerateConfig
    from ..eval.judges import Answer
    from ..models import chat_prompt

    done = read_jsonl(path) if path.exists() else []
    have = {r["id"] for r in done}
    todo = [p for p in prompts if p["id"] not in have]
    base = GenerateConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          reserve_scale=cfg.reserve_scale if cfg.layout == "reserve" else None, layout=cfg.layout,
                          record_trace=True)
    per_batch = max(1, cfg.batch_requests // cfg.samples)
    bar = tqdm(total=len(todo), desc="sample", unit="prompt", disable=not progress)
    for i in range(0, len(todo), per_batch):
        chunk = todo[i:i + per_batch]
        batcher = engine.batcher()
        reqs = []
        for p in chunk:
            ids = chat_prompt(engine.tokenizer, p["prompt"], cfg.system)
            for k in range(cfg.samples):
                gen = replace(base, seed=cfg.seed * 1000 + k)
                if k == 0 and cfg.greedy_candidate:
                    gen = replace(gen, temperature=0.0, top_p=1.0)
                reqs.append((p, k, batcher.add(ids, gen)))
        while batcher.active:
            batcher.step()
        rows = []
        for p, k, req in reqs:
            res = req.result
            rep = validate(res.raw)
            ref = references[p["id"]]
            v = judge.judge(p["prompt"], Answer(ref["answer"], ref.get("pieces", [])), Answer(res.text, res.pieces))
            rows.append({"id": p["id"], "prompt": p["prompt"], "sample": k,
                         "greedy": bool(k == 0 and cfg.greedy_candidate), "raw": res.raw, "text": res.text,
                         "tokens": res.tokens, "tag_tokens": res.tag_tokens, "threads": res.threads,
                         "theoretical_speedup": res.theoretical_speedup, "limits_hit": res.limits_hit,
                         "valid": bool(rep.ok and res.text.strip()), "reasons": sorted(set(rep.reasons)),
                         "quality": v.score, "judge": v.details, "trace": res.trace})
        for r in rows:  # a prompt's samples are written together, so a resumed run never sees half of them
            append_jsonl(path, r)
        done += rows
        bar.update(len(chunk))
    bar.close()
    return done


def reference_answers(engine, prompts: list[dict], cfg: PreferConfig, path: Path, progress: bool = True) -> dict:
    """The baseline's greedy sequential answer to each prompt (the quality reference), cached in `path`."""
    from ..engine import GenerateConfig
    from ..models import chat_prompt

    done = {r["id"]: r for r in (read_jsonl(path) if path.exists() else [])}
    todo = [p for p in prompts if p["id"] not in done]
    seq = GenerateConfig(max_new_tokens=cfg.max_new_tokens, sequential=True)
    for i in tqdm(range(0, len(todo), cfg.batch_requests), desc="reference", unit="batch", disable=not progress):
        batcher = engine.batcher()
        reqs = [(p, batcher.add(chat_prompt(engine.tokenizer, p["prompt"], cfg.system), seq))
                for p in todo[i:i + cfg.batch_requests]]
        while batcher.active:
            batcher.step()
        for p, req in reqs:
            r = {"id": p["id"], "prompt": p["prompt"], "answer": req.result.text, "pieces": req.result.pieces,
                 "tokens": req.result.tokens}
            append_jsonl(path, r)
            done[p["id"]] = r
    return done


# -- training ------------------------------------------------------------------------------------------------------


def pair_layouts(tokenizer, pairs: list[dict], cfg: PreferConfig) -> tuple[list[dict], int]:
    """Each pair's winner and loser as lists of layouts: the decode's own trace (one layout, exactly what was
    sampled: `trace_layout`) when the samples kept one; else the raw form re-tokenized, one example in the reserve
    layout, one per re-laid sync in the linear layout (`build_weighted`). A pair with an example longer than
    `max_length` is skipped."""
    policy = ReservePolicy.for_tokenizer(tokenizer, cfg.reserve_scale, cfg.layout)
    out, skipped = [], 0
    for p in pairs:
        try:
            if p.get("winner_trace") and p.get("loser_trace"):
                w, lo = [trace_layout(p["winner_trace"])], [trace_layout(p["loser_trace"])]
            else:
                w, lo = ([seq for seq, _ in build_weighted(tokenizer, p["prompt"], p[k], policy,
                                                            tokenizer.eos_token_id, cfg.system)]
                         for k in ("winner", "loser"))
        except ValueError:
            skipped += 1
            continue
        if max(len(seq.input_ids) for seq in w + lo) > cfg.max_length:
            skipped += 1
            continue
        out.append({"w": w, "l": lo})
    return out, skipped


def _pair_batch(collate, chunk: list[dict], model) -> tuple[dict, torch.Tensor]:
    """Winners then losers of `chunk` as one batch on the model's device, and each row's answer: answer j is
    chunk[j]'s winner, answer len(chunk) + j its loser."""
    rows, owner = [], []
    for side in ("w", "l"):
        for j, it in enumerate(chunk):
            rows += [{"layout": seq} for seq in it[side]]
            owner += [j + (len(chunk) if side == "l" else 0)] * len(it[side])
    batch = collate(rows)
    dev = next(model.parameters()).device
    return {k: v.to(dev) for k, v in batch.items()}, torch.tensor(owner, device=dev)


@torch.no_grad()
def reference_logps(model, items: list[dict], collate, batch_size: int, norm: str = "mean") -> None:
    """Store the model's sequence log-probabilities of each pair's answers (`ref_w`, `ref_l`) before training."""
    was_training = model.training
    model.eval()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        batch, owner = _pair_batch(collate, chunk, model)
        labels = batch.pop("labels")
        logp, _ = ipo_logps(model(**batch).logits, labels, norm, owner)
        for j, it in enumerate(chunk):
            it["ref_w"], it["ref_l"] = float(logp[j]), float(logp[len(chunk) + j])
    model.train(was_training)


def train_pairs(model, tokenizer, items: list[dict], cfg: PreferConfig, progress: bool = True) -> dict:
    """One pass (cfg.epochs) of BoNBoN over the pairs; returns the loss history."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = LayoutCollator(pad, next(model.parameters()).dtype)
    reference_logps(model, items, collate, cfg.batch_size, cfg.ipo_norm)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(items) / (cfg.batch_size * cfg.grad_accum))
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)
    model.train()
    history, step, micro = [], 0, 0
    bar = tqdm(total=total, desc="bonbon", unit="step", disable=not progress)
    acc_loss = 0.0
    while step < total:
        order = torch.randperm(len(items), generator=g).tolist()
        for i in range(0, len(order), cfg.batch_size):
            chunk = [items[j] for j in order[i:i + cfg.batch_size]]
            batch, owner = _pair_batch(collate, chunk, model)
            labels = batch.pop("labels")
            logp, nll = ipo_logps(model(**batch).logits, labels, cfg.ipo_norm, owner)
            n = len(chunk)
            ref_w = torch.tensor([it["ref_w"] for it in chunk], device=logp.device)
            ref_l = torch.tensor([it["ref_l"] for it in chunk], device=logp.device)
            loss = bonbon_loss(logp[:n], logp[n:], ref_w, ref_l, nll[:n], cfg.alpha, cfg.beta)
            (loss / cfg.grad_accum).backward()
            acc_loss += float(loss.detach()) / cfg.grad_accum
            micro += 1
            if micro % cfg.grad_accum == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                history.append({"step": step, "loss": acc_loss, "lr": sched.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(loss=f"{acc_loss:.4f}")
                acc_loss = 0.0
                if step >= total:
                    break
    bar.close()
    return {"steps": step, "history": history}


# -- rounds --------------------------------------------------------------------------------------------------------


def lam_name(lam: float) -> str:
    return "inf" if math.isinf(lam) else f"{lam:g}"


def run_prefer(cfg: PreferConfig, progress: bool = True, judge=None) -> dict:
    """All lambdas, all rounds; returns the per-round statistics (also saved as OUT/stats.json)."""
    from ..engine import Engine
    from ..eval.judges import ProxyJudge
    from ..eval.speed import stratified
    from ..models import adapter_digest, adapter_tokens, load, load_adapter, resolve_adapter, save_adapter
    from .prompts import load_prompts

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "prefer_config.json"
    start = resolve_adapter(cfg.from_adapter, cfg.model)
    if start is None:
        raise ValueError("--from must name a PASTA adapter (a folder from `pasta train sft`, 'pasta-stage1' or "
                         "'pasta')")
    saved = asdict(cfg)
    saved["lambdas"] = [lam_name(x) for x in cfg.lambdas]
    # a name such as 'pasta' can point at other weights later (a new adapter shipped): the weights are compared
    saved["from_sha256"] = adapter_digest(start)
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if "from_sha256" not in old:  # written before the digest was recorded: nothing to compare with
            del saved["from_sha256"]
        elif old["from_sha256"] != saved["from_sha256"]:
            raise ValueError(f"{out} was started from other weights than --from {cfg.from_adapter} gives now "
                             f"({start}); pass the adapter the run started from, or a new --output")
        # a setting added after the run started is absent from its file: it ran with that setting's default
        defaults = asdict(PreferConfig(output=cfg.output, from_adapter=cfg.from_adapter))
        diff = [k for k in saved if k not in ("rounds", "lambdas", "from_sha256")
                and old.get(k, defaults.get(k)) != saved[k]]
        if diff:
            raise ValueError(f"{out} holds a run with other settings ({', '.join(diff)}); resume with the same "
                             "settings or pass a new --output")
    cfg_path.write_text(json.dumps(saved, indent=1) + "\n")
    prompts = stratified(load_prompts(cfg.prompts), cfg.per_category)[: cfg.limit]
    if not prompts:
        raise ValueError(f"--prompts {cfg.prompts}: no prompts")
    judge = judge or ProxyJudge()
    base = load(cfg.model, cfg.dtype, cfg.baseline_adapter)
    refs = reference_answers(Engine(base.model, base.tokenizer, base.name), prompts, cfg, out / "reference.jsonl",
                             progress)
    del base
    stats: dict = {}
    stats_path = out / "stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
    for lam in cfg.lambdas:
        prev = start
        for r in range(1, cfg.rounds + 1):
            key = f"lambda-{lam_name(lam)}/round-{r}"
            rdir = out / f"lambda-{lam_name(lam)}" / f"round-{r}"
            adapter_dir = rdir / "adapter"
            if (adapter_dir / "adapter_config.json").is_file() and key in stats:
                prev = adapter_dir
                continue
            rdir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            sample_path = out / "round-1-samples.jsonl" if r == 1 else rdir / "samples.jsonl"
            gen = load(cfg.model, cfg.dtype, str(prev))
            samples = sample_answers(Engine(gen.model, gen.tokenizer, gen.name), prompts, cfg, sample_path, judge,
                                     refs, progress)
            del gen
            t_sample = time.perf_counter() - t0
            pairs, pstats = build_pairs(samples, lam, cfg.tie_eps)
            (rdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            train = load(cfg.model, "fp32" if cfg.dtype == "fp32" else cfg.dtype, "none")
            model = load_adapter(train.model, train.tokenizer, prev, trainable=True)
            items, skipped = pair_layouts(train.tokenizer, pairs, cfg)
            if not items:
                raise ValueError(f"{key}: no usable pair ({pstats}); sample more (--samples) or more prompts")
            t1 = time.perf_counter()
            hist = train_pairs(model, train.tokenizer, items, cfg, progress)
            save_adapter(model, adapter_dir, adapter_tokens(prev))
            n = len(samples)
            stats[key] = {
                "lambda": lam_name(lam), "round": r, "from": str(prev), **pstats, "pairs_too_long": skipped,
                "mean_speedup": sum(s["theoretical_speedup"] for s in samples) / n,
                "mean_quality": sum(s["quality"] for s in samples) / n,
                "valid_share": sum(s["valid"] for s in samples) / n,
                "mean_score": sum(s["theoretical_speedup"] + lam * s["quality"] if not math.isinf(lam)
                                  else s["quality"] for s in samples) / n,
                "winner_mean_speedup": _mean(samples, pairs, "winner_sample", "theoretical_speedup"),
                "winner_mean_quality": _mean(samples, pairs, "winner_sample", "quality"),
                "steps": hist["steps"], "first_losses": [h["loss"] for h in hist["history"][:3]],
                "last_losses": [h["loss"] for h in hist["history"][-3:]],
                "sample_seconds": round(t_sample, 1), "train_seconds": round(time.perf_counter() - t1, 1),
            }
            (rdir / "round.json").write_text(json.dumps({**stats[key], "history": hist["history"]}, indent=1))
            write_provenance(adapter_dir, saved, stats[key])
            stats_path.write_text(json.dumps(stats, indent=1) + "\n")
            (out / "report.md").write_text(lambda_table(stats))
            prev = adapter_dir
    (out / "report.md").write_text(lambda_table(stats))
    return stats


def write_provenance(adapter_dir: Path, config: dict, round_stats: dict) -> None:
    """`pasta_prefer.json` inside the adapter folder: the run's settings and this round's statistics, so that a
    copied or shipped adapter says how it was made."""
    (Path(adapter_dir) / "pasta_prefer.json").write_text(
        json.dumps({"config": config, "round": round_stats}, indent=1) + "\n")


def lambda_table(stats: dict) -> str:
    """The per-lambda, per-round statistics as a markdown table (OUT/report.md)."""
    from ..eval.harness import _fmt as f

    def order(k):
        lam, r = stats[k]["lambda"], stats[k]["round"]
        return (math.inf if lam == "inf" else float(lam), r)

    lines = ["| lambda | round | pairs | skipped (tie / no valid) | valid samples | mean speedup | mean quality | "
             "winners' speedup | winners' quality | steps | loss first -> last | sampling s | training s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted(stats, key=order):
        s = stats[k]
        first = s["first_losses"][0] if s.get("first_losses") else None
        last = s["last_losses"][-1] if s.get("last_losses") else None
        lines.append(" | ".join([
            f"| {s['lambda']}", str(s["round"]), str(s["pairs"]), f"{s['skipped_tie']} / {s['skipped_no_valid']}",
            f(s.get("valid_share"), "{:.0%}"), f(s.get("mean_speedup"), "{:.2f}x"), f(s.get("mean_quality"), "{:.3f}"),
            f(s.get("winner_mean_speedup"), "{:.2f}x"), f(s.get("winner_mean_quality"), "{:.3f}"), str(s["steps"]),
            f"{f(first, '{:.3f}')} -> {f(last, '{:.3f}')}", f(s.get("sample_seconds"), "{:.0f}"),
            f(s.get("train_seconds"), "{:.0f}")]) + " |")
    return "\n".join(lines) + "\n"


def _mean(samples: list[dict], pairs: list[dict], which: str, field_: str) -> float | None:
    idx = {(s["id"], s["sample"]): s for s in samples}
    vals = [idx[(p["id"], p[which])][field_] for p in pairs if (p["id"], p[which]) in idx]
    return sum(vals) / len(vals) if vals else None
