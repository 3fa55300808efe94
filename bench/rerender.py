"""Apply the refused-lead rule (docs/spec.md section 5) to the answers of a `pasta eval` run made before it.

The rule changes only what is rendered, never what is decoded: an answer a runaway guard ended (`repeated_topic`,
`max_promises` in `limits_hit`) loses main's last line when it may be a lead (at most 80 characters, list-like), and
its rendered token count loses that line's tokens. Timings stay as measured. This rewrites `results.jsonl` into a
new folder with the run's settings, judges the re-rendered answers with the proxy judge and writes the report
there, as `pasta eval` would, without decoding anything again:

    python bench/rerender.py docs/eval13b docs/eval13c --per-category 10   # the run's --prompts / --per-category
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUARDS = ("repeated_topic", "max_promises")


def rerender(rec: dict, tokenizer) -> dict:
    from pastalm.engine.interpreter import Interpreter

    if not any(h in GUARDS for h in rec.get("limits_hit", [])):
        return rec
    pieces = [(p["thread"], p["text"]) for p in rec["pieces"]]
    tail = max((k + 1 for k, (t, _) in enumerate(pieces) if t != 0), default=0)
    cut = Interpreter._drop_held_lead(pieces, tail)
    if not cut:
        return rec
    out = dict(rec)
    merged: list[dict] = []
    finish = {p["thread"]: p["finish"] for p in rec["pieces"]}
    for t, text in pieces:
        merged.append({"thread": t, "text": text, "finish": finish[t]})
    out["pieces"] = merged
    out["answer"] = "".join(text for _, text in pieces)
    assert rec["answer"] == out["answer"] + cut, rec["id"]
    out["tokens"] = rec["tokens"] - len(tokenizer.encode(cut, add_special_tokens=False))
    out["rerendered"] = {"cut": cut}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--prompts", default="eval")
    ap.add_argument("--per-category", type=int)
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    from pastalm.models import load_tokenizer

    src, dst = Path(a.src), Path(a.dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "run.json", dst / "run.json")
    tok = load_tokenizer()
    rows = [json.loads(line) for line in (src / "results.jsonl").open()]
    new = [rerender(r, tok) for r in rows]
    (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
    changed = [r for r in new if "rerendered" in r]
    by_mode: dict[str, int] = {}
    for r in changed:
        by_mode[r["mode"]] = by_mode.get(r["mode"], 0) + 1
    print(f"{len(changed)} of {len(rows)} answers lost a refused lead: {by_mode}")
    if not a.no_report:
        report(dst, a.prompts, a.per_category, new)


def report(dst: Path, split: str, per_category: int | None, records: list[dict]) -> None:
    from pastalm.engine import GenerateConfig
    from pastalm.eval.harness import EvalConfig, judge_and_report
    from pastalm.eval.judges import ProxyJudge
    from pastalm.eval.speed import stratified
    from pastalm.train.prompts import load_prompts

    run = json.loads((dst / "run.json").read_text())
    cfg = EvalConfig(modes=list(run["models"]), generate=GenerateConfig(**run["generate"]), system=run["system"],
                     efficiency=False, sot_skeleton_tokens=run["sot"][0], sot_point_tokens=run["sot"][1],
                     mode_options={m: o for m, o in run.get("mode_options", {}).items() if o})
    judge_and_report(records, stratified(load_prompts(split), per_category), cfg, dst, ProxyJudge(),
                     note="refused leads removed from the answers of the run (bench/rerender.py)")


if __name__ == "__main__":
    main()
