"""Text generation from a float model or a qcore checkpoint, with prefill and decode speed.

:func:`generate` runs the model's own ``generate`` (so any architecture transformers can
generate with is served: a KV cache for transformers, a recurrent state for state-space
models), streams the text as tokens arrive, and times the two phases: prefill (the whole
prompt, up to the first new token) and decode (each token after the first).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Generation:
    """What :func:`generate` produced and how fast."""

    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second (the first one ends the prefill)."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def summary(self) -> str:
        decode = (f"decode {self.new_tokens - 1} tokens in {self.decode_s:.2f} s "
                  f"({self.decode_tokens_per_s:.1f} tokens/s)" if self.new_tokens > 1
                  else "decode: no token after the first")
        return (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.2f} s "
                f"({self.prefill_tokens_per_s:.1f} tokens/s); {decode}")


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` computing in ``dtype``: its float parameters and buffers cast, except the
    stored tensors of quantized layers (their scales keep the dtype they were chosen in;
    kernels take inputs of any float dtype)."""
    from qcore.qlinear import QuantLinear

    kept = {m: dict(m._buffers) for m in model.modules() if isinstance(m, QuantLinear)}
    model.to(dtype)
    for module, buffers in kept.items():
        module._buffers.update(buffers)
        module._providers.clear()
    return model


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """The prompt's token ids ``[1, n]``: through the tokenizer's chat template (one user
    turn, then the assistant's turn opened) where it has one and ``chat_template``, else
    the plain text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError("the prompt is empty after tokenization; give some text with --prompt")
    return ids


class _Stream:
    """A transformers streamer: times each new token and hands the new text on."""

    def __init__(self, tokenizer: Any | None, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A multi-byte character split over tokens decodes to U+FFFD until it is complete.
        if not text.endswith("\ufffd") and len(text) > len(self.text):
            if self.on_text is not None:
                self.on_text(text[len(self.text):])
            self.text = text

    def end(self) -> None:
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.text):
            self.on_text(text[len(self.text):])
        self.text = text


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128,
             sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
             seed: int = 0, chat_template: bool = True,
             on_text: Callable[[str], None] | None = None) -> Generation:
    """Greedy (default) or sampled generation; ``on_text`` receives the text as it comes."""
    if sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got "
                         f"temperature={temperature}, top_p={top_p}")
    ids = prompt_ids(tokenizer, prompt, chat_template)
    return generate_ids(model, ids, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                        sample=sample, temperature=temperature, top_p=top_p, seed=seed,
                        on_text=on_text)


def generate_ids(model: Any, ids: torch.Tensor, *, max_new_tokens: int,
                 tokenizer: Any | None = None, sample: bool = False, temperature: float = 0.7,
                 top_p: float = 0.9, seed: int = 0, exact_length: bool = False,
                 on_text: Callable[[str], None] | None = None) -> Generation:
    """Generation from token ids ``[1, n]``, timed. ``exact_length`` generates exactly
    ``max_new_tokens`` (end-of-sequence tokens do not stop it: for benchmarks); without a
    ``tokenizer`` no text is decoded."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    stream = _Stream(tokenizer, on_text)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sample,
                                   streamer=stream)
    if exact_length:
        options["min_new_tokens"] = max_new_tokens
    if sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # a model's generation config may set sampling options; greedy ignores them
        options.update(temperature=None, top_p=None, top_k=None)
    pad = None
    if tokenizer is not None:
        pad = tokenizer.pad_token_id
        pad = tokenizer.eos_token_id if pad is None else pad
    if pad is not None:
        options["pad_token_id"] = pad
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    end = time.perf_counter()
    times = stream.times or [end]
    return Generation(text=stream.text, prompt_tokens=int(ids.shape[1]),
                      new_tokens=len(stream.ids), prefill_s=times[0] - start,
                      decode_s=times[-1] - times[0])
