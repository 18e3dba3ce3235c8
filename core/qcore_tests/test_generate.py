"""``qcore generate`` and :func:`qcore.generate.generate` on a tiny model: deterministic
greedy text equal to transformers' own greedy generation, from a float model and from a
checkpoint, sampling under a seed, and bad options refused before anything loads."""

from __future__ import annotations

import pytest
import torch

from qcore.cli import EXIT_ERROR, main
from qcore.generate import cast_model, generate, prompt_ids

PROMPT = "the quick brown fox"


def _quantize(model_dir, out, *scheme) -> None:
    assert main(["quantize", str(model_dir), "--calib", str(model_dir.parent / "calib.txt"),
                 "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                 "--pipeline", "rtn", *scheme, "--out", str(out)]) == 0


def _cli(capsys, *args: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def _transformers_greedy(model, tokenizer, n: int) -> str:
    ids = prompt_ids(tokenizer, PROMPT)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_greedy_text_of_a_float_model_and_its_checkpoint(tiny_model_dir, tmp_path, capsys):
    from qcore.assets import load_model
    from qcore.checkpoint import load

    float_out, err = _cli(capsys, str(tiny_model_dir), "--prompt", PROMPT,
                          "--max-new-tokens", "12")
    assert "prefill" in err and "tokens/s" in err
    model, tokenizer = load_model(str(tiny_model_dir))
    expected = _transformers_greedy(model, tokenizer, 12)
    assert expected.strip() and float_out == expected + "\n"
    assert _cli(capsys, str(tiny_model_dir), "--prompt", PROMPT,
                "--max-new-tokens", "12")[0] == float_out  # deterministic

    # An 8-bit per-channel checkpoint, close enough to the float model that greedy
    # decoding picks the same tokens.
    ckpt = tmp_path / "w8"
    _quantize(tiny_model_dir, ckpt, "--bits", "8", "--group-size", "-1")
    quant_out, err = _cli(capsys, str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "12")
    quantized = load(ckpt)
    assert quant_out == _transformers_greedy(quantized, tokenizer, 12) + "\n"
    assert quant_out == float_out


def test_a_4_bit_checkpoint_in_bfloat16_keeps_its_scales(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from qcore.checkpoint import load
    from qcore.qlinear import QuantLinear

    ckpt = tmp_path / "w4"
    _quantize(tiny_model_dir, ckpt, "--bits", "4", "--group-size", "32")
    out, _ = _cli(capsys, str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "6",
                  "--dtype", "bfloat16")
    assert out.endswith("\n")
    model = cast_model(load(ckpt), torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.scales.dtype == torch.float16 for m in layers)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    generate(model, AutoTokenizer.from_pretrained(str(ckpt)), PROMPT, max_new_tokens=2)
    assert {m.provider_name for m in layers} == {"cpu-int4"}  # the packed CPU kernel


def test_sampling_is_seeded(tiny_model_dir) -> None:
    from qcore.assets import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    runs = [generate(model, tokenizer, PROMPT, max_new_tokens=10, sample=True,
                     temperature=1.5, top_p=1.0, seed=seed).text for seed in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len(set(runs)) > 1  # other seeds, other text


def test_streamed_pieces_make_the_text(tiny_model_dir) -> None:
    from qcore.assets import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    pieces: list[str] = []
    result = generate(model, tokenizer, PROMPT, max_new_tokens=9, on_text=pieces.append)
    assert "".join(pieces) == result.text and len(pieces) > 1
    assert result.new_tokens == 9 and result.prompt_tokens == prompt_ids(tokenizer, PROMPT).shape[1]
    assert result.prefill_s > 0 and result.decode_s > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--sample", "--temperature", "0"], "sampling needs temperature > 0"),
])
def test_bad_options_are_refused(tiny_model_dir, capsys, args, message) -> None:
    assert main(["generate", str(tiny_model_dir), "--prompt", PROMPT, *args]) == EXIT_ERROR
    assert message in capsys.readouterr().err
