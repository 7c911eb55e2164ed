"""``lln convert --text/--eval-text`` on a tiny random causal LM saved to a folder: the
conversion records the texts it used and ``--measure`` never evaluates on them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lln.cli import main as cli_main  # noqa: E402
from lln.hf.cli import TEXTS_FILE  # noqa: E402
from lln.hf.convert import read_texts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the cat sat on a mat and then it ran away from dog while bird sang".split()
SMALL = ["--calib", "4", "--train", "4", "--eval", "4", "--max-length", "16", "--steps", "2",
         "--batch-size", "8", "--no-progress", "--threads", "1"]


def write_words(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(n)))
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 1-layer Llama and a word-level tokenizer, saved as a transformers folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("llama")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]")
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_read_texts_plain_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first  para\nstill first\n\n\nsecond\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth", "id": 3}\n')
    assert read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == [
        "first para still first", "second", "third", "fourth"]
    (tmp_path / "c.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(ValueError, match="line 1 is not a JSON object with a string 'text'"):
        read_texts([tmp_path / "c.jsonl"], "--eval-text")


def test_convert_with_own_text_records_it_and_measure_skips_it(tiny_llama, tmp_path, capsys):
    text = write_words(tmp_path / "mine.txt", 1500, seed=1)
    held = write_words(tmp_path / "held.txt", 600, seed=2)
    out = tmp_path / "converted"
    cli_main(["convert", str(tiny_llama), "--method", "lln", "--text", str(text),
              "--eval-text", str(held), "--out", str(out), *SMALL])
    record = json.loads((out / TEXTS_FILE).read_text())
    assert record["source"][0]["path"] == str(text)
    assert record["unit"] == "token window"
    assert len(record["calibration"]) == 4 and len(record["transfer"]) == 4
    assert (out / "config.json").is_file()

    # measuring the converted folder on the very text it was converted with: the windows the
    # conversion used (recorded in lln_texts.json) are dropped from the evaluation
    result = tmp_path / "measure.json"
    cli_main(["convert", str(out), "--measure", "--methods", "lln", "--text", str(held),
              "--eval-text", str(text), "--json", str(result), *SMALL])
    settings = json.loads(result.read_text())["settings"]
    assert settings["eval_dropped_as_used_for_conversion"] >= 1
    assert "dropped" in capsys.readouterr().out


def test_measure_refuses_when_every_eval_window_was_used(tiny_llama, tmp_path, capsys):
    text = write_words(tmp_path / "mine.txt", 200, seed=3)  # few windows: all go to the pool
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", str(tiny_llama), "--measure", "--methods", "lln", "--text",
                  str(text), "--eval-text", str(text), *SMALL])
    assert exc.value.code == 2
    assert "every evaluation text was used" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["nosuchmodel", "--out", "X"], "model must be 'minilm', 'smollm2' or a local"),
    (["MODEL", "--text", "/no/such.txt", "--out", "X"], "no such file"),
    (["MODEL", "--steps", "0", "--out", "X"], "--steps must be a positive integer"),
])
def test_convert_usage_errors(tiny_llama, tmp_path, capsys, extra, message):
    argv = [str(tiny_llama) if a == "MODEL" else str(tmp_path / "o") if a == "X" else a
            for a in extra]
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_convert_refuses_to_overwrite_a_folder(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        cli_main(["convert", str(tiny_llama), "--out", str(out), *SMALL])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
