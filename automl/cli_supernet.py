"""`automl supernet train` (automl.supernet.train) and `automl search --supernet` (automl.search.supernet_search)."""
from __future__ import annotations

import time
from pathlib import Path

from automl.errors import ConfigError


def cmd_supernet_train(args) -> int:
    from automl.spaces import load_default_space, load_space
    from automl.supernet.train import SupernetTraining, train_supernet

    space = load_default_space() if args.space is None else load_space(args.space)
    settings = SupernetTraining(**{k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    for key, value in vars(settings).items():
        if isinstance(value, (int, float)) and value < (1 if key in ("epochs", "batch_size") else 0):
            raise ConfigError("out of range", key=f"--{key.replace('_', '-')}", value=value,
                              fix="give a positive value" if key in ("epochs", "batch_size") else "give a value >= 0")
    print(f"automl supernet: training the {space.family} supernet of '{space.source}' for {settings.epochs} epochs "
          f"-> {args.out}", flush=True)
    train_supernet(space, args.out, settings, force=args.force, log=lambda m: print(m, flush=True))
    print(f"search it: automl search {f'--space {args.space} ' if args.space else ''}--supernet {args.out}")
    return 0


def supernet_search(space, args, *, override_budget, summary) -> int:
    """`automl search --supernet DIR`: cmd_search hands over its space and its budget and summary helpers."""
    from automl.search.supernet_search import SupernetSearch, run_supernet_search
    from automl.spaces.user import with_supernet

    space = override_budget(with_supernet(space, args.supernet, epochs=2 if args.epochs is None else args.epochs),
                            args)
    for flag in ("measure_trials", "measure_front", "address"):
        if getattr(args, flag):
            raise ConfigError("does not apply to a supernet search (its front is always applied and measured, on a "
                              "local Ray instance)", key=f"--{flag.replace('_', '-')}", value=getattr(args, flag),
                              fix=f"drop --{flag.replace('_', '-')}")
    options = SupernetSearch(**{k: getattr(args, k) for k in ("candidates", "front_size", "predictor_samples")
                                if getattr(args, k) is not None})
    for key in ("candidates", "front_size"):
        if getattr(options, key) < 1:
            raise ConfigError("must be at least 1", key=f"--{key.replace('_', '-')}", value=getattr(options, key))
    n = options.predictor_samples
    if n and not MIN_PREDICTOR_SAMPLES <= n < options.candidates:
        raise ConfigError(f"the predictor is fitted on at least {MIN_PREDICTOR_SAMPLES} measured candidates and "
                          "scores the rest of --candidates", key="--predictor-samples", value=n,
                          fix=f"give {MIN_PREDICTOR_SAMPLES} to {options.candidates - 1}, or 0 to measure every "
                              "candidate")
    out = Path(args.out or f"runs/supernet-{time.strftime('%Y%m%d-%H%M%S')}")
    profile = "auto" if args.profile is None and not args.no_profile else args.profile
    scored = f" ({n} measured, the rest by a predictor fitted on them)" if n else ""
    print(f"automl search: {options.candidates} candidates{scored} of '{space.source}' on the supernet "
          f"{args.supernet}, then the {options.front_size} best applied with {space.epochs} fine-tune epochs -> {out}",
          flush=True)
    return summary(run_supernet_search(space, out, options, profile=profile, force=args.force,
                                       log=lambda m: print(m, flush=True)))


MIN_PREDICTOR_SAMPLES = 20
SETTINGS = ("epochs", "lr", "batch_size", "random_subnets", "bn_samples", "eval_subnets", "seed", "threads")


def add_supernet_parser(sub):
    p = sub.add_parser("supernet", help="train a weight-sharing supernet of a space's architectures once")
    psub = p.add_subparsers(dest="supernet_command", required=True)
    t = psub.add_parser("train", help="sandwich-rule training with in-place distillation (resumable)")
    t.add_argument("--space", help="search-space YAML whose arch: section the supernet covers (default: embedded)")
    t.add_argument("--out", required=True, help="supernet directory (a stopped training resumes there)")
    t.add_argument("--epochs", type=int, help="training epochs (default 30)")
    t.add_argument("--lr", type=float, help="Adam learning rate, cosine decay (default 3e-3)")
    t.add_argument("--batch-size", type=int, help="default 32")
    t.add_argument("--random-subnets", type=int, help="random sub-networks per batch besides the largest and "
                   "smallest (default 2)")
    t.add_argument("--bn-samples", type=int, help="samples that recalibrate batch norm when scoring (default 256)")
    t.add_argument("--eval-subnets", type=int, help="random sub-networks scored in the manifest (default 8)")
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch threads (default: all)")
    t.add_argument("--force", action="store_true", help="replace the directory's supernet")
    t.set_defaults(fn=cmd_supernet_train)
