"""The ``vptq`` quantizer: the component that qcore's pipelines name."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qcore.interfaces import QuantizedWeight, Quantizer

if TYPE_CHECKING:
    import torch

    from qcore.scheme import Scheme

#: ``--bits`` -> (vector size, index bits): ``index_bits / v`` index bits per weight.
#: The codebook is stored with every layer (``2**index_bits * v`` float16 values), so
#: small codebooks win on models the size of SmolLM2 (a 4096 x 6 codebook would add 1.2
#: bits per weight to a 576 x 576 layer); see the README for the measurements.
BITS_TO_VECTOR: dict[int, tuple[int, int]] = {2: (4, 8), 3: (3, 9), 4: (2, 8)}


class VPTQQuantizer(Quantizer):
    """VPTQ: vector quantization with codebooks, second-order (inverse-Hessian) updates."""

    name = "vptq"
    needs = frozenset({"hessian"})
    produces = "vq"
    supported_bits = frozenset(BITS_TO_VECTOR)
    supported_act_bits = frozenset({None})
    sequential = True

    @dataclass(frozen=True)
    class Config:
        #: input columns per vector (0: from ``--bits``, see ``BITS_TO_VECTOR``)
        vector_size: int = 0
        #: bits per index of the main codebook, ``2**index_bits`` entries (0: from ``--bits``)
        index_bits: int = 0
        #: bits per index of the residual codebook (0: no residual stage)
        res_index_bits: int = 0
        #: fraction of the input columns (those with the largest Hessian diagonal) given
        #: their own codebook, rounded to whole vectors (0: no outlier part)
        outlier_fraction: float = 0.0
        #: bits per index of the outlier codebook (0: the main ``index_bits``)
        outlier_index_bits: int = 0
        #: per-output-channel normalisation stored with the weight: ``scale`` (row RMS),
        #: ``scale_offset`` (row mean and RMS) or ``none``
        normalization: Literal["none", "scale", "scale_offset"] = "scale"
        #: ``obs``: second-order assignment with inverse-Hessian error feedback;
        #: ``diagonal`` / ``euclidean``: nearest entry, no feedback (for comparison)
        search: Literal["obs", "diagonal", "euclidean"] = "obs"
        #: quantize vector positions by decreasing Hessian diagonal
        act_order: bool = True
        #: Lloyd iterations of the codebook k-means
        kmeans_iterations: int = 10
        #: vectors the k-means clusters at most (a seeded subsample of a larger layer)
        kmeans_samples: int = 32768
        seed: int = 0
        #: columns per lazy batch update (rounded up to whole vectors)
        block_size: int = 128
        #: added to the Hessian's diagonal, relative to its mean diagonal
        dampening: float = 0.01
        #: each group of linears sees the inputs of the already-quantized earlier ones
        true_sequential: bool = True
        #: CPU threads of the solver (0: torch's setting). Its operations are small (one
        #: vector position, a 1 MiB distance chunk), where a thread pool costs more than
        #: it saves: on a busy 2-core machine 2 threads made them several times slower
        #: than 1.
        threads: int = 1

        def __post_init__(self) -> None:
            checks = [
                (0 <= self.vector_size <= 64, f"vector_size must be 1..64 (0: from bits), got "
                                              f"{self.vector_size}"),
                (0 <= self.index_bits <= 16, f"index_bits must be 1..16 (0: from bits), got "
                                             f"{self.index_bits}"),
                (0 <= self.res_index_bits <= 16, f"res_index_bits must be 0..16, got "
                                                 f"{self.res_index_bits}"),
                (0 <= self.outlier_index_bits <= 16, f"outlier_index_bits must be 0..16, got "
                                                     f"{self.outlier_index_bits}"),
                (0 <= self.outlier_fraction < 1, f"outlier_fraction must be in [0, 1), got "
                                                 f"{self.outlier_fraction}"),
                (self.kmeans_iterations >= 1, f"kmeans_iterations must be >= 1, got "
                                              f"{self.kmeans_iterations}"),
                (self.kmeans_samples >= 1, f"kmeans_samples must be >= 1, got "
                                           f"{self.kmeans_samples}"),
                (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
                (0 <= self.dampening < 10, f"dampening must be in [0, 10), got {self.dampening}"),
                (self.threads >= 0, f"threads must be >= 0 (0: torch's setting), got "
                                    f"{self.threads}"),
            ]
            for ok, message in checks:
                if not ok:
                    raise ValueError(message)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.sequential = self.config.true_sequential  # type: ignore[misc]

    def vector_settings(self, bits: int) -> tuple[int, int]:
        """(vector size, main index bits) for ``--bits bits``, with the options applied."""
        v, index_bits = BITS_TO_VECTOR[bits]
        return self.config.vector_size or v, self.config.index_bits or index_bits

    def n_outliers(self, in_features: int, vector_size: int) -> int:
        """Outlier columns of a layer: the fraction rounded to whole vectors, leaving at
        least one main vector."""
        if self.config.outlier_fraction <= 0:
            return 0
        vectors = max(1, round(self.config.outlier_fraction * in_features / vector_size))
        return min(vectors * vector_size, max(0, in_features - vector_size))

    def quantize(self, weight: torch.Tensor, stats: Mapping[str, Any],
                 scheme: Scheme) -> QuantizedWeight:
        from qcore_plugin_vptq.solver import vptq

        c = self.config
        v, index_bits = self.vector_settings(scheme.bits)
        n_outliers = self.n_outliers(weight.shape[1], v)
        with torch_threads(c.threads if weight.device.type == "cpu" else 0):
                result = vptq(weight, stats["hessian"], vector_size=v, index_bits=index_bits,
                          res_index_bits=c.res_index_bits, n_outliers=n_outliers,
                          outlier_index_bits=c.outlier_index_bits or index_bits,
                          normalization=c.normalization, search=c.search,
                          act_order=c.act_order, kmeans_iterations=c.kmeans_iterations,
                          kmeans_samples=c.kmeans_samples, seed=c.seed,
                          block_size=c.block_size, dampening=c.dampening)
        return QuantizedWeight(
            format="vq", shape=(weight.shape[0], weight.shape[1]), tensors=result.tensors,
            params={"vector_size": v, "index_bits": result.index_bits,
                    "res_index_bits": result.res_index_bits,
                    "outlier_index_bits": result.outlier_index_bits,
                    "n_outliers": result.n_outliers, "bits": scheme.bits})


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (0: unchanged), then restore."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
