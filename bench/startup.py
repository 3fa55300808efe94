"""Start-up of `pasta generate`: seconds from starting the command to its first answer text on stdout.

Runs `pasta generate PROMPT` (default: the README's quick-start prompt) once to fill the model cache (not counted,
unless --cold), then --reps more times, each a fresh process; times the first byte of stdout and the end against
the moment the process was started, and keeps stderr. Prints a table, writes JSON, and with --doc the section of
that markdown file between its markers.

    python bench/startup.py [--reps 3] [--doc docs/benchmarks.md] [-- extra pasta generate flags]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"


def run(cmd: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = None
    out = b""
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 0.01)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            if first is None and chunk.strip():
                first = time.perf_counter() - t0
            out += chunk
        elif proc.poll() is not None:
            out += proc.stdout.read()
            break
    err = proc.stderr.read().decode()
    proc.wait()
    return {"first_text_s": first, "total_s": time.perf_counter() - t0, "rc": proc.returncode,
            "stderr": err.strip().splitlines(), "answer": out.decode()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="Give three tips to sleep better.")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pasta", default=str(Path(sys.executable).parent / "pasta"), help="the pasta executable")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "startup.json")
    ap.add_argument("--doc", type=Path)
    ap.add_argument("extra", nargs="*", help="more `pasta generate` flags (after --)")
    args = ap.parse_args(argv)
    cmd = [args.pasta, "generate", args.prompt, *args.extra]
    warm = run(cmd)  # fills the converted-model cache if it is empty
    runs = [run(cmd) for _ in range(args.reps)]
    firsts = [r["first_text_s"] for r in runs]
    summary = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": cmd, "warm_up": warm,
               "runs": runs, "median_first_text_s": statistics.median(firsts),
               "median_total_s": statistics.median(r["total_s"] for r in runs)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["| run | first text (s) | whole command (s) | stderr |", "|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['first_text_s']:.2f} | {r['total_s']:.2f} | {' / '.join(r['stderr'])} |")
    lines.append(f"| median | {summary['median_first_text_s']:.2f} | {summary['median_total_s']:.2f} | |")
    table = "\n".join(lines)
    print(table)
    if args.doc is not None:
        text = args.doc.read_text()
        block = (f"{BEGIN}\nMeasured {summary['when']} with `python bench/startup.py --reps {args.reps}`: "
                 f"`{' '.join(['pasta'] + cmd[1:])}`, each run a fresh process after one warm-up run that filled "
                 f"the model cache; times from starting the process.\n\n{table}\n{END}")
        text = (text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):] if BEGIN in text
                else text.rstrip() + "\n\n" + block + "\n")
        args.doc.write_text(text)


if __name__ == "__main__":
    main()
