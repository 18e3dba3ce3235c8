"""One llm-compressor run under qcore's benchmark protocol. Runs in the peer's own virtual
environment (benchmarks/peers/llm_compressor.py makes it and calls this file); it imports
llm-compressor and its dependencies, never qcore.

Input: the exported float model directory, and the protocol's token windows (``calib.pt``:
128 x 512, ``eval.pt``: 97 x 512) as qcore made them, so both tools see the same tokens.
Output: one JSON line, as qcore's benchmark children print it: seconds from loading the
model to the saved compressed checkpoint, peak RSS, perplexity.

The perplexity follows qcore's definition (qcore/eval.py): each window scored on its own,
``seq_len - 1`` next-token predictions per window, exp of the mean NLL over all of them,
the NLL summed in float64, the model in float32, batches of 8 windows.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size]
            logits = model(input_ids=ids).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="sum")
            total += float(nll.double())
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def stored_bits_per_weight(folder: str) -> float:
    """Every stored bit of the quantized linears of a saved compressed-tensors checkpoint
    (packed codes, scales, zero points, shapes; not biases), per weight of those linears."""
    from pathlib import Path

    from safetensors import safe_open

    bits = weights = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
            layers = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_packed")}
            for key in keys:
                layer, name = key.rsplit(".", 1)
                if layer not in layers or name == "bias":
                    continue
                tensor = f.get_tensor(key)
                bits += 8 * tensor.numel() * tensor.element_size()
                if name == "weight_shape":
                    weights += int(tensor[0]) * int(tensor[1])
    return bits / max(weights, 1)


def weight_args(spec: dict) -> object:
    from compressed_tensors.quantization import QuantizationArgs

    kwargs = dict(num_bits=spec["bits"], type="int", symmetric=spec["symmetric"],
                  strategy="group", group_size=spec["group_size"])
    if spec.get("observer"):
        kwargs["observer"] = spec["observer"]
    return QuantizationArgs(**kwargs)


def recipe(spec: dict) -> list:
    """The modifiers of one setting (``spec["method"]``: gptq, rtn or awq)."""
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args(spec))
    groups = {"group_0": scheme}
    if spec["method"] == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    from llmcompressor.modifiers.quantization import QuantizationModifier

    rtn = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    if spec["method"] == "rtn":
        return [rtn]
    if spec["method"] == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(ignore=["lm_head"], config_groups=groups,
                            duo_scaling=spec.get("duo_scaling", True)), rtn]
    raise SystemExit(f"unknown method {spec['method']!r}")


def cpu_only_pin_memory() -> None:
    """llm-compressor's AWQ pins its activation cache to page-locked memory, which a
    CPU-only torch refuses; on CPU pinning only speeds up copies to a GPU, so it becomes
    the identity here (the workaround the peer needs on this machine)."""
    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--spec", required=True, help="JSON: method, bits, group_size, ...")
    parser.add_argument("--save", help="keep the compressed checkpoint in this directory")
    args = parser.parse_args()
    spec = json.loads(args.spec)
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    cpu_only_pin_memory()

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib = torch.load(args.calib)
    windows = torch.load(args.eval)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe(spec),
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.save or tmp
        model.save_pretrained(folder, save_compressed=True)
        tokenizer.save_pretrained(folder)
        seconds = time.perf_counter() - start
        bits_per_weight = stored_bits_per_weight(folder)
    peak = peak_rss_gb()
    import llmcompressor

    result = {"quantize_s": seconds, "peak_rss_gb": peak, "bits_per_weight": bits_per_weight,
              "ppl": perplexity(model, windows), "peer_version": llmcompressor.__version__}
    if args.save:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        reloaded = AutoModelForCausalLM.from_pretrained(
            args.save, dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(run_compressed=False))
        result["reloaded_ppl"] = perplexity(reloaded.eval(), windows)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
