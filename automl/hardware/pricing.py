"""What a hardware profile says a deployed model costs: latency and energy of the trained, compressed model,
priced by what its method says it deployed (``Artifact.quant``, ``Artifact.exit_shares``).

A CPU profile prices fp32 and int8 models layer by layer (an early-exit model as the expected cost over its
segments, weighed by the share of inputs reaching each); a modelled accelerator profile prices each conv/linear
layer at its own bit-widths (see :func:`accelerator_precisions`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from automl.errors import ProfileError
from automl.hardware.accelerator import float_precision
from automl.hardware.layers import MAC_OPS, PRECISIONS, TracedLayer, trace_layers
from automl.hardware.predict import Prediction, assign_precisions, predict_early_exit, predict_keys, predict_model
from automl.hardware.profile import HardwareProfile
from automl.runtime import Artifact, QuantInfo


def price_deployed(profile: HardwareProfile, model, artifact: Artifact, example, *,
                   space: Optional[str] = None) -> Dict:
    """Cost metrics (``latency_ms``, ``energy_mj``, their sources and the precisions used) of ``model`` as
    deployed in ``artifact``."""
    out: Dict = {}
    quant = artifact.quant
    if profile.modelled:
        pred, bits = predict_on_accelerator(profile, model, example, quant, artifact.precision,
                                            space=space)
        out.update(latency_ms=pred.latency_ms, energy_mj=pred.energy_mj, energy_source=energy_source(pred),
                   latency_source="modelled", predicted_precision="+".join(dict.fromkeys(bits.values())),
                   predicted_layer_bits=",".join(f"{_plan_name(n)}:{p}" for n, p in bits.items()),
                   predicted_extrapolated_layers=0)
        return out
    precision = profile_precision(quant, profile)
    shares = artifact.exit_shares
    if shares:  # early exit: the expected cost over segments, weighed by P(reach)
        pred = predict_early_exit(profile, model, example, shares, precision, space=space)
        source = energy_source(pred.segments[0])
        out["predicted_exit_reach"] = ",".join(f"{r:.3f}" for r in pred.reach)
    else:
        # a simulated low-bit model is priced as its float equivalent, without its fake-quantizers
        pred = predict_model(profile, model, example, precision, space=space,
                             free_input_quant=quant.simulated or None)
        source = energy_source(pred)
    out.update(latency_ms=pred.latency_ms, energy_mj=pred.energy_mj, energy_source=source,
               predicted_precision=precision, predicted_extrapolated_layers=pred.count("extrapolated"))
    return out


def _plan_name(name: str) -> str:
    """A quantized layer's name in its method's plan (a simulated model holds it as <name>.layer)."""
    return name[: -len(".layer")] if name.endswith(".layer") else name


def accelerator_precisions(profile: HardwareProfile, model, layers: List[TracedLayer], quant: QuantInfo,
                           label: str) -> Dict[str, str]:
    """{conv/linear layer name: 'wXaY'} of a candidate deployed as ``quant`` on a modelled profile.

    Weight bits: 8 for an int8 model; else the per-layer bits its method recorded (``layer_w_bits``;
    layers it does not list stayed float), else its uniform ``w_bits`` (data-free weight-only), else
    float. Activation bits: int8 models 8, else the layer's own input grid in the model (exact), else
    float. Float weights or inputs run at the profile's ``accelerator.float_bits`` fixed point (or are
    refused)."""
    int8 = quant.priced_as in ("int8_static", "int8_dynamic")
    out = {}
    for t in layers:
        if t.key.op not in MAC_OPS:
            continue
        name, a = _plan_name(t.name), t.input_bits
        if int8:
            w, a = 8, 8
        elif quant.layer_w_bits:
            w = quant.layer_w_bits.get(name)
        else:
            w = quant.w_bits if quant.simulated else None
        out[t.name] = float_precision(profile.accelerator, w, a, where=f"layer '{name}' (deployed as '{label}')")
    return out


def predict_on_accelerator(profile: HardwareProfile, model, example, quant: QuantInfo, label: str, *,
                           space: Optional[str] = None):
    """(prediction, {conv/linear layer: precision}) of a trained candidate on a modelled profile."""
    layers = trace_layers(model, example, "fp32", free_input_quant=True)
    bits = accelerator_precisions(profile, model, layers, quant, label)
    return predict_keys(profile, [t.key for t in assign_precisions(layers, bits)], space=space), bits


def profile_precision(quant: QuantInfo, profile: Optional[HardwareProfile] = None) -> str:
    """The profile precision that prices a model deployed as ``quant``: what its method says
    (``priced_as``); CPU profiles hold fp32 and int8 entries, so anything else is refused."""
    if quant.priced_as in PRECISIONS:
        return quant.priced_as
    raise ProfileError(f"CPU profiles hold fp32 and int8 entries, so they cannot price an {quant.priced_as} model",
                       file=profile.source if profile else None, key="precision", value=quant.priced_as,
                       fix="search a space that deploys it with --no-profile (latency measured in each trial), "
                           "or leave that precision out of the space you profile")


def energy_source(prediction: Prediction) -> str:
    """measured / modelled, or mixed when the layers' entries disagree."""
    return one_source({p.energy_source for p in prediction.layers})


def one_source(sources) -> str:
    sources = set(sources)
    return sources.pop() if len(sources) == 1 else "mixed" if sources else "none"
