"""`pasta eval`: answer a prompt set in several modes, time them side by side, judge quality, write the reports.

Modes:
- `sequential`: the baseline model (`--baseline-adapter`) decoding one token at a time; every ratio divides by it;
- `pasta`: the PASTA model (`--adapter`) decoding asynchronously;
- `sot`: Skeleton-of-Thought on the baseline model, points expanded through the same fork machinery;
- `reference`: the base model without an adapter (`--reference-adapter`), greedy and sequential. When it is in the
  run, the proxy judge scores *every* mode against it, sequential included, so no mode is its own reference;
- `sample`: the baseline model again, sequential, sampled (temperature 0.7, top-p 0.95): a second answer of the
  sequential model. Its quality against sequential's is the proxy's noise floor.

Every answer is also checked for visible defects (`defects.py`: tag leaks, runaways, cut chunks, glued items,
broken numbering, duplicate items), the same checks in every mode.

For each prompt the modes run back to back in an order that rotates from prompt to prompt, after one untimed
warm-up per engine, so that drift in the machine's speed hits every mode alike (docs/spec.md section 7). Results are
appended to `results.jsonl` as they come: a rerun skips every (prompt, mode) already there, and judgments are
cached the same way in `judgments.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from ..engine import Engine, GenerateConfig
from ..models import chat_prompt
from ..train.io import append_jsonl, read_jsonl
from .defects import DEFECTS, defects
from .judges import Answer, Judge, lc_win_rate, win_rate
from .sot import sot_generate
from .speed import geomean, machine, paired_bootstrap, timestamp, validity

MODES = ("sequential", "pasta", "sot", "reference", "sample")
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.7, 0.95


def is_pasta(mode: str) -> bool:
    """`pasta`, or `pasta:LABEL` when several PASTA adapters are compared in one run."""
    return mode == "pasta" or mode.startswith("pasta:")


@dataclass
class EvalConfig:
    """Settings of one evaluation run (saved in summary.json)."""

    modes: list[str] = field(default_factory=lambda: list(MODES))
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    system: str | None = None
    efficiency: bool = True  # replay each forked PASTA answer sequentially to measure engine efficiency
    sot_skeleton_tokens: int = 120
    sot_point_tokens: int = 60
    mode_options: dict = field(default_factory=dict)  # PASTA mode -> GenerateConfig fields it overrides

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES and not (is_pasta(m) and len(m) > 6)]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
        if "sequential" not in self.modes:
            raise ValueError("the modes must include 'sequential': every speedup and win rate is relative to it")
        self.modes = list(dict.fromkeys(self.modes))


def prompt_id(p: dict) -> str:
    """The prompt's `id`, or a stable hash of its text when it has none."""
    return str(p.get("id") or "sha1-" + hashlib.sha1(p["prompt"].encode()).hexdigest()[:12])


def _record(p: dict, mode: str, model: str, res) -> dict:
    d = res.to_json()
    rec = {"id": prompt_id(p), "prompt": p["prompt"], "category": p.get("category"), "parallel": p.get("parallel"),
           "mode": mode, "model": model, "answer": d.pop("text"), "raw": d.pop("raw")}
    d.pop("model", None)
    d.pop("mode", None)
    rec.update(d)
    if is_pasta(mode):
        rec.update(validity(rec["raw"], rec["threads"]))
    return rec


