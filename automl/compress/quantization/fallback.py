"""Static int8 with float fallback: keep the layers whose quantization hurts most in float until the
int8 model agrees with the float one on ``target_parity`` of the validation inputs.

Why: one layer can ruin a whole int8 model -- e.g. a depthwise convolution whose BatchNorm had a
near-zero variance folds into weights of 1e3-1e4 that amplify the input's rounding error (measured on a
trained pytorchcv GhostNet: 57 % int8 accuracy from 86 % float; quantized alone, single convolutions
dropped agreement to 27-76 %). Accuracy-aware quantization in NNCF and AIMET's quant analyzer answer
the same way: rank layers by their own damage, revert the worst.

Ranking quantizes one op at a time with the activation ranges calibrated once, so it costs one
quantization and one parity probe per quantizable op; it runs only when the plain int8 model misses
the target.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence

import numpy as np

# the ops onnxruntime's QDQ quantizer wraps in Q/DQ pairs: keeping one float also keeps its output
# float (a residual add or a concatenation can be what ruins the int8 model, not a convolution)
QUANTIZABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "ReduceMean", "GlobalAveragePool",
               "AveragePool", "MaxPool", "Sigmoid", "HardSigmoid", "HardSwish", "Softmax", "Resize", "Pad", "Split")


class ParityProbe:
    """Agreement of an ONNX model's predicted classes with the float model's, on up to ``max_samples``
    validation inputs (the float predictions computed once)."""

    def __init__(self, float_path, loader, threads: int = 1, max_samples: int = 512):
        from automl.runtime import OrtModel

        xs, total = [], 0
        for x, _ in loader:
            xs.append(x.numpy().astype(np.float32))
            total += len(xs[-1])
            if total >= max_samples:
                break
        self.x = np.concatenate(xs)[:max_samples] if xs else np.zeros((0,), np.float32)
        self.threads = threads
        self.reference = self._classes(OrtModel(float_path, threads=threads))

    def _classes(self, model) -> np.ndarray:
        return np.concatenate([np.asarray(model(self.x[i:i + 64])).argmax(1) for i in range(0, len(self.x), 64)])

    def __call__(self, path) -> float:
        from automl.runtime import OrtModel

        if not len(self.x):
            return 1.0
        return float((self._classes(OrtModel(path, threads=self.threads)) == self.reference).mean())


def quantizable_nodes(path) -> List[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZABLE and n.name]


def float_fallback(quantize: Callable[..., None], src, out, probe: ParityProbe, target: float,
                   max_share: float) -> dict:
    """``quantize(src, out, nodes_to_quantize=None, nodes_to_exclude=())`` writes an int8 model; this
    keeps the fewest layers float (most harmful first, at most ``max_share`` of them) that bring parity to
    ``target``, or the best it found. ``out`` holds the chosen model; returns what was done.

    Several harmful layers compound (each alone may cost a tenth of the agreement), so the count is
    searched by doubling, then bisected: parity is close to monotone in it."""
    quantize(src, out)
    parity = probe(out)
    if parity >= target or max_share <= 0:
        return {"parity": parity, "float_layers": []}
    ranked = _rank(quantize, src, out, probe)
    tried = {0: parity}

    def attempt(k: int) -> float:
        if k not in tried:
            quantize(src, out, nodes_to_exclude=ranked[:k])
            tried[k] = probe(out)
        return tried[k]

    cap, low, high = math.ceil(max_share * len(ranked)), 0, None
    k = 1
    while k <= cap and high is None:
        low, high = (k, None) if attempt(k) < target else (low, k)
        k = cap if k < cap < 2 * k else 2 * k
    while high is not None and high - low > 1:  # smallest count in (low, high] that meets the target
        mid = (low + high) // 2
        low, high = (mid, high) if attempt(mid) < target else (low, mid)
    best = high if high is not None else max(tried, key=lambda n: (tried[n], -n))
    if best != list(tried)[-1]:  # the file on disk is the last try: write the chosen one again
        quantize(src, out, nodes_to_exclude=ranked[:best])
    return {"parity": tried[best], "float_layers": ranked[:best]}


def _rank(quantize, src, out, probe) -> List[str]:
    """Quantizable layers, most harmful first: parity with only that layer in int8."""
    alone = []
    for name in quantizable_nodes(src):
        quantize(src, out, nodes_to_quantize=[name])
        alone.append((probe(out), name))
    return [name for _, name in sorted(alone)]


def describe(names: Sequence[str], limit: int = 6) -> str:
    shown = ",".join(names[:limit])
    return shown + (f",+{len(names) - limit}" if len(names) > limit else "") if names else "none"
