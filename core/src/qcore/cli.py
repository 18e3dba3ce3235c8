"""The ``qcore`` command: ``plugins``, ``new-plugin``, ``quantize``, ``eval``, ``generate``,
``inspect``.

``qcore plugins`` imports no torch: it must answer quickly on any machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from qcore.errors import QcoreError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in args.disable_plugin or []:
        current = os.environ.get("QCORE_DISABLE_PLUGINS", "")
        os.environ["QCORE_DISABLE_PLUGINS"] = ",".join(filter(None, [current, name]))
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qcore").setLevel(logging.INFO if args.verbose == 0 else logging.DEBUG)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("qcore: interrupted; no checkpoint was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (QcoreError, ValueError, FileNotFoundError) as exc:
        print(f"qcore: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcore", description="Quantize neural networks with "
                                     "methods from installed plugins.")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-p", "--disable-plugin", action="append", metavar="NAME",
                        help="do not load this plugin (repeatable; like QCORE_DISABLE_PLUGINS)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--requirements", action="store_true",
                   help="print pins (name==version) of qcore and every installed plugin "
                   "distribution, for a requirements file")
    p.set_defaults(func=cmd_plugins)

    n = sub.add_parser("new-plugin", help="start a new plugin project from qcore's template",
                       description="Write a plugin project (pyproject.toml with the qcore "
                       "entry point, a hooks module registering a working example component, "
                       "a README, tests on qcore.testing) into --dir, by default "
                       "./qcore-plugin-NAME. Needs no network.")
    n.add_argument("name", help="the plugin's short name, e.g. 'myquant': the entry point, "
                   "the component, qcore-plugin-NAME and qcore_plugin_NAME")
    n.add_argument("--dir", type=Path, default=None,
                   help="project directory to create (must not exist or be empty)")
    n.add_argument("--kind", choices=["quantizer", "transform"], default="quantizer",
                   help="the example component (default: quantizer)")
    n.set_defaults(func=cmd_new_plugin)

    q = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    q.add_argument("model", nargs="?", help="model directory or hub id (default: embedded SmolLM2)")
    q.add_argument("--pipeline", default=None,
                   help="short form, e.g. 'rtn', 'gptq', 'awq,gptq' (default: rtn)")
    q.add_argument("--recipe", type=Path, help="TOML recipe (instead of --pipeline and scheme flags)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64, help="-1 = one scale per output channel")
    q.add_argument("--sym", action="store_true", help="symmetric grid (no zero point)")
    q.add_argument("--act-bits", type=int, default=None, help="quantize activations too (e.g. 8)")
    q.add_argument("--static-act", action="store_true",
                   help="static per-tensor activation scales (default: dynamic per token)")
    q.add_argument("--act-group-size", type=int, default=-1,
                   help="input columns sharing one dynamic activation scale (e.g. 64 for "
                   "W4A4; default -1: one scale per token)")
    q.add_argument("--act-asym", action="store_true",
                   help="asymmetric activation grid with zero points (dynamic scales only)")
    q.add_argument("--set", action="append", default=[], metavar="STEP.OPTION=VALUE",
                   help="a step's option, e.g. --set rtn.scale_dtype=float32")
    q.add_argument("--packer", default="auto")
    q.add_argument("--kernel", default="auto")
    q.add_argument("--calib", type=Path, help="calibration text (plain text or JSONL with 'text'); "
                   "default: the embedded corpus' calibration split")
    q.add_argument("--samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--device", default=None, help="where blocks run (default: cuda if available)")
    q.add_argument("--calib-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="precision of the calibration forwards (bfloat16: faster on CPUs with "
                   "AMX/AVX-512-BF16 and on GPUs; statistics and weights stay float32)")
    q.add_argument("--out", type=Path, help="checkpoint directory (default: under the qcore cache)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--eval", action="store_true",
                   help="print perplexity before and after (embedded eval split or --corpus)")
    q.add_argument("--corpus", type=Path, help="evaluation text for --eval")
    q.add_argument("--eval-windows", type=int, default=97)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or a qcore checkpoint")
    e.add_argument("model", nargs="?", help="model directory, checkpoint or hub id (default: embedded)")
    e.add_argument("--corpus", type=Path, help="evaluation text (default: embedded eval split)")
    e.add_argument("--windows", type=int, default=97)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text from a model or a qcore checkpoint",
                       description="Greedy (default) or sampled generation, streamed as it "
                       "comes, through the model's chat template where it has one; prints "
                       "prefill and decode tokens/s at the end (to stderr).")
    g.add_argument("model", nargs="?",
                   help="model directory, checkpoint or hub id (default: embedded)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    g.add_argument("--top-p", type=float, default=0.9, help="with --sample")
    g.add_argument("--seed", type=int, default=0, help="with --sample")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed the prompt as plain text even where the model has a chat template")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype (default float32)")
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="write a checkpoint in a format other engines read "
                       "(vLLM, SGLang, transformers)",
                       description="Write a qcore checkpoint as a Hugging Face model directory "
                       "in another format: compressed-tensors, gptq or awq (qcore-plugin-interop).")
    x.add_argument("checkpoint", type=Path, help="qcore checkpoint directory")
    x.add_argument("out", type=Path, help="output model directory")
    x.add_argument("--format", required=True, help="compressed-tensors, gptq or awq (installed "
                   "formats: `qcore plugins`)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="what a checkpoint holds")
    i.add_argument("checkpoint", type=Path)
    i.add_argument("--json", action="store_true")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.set_defaults(func=cmd_inspect)
    return parser


# --------------------------------------------------------------------------- plugins


def cmd_plugins(args: argparse.Namespace) -> int:
    import qcore
    from qcore.plugins import get_plugin_manager, installed_distributions

    if args.requirements:
        # Pins of what is installed, loadable or not: the environment to reproduce.
        for dist, ver in installed_distributions().items():
            print(f"{dist}=={ver}")
        return 0
    manager = get_plugin_manager()
    report = manager.report()
    if args.json:
        print(json.dumps({"qcore": {"version": qcore.__version__,
                                    "contract": qcore.CONTRACT_VERSION},
                          "plugins": report, "errors": [str(e) for e in manager.errors]},
                         indent=2))
        return 0
    print(f"qcore {qcore.__version__} (plugin contract {qcore.CONTRACT_VERSION})")
    for p in manager.plugins.values():
        print(f"{p.name}  ({p.distribution} {p.version})")
        for kind, names in p.components.items():
            print(f"    {kind + 's':12} {', '.join(names)}")
        if p.error:
            print(f"    ERROR: {p.error}")
    for err in manager.errors:
        if not any(p.error == str(err) for p in manager.plugins.values()):
            print(f"ERROR: {err}")
    return 1 if manager.errors else 0


# ------------------------------------------------------------------------ new-plugin


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from qcore.plugin_template import PluginNames, create_plugin

    target = create_plugin(args.name, args.dir, args.kind)
    names = PluginNames.of(args.name, args.kind)
    print(f"created {target}: {names.distribution}, {args.kind} {args.name!r} "
          f"({names.package}.{args.kind}.{names.class_name})")
    print("next:")
    print(f"    cd {target}")
    print('    pip install -e ".[test]"')
    print("    pytest")
    print(f"    qcore quantize MODEL --pipeline {args.name}")
    return 0


# -------------------------------------------------------------------------- quantize


def _parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        step, dot, option = key.partition(".")
        if not sep or not dot or not step or not option:
            raise QcoreError(f"--set {item!r}: write STEP.OPTION=VALUE, e.g. --set rtn.scale_dtype=float32")
        options.setdefault(step.strip(), {})[option.strip()] = value.strip()
    return options


def build_pipeline(args: argparse.Namespace) -> Any:
    from qcore.pipeline import Pipeline
    from qcore.scheme import Scheme

    if args.recipe is not None:
        if args.pipeline is not None or args.set:
            raise QcoreError("give either --recipe or --pipeline/--set, not both")
        return Pipeline.from_toml(args.recipe)
    scheme = Scheme(bits=args.bits, group_size=args.group_size, symmetric=args.sym,
                    act_bits=args.act_bits, act_dynamic=not args.static_act,
                    act_group_size=args.act_group_size, act_symmetric=not args.act_asym)
    return Pipeline.from_names(args.pipeline or "rtn", scheme=scheme, options=_parse_sets(args.set),
                               packer=args.packer, kernel=args.kernel)


def default_out_dir(model: str | None, pipeline: Any) -> Path:
    from qcore.assets import cache_dir

    model_name = Path(model).name if model else "SmolLM2-135M-Instruct"
    label = pipeline.scheme.label().replace(" ", "-")
    return cache_dir() / "checkpoints" / f"{model_name}-{pipeline.short_form().replace(',', '+')}-{label}"


def cmd_quantize(args: argparse.Namespace) -> int:
    import time

    pipeline = build_pipeline(args)
    resolved = pipeline.validate()  # before any model is loaded
    out = args.out or default_out_dir(args.model, pipeline)
    if out.exists() and not args.overwrite:
        raise QcoreError(f"output directory {out} already exists; choose another --out or pass "
                         "--overwrite to replace it")
    calib_text = None
    if args.calib is not None:
        from qcore.assets import read_corpus_file

        calib_text = read_corpus_file(args.calib)
    for name, value in (("--samples", args.samples), ("--seq-len", args.seq_len),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise QcoreError(f"{name} must be at least 1, got {value}")

    import torch

    from qcore.assets import calibration_windows, embedded_corpus, load_model
    from qcore.checkpoint import save
    from qcore.quantize import quantize

    from qcore.calibration import needs_calibration

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    uses_data = needs_calibration(resolved)
    if calib_text is None and uses_data:
        calib_text = embedded_corpus("calibration")
    # a calibration file given for a data-free pipeline is still checked, never ignored silently
    calibration = (calibration_windows(tokenizer, calib_text, args.samples, args.seq_len)
                   if calib_text is not None else None)
    eval_ids = _eval_windows(args, tokenizer, args.corpus, args.eval_windows) if args.eval else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    if eval_ids is not None:
        _report_ppl("before", model, eval_ids, args.batch_size)
    data = (f"{calibration.shape[0]} x {calibration.shape[1]} calibration tokens" if uses_data
            else "weight-only: no calibration data needed")
    print(f"qcore: quantizing with {pipeline.short_form()} ({pipeline.scheme.label()}), {data}",
          file=sys.stderr)
    calib_dtype = None if args.calib_dtype == "float32" else getattr(torch, args.calib_dtype)
    result = quantize(model, resolved, calibration, batch_size=args.batch_size, device=device,
                      calib_dtype=calib_dtype)
    if eval_ids is not None:
        _report_ppl("after", model, eval_ids, args.batch_size)
    path = save(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"quantized {result.n_layers} layers in {result.seconds:.1f} s "
          f"(total {time.perf_counter() - start:.1f} s)")
    print(f"checkpoint: {path} ({size / 1e6:.1f} MB)")
    return 0


def _eval_windows(args: argparse.Namespace, tokenizer: Any, corpus: Path | None, n: int) -> Any:
    from qcore.assets import embedded_corpus, eval_windows, read_corpus_file

    text = read_corpus_file(corpus) if corpus is not None else embedded_corpus("eval")
    return eval_windows(tokenizer, text, n_windows=n, seq_len=getattr(args, "seq_len", 512) if corpus else 512)


def _report_ppl(label: str, model: Any, windows: Any, batch_size: int) -> float:
    from qcore.eval import perplexity

    ppl = perplexity(model, windows, batch_size=batch_size)
    print(f"perplexity {label}: {ppl:.3f} ({windows.shape[0]} windows x {windows.shape[1]} tokens)")
    return ppl


# ------------------------------------------------------------------------------ eval


def _load_model_or_checkpoint(model_arg: str | None) -> tuple[Any, Any]:
    """A qcore checkpoint (quantized) or a float model, with its tokenizer."""
    from qcore.assets import load_model

    path = Path(model_arg) if model_arg else None
    if path is not None and (path / "config.json").is_file() and _qcore_reads(path):
        from transformers import AutoTokenizer

        from qcore.checkpoint import load

        return load(path), AutoTokenizer.from_pretrained(str(path))
    return load_model(model_arg)


def cmd_eval(args: argparse.Namespace) -> int:
    from qcore.assets import embedded_corpus, eval_windows, read_corpus_file
    from qcore.eval import perplexity

    text = read_corpus_file(args.corpus) if args.corpus is not None else None
    model, tokenizer = _load_model_or_checkpoint(args.model)
    windows = eval_windows(tokenizer, text if text is not None else embedded_corpus("eval"),
                           n_windows=args.windows, seq_len=args.seq_len)
    ppl = perplexity(model, windows, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"perplexity": ppl, "windows": windows.shape[0], "seq_len": windows.shape[1]}))
    else:
        print(f"perplexity: {ppl:.3f} ({windows.shape[0]} windows x {windows.shape[1]} tokens)")
    return 0


# -------------------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from qcore.generate import cast_model, generate

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = _load_model_or_checkpoint(args.model)
    model = cast_model(model, getattr(torch, args.dtype))

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                      sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed, chat_template=not args.no_chat_template, on_text=show)
    sys.stdout.write("\n")
    print(result.summary(), file=sys.stderr)
    return 0


def _qcore_reads(path: Path) -> bool:
    """A qcore checkpoint, or one of another tool that an installed checkpoint format
    imports (other quantized or float models go to transformers)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict):
        return False
    from qcore.exchange import importer_for

    method = qconfig.get("quant_method")
    return method == "qcore" or importer_for(str(method)) is not None


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from qcore.exchange import export

    path = export(args.checkpoint, args.out, args.format, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"exported {args.checkpoint} as {args.format}: {path} ({size / 1e6:.1f} MB)")
    return 0