def generate_all(prompts: list[dict], engines: dict[str, Engine], cfg: EvalConfig, out_dir: Path,
                 progress: bool = True) -> list[dict]:
    """Answer every prompt in every mode not yet in `out_dir/results.jsonl`; return all records (old and new)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    done = read_jsonl(path) if path.exists() else []
    have = {(r["id"], r["mode"]) for r in done}
    todo = [(i, p) for i, p in enumerate(prompts) if any((prompt_id(p), m) not in have for m in cfg.modes)]
    if todo:
        warm = chat_prompt(next(iter(engines.values())).tokenizer, "Say hello.", cfg.system)
        for e in {id(e): e for e in engines.values()}.values():
            e.generate(warm, replace(cfg.generate, max_new_tokens=8))  # warm-up, not measured
    seq_cfg = replace(cfg.generate, sequential=True)
    for i, p in tqdm(todo, desc="eval", unit="prompt", disable=not progress):
        modes = cfg.modes[i % len(cfg.modes):] + cfg.modes[: i % len(cfg.modes)]
        for mode in modes:
            if (prompt_id(p), mode) in have:
                continue
            eng = engines[mode]
            ids = chat_prompt(eng.tokenizer, p["prompt"], cfg.system)
            if mode in ("sequential", "reference"):
                rec = _record(p, mode, eng.name, eng.generate(ids, seq_cfg))
            elif mode == "sample":
                sample_cfg = replace(seq_cfg, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=i)
                rec = _record(p, mode, eng.name, eng.generate(ids, sample_cfg))
            elif is_pasta(mode):
                res = eng.generate(ids, replace(cfg.generate, sequential=False, **cfg.mode_options.get(mode, {})))
                rec = _record(p, mode, eng.name, res)
                if cfg.efficiency and res.threads > 0:
                    try:  # the same tokens, replayed one per step
                        replay = eng.generate(ids, seq_cfg, force=res.raw)
                    except ValueError as e:  # an answer the replay cannot take: no efficiency for this one
                        rec["efficiency_error"] = str(e)
                    else:
                        rec["replay_sequential_s"] = replay.wall_s
                        rec["efficiency"] = (replay.wall_s / res.wall_s) / res.theoretical_speedup
            else:
                res = sot_generate(eng, p["prompt"], cfg.generate, cfg.system, cfg.sot_skeleton_tokens,
                                   cfg.sot_point_tokens)
                rec = _record(p, mode, eng.name, res)
            append_jsonl(path, rec)
            done.append(rec)
            have.add((rec["id"], mode))
    return done


def reference_mode(records: list[dict], judge: Judge) -> str:
    """The answers a judge compares with: `reference` for a judge that scores one answer against another
    (proxy) when the run has that mode, else `sequential` (a pairwise judge's win rate is against sequential)."""
    if not judge.pairwise and any(r["mode"] == "reference" for r in records):
        return "reference"
    return "sequential"


def judge_all(records: list[dict], judge: Judge, out_dir: Path, progress: bool = True) -> list[dict]:
    """Judge every answer against the reference mode's answer to the same prompt (`reference_mode`): a pairwise
    judge skips sequential (it is the other side), the proxy scores every mode but the reference itself, or, in a
    run without `reference`, sequential against itself (content 1 by construction). Cached in
    `out_dir/judgments.jsonl`; each judgment names its reference (`ref`)."""
    path = out_dir / "judgments.jsonl"
    ref_mode = reference_mode(records, judge)
    done = [j for j in (read_jsonl(path) if path.exists() else [])
            if j["judge"] == judge.name and j.get("ref", "sequential") == ref_mode]
    have = {(j["id"], j["mode"]) for j in done}
    refs = {r["id"]: r for r in records if r["mode"] == ref_mode}
    skip = {"sequential"} if judge.pairwise else ({"reference"} if ref_mode == "reference" else set())
    todo = [r for r in records if r["id"] in refs and (r["id"], r["mode"]) not in have and r["mode"] not in skip]
    for r in tqdm(todo, desc=f"judge ({judge.name} vs {ref_mode})", unit="answer", disable=not progress):
        ref = refs[r["id"]]
        v = judge.judge(r["prompt"], Answer(ref["answer"], ref.get("pieces", [])),
                        Answer(r["answer"], r.get("pieces", [])))
        j = {"id": r["id"], "mode": r["mode"], "judge": judge.name, "ref": ref_mode, "score": v.score,
             "details": v.details}
        append_jsonl(path, j)
        done.append(j)
    return done


def defect_rates(recs: list[dict]) -> dict:
    """Share of answers with each visible defect, and with any of them but the token limit (`any`)."""
    n = len(recs)
    ds = [defects(r["answer"], r.get("raw", ""), r.get("pieces"), r.get("limits_hit")) for r in recs]
    out = {k: sum(d[k] for d in ds) / n for k in DEFECTS}
    out["any"] = sum(any(d[k] for k in DEFECTS if k != "hit_limit") for d in ds) / n
    return out


def _speed(rows: list[tuple[dict, dict]]) -> dict:
    """Speed measures of (mode record, sequential record) pairs."""
    wall = [s["wall_s"] / r["wall_s"] for r, s in rows if r["wall_s"] > 0]
    tput = [(r["tokens"] / r["wall_s"]) / (s["tokens"] / s["wall_s"]) for r, s in rows
            if r["tokens"] and s["tokens"] and r["wall_s"] > 0 and s["wall_s"] > 0]
    eff = [r["efficiency"] for r, _ in rows if r.get("efficiency")]
    return {
        "wall_speedup_gmean": geomean(wall),
        "throughput_speedup_gmean": geomean(tput),
        "theoretical_speedup_gmean": geomean(r["theoretical_speedup"] for r, _ in rows),
        "engine_efficiency_gmean": geomean(eff) if eff else None,
        "efficiency_prompts": len(eff),
    }


def summarize_mode(mode: str, rows: list[tuple[dict, dict]], judgments: dict, judge: Judge | None) -> dict:
    n = len(rows)
    s = {"mode": mode, "prompts": n}
    if not n:
        return s
    recs = [r for r, _ in rows]
    s["model"] = recs[0]["model"]
    s.update(_speed(rows))
    s.update({
        "tokens_mean": sum(r["tokens"] for r in recs) / n,
        "tag_tokens_mean": sum(r["tag_tokens"] for r in recs) / n,
        "decode_steps_mean": sum(r["decode_steps"] for r in recs) / n,
        "threads_mean": sum(r["threads"] for r in recs) / n,
        "forked": sum(r["threads"] > 0 for r in recs) / n,
        "wall_s_mean": sum(r["wall_s"] for r in recs) / n,
        "limits_hit": sum(bool(r["limits_hit"]) for r in recs),
    })
    s["defects"] = defect_rates(recs)
    if is_pasta(mode):
        s["with_valid_promise"] = sum(bool(r.get("valid_promise")) for r in recs) / n
    if mode == "sot":
        s["sot_fallback"] = sum(bool(r.get("fallback")) for r in recs) / n
    if judge is not None and not (mode == "reference" and not judge.pairwise):  # the proxy's yardstick itself
        s["judge"] = judge.name
        if judge.pairwise and mode == "sequential":
            s["quality"] = s["win_rate"] = s["lc_win_rate"] = 0.5
        else:
            js = [(judgments.get((r["id"], mode)), r, ref) for r, ref in rows]
            js = [(j, r, ref) for j, r, ref in js if j is not None]
            scores = [j["score"] for j, _, _ in js]
            if judge.pairwise:
                s.update(win_rate(scores))
                s["lc_win_rate"] = lc_win_rate(scores, [r["tokens"] for _, r, _ in js],
                                               [ref["tokens"] for _, _, ref in js])["lc_win_rate"]
                s["quality"] = s["win_rate"]
            else:
                s["quality"] = sum(scores) / len(scores) if scores else float("nan")
                for part in ("content", "repetition", "degenerate"):
                    vals = [j["details"][part] for j, _, _ in js]
                    s[part] = sum(vals) / len(vals) if vals else float("nan")
            s["judged"] = len(scores)
            if mode != "sequential" and not judge.pairwise:
                s["vs_sequential"] = _paired(rows, judgments, mode)
    return s


def _paired(rows: list[tuple[dict, dict]], judgments: dict, mode: str) -> dict | None:
    """Paired bootstrap of this mode against sequential on the prompts both were judged on: wall-clock ratio,
    quality difference and quality ratio (mean over mean), each with a 95% interval."""
    pairs = [(r, ref, judgments.get((r["id"], mode)), judgments.get((r["id"], "sequential"))) for r, ref in rows]
    pairs = [(r, ref, j, js) for r, ref, j, js in pairs if j is not None and js is not None and r["wall_s"] > 0]
    if len(pairs) < 2:
        return None
    return paired_bootstrap([ref["wall_s"] for _, ref, _, _ in pairs], [r["wall_s"] for r, _, _, _ in pairs],
                            [js["score"] for _, _, _, js in pairs], [j["score"] for _, _, j, _ in pairs])


def summarize(records: list[dict], judgments: list[dict], cfg: EvalConfig, judge: Judge | None,
              prompts: list[dict]) -> dict:
    """summary.json: per mode and per group (all, parallelizable, not), over the prompts of this run."""
    wanted = {prompt_id(p) for p in prompts}
    by = {(r["id"], r["mode"]): r for r in records if r["id"] in wanted}
    jmap = {(j["id"], j["mode"]): j for j in judgments}
    groups = {"all": lambda r: True, "parallel": lambda r: r.get("parallel") is True,
              "not parallel": lambda r: r.get("parallel") is False}
    out = {"timestamp": timestamp(), "machine": machine(), "judge": judge.name if judge else None,
           "reference_mode": reference_mode(records, judge) if judge else None,
           "config": {"modes": cfg.modes, "efficiency": cfg.efficiency, "system": cfg.system,
                      "mode_options": cfg.mode_options,
                      "sot_skeleton_tokens": cfg.sot_skeleton_tokens, "sot_point_tokens": cfg.sot_point_tokens,
                      "generate": {k: v for k, v in vars(cfg.generate).items() if k != "record_logits"}},
           "groups": {}}
    for g, keep in groups.items():
        per = {}
        for mode in cfg.modes:
            rows = [(r, by[(r["id"], "sequential")]) for (i, m), r in by.items()
                    if m == mode and (i, "sequential") in by and keep(r)]
            per[mode] = summarize_mode(mode, rows, jmap, judge)
        if any(v["prompts"] for v in per.values()):
            out["groups"][g] = per
    return out


def _fmt(v, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


ROWS = [
    ("prompts", "prompts", "{:d}"),
    ("model", "model", "{}"),
    ("wall-clock speedup (gmean)", "wall_speedup_gmean", "{:.2f}x"),
    ("throughput-normalized speedup (gmean)", "throughput_speedup_gmean", "{:.2f}x"),
    ("theoretical speedup (gmean)", "theoretical_speedup_gmean", "{:.2f}x"),
    ("engine efficiency (gmean, forked answers)", "engine_efficiency_gmean", "{:.2f}"),
    ("answers that forked", "forked", "{:.0%}"),
    ("answers with a valid promise", "with_valid_promise", "{:.0%}"),
    ("async threads (mean)", "threads_mean", "{:.2f}"),
    ("rendered tokens (mean)", "tokens_mean", "{:.0f}"),
    ("tag tokens (mean)", "tag_tokens_mean", "{:.0f}"),
    ("decode steps (mean)", "decode_steps_mean", "{:.0f}"),
    ("wall time per answer (mean, s)", "wall_s_mean", "{:.2f}"),
    ("answers that hit a limit", "limits_hit", "{:d}"),
    ("SoT fell back to sequential", "sot_fallback", "{:.0%}"),
    ("win rate vs sequential", "win_rate", "{:.1%}"),
    ("length-controlled win rate", "lc_win_rate", "{:.1%}"),
    ("defect: tag leak", "defects.tag_leak", "{:.0%}"),
    ("defect: hit the token limit", "defects.hit_limit", "{:.0%}"),
    ("defect: runaway (hit the limit while promising)", "defects.runaway", "{:.0%}"),
    ("defect: chunk cut mid-sentence (budget or block guard)", "defects.cut_chunk", "{:.0%}"),
    ("defect: glued items", "defects.glued", "{:.0%}"),
    ("defect: numbering out of order", "defects.numbering", "{:.0%}"),
    ("defect: duplicate items", "defects.duplicate_items", "{:.0%}"),
    ("defect: empty item (a lead with no body)", "defects.empty_item", "{:.0%}"),
    ("defect: any of the above but the limit", "defects.any", "{:.0%}"),
    ("proxy: content kept", "content", "{:.3f}"),
    ("proxy: repetition across chunks", "repetition", "{:.3f}"),
    ("proxy: degenerate chunks", "degenerate", "{:.3f}"),
    ("quality (judge's score)", "quality", "{:.3f}"),
]


def _get(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


# The bar a PASTA mode must clear against the sequential baseline (issue 13, docs/spec.md "Quality measures").
TARGETS = {"defect_points": 0.05, "quality_ratio": 0.95, "wall_parallel": 1.6, "throughput_parallel": 1.4}


def acceptance(summary: dict) -> dict:
    """Per PASTA mode: each target with the measured value and whether it holds (None where not measured)."""
    out = {}
    groups = summary["groups"]
    for mode in [m for m in summary["config"]["modes"] if is_pasta(m)]:
        a = groups.get("all", {}).get(mode, {})
        seq = groups.get("all", {}).get("sequential", {})
        par = groups.get("parallel", {}).get(mode, {})
        if not a.get("prompts"):
            continue
        d, ds = a.get("defects", {}), seq.get("defects", {})
        rows = {"tag leaks": (d.get("tag_leak"), d.get("tag_leak") == 0)}
        for k, label in (("hit_limit", "hit the token limit"), ("glued", "glued items"),
                         ("numbering", "numbering out of order"), ("duplicate_items", "duplicate items")):
            if k in d and k in ds:
                rows[f"{label} (points above sequential)"] = (d[k] - ds[k], d[k] - ds[k] <= TARGETS["defect_points"])
        vs = a.get("vs_sequential") or {}
        if vs:
            rows["quality / sequential's"] = (vs["quality_ratio"], vs["quality_ratio"] >= TARGETS["quality_ratio"],
                                              vs["quality_ratio_ci"])
        for key, label, t in (("wall_speedup_gmean", "wall-clock speedup, parallelizable", "wall_parallel"),
                              ("throughput_speedup_gmean", "throughput-normalized, parallelizable",
                               "throughput_parallel")):
            v = par.get(key)
            rows[label] = (v, None if v is None else v >= TARGETS[t])
        out[mode] = rows
    return out


def report_md(summary: dict, title: str = "pasta eval") -> str:
    m = summary["machine"]
    g = summary["config"]["generate"]
    lines = [f"# {title}", "",
             f"Run {summary['timestamp']} on {m['machine']} ({m['processor']}), {m['threads']} torch threads, "
             f"torch {m['torch']}. Every speedup divides by the `sequential` mode, timed in the same run "
             f"(modes interleaved per prompt, after a warm-up). Judge: `{summary['judge']}`. Decoding: "
             f"max_new_tokens {g['max_new_tokens']}, temperature {g['temperature']}, max_threads {g['max_threads']}, "
             f"async_factor {g['async_factor']}.", ""]
    for group, per in summary["groups"].items():
        modes = list(per)
        lines += [f"## {group} prompts", "", "| measure | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        for label, key, f in ROWS:
            cells = [_fmt(_get(per[mo], key), f) for mo in modes]
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    pastas = [m for m in summary["config"]["modes"] if is_pasta(m)]
    if len(pastas) > 1 and summary["judge"]:
        lines += ["## Speed/quality frontier", "",
                  "Wall-clock speedup against quality; a mode is on the frontier when no other mode is at least as "
                  f"good in both and better in one. Reference for 'fastest at equal-or-better quality': `{pastas[0]}`.",
                  "", "| group | frontier | fastest at quality >= " + pastas[0] + " |", "|---|---|---|"]
        for group, per in summary["groups"].items():
            front = pareto_front(_points(per))
            lines.append(f"| {group} | " + ", ".join(f"`{m}`" for m in front) + " | "
                         + _fmt(fastest_at_quality(per, pastas[0]), "`{}`") + " |")
        lines.append("")
    acc = acceptance(summary)
    if acc:
        ref = summary.get("reference_mode", "sequential")
        lines += ["## Against the sequential baseline", "",
                  f"Targets: no tag leak; each defect at most {TARGETS['defect_points']:.0%} points above sequential's "
                  f"rate; proxy quality at least {TARGETS['quality_ratio']:.0%} of sequential's (both judged against "
                  f"`{ref}`; paired bootstrap 95% interval); on parallelizable prompts wall-clock >= "
                  f"{TARGETS['wall_parallel']}x and throughput-normalized >= {TARGETS['throughput_parallel']}x.", "",
                  "| mode | measure | value | holds |", "|---|---|---|---|"]
        for mode, rows in acc.items():
            for label, v in rows.items():
                val = "-" if v[0] is None else (f"{v[0]:+.0%}" if "points" in label else f"{v[0]:.3f}")
                if len(v) > 2:
                    val += f" [{v[2][0]:.3f}, {v[2][1]:.3f}]"
                lines.append(f"| `{mode}` | {label} | {val} | {'-' if v[1] is None else ('yes' if v[1] else 'no')} |")
        lines.append("")
    noise = summary["groups"].get("all", {}).get("sample", {}).get("vs_sequential")
    ref_name = summary.get("reference_mode") or "sequential"
    if noise:
        lines += [f"Noise floor of the proxy: a second, sampled answer of the sequential model differs from its greedy "
                  f"answer by {noise['quality_diff']:+.3f} [{noise['quality_diff_ci'][0]:+.3f}, "
                  f"{noise['quality_diff_ci'][1]:+.3f}] in quality, both judged against `{ref_name}` "
                  f"(ratio {noise['quality_ratio']:.3f}).", ""]
    if summary["judge"] == "proxy":
        ref = summary.get("reference_mode") or "sequential"
        lines += [f"The `proxy` judge is not a preference judge: it scores content kept relative to the `{ref}` "
                  "answer, repetition across chunks and degenerate chunks (see docs/eval.md)"
                  + (". Without a `reference` mode sequential is judged against itself (content 1 by construction), "
                     "which flatters it; add `reference` to --modes for a fair comparison" if ref == "sequential"
                     else "") + ". Run the AlpacaEval files in `alpaca_eval/` through a strong judge for win rates.",
                  ""]
    return "\n".join(lines)


def _points(per: dict) -> dict[str, tuple[float, float]]:
    """(wall-clock speedup, quality) per mode of one group, sequential at 1.0x; modes without both are left out."""
    pts = {}
    for mode, s in per.items():
        x = 1.0 if mode == "sequential" else s.get("wall_speedup_gmean")
        y = s.get("quality")
        if x is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        pts[mode] = (float(x), float(y))
    return pts


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The modes no other mode beats in both speedup and quality (at least as good in one, better in the other),
    sorted by speedup."""
    front = [m for m, (x, y) in points.items()
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for m2, (x2, y2) in points.items() if m2 != m)]
    return sorted(front, key=lambda m: points[m])


def fastest_at_quality(per: dict, reference: str) -> str | None:
    """The mode with the best wall-clock speedup among those whose quality is no worse than `reference`'s."""
    pts = _points(per)
    if reference not in pts:
        return None
    q = pts[reference][1]
    ok = [m for m, (x, y) in pts.items() if y >= q and m != "sequential"]
    return max(ok, key=lambda m: pts[m]) if ok else None


def pareto_png(summary: dict, path: Path) -> None:
    """Quality against wall-clock speedup, one point per mode (sequential at 1.0x): one panel for all prompts and,
    when the prompts have labels, one for the parallelizable ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("all", "parallel") if g in summary["groups"]] or list(summary["groups"])[:1]
    pairwise = summary["judge"] in ("openai", "hf")
    fig, axes = plt.subplots(1, len(groups), figsize=(5.6 * len(groups), 5.4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        per = summary["groups"][group]
        pts = _points(per)
        front = pareto_front(pts)
        xs = [x for x, _ in pts.values()]
        for i, (mode, (x, y)) in enumerate(pts.items()):
            model = str(per[mode].get("model", ""))
            name = mode + (f" ({model.split('+', 1)[1]})" if "+" in model and ":" not in mode else "")
            on = mode in front
            # a legend entry per point (with its numbers) rather than labels, which collide when points crowd
            ax.scatter([x], [y], s=60, zorder=3, color=f"C{i % 10}", facecolors=f"C{i % 10}" if on else "none",
                       label=f"{name}: {x:.2f}x, {y:.3f}" + ("" if on else " (dominated)"))
        if len(front) > 1:
            ax.plot([pts[m][0] for m in front], [pts[m][1] for m in front], color="grey", lw=1, ls="-",
                    zorder=2, label="frontier (not dominated)")
        if pts:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=7, ncol=2, frameon=False)
        if xs:
            lo, hi = min(xs + [1.0]), max(xs + [1.0])
            pad = max(0.1, 0.25 * (hi - lo))
            ax.set_xlim(lo - pad, hi + 2 * pad)
        ax.margins(y=0.15)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("wall-clock speedup over sequential (geometric mean)")
        ax.set_ylabel("win rate vs sequential" if pairwise else f"quality ({summary['judge'] or 'none'} score)")
        n = next(iter(per.values()))["prompts"]
        ax.set_title(f"{group} prompts ({n})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def alpaca_eval_files(records: list[dict], out_dir: Path, prompts: list[dict]) -> list[Path]:
    """One AlpacaEval model-outputs file per mode: a JSON list of {instruction, output, generator, dataset}."""
    wanted = [prompt_id(p) for p in prompts]
    d = out_dir / "alpaca_eval"
    d.mkdir(exist_ok=True)
    by = {(r["id"], r["mode"]): r for r in records}
    paths = []
    for mode in sorted({r["mode"] for r in records}):
        rows = [by[(i, mode)] for i in wanted if (i, mode) in by]
        out = [{"instruction": r["prompt"], "output": r["answer"], "generator": f"{r['model']}-{mode}",
                "dataset": r.get("category") or "pastalm"} for r in rows]
        p = d / f"{mode.replace(':', '-')}.json"  # no colon in file names (Windows)
        p.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        paths.append(p)
    return paths


_NOT_SETTINGS = {"record_logits", "record_trace", "logprobs"}  # what a decode records, not how it decodes


def check_settings(out_dir: Path, engines: dict[str, Engine], cfg: EvalConfig) -> None:
    """Save the run's settings in out_dir/run.json; refuse to resume a folder made with other settings (its old
    answers would be compared with new ones). Adding a mode to a folder is allowed."""
    settings = {"generate": {k: v for k, v in vars(cfg.generate).items() if k not in _NOT_SETTINGS},
                "system": cfg.system, "sot": [cfg.sot_skeleton_tokens, cfg.sot_point_tokens],
                "models": {m: e.name for m, e in engines.items()},
                "mode_options": {m: cfg.mode_options.get(m, {}) for m in engines}}
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in ("system", "sot") if old.get(k) != settings[k]]
        # a decoding setting added after the folder was made is absent from its file: it ran with the default
        defaults = {k: v for k, v in vars(GenerateConfig()).items() if k not in _NOT_SETTINGS}
        was = {k: v for k, v in old.get("generate", {}).items() if k not in _NOT_SETTINGS}
        diff = [f"generate.{k}" for k in sorted(set(was) | set(settings["generate"]))
                if was.get(k, defaults.get(k)) != settings["generate"].get(k, defaults.get(k))] + diff
        diff += [f"model of {m}" for m, n in settings["models"].items() if old["models"].get(m, n) != n]
        diff += [f"options of {m}" for m, o in settings["mode_options"].items()
                 if m in old["models"] and old.get("mode_options", {}).get(m, {}) != o]
        if diff:
            raise ValueError(f"{out_dir} holds results made with other settings ({', '.join(diff)}); resume with "
                             "the same settings or pass a new --out")
        settings["models"] = {**old["models"], **settings["models"]}
        settings["mode_options"] = {**old.get("mode_options", {}), **settings["mode_options"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def run_eval(prompts: list[dict], engines: dict[str, Engine], cfg: EvalConfig, out_dir: Path,
             judge: Judge | None = None, progress: bool = True) -> dict:
    """Generate, judge and report; returns the summary (also written to out_dir/summary.json)."""
    out_dir = Path(out_dir)
    check_settings(out_dir, engines, cfg)
    records = generate_all(prompts, engines, cfg, out_dir, progress)
    return judge_and_report(records, prompts, cfg, out_dir, judge, progress)


def judge_and_report(records: list[dict], prompts: list[dict], cfg: EvalConfig, out_dir: Path,
                     judge: Judge | None = None, progress: bool = True, note: str | None = None) -> dict:
    """Judge the answers (resuming `judgments.jsonl`), summarize them and write summary.json, report.md,
    pareto.png and the AlpacaEval files; `note` is saved in the summary."""
    judgments = judge_all(records, judge, out_dir, progress) if judge is not None else []
    summary = summarize(records, judgments, cfg, judge, prompts)
    if note:
        summary["note"] = note
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "report.md").write_text(report_md(summary))
    pareto_png(summary, out_dir / "pareto.png")
    alpaca_eval_files(records, out_dir, prompts)
    return summary
