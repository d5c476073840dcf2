"""A BitFusion-like bit-level composable accelerator (Sharma et al., ISCA 2018) as an analytic model.

Nothing here is measured: every figure is labelled ``modelled``.

Architecture (defaults: the paper's 45 nm design as configured in the authors' simulator for the
Eyeriss comparison, ``bf_e_conf.ini``): a systolic array of 16 rows x 32 columns = 512 Fusion
Units of 16 BitBricks (2-bit x 2-bit multipliers) each, 500 MHz, weight / input / output buffers
of 64 / 32 / 16 KB, a 192-bit (24 bytes per cycle) DRAM interface.

Bit-widths: BitBricks fuse in powers of two, so an operand runs at the next fused width (2, 4, 8;
16 by temporal fusion): a 1-bit operand on 2-bit bricks, 3 bits as 4, 5-7 bits as 8. A MAC at
widths (w, a) takes (w/2)(a/2) bricks, so a Fusion Unit does 16 / ((w/2)(a/2)) MACs per cycle:
16 at w2a2, 4 at w4a4, 1 at w8a8, 1/4 at w16a16.

Compute cycles (the simulator's mapping): rows reduce over input channels, columns hold output
channels; a conv takes batch x groups x oh x ow x k*k x ceil(oc_g / cols) x ceil(ic_g x bricks /
(rows x 16)) cycles, so narrow layers leave rows or columns idle. A conv with fewer input channels
than rows (the first layer) is mapped im2col: the k x k window joins the reduction. Pools and
element-wise ops run on ``post_lanes`` lanes (one per column: our choice; the paper gives none).

Memory cycles: DRAM bytes / ``dram_bytes_per_cycle``. Every layer reads its input from DRAM and
writes its output back (layer by layer, no fusion across layers): weights at w bits (bias at 32),
input and output at a bits (the fused widths the F-PEs read). When neither the weights nor the
input fit half their buffer (double buffering) the cheaper of re-reading the input per weight tile
or the weights per input tile is charged. Latency = max(compute, memory cycles) / clock: tiles are
double-buffered, so transfer and compute overlap.

Energy: MACs x the Horowitz 45 nm MAC energy scaled by bit-width (``energy.mac_pj``: the 8x8
multiply x w*a/64, which is the same as counting (w/2)(a/2) BitBricks, plus a 32-bit accumulate),
plus SRAM traffic (5 pJ per 32 bits: a weight read per MAC, an input read per MAC shared along a
row of columns, a 32-bit partial-sum read and write per output and reduction pass, and a buffer
write of every DRAM byte) and DRAM traffic (640 pJ per 32 bits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from automl.configs import option
from automl.errors import ConfigError, ProfileError
from automl.hardware.energy import DRAM_PJ_PER_32BIT, OP_PJ, SRAM_PJ_PER_32BIT
from automl.hardware.keys import window
from automl.hardware.layers import MAC_OPS, LayerKey, bit_pair, layer_cost, out_hw, pair_precision
from automl.registry import Registry

MODEL_VERSION = "1"
RUNTIME = "bitfusion_model"
FUSED_WIDTHS = (2, 4, 8, 16)
ACC_BITS = 32
# the pairs the fused modes run natively; any other width runs at the next one up
NATIVE_PRECISIONS = tuple(pair_precision(w, a) for w in FUSED_WIDTHS for a in FUSED_WIDTHS)


@dataclass(frozen=True)
class AcceleratorConfig:
    """The parameters the model prices with; stored in the profile's ``accelerator`` section."""

    name: str = option("bitfusion", choices=("bitfusion",), doc="accelerator family")
    rows: int = option(16, low=1, high=65_536, doc="systolic rows (input-channel reduction)")
    cols: int = option(32, low=1, high=65_536, doc="systolic columns (output channels)")
    bricks_per_unit: int = option(16, low=1, high=1024, doc="2x2-bit BitBricks per Fusion Unit")
    clock_mhz: float = option(500.0, low=1.0, high=100_000.0)
    wbuf_kb: float = option(64.0, low=0.0, low_open=True, doc="weight buffer")
    ibuf_kb: float = option(32.0, low=0.0, low_open=True, doc="input buffer")
    obuf_kb: float = option(16.0, low=0.0, low_open=True, doc="output (partial sum) buffer")
    dram_bytes_per_cycle: float = option(24.0, low=0.0, low_open=True, doc="DRAM interface (192 bits)")
    post_lanes: int = option(32, low=1, high=65_536, doc="pool / element-wise lanes (our choice)")
    float_bits: int = option(16, choices=(0, 8, 16),
                             doc="fixed-point width float tensors run at (0: refuse float layers)")
    mul8_pj: float = option(OP_PJ[("int", 8, "mul")], low=0.0, doc="8x8-bit multiply, Horowitz 45 nm")
    acc_pj: float = option(OP_PJ[("int", 32, "add")], low=0.0, doc="32-bit accumulate")
    add8_pj: float = option(OP_PJ[("int", 8, "add")], low=0.0, doc="8-bit add / compare (pools, adds)")
    sram_pj_per_bit: float = option(SRAM_PJ_PER_32BIT / 32, low=0.0)
    dram_pj_per_bit: float = option(DRAM_PJ_PER_32BIT / 32, low=0.0)

    @property
    def units(self) -> int:
        return self.rows * self.cols

    def describe(self) -> str:
        return (f"BitFusion-like accelerator (modelled): {self.units} fusion units x {self.bricks_per_unit} "
                f"bit-bricks, {self.clock_mhz:g} MHz, 45 nm energies")