# --------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    from qcore.checkpoint_info import inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"checkpoint   {info['path']}")
    print(f"pipeline     {info['pipeline_short']}  ({info['scheme']})")
    if "imported_from" in info:
        print(f"made with    another tool (quant_method {info['imported_from']['quant_method']!r}"
              f"), read by qcore's {info['imported_from']['format']} format")
    else:
        print("made with    " + ", ".join(f"{d} {v}" for d, v in info["distributions"].items()))
    print(f"layers       {info['n_quantized']} quantized: " + ", ".join(
        f"{n} x {fmt} ({info['formats_bits_per_weight'][fmt]:.3f} bits/weight)"
        for fmt, n in info["formats"].items()))
    print(f"bits/weight  {info['bits_per_weight']:.3f} over quantized layers (every stored bit "
          "counted: codes, scales, zeros, indices, codebooks, padding)")
    print(f"size         {info['size_bytes'] / 1e6:.1f} MB on disk vs {info['fp16_bytes'] / 1e6:.1f} MB "
          f"in fp16 ({info['size_bytes'] / info['fp16_bytes']:.2%})")
    if args.layers:
        for name, layer in info["layers"].items():
            print(f"  {name:48} {layer['shape'][0]}x{layer['shape'][1]}  {layer['format']}  "
                  f"{layer['bits_per_weight']:.3f} b/w  kernel {layer['kernel']}: "
                  f"cpu={layer['kernel_cpu']} cuda={layer['kernel_cuda']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
