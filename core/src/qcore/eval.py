"""Perplexity under qcore's fixed protocol (see ``BENCHMARKS.md``).

Each window is scored on its own: no BOS token is added, no context is carried from one
window to the next, and every window of ``seq_len`` tokens contributes ``seq_len - 1``
next-token predictions. The perplexity is ``exp`` of the mean negative log-likelihood over
all predictions of all windows, with the summed NLL accumulated in float64.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["EVAL_SEQ_LEN", "EVAL_WINDOWS", "evaluate_embedded", "perplexity", "window_nll"]

EVAL_WINDOWS = 97
"""Number of evaluation windows of the protocol."""
EVAL_SEQ_LEN = 512
"""Tokens per evaluation window."""


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _check_windows(model: torch.nn.Module, windows: Any, batch_size: int) -> None:
    if not isinstance(windows, torch.Tensor):
        raise TypeError(
            f"windows must be a torch.LongTensor of shape [n_windows, seq_len], got "
            f"{type(windows).__name__}; build it with qcore.assets.eval_windows()"
        )
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(
            f"windows must have shape [n_windows >= 1, seq_len >= 2], got {tuple(windows.shape)}"
        )
    if windows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"windows must hold integer token ids (torch.long), got {windows.dtype}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None:
        low, high = int(windows.min()), int(windows.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"windows hold token ids in [{low}, {high}] but the model's vocabulary has "
                f"{vocab} entries: the windows were made with another tokenizer"
            )


def window_nll(
    model: PreTrainedModel | torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """Summed next-token NLL (nats) of each window, scored on its own; float64 ``[n_windows]``.

    Window ``w`` contributes ``-sum_t log p(w[t+1] | w[:t+1])`` for ``t < seq_len - 1``.
    Runs under :func:`torch.inference_mode` on the model's device; the logits are upcast to
    float32 before the log-softmax and the per-token losses are summed in float64.
    """
    from tqdm.auto import tqdm

    _check_windows(model, windows, batch_size)
    device = _model_device(model)
    n = windows.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    with torch.inference_mode():
        bar = tqdm(total=n, desc="perplexity", unit="win", disable=not progress, leave=False)
        try:
            for start in range(0, n, batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(input_ids=batch, use_cache=False).logits
                pred = logits[:, :-1, :].float()
                target = batch[:, 1:]
                nll = F.cross_entropy(
                    pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none"
                )
                out[start : start + batch.shape[0]] = (
                    nll.view(batch.shape[0], -1).double().sum(dim=1).cpu()
                )
                del logits, pred, nll
                bar.update(batch.shape[0])
        finally:
            bar.close()
    return out


def perplexity(
    model: PreTrainedModel | torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``windows`` (``[n_windows, seq_len]`` token ids).

    ``exp(total NLL / (n_windows * (seq_len - 1)))``: each window is scored on its own
    (no BOS, no context carried over), the NLL summed in float64. ``batch_size`` only trades
    memory for speed; ``progress`` shows a tqdm bar.
    """
    nll = window_nll(model, windows, batch_size=batch_size, progress=progress)
    predictions = windows.shape[0] * (windows.shape[1] - 1)
    return math.exp(float(nll.sum()) / predictions)


def evaluate_embedded(
    model: PreTrainedModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_windows: int = EVAL_WINDOWS,
    seq_len: int = EVAL_SEQ_LEN,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Perplexity on the embedded corpus' eval split under the standard protocol.

    The first ``n_windows`` (97) non-overlapping windows of ``seq_len`` (512) tokens of the
    eval split, tokenized with ``tokenizer`` without special tokens. The fp32 embedded
    SmolLM2-135M-Instruct's score is in BENCHMARKS.md.
    """
    from qcore.assets import embedded_corpus, eval_windows

    windows = eval_windows(tokenizer, embedded_corpus("eval"), n_windows=n_windows, seq_len=seq_len)
    return perplexity(model, windows, batch_size=batch_size, progress=progress)
