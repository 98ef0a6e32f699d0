"""CLIP's BPE tokenizer (SD v1): the reference ids, truncation, padding, the pinned vocabulary."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from ldm.modules.clip_tokenizer import VOCAB_FILE, CLIPTokenizer, default_vocab_file
from ldm.modules.conditioning import open_tokenizer

REFERENCE = json.loads((Path(__file__).parent.parent / "fixtures" /
                        "clip_reference_ids.json").read_text())
START, END = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def padded(ids: list[int]) -> list[int]:
    return ids + [REFERENCE["pad_id"]] * (REFERENCE["context_length"] - len(ids))


@pytest.mark.parametrize("row", REFERENCE["prompts"], ids=lambda r: r["why"][:30])
def test_ids_equal_the_recorded_clip_reference(tokenizer, row):
    ids, truncated = tokenizer.tokenize([row["text"]])
    assert ids.shape == (1, 77)
    assert ids[0].tolist() == padded(row["ids"])
    assert truncated == [len(tokenizer.encode(row["text"])) > 75]


def test_ids_equal_openais_tokenizer_run_now(tokenizer):
    # The reference itself (the open-clip-torch wheel's copy of OpenAI's SimpleTokenizer),
    # loaded from its file: the package's __init__ needs torchvision, which we never install.
    path = Path(importlib.util.find_spec("open_clip").origin).parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer()
    texts = [r["text"] for r in REFERENCE["prompts"]] + ["an oil painting of a fox, 4k"]
    for text, ours in zip(texts, tokenizer(texts).tolist(), strict=True):
        theirs = reference([text])[0].tolist()
        end = theirs.index(END) + 1
        assert ours == padded(theirs[:end]), text


def test_ids_equal_transformers_clip_tokenizer(tokenizer, tmp_path):
    # transformers 5's CLIPTokenizer (the tokenizers library's BPE) on our vocabulary, for
    # prompts ftfy leaves unchanged (it does not run ftfy).
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    (tmp_path / "vocab.json").write_text(json.dumps(tokenizer.encoder))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in tokenizer.ranks))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 77}))
    hf = HFCLIPTokenizer.from_pretrained(str(tmp_path))
    texts = ["a photograph of an astronaut riding a horse", "", "It's 100% DONE!!!",
             "café naïve", "東京の夜景", "a cat 🐱", "a red circle " * 30]
    want = hf(texts, truncation=True, max_length=77, padding="max_length")["input_ids"]
    assert tokenizer(texts).tolist() == want


def test_truncation_keeps_the_end_token(tokenizer):
    ids, truncated = tokenizer.tokenize(["word " * 75, "word " * 76, "a"])
    assert truncated == [False, True, False]
    assert ids[0, -1] == END and ids[1, -1] == END and ids[1, -2] != END
    assert ids[2].tolist() == [START, 320, END] + [END] * 74  # padded with <|endoftext|>


def test_vocabulary_is_checked_and_errors_name_the_file(tmp_path, monkeypatch):
    assert default_vocab_file().name == VOCAB_FILE
    bad = tmp_path / VOCAB_FILE
    bad.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
    with pytest.raises(ValueError, match="sha256 .* is not CLIP's"):
        CLIPTokenizer(bad)
    with pytest.raises(FileNotFoundError, match="no CLIP vocabulary file"):
        CLIPTokenizer(tmp_path / "missing.txt.gz")
    monkeypatch.setenv("LDM_CLIP_VOCAB", str(bad))  # the override is used, and checked
    with pytest.raises(ValueError, match="sha256"):
        CLIPTokenizer()


def test_saved_tokenizer_opens_offline(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    again = open_tokenizer(tmp_path / "tok", 77)
    assert isinstance(again, CLIPTokenizer)
    text = "a photograph of an astronaut riding a horse"
    assert again(text).tolist() == tokenizer(text).tolist()
    assert again.vocab_size == 49408
