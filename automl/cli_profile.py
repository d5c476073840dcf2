"""``automl profile measure | validate | model``: hardware profiles from the command line."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from automl.cli_common import load_space_arg, search_space
from automl.errors import ConfigError


def _below_one(flag: str, value) -> ConfigError:
    return ConfigError("must be at least 1", key=flag, value=value, fix=f"give {flag} 1 or more, or leave it out "
                       "for the default")


def cmd_profile_measure(args) -> int:
    from automl.hardware.candidates import check_runtime
    from automl.hardware.measure import profile_space

    if args.device != "cpu":
        raise ConfigError("only CPU profiles can be measured on this machine", key="--device", value=args.device,
                          fix="use --device cpu")
    check_runtime(args.runtime)
    for key in ("threads", "batch", "samples", "calibration_models"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise _below_one("--" + key.replace("_", "-"), value)
    space = search_space(args)
    threads = args.threads or space.deploy.threads
    print(f"automl profile measure: {space.source} on {args.device}, {args.runtime}, {threads} thread(s) -> "
          f"{args.out}", flush=True)
    from automl.hardware.profile import Protocol

    protocol = Protocol()
    if args.max_drift is not None:
        if not 0 < args.max_drift < 1:
            raise ConfigError("must lie in (0, 1)", key="--max-drift", value=args.max_drift,
                              fix=f"a share such as {protocol.max_drift} (the default)")
        protocol = Protocol(max_drift=args.max_drift)
    try:
        profile_space(space, args.out, runtime=args.runtime, threads=threads, batch=args.batch,
                      samples=args.samples, calibration_models=args.calibration_models, protocol=protocol)
    except KeyboardInterrupt:
        print(f"automl profile measure: interrupted; the entries measured so far are in {args.out}. Run the same "
              "command again to resume.", file=sys.stderr)
        return 130
    return 0


def cmd_profile_validate(args) -> int:
    from automl.hardware.profile import HardwareProfile
    from automl.hardware.validate import validate_profile

    if args.samples < 1:
        raise _below_one("--samples", args.samples)
    from automl.search.costing import check_profile

    profile = HardwareProfile.load(args.profile)
    space = search_space(args)
    if not profile.modelled:  # measured with other threads/runtime/batch, its figures would be wrong
        check_profile(profile, space)
    stored = (profile.validation or {}).get("samples") or 0
    if stored > args.samples and not args.replace_figures:
        raise ConfigError(f"the profile's stored validation figures come from {stored} samples; {args.samples} "
                          "would replace them with weaker ones", key="--samples", value=args.samples,
                          fix=f"use --samples {stored} or more, or add --replace-figures")
    out = Path(args.out or Path(args.profile).with_suffix("").as_posix() + "-validation")
    _check_out(out, directory=True, key="--out")
    print(f"automl profile validate: {args.samples} random candidates of {space.source} against {args.profile}",
          flush=True)
    figures = validate_profile(profile, space, out, samples=args.samples)
    tau = figures["kendall_tau"]
    print(f"within +-10%: {100 * figures['within_10pct']:.1f}%, within +-5%: {100 * figures['within_5pct']:.1f}%, "
          f"Kendall tau {'n/a' if tau is None else format(tau, '.3f')}, RMSPE {100 * figures['rmspe']:.1f}%, "
          f"mean error {100 * figures['mean_error']:+.1f}%")
    for w in figures["worst"][:3]:
        print(f"  worst: {100 * w['error']:+.1f}% ({w['precision']}, predicted {w['predicted_ms'] * 1e3:.1f} us, "
              f"measured {w['measured_ms'] * 1e3:.1f} us) {w['config']}")
    met = figures["within_10pct"] >= 0.95 and tau is not None and tau >= 0.9
    print(f"bar (>= 95% within +-10%, tau >= 0.9): {'met' if met else 'not met'}; wrote {out / 'validation.json'}, "
          f"{out / 'validation.png'}; figures stored in {args.profile}")
    return 0


def _check_out(out: Path, *, directory: bool, key: str, force: bool = False):
    """Refuse, before any work, an output the command could not write or would destroy."""
    blocker = next((p for p in [out, *out.parents] if p.exists()), None)
    if blocker is not None and blocker != out and not blocker.is_dir():
        raise ConfigError(f"{blocker} is a file, so {out} cannot be created", key=key, value=str(out),
                          fix="choose another path")
    if directory and out.exists() and not out.is_dir():
        raise ConfigError("is an existing file, not a directory", key=key, value=str(out),
                          fix="choose a directory path (it is created)")
    if not directory and out.is_dir():
        raise ConfigError("is a directory, not a file", key=key, value=str(out), fix="give a file path")
    if not directory and out.exists() and not force:
        raise ConfigError("exists; it would be overwritten", key=key, value=str(out),
                          fix="choose a new file, or add --force to replace it")
    if blocker is not None and not os.access(blocker, os.W_OK):
        raise ConfigError(f"cannot write in {blocker}", key=key, value=str(out), fix="choose a writable path")


def cmd_profile_model(args) -> int:
    from collections import Counter

    from automl.hardware.accelerator import ACCELERATORS, build_modelled_profile, layer_model

    ACCELERATORS.get(args.accelerator, key="--accelerator")
    for key in ("batch", "samples"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise _below_one("--" + key, value)
    space = load_space_arg(args.space)
    _check_out(Path(args.out), directory=False, key="--out", force=args.force)
    print(f"automl profile model: {space.source} on the modelled {args.accelerator} accelerator -> {args.out}",
          flush=True)
    profile = build_modelled_profile(space, accelerator=args.accelerator, batch=args.batch, samples=args.samples,
                                     reference=args.reference)
    profile.save(args.out)
    bounds = Counter(layer_model(k, profile.accelerator).bound for k in profile.entries)
    print(f"{len(profile.entries)} layer shapes at {args.reference} ({bounds['compute']} compute-bound, "
          f"{bounds['memory']} memory-bound); other precisions are priced by the model. Latency and energy are "
          f"MODELLED ({profile.device.cpu_model}), not measured -> {args.out}")
    return 0


def _user_model_flags(parser):
    """--model, --checkpoint, --data, --task: the layers and variants of your model (see automl search)."""
    parser.add_argument("--model", help="your model: 'package.module:function' or 'file.py:function'")
    parser.add_argument("--checkpoint", help="its trained weights (a state_dict or an `automl apply` directory)")
    parser.add_argument("--data", help="your data folder or .npz (input shapes and int8 calibration)")
    parser.add_argument("--task", help="a task name or 'package.module:function', replacing the space's")


def add_profile_parser(sub):
    pr = sub.add_parser("profile", help="measure, validate or model a hardware latency profile")
    psub = pr.add_subparsers(dest="profile_command", required=True)
    pm = psub.add_parser("measure", help="measure every distinct layer of a space on this device (resumable)")
    pm.add_argument("--space", help="search-space YAML (default: embedded digits_cnn.yaml)")
    _user_model_flags(pm)
    pm.add_argument("--device", default="cpu", help="device kind (cpu)")
    pm.add_argument("--threads", type=int, help="intra-op threads (default: the space's deploy.threads)")
    pm.add_argument("--runtime", default="onnxruntime", help="onnxruntime, onnxruntime_int8 or torch")
    pm.add_argument("--batch", type=int, help="batch size (default: the space's deploy.batch)")
    pm.add_argument("--samples", type=int, default=200, help="random configs sampled to find layers (default 200)")
    pm.add_argument("--calibration-models", type=int, default=24,
                    help="whole models per precision the correction is fitted on (default 24)")
    pm.add_argument("--max-drift", type=float,
                    help="re-measure a chunk whose reference layer is off its usual time by more than this share "
                         "(default 0.05; several threads on a shared machine may need more, e.g. 0.15)")
    pm.add_argument("--out", required=True, help="profile YAML; an existing partial one is resumed")
    pm.set_defaults(fn=cmd_profile_measure)
    pv = psub.add_parser("validate", help="predict and measure random whole candidates; store the figures")
    pv.add_argument("--profile", required=True, help="profile YAML from 'automl profile measure'")
    pv.add_argument("--space", help="search-space YAML (default: embedded digits_cnn.yaml)")
    _user_model_flags(pv)
    pv.add_argument("--samples", type=int, default=100, help="random candidates (default 100)")
    pv.add_argument("--out", help="directory for validation.json and validation.png (default: <profile>-validation)")
    pv.add_argument("--replace-figures", action="store_true",
                    help="store figures from fewer samples than the profile's current ones")
    pv.set_defaults(fn=cmd_profile_validate)
    pmo = psub.add_parser("model", help="build a MODELLED profile of an accelerator for a space (no device needed)")
    pmo.add_argument("--accelerator", required=True, help="accelerator model (bitfusion)")
    pmo.add_argument("--space", help="search-space YAML (default: embedded digits_cnn.yaml)")
    pmo.add_argument("--batch", type=int, help="batch size (default: the space's deploy.batch)")
    pmo.add_argument("--samples", type=int, default=200, help="random configs sampled to find layers (default 200)")
    pmo.add_argument("--reference", default="w8a8", help="precision the stored entries are computed at (default "
                     "w8a8; every precision is priced by the model)")
    pmo.add_argument("--out", required=True, help="profile YAML to write")
    pmo.add_argument("--force", action="store_true", help="replace an existing --out file")
    pmo.set_defaults(fn=cmd_profile_model)
