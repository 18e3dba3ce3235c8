"""Tests of qcore.eval: perplexity under the fixed protocol."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qcore import assets
from qcore.eval import evaluate_embedded, perplexity, window_nll


def tiny_llama(vocab_size: int = 50, seed: int = 0):
    from qcore.testing.models import tiny_causal_lm

    return tiny_causal_lm("llama", hidden=32, intermediate=64, vocab_size=vocab_size, seed=seed)


def random_windows(n: int, seq_len: int, vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


class UniformLM(torch.nn.Module):
    """Predicts a uniform distribution; records the inputs it was given."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 1)
        self.seen: list[torch.Tensor] = []

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        self.seen.append(input_ids.clone())
        b, t = input_ids.shape
        return SimpleNamespace(logits=torch.zeros(b, t, self.embed.num_embeddings))


def hand_ppl(model, windows: torch.Tensor) -> float:
    """One window at a time, F.cross_entropy summed, mean over all predictions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0]
            total += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            count += w.numel() - 1
    return math.exp(total / count)


def test_uniform_model_has_ppl_vocab_size() -> None:
    model = UniformLM(37)
    windows = random_windows(5, 16, 37)
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(37, rel=1e-6)
    # The model saw exactly the windows (no BOS prepended, no context carried over).
    assert torch.equal(torch.cat(model.seen), windows)
    assert [s.shape[0] for s in model.seen] == [2, 2, 1]


def test_perplexity_matches_hand_computation() -> None:
    model = tiny_llama(vocab_size=50)
    windows = random_windows(6, 24, 50)
    ppl = perplexity(model, windows, batch_size=4, progress=False)
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(hand_ppl(model, windows), rel=1e-6)


def test_window_nll_is_per_window_sum_in_float64() -> None:
    model = tiny_llama(vocab_size=50)
    windows = random_windows(3, 10, 50)
    nll = window_nll(model, windows, batch_size=3, progress=False)
    assert nll.dtype == torch.float64 and nll.shape == (3,)
    with torch.no_grad():
        for i, w in enumerate(windows):
            logits = model(w[None]).logits[0]
            expected = F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
            assert nll[i].item() == pytest.approx(expected, rel=1e-6)
    # ppl is exp(total / (n * (seq_len - 1))).
    assert perplexity(model, windows, progress=False) == pytest.approx(
        math.exp(nll.sum().item() / (3 * 9)), rel=1e-12
    )


def test_batch_size_does_not_change_result() -> None:
    model = tiny_llama(vocab_size=50, seed=3)
    windows = random_windows(7, 32, 50, seed=4)
    results = [perplexity(model, windows, batch_size=b, progress=False) for b in (1, 3, 8)]
    for r in results[1:]:
        assert r == pytest.approx(results[0], rel=1e-6)


def test_each_window_scored_on_its_own() -> None:
    """Swapping windows' order changes nothing: no state carried between windows."""
    model = tiny_llama(vocab_size=50, seed=5)
    windows = random_windows(4, 16, 50, seed=6)
    a = perplexity(model, windows, batch_size=1, progress=False)
    b = perplexity(model, windows.flip(0), batch_size=1, progress=False)
    assert a == pytest.approx(b, rel=1e-9)


def test_bad_windows_rejected() -> None:
    model = tiny_llama(vocab_size=50)
    with pytest.raises(ValueError, match="shape"):
        perplexity(model, torch.zeros(16, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        perplexity(model, torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="vocabulary has 50"):
        perplexity(model, torch.full((1, 8), 50), progress=False)
    with pytest.raises(ValueError, match="integer token ids"):
        perplexity(model, torch.zeros(1, 8), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, torch.zeros(1, 8, dtype=torch.long), batch_size=0, progress=False)
    with pytest.raises(TypeError, match="LongTensor"):
        perplexity(model, [[1, 2, 3]], progress=False)


def test_evaluate_embedded_uses_eval_split(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(50)}, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    text = " ".join(f"w{(i * 7) % 50}" for i in range(200))
    monkeypatch.setattr(assets, "embedded_corpus", lambda split: text if split == "eval" else "")
    model = tiny_llama(vocab_size=50)
    got = evaluate_embedded(model, tokenizer, n_windows=3, seq_len=40, progress=False)
    windows = assets.eval_windows(tokenizer, text, n_windows=3, seq_len=40)
    assert windows.shape == (3, 40)
    assert got == pytest.approx(hand_ppl(model, windows), rel=1e-6)


@pytest.mark.embedded
def test_embedded_model_and_corpus() -> None:
    """The real SmolLM2 on the first 2 eval windows, and the corpus' split sizes."""
    start = time.perf_counter()
    splits = assets._embedded_split_texts()
    assert len(splits["calibration"]) + len(splits["eval"]) == assets.EMBEDDED_CORPUS_ARTICLES
    assert len(splits["eval"]) == 980
    assert len(splits["calibration"]) == 9053

    model, tokenizer = assets.load_model(None)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    windows = assets.eval_windows(tokenizer, assets.embedded_corpus("eval"), n_windows=2)
    assert windows.shape == (2, 512)
    bos = tokenizer.bos_token_id
    assert bos is None or windows[0, 0].item() != bos
    ppl = perplexity(model, windows, batch_size=2, progress=False)
    assert math.isfinite(ppl) and 5 < ppl < 40, ppl
    assert time.perf_counter() - start < 120
