"""The command line on bad input, and `pasta generate` end to end on a tiny model folder."""

import json

import pytest

from pastalm.cli import main
from pastalm.testing import tiny_tokenizer


@pytest.mark.parametrize("argv, message", [
    (["generate", ""], "the prompt is empty"),
    (["generate"], "no prompt"),
    (["generate", "hi", "--model", "/no/such/folder"], "no such folder"),
])
def test_bad_input_exits_with_one_clear_line(argv, message, capsys):
    """Bad input exits non-zero with one line that names the problem."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "-3"], "--max-new-tokens: expected a positive integer"),
    (["--max-threads", "-1"], "--max-threads: expected an integer >= 0"),
    (["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
    (["--reserve-scale", "nan"], "--reserve-scale: expected a finite number >= 0"),
])
def test_bad_flag_is_rejected(argv, message, capsys):
    """A negative limit or an out-of-range setting is refused by the argument parser, naming the flag."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_json_and_prompts_file(folder, tmp_path, capsys):
    """--prompts answers many prompts, one JSON object per line, with the documented fields."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Name a color."}\n\nplain line prompt\n')
    assert main(["generate", "--prompts", str(f), "--model", str(folder), "--json", "--max-new-tokens", "8",
                 "--dtype", "fp32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        d = json.loads(line)
        for key in ("text", "raw", "model", "mode", "prompt_tokens", "tokens", "tag_tokens", "decode_steps",
                    "threads", "theoretical_speedup", "wall_s", "limits_hit"):
            assert key in d
        assert d["tokens"] + d["tag_tokens"] <= 8 or d["limits_hit"]


def test_force_raw_and_stream(folder, tmp_path, capsys):
    """--force replays an annotation; --raw prints it back; --stream prints the rendered answer."""
    ans = tmp_path / "a.txt"
    ans.write_text('Tips: <promise topic="a" tokens="6"/><async>keep a schedule</async><sync/> done')
    common = ["generate", "hi", "--model", str(folder), "--force", str(ans), "--dtype", "fp32"]
    assert main(common + ["--raw"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == ans.read_text()
    assert main(common + ["--stream"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == "Tips: keep a schedule done"


# --- training commands and adapters ------------------------------------------------------------------------
LIST = ("Tips:\n\n1. **Sleep early**: go to bed at the same time every night, weekends included.\n\n"
        "2. **No screens**: put the phone away an hour before bed, the light keeps you awake.\n")


def test_annotate_command_writes_checked_records_and_counts(folder, tmp_path, capsys):
    src = tmp_path / "answers.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "Tips?", "answer": LIST}) + "\n"
                   + json.dumps({"id": "b", "prompt": "2+2?", "answer": "4"}) + "\n")
    out = tmp_path / "annotated.jsonl"
    assert main(["annotate", str(src), "--output", str(out), "--model", str(folder)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"input": 2, "kept": 2, "kept-parallel": 1, "kept-serial": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["promises"] == 2 and rows[1]["annotated"] == "4"
    from pastalm.lang.render import render

    assert render(rows[0]["annotated"]) == LIST


def test_malformed_input_file_names_file_and_line(folder, tmp_path, capsys):
    src = tmp_path / "answers.jsonl"
    src.write_text(json.dumps({"prompt": "Tips?", "answer": LIST}) + "\n{broken\n")
    assert main(["annotate", str(src), "--output", str(tmp_path / "o.jsonl"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pasta: error: {src}:2: not valid JSON")
    src.write_text(json.dumps({"prompt": "Tips?"}) + "\n")
    assert main(["train", "sft", str(src), "--output", str(tmp_path / "o"), "--model", str(folder)]) == 2
    assert f"{src}:1: missing field 'annotated'" in capsys.readouterr().err


def test_teacher_annotator_needs_url_and_model(tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"prompt": "Tips?", "answer": LIST}) + "\n")
    assert main(["annotate", str(src), "--output", str(tmp_path / "o.jsonl"), "--annotator", "teacher"]) == 2
    assert "--teacher-url and --teacher-model" in capsys.readouterr().err


def test_train_sft_then_generate_with_the_adapter(folder, tmp_path, capsys):
    """`pasta train sft` on a tiny model folder writes an adapter that `pasta generate --adapter` applies,
    merged, giving the same logits as the PEFT model itself."""
    import torch
    from peft import PeftModel

    from pastalm.models import load
    from pastalm.train.annotate import StructuralAnnotator, check

    ann = check(StructuralAnnotator().annotate("", LIST), LIST, tiny_tokenizer()).annotated
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tips {i}?", "annotated": ann}) + "\n" for i in range(4)))
    out = tmp_path / "adapter"
    assert main(["train", "sft", str(data), "--output", str(out), "--model", str(folder), "--dtype", "fp32",
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "0.05"]) == 0
    out_text = capsys.readouterr().out  # the Trainer's log lines come first, the summary last
    summary = json.loads(out_text[out_text.rfind("\n{\n") + 1:])
    assert summary["steps"] == 2 and summary["examples"] == 4
    assert (out / "adapter_config.json").is_file() and (out / "pasta_train.json").is_file()

    merged = load(str(folder), "fp32", str(out)).model
    ref = PeftModel.from_pretrained(load(str(folder), "fp32", "none").model, str(out)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(ids).logits, load(str(folder), "fp32", "none").model(ids).logits)
    assert main(["generate", "hi", "--model", str(folder), "--adapter", str(out), "--dtype", "fp32",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"].endswith("+adapter")


@pytest.mark.parametrize("adapter, message", [
    ("/no/such/adapter", "is not a PEFT adapter folder"),
])
def test_bad_adapter_is_one_clear_line(folder, adapter, message, capsys):
    assert main(["generate", "hi", "--model", str(folder), "--adapter", adapter]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_every_flag_is_declared_once_and_shared_flags_agree():
    """Settings are declared once (pastalm/settings.py, GenerateConfig): the CLI's source names no flag twice, and a
    flag that several commands share has the same default and parser everywhere, unless a command documents its own
    default (`pasta answers` decodes 320 tokens; the training stages have their own optimizer defaults)."""
    import inspect
    import re

    import pastalm.cli as cli
    from pastalm.engine import GenerateConfig

    declared = re.findall(r'add_argument\(\s*"(--[\w-]+)"', inspect.getsource(cli))
    assert len(declared) == len(set(declared)), sorted({d for d in declared if declared.count(d) > 1})
    own_defaults = {("answers", "max_new_tokens"), ("train sft", "layout"), ("train prefer", "layout"),
                    ("train prefer", "max_new_tokens"), ("train prefer", "temperature"),
                    ("train prefer", "top_p"), ("answers", "adapter"), ("train sft", "reserve_scale"),
                    ("answers", "prompts"), ("eval", "prompts"), ("train prefer", "prompts"),
                    ("generate", "vllm_compile")}
    seen: dict[str, tuple] = {}
    for name, sub in _subparsers(cli.build_parser()):
        for a in sub._actions:
            if not a.option_strings or a.dest == "help" or (name, a.dest) in own_defaults:
                continue
            if name.startswith("train") and a.dest in ("epochs", "batch_size", "grad_accum", "lr", "max_length", "seed"):
                continue  # each stage's config gives its own defaults (SFTConfig, PreferConfig)
            key = (a.default, getattr(a.type, "__name__", a.type), tuple(a.choices or ()))
            assert seen.setdefault(a.dest, key) == key, (name, a.dest, seen[a.dest], key)
    for f in ("max_new_tokens", "temperature", "layout", "reserve_scale", "max_threads"):  # one source of defaults
        assert seen[f][0] == getattr(GenerateConfig(), f)
    assert seen["backend"][0] == "hf" and seen["model"][0] is None
    # vLLM compiles for the long-running commands, not for one answer (docs/serving.md, "Throughput on a CPU")
    compile_default = {name: a.default for name, sub in _subparsers(cli.build_parser()) for a in sub._actions
                       if a.dest == "vllm_compile"}
    assert compile_default == {"generate": False, "eval": True, "serve": True}, compile_default


@pytest.mark.parametrize("extra, message", [
    (["--layout", "reserve"], "the vllm backend decodes the linear layout, not 'reserve'; pass --layout linear"),
    ([], "--backend vllm needs vLLM"),
])
def test_vllm_backend_refusals_are_one_clear_line(folder, extra, message, capsys):
    """The reserve layout on vLLM is refused before anything loads; without vLLM installed, the message says how to
    get it (this runs in .venv, which has no vLLM)."""
    try:
        import vllm  # noqa: F401
        if not extra:
            pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    assert main(["generate", "hi", "--model", str(folder), "--backend", "vllm", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_tag_tokens_train_load_and_decode(folder, tmp_path, capsys):
    """`pasta train sft --tag-tokens`: each tag becomes one vocabulary entry whose rows train with the adapter. The
    merged model (what both backends load) has the rows and the tokenizer the tokens, gives the PEFT model's logits,
    and a forced replay of an annotated answer renders it exactly, each promise one token on main's path."""
    import torch
    from peft import PeftModel

    from pastalm.engine import Engine, GenerateConfig
    from pastalm.lang import render
    from pastalm.lang.tags import TAG_TOKENS
    from pastalm.models import VOCAB_FILE, add_tokens, load
    from pastalm.train.annotate import StructuralAnnotator, check

    # v3 promises, their counts rounded up to 10 as `pasta annotate` writes them: the tags the vocabulary has
    ann = check(StructuralAnnotator(scheme="v3").annotate("", LIST), LIST, tiny_tokenizer(), bucket=10).annotated
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tips {i}?", "annotated": ann}) + "\n" for i in range(4)))
    out = tmp_path / "adapter"
    assert main(["train", "sft", str(data), "--output", str(out), "--model", str(folder), "--dtype", "fp32",
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "0.05", "--tag-tokens"]) == 0
    assert (out / "adapter_model.safetensors").stat().st_size < 200_000  # LoRA and the new rows, not the embeddings
    capsys.readouterr()
    assert json.loads((out / VOCAB_FILE).read_text())["added_tokens"] == TAG_TOKENS

    loaded = load(str(folder), "fp32", str(out))
    tok, merged = loaded.tokenizer, loaded.model
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in TAG_TOKENS)
    assert merged.get_input_embeddings().weight.shape[0] == len(tok) > len(tiny_tokenizer())
    base = load(str(folder), "fp32", "none")
    ids = add_tokens(base.model, base.tokenizer, TAG_TOKENS)
    start = base.model.get_input_embeddings().weight[ids].clone()  # the rows as training began
    ref = PeftModel.from_pretrained(base.model, str(out)).eval()
    x = torch.tensor([[1, 5, ids[2], 33, ids[-2], 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged.get_input_embeddings().weight[ids], start)  # trained
    assert not torch.allclose(merged.get_output_embeddings().weight[ids], start)  # untied: the output rows too

    engine = Engine(merged, tok, loaded.name)
    r = engine.generate(tok.encode("Tips?", add_special_tokens=False), GenerateConfig(), force=ann)
    assert r.text == render(ann) and r.threads == ann.count("<async>")
    assert r.tag_tokens == 3 * ann.count("<async>")  # a promise, <async> and </async>: one token each

    # continuing the adapter keeps its tokens (and their trained rows)
    more = tmp_path / "more"
    assert main(["train", "sft", str(data), "--output", str(more), "--model", str(folder), "--dtype", "fp32",
                 "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-9",
                 "--init-adapter", str(out)]) == 0
    again = load(str(folder), "fp32", str(more)).model
    torch.testing.assert_close(again.get_input_embeddings().weight[ids], merged.get_input_embeddings().weight[ids],
                               atol=1e-4, rtol=1e-4)

    # adding the tags to an adapter trained without them (how the shipped pasta-linear was made): its LoRA goes on
    # as it was, and the new rows start as add_tokens makes them
    from safetensors.torch import load_file

    plain, tagged = tmp_path / "plain", tmp_path / "tagged"
    common = ["--model", str(folder), "--dtype", "fp32", "--batch-size", "2", "--grad-accum", "1"]
    assert main(["train", "sft", str(data), "--output", str(plain), "--max-steps", "2", "--lr", "0.05", *common]) == 0
    assert main(["train", "sft", str(data), "--output", str(tagged), "--max-steps", "1", "--lr", "1e-9",
                 "--init-adapter", str(plain), "--tag-tokens", *common]) == 0
    before, after = (load_file(str(d / "adapter_model.safetensors")) for d in (plain, tagged))
    assert set(before) < set(after) and all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert json.loads((tagged / VOCAB_FILE).read_text())["added_tokens"] == TAG_TOKENS
    fresh = load(str(folder), "fp32", "none")
    rows = fresh.model.get_input_embeddings().weight[add_tokens(fresh.model, fresh.tokenizer, TAG_TOKENS)]
    new = next(v for k, v in after.items() if "embed_tokens" in k and "trainable_tokens" in k)
    torch.testing.assert_close(new, rows.detach(), atol=1e-4, rtol=1e-4)


def test_added_tag_rows_start_as_the_mean_of_their_pieces():
    """A tied model (tiny Qwen2): one new row each, the mean of the rows of the tokens the tag was cut into, and
    the output layer stays tied to it."""
    import torch

    from pastalm.lang.tags import TAG_TOKENS
    from pastalm.models import add_tokens
    from pastalm.testing import tiny_model

    model, tok = tiny_model("qwen2"), tiny_tokenizer()
    pieces = {t: tok.encode(t, add_special_tokens=False) for t in TAG_TOKENS}
    old = model.get_input_embeddings().weight.detach().clone()
    ids = add_tokens(model, tok, TAG_TOKENS)
    w = model.get_input_embeddings().weight
    assert ids == list(range(len(old), len(old) + len(TAG_TOKENS))) and w.shape[0] == len(old) + len(TAG_TOKENS)
    for t, i in zip(TAG_TOKENS, ids):
        torch.testing.assert_close(w[i], old[pieces[t]].mean(0))
    assert model.get_output_embeddings().weight is w
    assert add_tokens(model, tok, TAG_TOKENS) == ids and model.get_input_embeddings().weight.shape[0] == w.shape[0]
