"""A space's ``schedule:``: the recipe's policies on epoch windows, searched like any other parameter,
checked when the space is read, and put back into each trial's recipe."""
import pytest

from automl.errors import ConfigError
from automl.io import parse_yaml
from automl.recipe import Recipe, apply_recipe, recipe_from_config
from automl.spaces import parse_space, sample_config

SPACE = """
version: 1
task: digits
arch: {family: cnn, width: 8, depth: 2}
train: {epochs: 4, lr: 0.01}
compression:
  pruning: {method: {choice: [none, magnitude]}, ratio: 0.5, finetune_epochs: 2}
schedule:
- {policy: regularization, kind: l1, strength: {float: [1.0e-5, 1.0e-3], log: true}, end_epoch: {choice: [2, 3]}}
- {policy: lr, kind: {choice: [step, cosine]}, gamma: 0.5, step: 1, start_epoch: 3}
objectives: {accuracy: max}
budget: {trials: 4}
"""


def space(text=SPACE):
    return parse_space(parse_yaml(text, "s.yaml"), "s.yaml")


def test_schedule_options_are_search_parameters():
    names = space().names()
    assert {"schedule.0.policy", "schedule.0.strength", "schedule.0.end_epoch", "schedule.1.kind",
            "schedule.1.gamma", "schedule.1.start_epoch"} <= set(names)


def test_each_trial_recipe_carries_its_sampled_schedule(task, tmp_path):
    s = space()
    config = {**sample_config(s, seed=1), "schedule.0.strength": 3e-4, "schedule.0.end_epoch": 3,
              "schedule.1.kind": "cosine"}
    recipe = recipe_from_config(s, config)
    reg, lr = recipe.schedule
    assert (reg.policy, reg.config.strength, reg.start_epoch, reg.end_epoch) == ("regularization", 3e-4, 0, 3)
    assert (lr.policy, lr.config.kind, lr.start_epoch) == ("lr", "cosine", 3)  # gamma: unused by cosine, left out
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    step = recipe_from_config(s, {**config, "schedule.1.kind": "step"}).schedule[1]
    assert (step.config.kind, step.config.gamma) == ("step", 0.5)
    result = apply_recipe(recipe, tmp_path, task=task)  # the schedule runs: the l1 penalty, then cosine lr
    assert 0.0 <= result.metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("entry, key, fragment", [
    ("{policy: regularisation}", "schedule.0.policy", "regularization"),
    ("{policy: lr, strength: 0.1}", "schedule.0", "strength"),
    ("{policy: regularization, strength: {float: [-1.0, 1.0]}}", "schedule.0.strength", ""),
    ("{policy: regularization, start_epoch: {choice: [1, 4]}}", "schedule.0.start_epoch", "training ends"),
    ("{policy: regularization, end_epoch: 6}", "schedule.0.end_epoch", "after training ends"),
    ("{policy: regularization, start_epoch: {int: [1, 3]}, end_epoch: {choice: [2, 4]}}", "schedule.0.end_epoch",
     "latest start"),
])
def test_a_schedule_that_cannot_run_is_refused_when_the_space_is_read(entry, key, fragment):
    text = SPACE.split("schedule:")[0] + f"schedule:\n- {entry}\nobjectives: {{accuracy: max}}\n"
    with pytest.raises(ConfigError) as info:
        space(text)
    message = str(info.value)
    assert key in message and fragment in message and "Fix:" in message, message


def test_two_lr_policies_on_one_epoch_are_refused():
    text = SPACE.split("schedule:")[0] + ("schedule:\n- {policy: lr, start_epoch: 0, end_epoch: 3}\n"
                                         "- {policy: lr, start_epoch: {choice: [2, 3]}}\nobjectives: {accuracy: max}\n")
    with pytest.raises(ConfigError, match="overlaps"):
        space(text)
