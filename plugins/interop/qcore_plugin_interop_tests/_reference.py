"""The other side's readers, run in a process that never imports qcore.

``read_with_transformers(export, ids)`` loads an exported model directory with
``transformers.AutoModelForCausalLM.from_pretrained`` (compressed-tensors exports through
compressed-tensors' own decompression), in a fresh interpreter, and returns the dense
weights of every linear it decompressed, the logits on ``ids`` and the perplexity under
qcore's definition (each window on its own, ``seq_len - 1`` predictions per window, NLL
summed in float64).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCRIPT = r"""
import json, math, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

export, ids_file, out_file = sys.argv[1:4]
kwargs = {}
config = json.load(open(f"{export}/config.json"))
if config["quantization_config"]["quant_method"] == "compressed-tensors":
    from transformers.utils.quantization_config import CompressedTensorsConfig
    # Decompress to dense float weights (compressed-tensors' ModelCompressor); the
    # compressed kernels need a GPU.
    kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, **kwargs).eval()
ids = load_file(ids_file)["ids"]
out = {}
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear):
        out[f"{name}.weight"] = module.weight.detach().float().contiguous()
total, count = 0.0, 0
with torch.inference_mode():
    logits = model(input_ids=ids).logits.float()
    out["__logits__"] = logits.contiguous()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    total, count = float(nll.double()), ids[:, 1:].numel()
save_file(out, out_file)
imported = sorted(m for m in sys.modules if m == "qcore" or m.startswith("qcore."))
print(json.dumps({"ppl": math.exp(total / count), "qcore_modules": imported}))
"""


def read_with_transformers(export: Path, ids: torch.Tensor, workdir: Path) -> dict:
    """``{"weights": {linear.weight: tensor}, "logits": tensor, "ppl": float,
    "qcore_modules": [...]}`` as transformers, without qcore, reads ``export``."""
    ids_file, out_file = workdir / "ids.safetensors", workdir / "reference.safetensors"
    save_file({"ids": ids.contiguous()}, str(ids_file))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(export), str(ids_file),
                           str(out_file)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"transformers could not read {export}:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tensors = load_file(str(out_file))
    result["logits"] = tensors.pop("__logits__")
    result["weights"] = tensors
    return result
