"""`pasta`: the command line.

  pasta generate PROMPT      answer with asynchronous decoding (bundled SmolLM2 + its PASTA adapter by default)
  pasta answers              the base model's greedy answers to a prompt set, cached as JSONL (resumable)
  pasta annotate             annotate answers in PASTA-LANG (structural or teacher), validate, count rejects
  pasta train sft            fine-tune on annotated answers (LoRA by default), or the sequential baseline
  pasta eval                 sequential vs PASTA vs Skeleton-of-Thought: speed, quality, reports and a plot
  pasta serve                an OpenAI-compatible HTTP server with continuous batching across requests
  pasta cache                the converted model folders kept between runs: list, prune or clear them
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the command's own clock: `pasta generate` reports its first text against it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from .settings import int_at_least


def _output_flag(parser, help: str) -> None:
    parser.add_argument("--output", type=Path, required=True, help=help)


def _modelflags(parser, only=None, defaults=None, helps=None, skip=("baseline_adapter",)):
    from .settings import ModelSettings, add_flags

    return add_flags(parser, ModelSettings, only=only, skip=skip, defaults=defaults, helps=helps)


def build_parser() -> argparse.ArgumentParser:
    from .engine.types import GenerateConfig
    from .settings import PromptSettings, add_flags

    p = argparse.ArgumentParser(prog="pasta", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer prompts with asynchronous (PASTA) decoding")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' reads it from stdin")
    add_flags(g, PromptSettings, only=["prompts"], helps={"prompts": "answer many prompts: 'train', 'eval' or a "
                                                          "JSONL file with a 'prompt' field (or one per line)"})
    _modelflags(g, defaults={"vllm_compile": False}, helps={
        "vllm_compile": "vLLM: compile the model (off here: the compiled model takes ~12 s more to load, which one "
                        "answer does not win back; worth it for --prompts with many prompts, and on by default for "
                        "serve and eval)"})
    g.add_argument("--force", type=Path, help="replay the annotated answer in this file instead of sampling")
    g.add_argument("--raw", action="store_true", help="print the annotated (serialized) form")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print the answer as it is decoded, in reading order (on; --no-stream prints it at the end)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt with text and measures")
    g.add_argument("--show-threads", action="store_true",
                   help="show each thread's progress live while it decodes (on stderr), then print the answer")
    add_flags(g, GenerateConfig)
    _train_parsers(sub)
    _eval_parser(sub)
    _serve_parser(sub)
    c = sub.add_parser("cache", help="list (or clear) the converted model folders pastalm keeps")
    c.add_argument("--clear", action="store_true", help="delete them all (each is converted again when next used)")
    c.add_argument("--prune", action="store_true", help="delete the least recently used ones past PASTA_CACHE_MAX_GB")
    return p


def _serve_parser(sub) -> None:
    from .engine.types import GenerateConfig
    from .settings import add_flags, nonneg_int, positive_int

    v = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _modelflags(v, helps={"system": "system message added when a request has none"})
    v.add_argument("--served-name", help="model id clients ask for (default: the model's name)")
    v.add_argument("--host", default="127.0.0.1", help="interface to listen on (127.0.0.1: this machine only)")
    v.add_argument("--port", type=nonneg_int, default=8000, help="port (0: any free port)")
    v.add_argument("--api-key", help="require this key (default: $PASTA_API_KEY; none when unset)")
    v.add_argument("--max-running", type=positive_int, default=16, help="requests decoded together")
    v.add_argument("--max-queue", type=nonneg_int, default=64, help="requests waiting; past this, 429")
    v.add_argument("--max-tokens-limit", type=positive_int, default=2048, help="largest max_tokens accepted")
    v.add_argument("--max-prompt-tokens", type=positive_int, default=4096)
    v.add_argument("--max-body-bytes", type=positive_int, default=1 << 20)
    v.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_flags(v, GenerateConfig, skip=("sequential",))


def _eval_parser(sub) -> None:
    from .engine.types import GenerateConfig
    from .settings import PromptSettings, add_flags, positive_int

    e = sub.add_parser("eval", help="compare sequential, PASTA and Skeleton-of-Thought decoding on a prompt set")
    add_flags(e, PromptSettings, defaults={"prompts": "eval"})
    e.add_argument("--modes", default="sequential,pasta,sot,reference",
                   help="comma-separated: sequential, pasta, sot, reference (the base model: the proxy judges every "
                        "mode against it), sample (a sampled second sequential answer: the proxy's noise floor)")
    e.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes)")
    _modelflags(e, skip=(), helps={"adapter": "adapter of the pasta mode (as in `pasta generate`); several, comma-separated "
                          "as LABEL=ADAPTER, give one mode pasta:LABEL each (a frontier in one run); "
                          "LABEL=ADAPTER?layout=linear&max_threads=4 changes that mode's decoding settings"})
    e.add_argument("--reference-adapter", default="none",
                   help="adapter of the reference mode (default: none, the base model the adapters were trained on)")
    e.add_argument("--judge", default="proxy", choices=["proxy", "openai", "hf", "none"],
                   help="quality judge (proxy: offline content/repetition/degeneracy checks, not a preference; "
                        "`pasta train prefer` uses it too)")
    e.add_argument("--judge-url", help="openai judge: API root, e.g. http://127.0.0.1:8000/v1")
    e.add_argument("--judge-model", help="openai judge: model name; hf judge: model folder or hub id")
    e.add_argument("--judge-key-env", default="PASTA_JUDGE_API_KEY", help="openai judge: env var holding the key")
    e.add_argument("--no-efficiency", action="store_true",
                   help="skip the sequential replay of each forked PASTA answer (engine efficiency)")
    e.add_argument("--sot-point-tokens", type=positive_int, default=60, help="SoT: promised tokens per point")
    e.add_argument("--sot-skeleton-tokens", type=positive_int, default=120, help="SoT: skeleton token limit")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    add_flags(e, GenerateConfig, skip=("sequential",))


def _train_parsers(sub) -> None:
    from .engine.types import GenerateConfig
    from .settings import PromptSettings, TrainSettings, add_flags, defaults_of, nonneg_float, nonneg_int, \
        positive_int, probability
    from .train.prefer import PreferConfig
    from .train.sft import SFTConfig

    a = sub.add_parser("answers", help="the base model's greedy answers to a prompt set (batched, resumable)")
    add_flags(a, PromptSettings, only=["prompts", "limit"], defaults={"prompts": "train"})
    _output_flag(a, "JSONL to append answers to (rerun to resume)")
    _modelflags(a, only=["model", "adapter", "dtype", "system"], defaults={"adapter": "none"},
                helps={"adapter": "adapter to apply first (default: none, the base model)"})
    a.add_argument("--batch-size", type=positive_int, default=16, help="prompts decoded together")
    add_flags(a, GenerateConfig, only=["max_new_tokens"], defaults={"max_new_tokens": 320})
    a.add_argument("--repetition-penalty", type=float, default=1.1,
                   help="greedy decoding with this penalty (1.0 = plain greedy; small models loop without one)")

    n = sub.add_parser("annotate", help="annotate answers in PASTA-LANG and keep only exact annotations")
    n.add_argument("input", type=Path, help="JSONL with 'prompt' and 'answer' (from `pasta answers`)")
    _output_flag(n, "JSONL of kept records with 'annotated'")
    n.add_argument("--annotator", default="structural", choices=["structural", "teacher"])
    n.add_argument("--scheme", default="v2", choices=["v2", "v3", "v1"],
                   help="structural annotation scheme (docs/spec.md): v2 keeps each item's marker, header and the "
                        "whitespace between items in main; v3 is v2 without topics; v1 puts whole items in the blocks")
    n.add_argument("--teacher-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    n.add_argument("--teacher-model", help="model name at the teacher endpoint")
    n.add_argument("--teacher-key-env", default="PASTA_TEACHER_API_KEY", help="env var holding the API key")
    _modelflags(n, only=["model"], helps={"model": "model whose tokenizer counts chunk tokens (default: bundled "
                                          "SmolLM2)"})
    n.add_argument("--bucket", type=nonneg_int, default=10, help="round token counts up to this (0/1: exact)")
    add_flags(n, PromptSettings, only=["limit"])

    t = sub.add_parser("train", help="fine-tune a model")
    tsub = t.add_subparsers(dest="stage", required=True)
    s = tsub.add_parser("sft", help="stage 1: supervised fine-tuning with the layout's mask, positions, labels")
    s.add_argument("data", type=Path, help="JSONL with 'prompt' and 'annotated' (from `pasta annotate`)")
    _output_flag(s, "output folder (adapter, checkpoints, summary)")
    s.add_argument("--sequential", action="store_true",
                   help="train the sequential baseline: the same answers with their tags removed")
    s.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    _modelflags(s, only=["model", "dtype", "system"],
                helps={"model": "base model (default: bundled SmolLM2-135M-Instruct)",
                       "dtype": "base weights dtype (LoRA weights stay fp32; use fp32 with --full)"})
    add_flags(s, TrainSettings, defaults=defaults_of(SFTConfig, ["epochs", "batch_size", "grad_accum", "lr",
                                                                 "max_length", "seed"]))
    s.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    s.add_argument("--lora-r", type=positive_int, default=16)
    s.add_argument("--lora-top", type=positive_int,
                   help="LoRA on the top N layers only (default: all); halves a CPU step for half the layers")
    add_flags(s, GenerateConfig, only=["reserve_scale", "layout"], defaults={"reserve_scale": 1.0, "layout": "reserve"})
    s.add_argument("--save-steps", type=positive_int, default=50)
    add_flags(s, PromptSettings, only=["limit"])
    s.add_argument("--tag-weight", type=nonneg_float, default=1.0,
                   help="loss weight of predicting a tag token (1: plain mean over tokens)")
    s.add_argument("--init-adapter", help="continue training this adapter folder instead of a new LoRA")
    s.add_argument("--tag-tokens", action="store_true",
                   help="add the tags to the vocabulary, one token each (a promise: 1 token instead of ~8 on main's "
                        "critical path), and train their rows with the adapter")
    s.add_argument("--skip-truncated", action="store_true",
                   help="leave out answers the base model did not finish (hit its token limit)")

    f = tsub.add_parser("prefer", help="stage 2: preference optimization on speed and quality (BoNBoN), in rounds")
    f.add_argument("--from", dest="from_adapter", required=True,
                   help="the PASTA adapter to start from: a folder from `pasta train sft` (or from an earlier "
                   "`pasta train prefer`), 'pasta' (the shipped v3 stage-2 adapter), 'pasta-linear' (the tag-token "
                   "adapter of the linear layout, every backend's default), 'pasta-v2' (the v2 SFT one), "
                   "'pasta-stage1' (the v1 SFT adapter) or 'pasta-v1' (the v1 stage-2 one)")
    _output_flag(f, "folder for samples, pairs, adapters, statistics")
    add_flags(f, PromptSettings, defaults={"prompts": "train"})
    _modelflags(f, only=["model", "dtype", "system", "baseline_adapter"], skip=(),
                helps={"model": "base model (default: bundled SmolLM2)"})
    f.add_argument("--samples", type=int_at_least(2), default=4, help="answers sampled per prompt")
    f.add_argument("--lambdas", default="1,2,4,8,inf", help="speed/quality knobs: score = speedup + lambda*quality")
    f.add_argument("--rounds", type=positive_int, default=1, help="rounds; each samples with the newest model")
    add_flags(f, GenerateConfig, only=["temperature", "top_p", "max_new_tokens", "layout"],
              defaults=defaults_of(PreferConfig, ["temperature", "top_p", "max_new_tokens", "layout"]),
              helps={"max_new_tokens": "token budget of each sample (use pasta eval's --max-new-tokens to train at "
                                       "its limit)",
                     "layout": "layout to sample and train in: 'reserve' (the HF engine's) or 'linear' (the one "
                               "vLLM runs; train the SFT adapter with `pasta train sft --layout linear` first)"})
    f.add_argument("--greedy-candidate", action="store_true",
                   help="make sample 0 of each prompt the greedy answer (how pasta eval and the server decode), so "
                   "a greedy answer that runs into a limit can lose against a sampled one")
    f.add_argument("--batch-requests", type=positive_int, default=16, help="requests decoded together")
    f.add_argument("--alpha", type=probability, default=0.5, help="weight of the winner's likelihood term")
    f.add_argument("--beta", type=float, default=5.0, help="IPO target margin 1/(2 beta), in nats per token with "
                   "--ipo-norm mean (5: 0.1 nat per token)")
    f.add_argument("--ipo-norm", choices=["mean", "sum"], default="mean",
                   help="log-ratios of the IPO term: per-token means (stable on long answers) or sums over the answer")
    add_flags(f, TrainSettings, defaults=defaults_of(PreferConfig, ["epochs", "batch_size", "grad_accum", "lr",
                                                                    "max_length", "seed"]),
              helps={"batch_size": "pairs per micro-batch"})


def _baseline(adapter: str, model: str | None) -> str:
    """--baseline-adapter 'auto': the shipped baseline adapter on the bundled model, none on others."""
    from .models import resolve_adapter

    if adapter != "auto":
        return adapter
    return "baseline" if resolve_adapter("auto", model) is not None else "none"


def _decoding_config(args, sequential: bool = False):
    from .engine import GenerateConfig
    from .settings import from_args

    return from_args(GenerateConfig, args, sequential=sequential)


def _model_settings(args):
    from .settings import ModelSettings, from_args

    return from_args(ModelSettings, args)


def answers(args) -> int:
    from .models import load
    from .train.answers import generate_answers
    from .train.prompts import load_prompts

    prompts = load_prompts(args.prompts, args.limit)
    loaded = load(args.model, args.dtype, args.adapter)
    res = generate_answers(loaded.model, loaded.tokenizer, prompts, args.output, args.batch_size,
                           args.max_new_tokens, args.system, args.repetition_penalty)
    print(json.dumps(res))
    return 0


def annotate(args) -> int:
    from .models import load_tokenizer
    from .train.annotate import StructuralAnnotator, annotate_records
    from .train.io import read_jsonl, write_jsonl

    rows = read_jsonl(args.input, required={"prompt": str, "answer": str})[: args.limit]
    if args.annotator == "teacher":
        if not args.teacher_url or not args.teacher_model:
            raise ValueError("--annotator teacher needs --teacher-url and --teacher-model")
        from .train.teacher import TeacherAnnotator

        annotator = TeacherAnnotator(args.teacher_url, args.teacher_model, api_key_env=args.teacher_key_env)
    else:
        annotator = StructuralAnnotator(scheme=args.scheme)
    kept, counts = annotate_records(rows, annotator, load_tokenizer(args.model), args.bucket)
    write_jsonl(args.output, kept)
    summary = {"input": len(rows), "kept": len(kept), **dict(sorted(counts.items()))}
    print(json.dumps(summary, indent=1))
    return 0


def _lambdas(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            v = float("inf") if part in ("inf", "infinity") else float(part)
        except ValueError:
            v = -1.0
        if not v >= 0:
            raise ValueError(f"--lambdas: expected numbers >= 0 or 'inf', got {part!r}")
        out.append(v)
    if not out:
        raise ValueError("--lambdas: give at least one value")
    return out


def prefer(args) -> int:
    from .train.prefer import PreferConfig, run_prefer

    if args.beta <= 0:
        raise ValueError("--beta must be > 0")
    cfg = PreferConfig(output=str(args.output), from_adapter=args.from_adapter, prompts=args.prompts,
                       baseline_adapter=_baseline(args.baseline_adapter, args.model), model=args.model, dtype=args.dtype,
                       samples=args.samples, lambdas=_lambdas(args.lambdas), rounds=args.rounds, judge="proxy",
                       temperature=args.temperature, top_p=args.top_p,
                       greedy_candidate=args.greedy_candidate, max_new_tokens=args.max_new_tokens,
                       batch_requests=args.batch_requests, alpha=args.alpha, beta=args.beta, ipo_norm=args.ipo_norm,
                       lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_length=args.max_length, layout=args.layout, seed=args.seed, limit=args.limit,
                       per_category=args.per_category, system=args.system)
    stats = run_prefer(cfg)
    print(json.dumps(stats, indent=1))
    return 0


def train(args) -> int:
    from .models import load
    from .train.sft import SFTConfig, train_sft

    if args.stage == "prefer":
        return prefer(args)
    cfg = SFTConfig(data=str(args.data), output=str(args.output), sequential=args.sequential, full=args.full,
                    epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, lr=args.lr, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                    lora_top=args.lora_top,
                    max_length=args.max_length, reserve_scale=args.reserve_scale, layout=args.layout,
                    save_steps=args.save_steps,
                    seed=args.seed, limit=args.limit, system=args.system,
                    skip_truncated=args.skip_truncated, tag_weight=args.tag_weight,
                    init_adapter=args.init_adapter, tag_tokens=args.tag_tokens)
    loaded = load(args.model, args.dtype, "none")
    summary = train_sft(loaded.model, loaded.tokenizer, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "log_history"}, indent=1))
    return 0


def read_prompts(args) -> list[str]:
    """The prompts to answer, from the argument, stdin, or --prompts."""
    if args.prompts is not None:
        if args.prompt is not None:
            raise ValueError("give either a PROMPT or --prompts FILE, not both")
        if args.prompts in ("train", "eval"):
            from .train.prompts import load_prompts

            return [p["prompt"] for p in load_prompts(args.prompts)]
        path = Path(args.prompts)
        if not path.is_file():
            raise ValueError(f"--prompts: no such file '{args.prompts}'")
        prompts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--prompts: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"--prompts: line {n} has no string 'prompt' field")
                prompts.append(obj["prompt"])
            else:
                prompts.append(line)
        if not prompts:
            raise ValueError(f"--prompts: '{args.prompts}' holds no prompt")
        return prompts
    if args.prompt is None:
        raise ValueError("no prompt; give PROMPT, '-' to read stdin, or --prompts FILE")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty; give some text")
    return [text]


def generate(args) -> int:
    from .models import chat_prompt

    prompts = read_prompts(args)
    force = None
    if args.force is not None:
        if not args.force.is_file():
            raise ValueError(f"--force: no such file '{args.force}'")
        force = args.force.read_text()
    cfg = _decoding_config(args, args.sequential)
    settings = _model_settings(args)
    settings.check_layout(cfg.layout)
    engine = settings.engine(layout=cfg.layout)
    cfg = engine.check(cfg)
    first: list[float] = []
    show = getattr(args, "show_threads", False)
    if show and args.json:
        raise ValueError("--show-threads draws a live view for people; leave it out with --json")
    for prompt in prompts:
        ids = chat_prompt(engine.tokenizer, prompt, args.system)
        stream = args.stream and not args.json and not args.raw and not show

        def on_text(s: str) -> None:
            if not first:
                first.append(time.perf_counter() - _STARTED)
            if stream:
                sys.stdout.write(s)
                sys.stdout.flush()

        if show:
            res = _with_threads_view(engine, ids, cfg, force, on_text)
        else:
            res = engine.generate(ids, cfg, force=force, on_text=on_text)
        stream_done = stream
        if args.json:
            d = res.to_json()
            d["dtype"] = settings.dtype
            d["backend"] = engine.backend
            print(json.dumps(d, ensure_ascii=False), flush=True)
            continue
        if not stream_done:
            print(res.raw if args.raw else res.text, flush=True)
        else:
            print(flush=True)
        shown = f", first text {first[0]:.2f} s after start" if first and len(first) == 1 and stream else ""
        first.append(0.0)  # later prompts: not measured from the start
        print(f"[{res.mode}] {res.tokens} tokens + {res.tag_tokens} tag tokens, {res.threads} threads, "
              f"{res.decode_steps} steps, theoretical speedup {res.theoretical_speedup:.2f}x, {res.wall_s:.2f} s"
              + shown
              + (f", limits hit: {', '.join(res.limits_hit)}" if res.limits_hit else ""), file=sys.stderr)
    return 0


def _with_threads_view(engine, ids, cfg, force, on_text):
    """`engine.generate` under a live view of its threads (rich, on stderr), which stays on screen at the end."""
    from rich.console import Console
    from rich.live import Live

    from .threadview import ThreadsView

    view, console = ThreadsView(), Console(stderr=True)
    with Live(view, console=console, refresh_per_second=12) as live:
        res = engine.generate(ids, cfg, force=force, on_text=on_text, on_step=view.update)
        live.refresh()
    if not console.is_terminal:  # a terminal's Live ends its last line itself; a file's does not
        console.print()
    return res


def _judge(args):
    from .eval.judges import HFJudge, OpenAIJudge, ProxyJudge

    if args.judge == "none":
        return None
    if args.judge == "proxy":
        return ProxyJudge()
    if args.judge == "openai":
        if not args.judge_url or not args.judge_model:
            raise ValueError("--judge openai needs --judge-url (an OpenAI-compatible API root) and --judge-model")
        return OpenAIJudge(args.judge_url, args.judge_model, args.judge_key_env)
    from .models import load

    if not args.judge_model:
        raise ValueError("--judge hf needs --judge-model (a local HF chat model folder or hub id)")
    j = load(args.judge_model, args.dtype, "none")
    return HFJudge(j.model, j.tokenizer)


def _adapter_options(text: str) -> dict[str, tuple[str, dict]]:
    """`--adapter A` or `--adapter LABEL=A,LABEL2=B,...` (a label defaults to the folder's name) -> LABEL ->
    (adapter, decoding overrides): `LABEL=A?repeat_guard=1&max_promises=12` runs the PASTA mode of that label with
    those GenerateConfig fields changed (the same weights may appear under several labels)."""
    from dataclasses import fields

    from .engine import GenerateConfig

    types = {f.name: f.type for f in fields(GenerateConfig) if f.name not in ("sequential", "record_logits")}
    out: dict[str, tuple[str, dict]] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        part, _, query = part.partition("?")
        label, _, adapter = part.rpartition("=")
        adapter = adapter.strip()
        label = label.strip() or Path(adapter).name or adapter
        if label in out:
            raise ValueError(f"--adapter: the label {label!r} is used twice; write LABEL=ADAPTER")
        opts = {}
        for kv in filter(None, query.split("&")):
            key, _, value = kv.partition("=")
            if key not in types:
                raise ValueError(f"--adapter: unknown decoding option {key!r} after '?'; choose from "
                                 f"{', '.join(sorted(types))}")
            kind = str(types[key])
            try:
                if "bool" in kind:
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(value)
                    opts[key] = value.lower() in ("1", "true", "yes")
                elif "float" in kind:
                    opts[key] = float(value)
                elif "str" in kind:
                    opts[key] = value
                else:
                    opts[key] = int(value)
            except ValueError:
                raise ValueError(f"--adapter: option {key}={value!r} is not a valid {kind}") from None
        out[label] = (adapter, opts)
    if not out:
        raise ValueError("--adapter: give an adapter")
    return out


def evaluate(args) -> int:
    from .eval.harness import EvalConfig, run_eval
    from .eval.speed import stratified
    from .models import auto_adapter, resolve_adapter
    from .train.prompts import load_prompts

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    parsed = _adapter_options(args.adapter)
    adapters = {label: a for label, (a, _) in parsed.items()}
    if len(adapters) > 1 and "pasta" in modes:  # one pasta mode per adapter
        i = modes.index("pasta")
        modes[i:i + 1] = [f"pasta:{label}" for label in adapters]
    options = {(f"pasta:{label}" if len(adapters) > 1 else "pasta"): o
               for label, (_, o) in parsed.items() if o}
    cfg = EvalConfig(modes=modes, generate=_decoding_config(args), system=args.system, mode_options=options,
                     efficiency=not args.no_efficiency, sot_skeleton_tokens=args.sot_skeleton_tokens,
                     sot_point_tokens=args.sot_point_tokens)
    prompts = stratified(load_prompts(args.prompts), args.per_category)[: args.limit]
    if not prompts:
        raise ValueError(f"--prompts {args.prompts}: no prompts to evaluate")
    settings = _model_settings(args)
    for mode in cfg.modes:  # refuse what the backend cannot decode before loading anything
        settings.check_layout(options.get(mode, {}).get("layout", cfg.generate.layout))
    judge = _judge(args)
    base_adapter = _baseline(args.baseline_adapter, args.model)
    wanted = {"sequential": base_adapter, "sot": base_adapter, "sample": base_adapter,
              "reference": args.reference_adapter}
    if len(adapters) == 1:
        wanted["pasta"] = next(iter(adapters.values()))
    else:
        wanted.update({f"pasta:{label}": a for label, a in adapters.items()})
    cache, engines = {}, {}
    for mode in cfg.modes:
        if mode not in wanted:
            raise ValueError(f"--modes: {mode} names no adapter; pass --adapter LABEL=ADAPTER,... for pasta:LABEL")
        # 'auto': the shipped adapter of the layout this mode decodes
        adapter = auto_adapter(wanted[mode], args.model, options.get(mode, {}).get("layout", cfg.generate.layout),
                               settings.backend)
        key = resolve_adapter(adapter, args.model)
        if key not in cache:  # the same weights twice are loaded once
            cache[key] = settings.engine(adapter)
        engines[mode] = cache[key]
    for mode, eng in engines.items():
        print(f"{mode}: {eng.name}", file=sys.stderr)
    summary = run_eval(prompts, engines, cfg, args.out, judge, progress=not args.quiet)
    per = summary["groups"]["all"]
    for mode, s in per.items():
        q = s.get("quality")
        print(f"{mode:>10}: {s['prompts']} prompts, wall-clock {s.get('wall_speedup_gmean', float('nan')):.2f}x, "
              f"throughput {s.get('throughput_speedup_gmean', float('nan')):.2f}x, theoretical "
              f"{s.get('theoretical_speedup_gmean', float('nan')):.2f}x"
              + (f", quality ({s['judge']}) {q:.3f}" if q is not None else ""), file=sys.stderr)
    print(json.dumps({"out": str(args.out), "summary": str(Path(args.out) / "summary.json")}))
    return 0


def serve(args) -> int:
    import socket

    import uvicorn

    from .serve.app import ServeConfig, create_app
    from .serve.scheduler import ComputeThread

    api_key = args.api_key or os.environ.get("PASTA_API_KEY") or None
    defaults = _decoding_config(args)
    settings = _model_settings(args)
    settings.check_layout(defaults.layout)
    compute = ComputeThread()  # loads the engine and then steps it: one thread does all tensor work
    engine = compute.call(settings.engine, layout=defaults.layout)
    cfg = ServeConfig(model_id=args.served_name or engine.name, defaults=defaults, system=args.system,
                      max_running=args.max_running, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
                      max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes, api_key=api_key)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ValueError(f"--host/--port: cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    # one line a supervisor (or a test) can read; it never shows the key
    print(json.dumps({"serving": cfg.model_id, "url": f"http://{host}:{port}/v1", "api_key": bool(api_key)}),
          flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, cfg, compute), log_level=args.log_level, lifespan="on"))
    server.run(sockets=[sock])
    return 0


def cache(args) -> int:
    from .models import cache_entries, cache_limit, cache_root, prune_cache

    if args.clear or args.prune:
        for e in prune_cache(0 if args.clear else cache_limit()):
            print(f"removed {e.folder} ({e.size / 2**20:.0f} MB)")
    entries = cache_entries()
    limit = cache_limit()
    print(f"{cache_root() / 'models'}: {len(entries)} converted model folders, "
          f"{sum(e.size for e in entries) / 2**30:.2f} GB "
          f"(limit {'none' if limit is None else f'{limit / 2**30:.2f} GB'}: PASTA_CACHE_MAX_GB), "
          "least recently used first")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"  {used}  {e.size / 2**20:8.0f} MB  {e.folder.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here by default; HF_HUB_OFFLINE=0 opts back in
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .models import ModelError
    from .train.teacher import TeacherError

    try:
        commands = {"generate": generate, "answers": answers, "annotate": annotate, "train": train,
                    "eval": evaluate, "serve": serve, "cache": cache}
        return commands[args.command](args)
    except (ModelError, ValueError, TeacherError) as e:
        print(f"pasta: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
