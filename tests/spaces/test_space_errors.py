"""Bad search spaces: each error names the file, the key path, the value received and the fix."""

import pytest

from automl.errors import ConfigError, UnknownNameError
from automl.spaces import load_default_space, load_space
from automl.spaces.domains import Choice, Fixed, FloatRange, IntRange
from repo_paths import REPO

REPO = REPO

ARCH = """arch:
  family: cnn
  width: {choice: [8, 16]}
  depth: {int: [1, 3]}
"""
TRAIN = """train:
  epochs: 5
  lr: {float: [1e-3, 1e-2], log: true}
"""
COMPRESSION = """compression:
  pruning:
    method: {choice: [none, magnitude]}
    ratio: {float: [0.3, 0.9], when: {pruning.method: magnitude}}
"""
OBJECTIVES = """objectives:
  accuracy: max
  latency_ms: min
"""


def space_text(*, head="version: 1\ntask: digits\n", arch=ARCH, train=TRAIN, compression=COMPRESSION,
               objectives=OBJECTIVES, extra=""):
    return head + arch + train + compression + objectives + extra


def write(tmp_path, text, name="bad_space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_space_is_valid(tmp_path):
    space = load_space(write(tmp_path, space_text(), "ok.yaml"))
    assert space.names() == ["arch.width", "arch.depth", "train.epochs", "train.lr", "pruning.method",
                             "pruning.ratio"]
    assert space.param("arch.width").domain == Choice((8, 16))
    assert space.param("arch.depth").domain == IntRange(1, 3)
    assert space.param("train.lr").domain == FloatRange(1e-3, 1e-2, log=True)
    assert space.param("train.epochs").domain == Fixed(5)
    assert space.epochs == 5
    assert space.objectives == {"accuracy": "max", "latency_ms": "min"}


# (id, yaml text, error type, fragments that must all be in the message)
CASES = [
    ("when_value_never_taken",
     space_text(compression=COMPRESSION.replace("when: {pruning.method: magnitude}", "when: {pruning.method: magnitud}")),
     ConfigError, ["compression.pruning.ratio.when.pruning.method", "never takes", "(got 'magnitud')",
                   "did you mean 'magnitude'?"]),
    ("top_level_typo",
     space_text(objectives=OBJECTIVES.replace("objectives:", "objectivs:")),
     ConfigError, ["objectivs: unknown key", "(got 'objectivs')", "did you mean 'objectives'?"]),
    ("arch_param_typo",
     space_text(arch=ARCH + "  widht: 8\n"),
     ConfigError, ["arch.widht: unknown key", "(got 'widht')", "did you mean 'width'?", "allowed keys: width"]),
    ("method_typo",
     space_text(compression=COMPRESSION.replace("none, magnitude]", "none, magnitud]")),
     UnknownNameError, ["compression.pruning.method.choice.1", "unknown pruning method", "(got 'magnitud')",
                        "did you mean 'magnitude'?", "valid names: ", "magnitude, none"]),
    ("category_typo",
     space_text(compression=COMPRESSION.replace("  pruning:", "  prunning:")),
     UnknownNameError, ["compression.prunning: unknown compression category", "(got 'prunning')",
                        "did you mean 'pruning'?", "valid names: distillation, early_exit, factorization, pruning, quantization, regularization"]),
    ("float_low_above_high",
     space_text(compression=COMPRESSION.replace("[0.3, 0.9]", "[0.9, 0.3]")),
     ConfigError, ["compression.pruning.ratio.float", "float range needs low < high", "(got [0.9, 0.3])",
                   "swap the bounds"]),
    ("float_low_equals_high",
     space_text(compression=COMPRESSION.replace("[0.3, 0.9]", "[0.5, 0.5]")),
     ConfigError, ["compression.pruning.ratio.float", "low < high", "(got [0.5, 0.5])", "{fixed: 0.5}"]),
    ("log_low_not_positive",
     space_text(train=TRAIN + "  weight_decay: {float: [0.0, 0.1], log: true}\n"),
     ConfigError, ["train.weight_decay.float", "a log range needs low > 0", "(got [0.0, 0.1])",
                   "raise the lower bound above 0"]),
    ("choice_of_lists",
     space_text(arch=ARCH + "  kernel: {choice: [[3, 3], [5, 5]]}\n"),
     ConfigError, ["arch.kernel.choice", "choices must be scalars", "Optuna cannot search", "(got [3, 3])",
                   "split the structure"]),
    ("bare_list",
     space_text(arch=ARCH.replace("{choice: [8, 16]}", "[8, 16]")),
     ConfigError, ["arch.width: a bare list is ambiguous", "(got [8, 16])", "{choice: [...]}", "{fixed: [...]}"]),
    ("when_names_later_param",
     space_text(arch=ARCH.replace("{choice: [8, 16]}", "{choice: [8, 16], when: {arch.depth: 2}}")),
     ConfigError, ["arch.width.when.arch.depth", "not defined before this one", "(got 'arch.depth')",
                   "conditions may use: (none)"]),
    ("when_names_undefined_param",
     space_text(compression=COMPRESSION.replace("{pruning.method: magnitude}", "{pruning.methd: magnitude}")),
     ConfigError, ["compression.pruning.ratio.when.pruning.methd", "not defined before this one",
                   "(got 'pruning.methd')", "did you mean 'pruning.method'?", "conditions may use: arch.width"]),
    ("when_unknown_operator",
     space_text(compression=COMPRESSION.replace("{pruning.method: magnitude}",
                                                "{pruning.method: {eqq: magnitude}}")),
     ConfigError, ["compression.pruning.ratio.when.pruning.method.eqq", "unknown condition operator",
                   "(got 'eqq')", "did you mean 'eq'?", "operators: eq, ne, in, not_in, gt, ge, lt, le"]),
    ("when_bare_list",
     space_text(arch=ARCH + "  kernel: {choice: [3, 5], when: {arch.width: [8, 16]}}\n"),
     ConfigError, ["arch.kernel.when.arch.width", "bare list in a condition is ambiguous", "(got [8, 16])",
                   "{in: [8, 16]}"]),
    ("when_in_needs_list",
     space_text(arch=ARCH + "  kernel: {choice: [3, 5], when: {arch.width: {in: 8}}}\n"),
     ConfigError, ["arch.kernel.when.arch.width.in", "'in' needs a list", "(got 8)", "{in: [a, b]}"]),
    ("when_gt_needs_number",
     space_text(arch=ARCH + "  kernel: {choice: [3, 5], when: {arch.depth: {gt: two}}}\n"),
     ConfigError, ["arch.kernel.when.arch.depth.gt", "'gt' needs a number", "(got 'two')", "Fix:"]),
    ("wrong_type_string",
     space_text(arch=ARCH.replace("{choice: [8, 16]}", '"abc"')),
     ConfigError, ["arch.width: expected an integer", "(got 'abc')", "Fix: write a whole number"]),
    ("wrong_type_float_bound",
     space_text(arch=ARCH.replace("{int: [1, 3]}", "{int: [1.5, 3]}")),
     ConfigError, ["arch.depth.int: expected an integer", "(got 1.5)", "Fix:"]),
    ("wrong_type_in_choice",
     space_text(arch=ARCH.replace("{choice: [8, 16]}", "{choice: [8, wide]}")),
     ConfigError, ["arch.width.choice.1: expected an integer", "(got 'wide')", "Fix:"]),
    ("out_of_range_bound",
     space_text(compression=COMPRESSION.replace("[0.3, 0.9]", "[0.5, 1.5]")),
     ConfigError, ["compression.pruning.ratio.float: out of range [0.0, 1.0)", "(got 1.5)",
                   "use a value in [0.0, 1.0)"]),
    ("not_an_allowed_choice",
     space_text(arch=ARCH + "  kernel: {choice: [3, 4]}\n"),
     ConfigError, ["arch.kernel.choice.1: not one of the allowed values", "(got 4)", "use one of: 1, 3, 5, 7"]),
    ("unknown_objective_metric",
     space_text(objectives="objectives:\n  accuracyy: max\n"),
     UnknownNameError, ["objectives.accuracyy: unknown metric", "(got 'accuracyy')",
                        "did you mean 'accuracy'?", "latency_ms"]),
    ("objective_mode",
     space_text(objectives="objectives:\n  accuracy: maximize\n"),
     ConfigError, ["objectives.accuracy: not one of the allowed values", "(got 'maximize')",
                   "use one of: max, min"]),
    ("no_objectives",
     space_text(objectives="objectives: {}\n"),
     ConfigError, ["objectives: at least one objective is needed", "(got {})", "accuracy: max"]),
    ("epochs_searched",
     space_text(train=TRAIN.replace("epochs: 5", "epochs: {int: [5, 10]}")),
     ConfigError, ["train.epochs", "must be one fixed integer", "(got {'int': [5, 10]})",
                   "search fine-tuning length with pruning.finetune_epochs"]),
    ("unsupported_version",
     space_text(head="version: 2\ntask: digits\n"),
     ConfigError, ["version: unsupported space version", "(got 2)", "use version: 1"]),
    ("boolean_version",
     space_text(head="version: true\ntask: digits\n"),
     ConfigError, ["version: unsupported space version", "(got True)", "use version: 1"]),
    ("missing_task",
     space_text(head="version: 1\n"),
     ConfigError, ["task: missing required key", "add 'task:'"]),
    ("unknown_task",
     space_text(head="version: 1\ntask: digit\n"),
     UnknownNameError, ["task: unknown task", "(got 'digit')", "did you mean 'digits'?"]),
    ("missing_family",
     space_text(arch=ARCH.replace("  family: cnn\n", "")),
     ConfigError, ["arch.family: missing required key", "add 'family:' with one of cnn"]),
    ("family_not_a_name",
     space_text(arch=ARCH.replace("family: cnn", "family: {choice: [cnn]}")),
     UnknownNameError, ["arch.family: unknown architecture family", "(got {'choice': ['cnn']})",
                        "valid names: cnn"]),
    ("option_of_unchosen_method",
     space_text(compression=COMPRESSION.replace("{choice: [none, magnitude]}", "none")
                .replace(", when: {pruning.method: magnitude}", "")),
     ConfigError, ["compression.pruning.ratio", "no method chosen in 'pruning.method' takes this option",
                   "(got 'ratio')", "options of none: (none)"]),
    ("option_of_other_category",
     space_text(compression=COMPRESSION + "    per_channel: true\n"),
     ConfigError, ["compression.pruning.per_channel: unknown key", "(got 'per_channel')", "allowed keys: method"]),
    ("method_not_a_name",
     space_text(compression="compression:\n  pruning:\n    method: {fixed: [magnitude]}\n"),
     ConfigError, ["compression.pruning.method", "a method name is a string", "(got {'fixed': ['magnitude']})",
                   "Fix:"]),
    ("method_missing",
     space_text(compression="compression:\n  pruning:\n    ratio: 0.5\n"),
     ConfigError, ["compression.pruning.method: missing required key", "add 'method:'"]),
    ("step_with_log",
     space_text(train=TRAIN.replace("log: true}", "log: true, step: 0.001}")),
     ConfigError, ["train.lr.step", "Optuna cannot combine step with log", "(got 0.001)", "drop one of them"]),
    ("domain_kind_missing",
     space_text(arch=ARCH.replace("{int: [1, 3]}", "{low: 1, high: 3}")),
     ConfigError, ["arch.depth.low: unknown key", "(got 'low')", "allowed keys: choice, int, float"]),
    ("range_not_a_pair",
     space_text(arch=ARCH.replace("{int: [1, 3]}", "{int: [1, 2, 3]}")),
     ConfigError, ["arch.depth.int", "a int range is a two-item list", "(got [1, 2, 3])", "{int: [low, high]}"]),
    ("unknown_constraint_metric",
     space_text(extra="constraints:\n  latency:\n    max: 5\n"),
     UnknownNameError, ["constraints.latency: unknown metric", "(got 'latency')", "did you mean 'latency_ms'?"]),
    ("budget_typo",
     space_text(extra="budget:\n  trails: 3\n"),
     ConfigError, ["budget.trails: unknown key", "(got 'trails')", "did you mean 'trials'?"]),
    ("deploy_runtime",
     space_text(extra="deploy:\n  runtime: tensorrt\n"),
     ConfigError, ["deploy.runtime: not one of the allowed values", "(got 'tensorrt')", "use one of: onnxruntime"]),
    ("duplicate_key",
     space_text(arch=ARCH + "  width: 32\n"),
     ConfigError, ["duplicate key 'width'", "line 7", "keep one of the two entries"]),
    ("quoted_number",
     space_text(compression=COMPRESSION.replace("[0.3, 0.9]", "['0.3', 0.9]")),
     ConfigError, ["compression.pruning.ratio.float: expected a number", "(got '0.3')", "without quotes"]),
    ("not_a_mapping",
     "- version: 1\n",
     ConfigError, ["expected a mapping", "(got [{'version': 1}])", "Fix:"]),
]


@pytest.mark.parametrize("text, error, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_space(tmp_path, text, error, fragments):
    path = write(tmp_path, text)
    with pytest.raises(error) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "Fix: " in message, message


def test_case_ids_are_distinct_and_many():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 12


def test_error_fields_are_structured(tmp_path):
    path = write(tmp_path, space_text(compression=COMPRESSION.replace("[0.3, 0.9]", "[0.5, 1.5]")))
    with pytest.raises(ConfigError) as info:
        load_space(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == "compression.pruning.ratio.float"
    assert err.value == 1.5
    assert err.exit_code == 2


def test_default_space_matches_the_shipped_file():
    embedded = load_default_space()
    shipped = load_space(REPO / "search_spaces" / "digits_cnn.yaml")
    assert embedded.hash == shipped.hash
    assert embedded.params == shipped.params
    assert embedded.objectives == shipped.objectives == {"accuracy": "max", "latency_ms": "min", "size_kb": "min"}
    assert embedded.budget == shipped.budget
    assert embedded.deploy == shipped.deploy
    assert (embedded.task, embedded.family) == (shipped.task, shipped.family) == ("digits", "cnn")
    assert "pruning.ratio" in embedded.names() and "quantization.mode" in embedded.names()


def test_hash_changes_with_content(tmp_path):
    a = load_space(write(tmp_path, space_text(), "a.yaml"))
    b = load_space(write(tmp_path, space_text(), "b.yaml"))
    c = load_space(write(tmp_path, space_text(train=TRAIN.replace("epochs: 5", "epochs: 6")), "c.yaml"))
    assert a.hash == b.hash
    assert a.hash != c.hash