ACCELERATORS: Registry[AcceleratorConfig] = Registry("accelerator")
ACCELERATORS.register("bitfusion")(AcceleratorConfig())


def fused_bits(bits: int) -> int:
    """The fused operand width a ``bits``-bit operand runs at (2, 4, 8 or 16)."""
    for width in FUSED_WIDTHS:
        if bits <= width:
            return width
    raise ConfigError(f"operands wider than {FUSED_WIDTHS[-1]} bits have no fused mode", key="precision",
                      value=bits, fix=f"use at most {FUSED_WIDTHS[-1]} bits")


def bricks_per_mac(w_bits: int, a_bits: int) -> int:
    return (fused_bits(w_bits) // 2) * (fused_bits(a_bits) // 2)


def operand_bits(key: LayerKey, config: AcceleratorConfig) -> Tuple[int, int]:
    """The fused (weight, activation) widths of ``key``; a float or int8-runtime key has no kernel."""
    pair = bit_pair(key.precision)
    if pair is None:
        raise ProfileError(f"the {config.name} accelerator has no kernel for {key.describe()}: it multiplies "
                           f"integers of 1-{FUSED_WIDTHS[-1]} bits on 2-bit BitBricks", key="precision",
                           value=key.precision,
                           fix="price the layer at an integer precision such as w4a8 (quantize the model, e.g. "
                               "with the mixed or qat method), or price it with a CPU profile")
    return fused_bits(pair[0]), fused_bits(pair[1])


def _ceil(a: float, b: float) -> int:
    if float(a).is_integer() and float(b).is_integer():
        return -(-int(a) // int(b))
    return math.ceil(a / b)


def _geometry(key: LayerKey) -> Tuple[int, int, int, int, int, int]:
    """(groups, input channels per group, output channels per group, kernel area, oh, ow) of a MAC layer."""
    if key.op == "linear":
        return 1, key["in_features"], key["out_features"], 1, 1, 1
    oh, ow = out_hw(key)
    (kh, kw), _, _ = window(key)
    if key.op == "dwconv":
        return key["channels"], 1, 1, kh * kw, oh, ow
    g = key["groups"]
    return g, key["in_ch"] // g, key["out_ch"] // g, kh * kw, oh, ow


def _mapping(key: LayerKey, config: AcceleratorConfig, bricks: int) -> Tuple[int, int]:
    """(compute cycles, partial-sum passes per output) of a MAC layer."""
    g, ic, oc, area, oh, ow = _geometry(key)
    im2col = ic < config.rows and area > 1
    reduction, windows = (ic * area, 1) if im2col else (ic, area)
    passes = _ceil(reduction * bricks, config.rows * config.bricks_per_unit)
    cycles = key.batch * g * oh * ow * windows * _ceil(oc, config.cols) * passes
    return cycles, windows * passes


def dram_bytes(key: LayerKey, config: AcceleratorConfig) -> int:
    """Bytes moved between DRAM and the buffers for one run of the layer (all ``batch`` samples)."""
    w, a = operand_bits(key, config)
    cost = layer_cost(key)
    if key.op in MAC_OPS:
        bias = key["out_features"] if key.op == "linear" else key["out_ch" if key.op == "conv" else "channels"]
        weight_bits = (cost.weights - bias) * w + bias * ACC_BITS
    else:
        weight_bits = cost.weights * ACC_BITS      # BatchNorm scale and shift
    wb = _ceil(weight_bits, 8)
    ib = _ceil(cost.input_elems * key.batch * a, 8)
    ob = _ceil(cost.output_elems * key.batch * a, 8)
    half_w, half_i = config.wbuf_kb * 512, config.ibuf_kb * 512     # double buffering: half is usable
    if key.op not in MAC_OPS or wb <= half_w or ib <= half_i:
        return wb + ib + ob
    return min(wb + ib * _ceil(wb, half_w), ib + wb * _ceil(ib, half_i)) + ob


@dataclass(frozen=True)
class LayerModel:
    """One layer on the accelerator: cycles, traffic and energy (pJ) for all ``batch`` samples."""

    compute_cycles: int
    memory_cycles: int
    dram_bytes: int
    sram_bits: int
    compute_pj: float
    sram_pj: float
    dram_pj: float
    clock_mhz: float

    @property
    def cycles(self) -> int:
        return max(self.compute_cycles, self.memory_cycles)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_cycles >= self.memory_cycles else "memory"

    @property
    def latency_ms(self) -> float:
        return self.cycles / (self.clock_mhz * 1e3)

    @property
    def energy_pj(self) -> float:
        return self.compute_pj + self.sram_pj + self.dram_pj

    @property
    def energy_mj(self) -> float:
        return self.energy_pj * 1e-9


def mac_pj(w_bits: int, a_bits: int, config: AcceleratorConfig) -> float:
    """One MAC at fused widths: the 8x8 multiply scaled by w*a/64 (per BitBrick) plus the accumulate."""
    return config.mul8_pj * w_bits * a_bits / 64.0 + config.acc_pj


def layer_model(key: LayerKey, config: AcceleratorConfig) -> LayerModel:
    """The cycles, DRAM/SRAM traffic and energy of ``key`` (see the module docstring)."""
    w, a = operand_bits(key, config)
    cost = layer_cost(key)
    traffic = dram_bytes(key, config)
    ops = cost.macs * key.batch
    if key.op in MAC_OPS:
        compute, passes = _mapping(key, config, bricks_per_mac(w, a))
        _, _, oc, _, _, _ = _geometry(key)
        sram = ops * w + _ceil(ops * a, min(oc, config.cols)) + cost.output_elems * key.batch * passes * 2 * ACC_BITS
        compute_pj = ops * mac_pj(w, a, config)
    else:
        compute = _ceil(ops, config.post_lanes)
        sram = (cost.input_elems + cost.output_elems) * key.batch * a
        compute_pj = ops * config.add8_pj * a / 8.0
    sram += traffic * 8
    return LayerModel(compute_cycles=compute, memory_cycles=_ceil(traffic, config.dram_bytes_per_cycle),
                      dram_bytes=traffic, sram_bits=sram, compute_pj=compute_pj,
                      sram_pj=sram * config.sram_pj_per_bit, dram_pj=traffic * 8 * config.dram_pj_per_bit,
                      clock_mhz=config.clock_mhz)


def float_precision(config: AcceleratorConfig, w_bits=None, a_bits=None, *, where: str = "") -> str:
    """The pair a layer runs at when its weights or inputs (None) are float: ``float_bits`` fixed point,
    or a ProfileError when the profile refuses float layers (float_bits: 0)."""
    if (w_bits is None or a_bits is None) and not config.float_bits:
        raise ProfileError(f"{where or 'a layer'} computes in float and the {config.name} accelerator has no "
                           "floating-point kernel (this profile sets accelerator.float_bits: 0)",
                           key="accelerator.float_bits", value=0,
                           fix="quantize the model (e.g. quantization methods mixed, qat, int8_ptq), or set "
                               "accelerator.float_bits: 16 to run float tensors as 16-bit fixed point")
    return pair_precision(w_bits or config.float_bits, a_bits or config.float_bits)


def model_entry(key: LayerKey, config: AcceleratorConfig):
    """A profile entry for ``key`` from the model (latency = p10 = p90, one 'run', energy modelled)."""
    from automl.hardware.profile import Entry

    layer = layer_model(key, config)
    ms = float(f"{layer.latency_ms:.6g}")
    return Entry(key=key, latency_ms=ms, raw_ms=ms, p10_ms=ms, p90_ms=ms, runs=1,
                 energy_mj=float(f"{layer.energy_mj:.6g}"), energy_source="modelled")


def build_modelled_profile(space, *, accelerator: str = "bitfusion", config: Optional[AcceleratorConfig] = None,
                           batch: Optional[int] = None, samples: int = 200, reference: str = "w8a8", task=None):
    """A complete modelled HardwareProfile for ``space``: one entry at ``reference`` for every distinct
    layer shape its candidates can have (the enumeration of `automl profile measure`). Other precisions
    and shapes are priced by the model from the profile's ``accelerator`` section, so the file stays
    one entry per shape; an entry, where present, takes precedence over the model."""
    from automl.hardware.candidates import space_layer_keys
    from automl.hardware.profile import DeviceInfo, HardwareProfile, Protocol

    config = config or ACCELERATORS.get(accelerator, key="--accelerator")
    if bit_pair(reference) is None:
        raise ConfigError("the reference precision is an integer pair", key="reference", value=reference,
                          fix="use e.g. w8a8")
    batch = batch or space.deploy.batch
    # Shapes do not depend on the precision. The int8 runtime deploys every candidate at one precision
    # without asking its quantization method (mixed, qat, binary ... have no CPU kernel precision).
    keys, _ = space_layer_keys(space, runtime="onnxruntime_int8", batch=batch, samples=samples, task=task)
    shapes = sorted({k.replace(precision=reference) for k in keys})
    device = DeviceInfo(kind="accelerator", cpu_model=config.describe(), logical_cpus=1, threads=1, runtime=RUNTIME,
                        runtime_version=MODEL_VERSION, precisions=NATIVE_PRECISIONS, batch=batch,
                        platform="modelled (no device)", torch_version="n/a")
    return HardwareProfile(device=device, protocol=Protocol(warmup=0, min_repeats=1, max_repeats=1, block=1,
                                                            stable_rounds=1, chunk=1, retries=0),
                           entries={k: model_entry(k, config) for k in shapes},
                           space={"source": str(space.source), "hash": space.hash}, status="complete",
                           accelerator=config)
