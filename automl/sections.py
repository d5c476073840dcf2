"""The model and task sections every space and recipe has, parsed the same way for both."""
from __future__ import annotations

from automl.arch import ARCHS
from automl.arch.inherited import parse_supernet_source
from automl.arch.user import parse_model_source
from automl.tasks.data import parse_data
from automl.validate import Where, expect_mapping, expect_type

DATA_TASK = "data"  # the task name of a recipe or space whose task is its data: section


def model_section(data: dict, where: Where):
    """(family, arch params, user model) of a space or recipe: ``arch:`` (a built-in family) or
    ``model:`` (your own), exactly one."""
    if ("arch" in data) == ("model" in data):
        raise where.error("give exactly one of 'arch:' (a built-in family) and 'model:' (your own model)",
                          sorted(k for k in ("arch", "model") if k in data),
                          "write 'model: {builder: package.module:function, checkpoint: weights.pt}' or "
                          f"'arch: {{family: ...}}' with one of {', '.join(ARCHS.names())}")
    if "model" in data:
        return "", {}, parse_model_source(data["model"], where / "model")
    arch = dict(expect_mapping(data["arch"], where / "arch"))
    if "family" not in arch:
        raise (where / "arch" / "family").error("missing required key", no_value=True,
                                                 fix=f"add 'family:' with one of {', '.join(ARCHS.names())}")
    family = ARCHS.get(arch.pop("family"), file=where.file, key="arch.family")
    return family.name, arch, None


def supernet_section(data: dict, where: Where, model):
    """The supernet a built-in family's model inherits its weights from, if the section names one."""
    if data.get("supernet") is None:
        return None
    if model is not None:
        raise (where / "supernet").error("a supernet gives weights to a built-in family's 'arch:', not to your "
                                         "model", data["supernet"], "drop supernet:, or use 'arch:'")
    return parse_supernet_source(data["supernet"], where / "supernet")


def task_section(data: dict, where: Where):
    """(task name, data spec): a ``task:`` name, or a ``data:`` section (whose task name is 'data')."""
    if "data" in data:
        if "task" in data and data["task"] != DATA_TASK:
            raise (where / "task").error("give either 'task:' or 'data:', not both", data["task"],
                                         "drop task: (the data section defines the task)")
        return DATA_TASK, parse_data(data["data"], where / "data")
    if "task" not in data:
        raise (where / "task").error("missing required key", no_value=True,
                                     fix="add 'task:' (a task name such as digits, or 'package.module:function'), or a "
                                         "'data:' section naming a folder of class folders or an .npz file")
    return expect_type(data["task"], where / "task", str), None


__all__ = ["DATA_TASK", "model_section", "supernet_section", "task_section"]
