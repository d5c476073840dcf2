"""A search over a user's model checks the model before its run directory is touched: a model that
does not build, load, take the data or return one score per class is one paragraph, exit 2, and an
earlier run in --out survives even with --force."""
import textwrap

import pytest
import torch

import automl
from automl.cli import main
from automl.errors import ConfigError
from automl.recipe.usermodel import check_user_model
from automl.spaces import parse_space
from automl.spaces.user import user_space

MODELS = '''
import torch
import torch.nn as nn
from sibling_layers import Head          # a module beside this file, imported as `python models.py` would


class Net(nn.Module):
    def __init__(self, out="tensor", classes=10):
        super().__init__()
        self.body, self.head, self.out = nn.Flatten(), Head(64, classes), out

    def forward(self, x, mask=None):
        if self.out == "two_inputs":
            return self.head(self.body(x)) * mask
        if self.out == "fixed_batch":  # right only for a batch of 2
            return self.head(self.body(x)) + torch.zeros(2, 1)
        logits = self.head(self.body(x))
        return {"tensor": logits, "tuple": (logits, x), "dict": {"logits": logits}}[self.out]


def build(out="tensor", classes=10):
    return Net(out, classes)
'''


@pytest.fixture()
def user_files(tmp_path):
    (tmp_path / "sibling_layers.py").write_text(textwrap.dedent('''
        import torch.nn as nn

        def Head(features, classes):
            return nn.Linear(features, classes)
        '''))
    (tmp_path / "models.py").write_text(MODELS)
    return tmp_path


def _old_run(path):
    path.mkdir()
    (path / "trials.csv").write_text("the user's earlier results\n")
    return path


@pytest.mark.parametrize("kwargs, words", [
    ({"out": "tuple"}, "must return one logits tensor .batch, classes.; it returned tuple"),
    ({"out": "dict"}, "it returned dict"),
    ({"classes": 7}, "scores 7 classes but the data has 10"),
    ({"out": "two_inputs"}, "forward failed on one input batch"),
    ({"out": "fixed_batch"}, "forward fixes the batch size"),
])
def test_a_model_that_does_not_fit_the_data_is_one_paragraph_naming_the_builder(user_files, task, kwargs, words):
    raw = user_space(builder=f"{user_files / 'models.py'}:build", task="digits").raw
    space = parse_space({**raw, "model": {**raw["model"], "kwargs": kwargs}}, "s.yaml")
    with pytest.raises(ConfigError, match=words) as info:
        check_user_model(space, task)
    assert info.value.key == "model.builder" and "Fix:" in str(info.value)


def test_a_model_beside_its_own_modules_passes(user_files, task):
    check_user_model(user_space(builder=f"{user_files / 'models.py'}:build", task="digits"), task)


def test_a_bad_checkpoint_with_force_keeps_the_old_run(user_files, capsys):
    out = _old_run(user_files / "run")
    torch.save({"head.weight": torch.zeros(3, 3)}, user_files / "bad.pt")
    code = main(["search", "--model", f"{user_files / 'models.py'}:build", "--checkpoint",
                 str(user_files / "bad.pt"), "--task", "digits", "--out", str(out), "--force"])
    assert code == 2 and "error: --checkpoint: " in capsys.readouterr().err  # the flag the user typed
    assert (out / "trials.csv").read_text() == "the user's earlier results\n"


