"""The Ray Tune controller. Only this package imports Ray."""
from automl.search.pareto import dominates, feasible, pareto_front

__all__ = ["dominates", "feasible", "pareto_front", "run_search", "resume_search"]


def __getattr__(name):
    # Ray is imported only when a search actually runs.
    if name in ("run_search", "resume_search", "SearchOutcome"):
        from automl.search import controller

        return getattr(controller, name)
    raise AttributeError(name)
