"""Search spaces: schema, domains, conditions and adapters to Optuna / Ray Tune."""
from automl.spaces.adapter import define_by_run, resolve, sample_config
from automl.spaces.schema import Param, SearchSpace, default_space_path, load_default_space, load_space, parse_space

__all__ = ["Param", "SearchSpace", "define_by_run", "resolve", "sample_config", "load_space",
           "load_default_space", "default_space_path", "parse_space"]
