"""What a deployed model is: its files, runtime and typed deploy information (set by the methods that
deployed it, read by pricing and measurement)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class QuantInfo:
    """How a deployed model is quantized, typed for pricing by a hardware profile; ``Artifact.precision``
    is the label for people. Set by the quantization method that deployed it."""

    priced_as: str = "fp32"       # the profile precision that prices it (fp32, int8_static, int8_dynamic, ...)
    simulated: bool = False       # low-bit values computed in float: priced as float, without its fake-quantizers
    w_bits: Optional[int] = None  # weight bits of every quantized layer, where one number holds for all
    a_bits: Optional[int] = None  # their input bits, where one number holds (None: float or per layer)
    layer_w_bits: Dict[str, int] = field(default_factory=dict)  # per quantized layer, where the method records it


@dataclass
class Artifact:
    """A deployable model file and what it is."""

    path: Path
    runtime: str = "onnxruntime"
    precision: str = "fp32"
    notes: Dict[str, str] = field(default_factory=dict)
    quant: QuantInfo = field(default_factory=QuantInfo)
    # The file a user ships when it is not the ONNX model that is run and timed (e.g. a Deep
    # Compression file that decodes into the same weights); sizes are measured on it.
    shipped: Optional[Path] = None
    # Further files the deployed model consists of (early exit: one graph per segment; ``path`` is
    # then the manifest that names them). Sizes count them all.
    files: Tuple[Path, ...] = ()
    # Early exit: the share of validation inputs leaving at each early exit (the last exit takes the rest),
    # which a hardware profile weighs the segments' costs by; empty for a model without exits.
    exit_shares: Tuple[float, ...] = ()

    def deployed_files(self) -> List[Path]:
        return [self.shipped] if self.shipped is not None else [self.path, *self.files]
