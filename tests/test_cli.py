"""The command line on bad input, and `pasta generate` end to end on a tiny model folder."""

import json

import pytest

from pastalm.cli import main
from pastalm.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


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