def test_a_truncated_training_image_with_force_keeps_the_old_run(user_files, capsys):
    from PIL import Image

    for c in range(10):  # 8x8 grey images, one class folder per digit (what models.py's Linear(64) takes)
        (user_files / "data" / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), color=20 * c + i).save(user_files / "data" / str(c) / f"{i}.png")
    broken = user_files / "data" / "3" / "1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    out = _old_run(user_files / "run")
    code = main(["search", "--model", f"{user_files / 'models.py'}:build", "--data", str(user_files / "data"),
                 "--out", str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be decoded" in err and "1.png" in err
    assert (out / "trials.csv").read_text() == "the user's earlier results\n"


def test_a_forward_torch_export_cannot_trace_is_refused_naming_the_fix(tmp_path, task):
    (tmp_path / "branchy.py").write_text(textwrap.dedent('''
        import torch.nn as nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

            def forward(self, x):
                if x.mean() > 0:          # a Python branch on a tensor's value
                    return self.head(x)
                return -self.head(x)

        def build():
            return Branchy()
        '''))
    with pytest.raises(ConfigError, match="torch.export cannot trace the model's forward") as info:
        check_user_model(user_space(builder=f"{tmp_path / 'branchy.py'}:build", task="digits"), task)
    assert "torch.where" in str(info.value) and info.value.key == "model.builder"


def test_load_asks_for_an_instance_not_a_class(tmp_path):
    (tmp_path / "recipe.yaml").write_text("version: 1\n")
    with pytest.raises(ConfigError, match="got the class Linear") as info:
        automl.load(tmp_path, model=torch.nn.Linear)
    assert "model=MyNet(...)" in str(info.value)


def test_a_task_of_the_users_own_defines_its_outputs(user_files):
    class Segmentation:  # not one of automl's classification tasks: outputs are whatever it evaluates
        num_classes = 10

        def example_input(self, batch=1):
            return torch.randn(batch, 1, 8, 8)

    (user_files / "dense.py").write_text("import torch.nn as nn\n\ndef build():\n    return nn.Conv2d(1, 10, 1)\n")
    check_user_model(user_space(builder=f"{user_files / 'dense.py'}:build", task="digits"), Segmentation())


def test_the_default_space_leaves_bn_scale_out_for_a_model_without_batchnorm(user_files, task):
    from automl.spaces.user import fit_to_model

    space = user_space(builder=f"{user_files / 'models.py'}:build", task="digits")
    notes = []
    fitted = fit_to_model(space, check_user_model(space, task), log=notes.append)
    criteria = fitted.raw["compression"]["pruning"]["criterion"]["choice"]
    assert "bn_scale" not in criteria and criteria == ["l1", "taylor"]
    assert "no BatchNorm" in notes[0] and fitted.hash != space.hash
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    assert fit_to_model(space, with_bn, log=notes.append) is space and len(notes) == 1


def test_a_users_space_with_bn_scale_for_a_model_without_batchnorm_is_refused(user_files, task):
    from automl.spaces.user import fit_to_model

    raw = user_space(builder=f"{user_files / 'models.py'}:build", task="digits").raw
    space = parse_space({**raw, "compression": {"pruning": {"method": "structured", "criterion": "bn_scale",
                                                            "mac_reduction": 2.0}}}, "mine.yaml")
    with pytest.raises(ConfigError, match="no BatchNorm layer") as info:
        fit_to_model(space, check_user_model(space, task))
    assert info.value.key == "compression.pruning.criterion" and info.value.value == "bn_scale"
    assert "mine.yaml" in str(info.value)


def test_errors_about_flag_values_name_the_flag_and_keep_their_class():
    from types import SimpleNamespace

    from automl.cli_common import flags_named
    from automl.errors import UnknownNameError

    args = SimpleNamespace(model="m.py:build", checkpoint=None, data="imgs/", task=None)
    with pytest.raises(ConfigError) as info, flags_named(args):
        raise ConfigError("too few samples", file="embedded:user_model.yaml", key="data.val_fraction", value=0.2)
    assert info.value.key == "--data (data.val_fraction)" and info.value.file is None
    with pytest.raises(UnknownNameError) as info, flags_named(args):
        raise UnknownNameError("no such function", file="embedded:user_model.yaml", key="model.builder")
    assert info.value.key == "--model"
    with pytest.raises(ConfigError) as info, flags_named(args):  # not given as a flag: as it was
        raise ConfigError("bad", file="s.yaml", key="model.checkpoint")
    assert info.value.key == "model.checkpoint" and info.value.file == "s.yaml"


def test_apply_checks_the_model_before_training_or_writing(user_files, tmp_path, capsys, monkeypatch):
    """`automl apply` on a recipe whose model returns a dict: one paragraph naming the recipe and the key,
    exit 2, nothing trained, the output directory the user had kept."""
    monkeypatch.syspath_prepend(str(user_files))
    recipe = tmp_path / "dict.yaml"
    recipe.write_text(textwrap.dedent(f'''
        version: 1
        task: digits
        model: {{builder: "{user_files / 'models.py'}:build", kwargs: {{out: dict}}}}
        train: {{epochs: 1}}
        stages: []
        '''))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's earlier model")
    assert main(["apply", str(recipe), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: model.builder: the model must return one logits tensor" in err and "it returned dict" in err
    assert (out / "keep.txt").read_text() == "the user's earlier model"
