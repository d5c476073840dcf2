"""The weight-sharing supernet: sizing, slicing, sandwich training, resume, inheritance through recipes."""
import json
import shutil

import numpy as np
import pytest
import torch

from automl.errors import ConfigError
from automl.recipe import Recipe, apply_recipe, recipe_from_config
from automl.spaces import parse_space
from automl.supernet.network import Supernet, recalibrate_bn
from automl.supernet.store import WEIGHTS, load_supernet
from automl.supernet.train import SupernetTraining, evaluate_subnet, train_supernet

SMALL = {"width": {"choice": [8, 16]}, "depth": {"int": [1, 3]}, "kernel": {"choice": [3, 5]},
         "pooling": {"choice": ["max", "stride"]}}


def space(arch=None, family="cnn", **top):
    return parse_space({"version": 1, "task": "digits", "arch": {"family": family, **(arch or SMALL)},
                        "train": {"epochs": 0}, "objectives": {"accuracy": "max", "latency_ms": "min"}, **top},
                       "test-space.yaml")


def arch_params(s):
    return [p for p in s.params if p.name.startswith("arch.")]


def supernet(s, task):
    return Supernet.create(s.family, arch_params(s), task.input_shape, task.num_classes)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, task):
    out = tmp_path_factory.mktemp("supernet")
    manifest = train_supernet(space(), out, SupernetTraining(epochs=3, eval_subnets=2), log=lambda m: None)
    return out, manifest


def test_shared_tensors_cover_every_subnetwork_with_a_head_per_depth(task):
    net = supernet(space(), task)
    assert tuple(net.tensors["block0.conv.weight"].shape) == (16, 1, 5, 5)
    assert tuple(net.tensors["block2.conv.weight"].shape) == (32, 32, 5, 5)  # 16 channels x growth 2
    assert {k for k in net.tensors if k.startswith("head")} == {f"head_after{d}.{p}" for d in (1, 2, 3)
                                                                for p in ("weight", "bias")}


def test_extracted_model_is_the_family_model_computing_what_the_shared_weights_compute(task):
    net = supernet(space(), task)
    config = {"width": 8, "depth": 2, "kernel": 3, "pooling": "max"}
    model = net.extract(config).eval()
    fresh = task.build_model("cnn", config)
    assert type(model) is type(fresh)
    assert [p.shape for p in model.parameters()] == [p.shape for p in fresh.parameters()]
    shared = net.tensors["block1.conv.weight"]
    assert torch.equal(model.features[4].weight, shared[:16, :8, 1:4, 1:4])  # leading channels, kernel centre
    x = task.example_input(4)
    with torch.no_grad():
        functional = net.forward(config, x)  # no grad: eval-mode batch norm, as the extracted model
    assert torch.allclose(model(x), functional, atol=1e-5)


def test_gradients_reach_only_the_slice_a_subnetwork_uses(task):
    net = supernet(space(), task)
    net.forward({"width": 8, "depth": 1, "kernel": 3, "pooling": "max"}, task.example_input(4)).sum().backward()
    grad = net.tensors["block0.conv.weight"].grad
    assert grad[:8, :, 1:4, 1:4].abs().sum() > 0
    assert grad[8:].abs().sum() == 0 and grad[:, :, 0].abs().sum() == 0
    assert net.tensors["block1.conv.weight"].grad is None


FAMILY_SPACES = {
    "cnn": SMALL,
    "resnet": {"width": {"choice": [8, 16]}, "stages": {"int": [1, 2]}, "blocks": {"int": [1, 2]},
               "se": {"choice": [False, True]}},
    "mobilenetv2": {"width_mult": {"choice": [0.25, 0.5]}, "expansion": {"choice": [1, 4]},
                    "blocks": {"int": [1, 2]}, "stages": {"fixed": 2}},
    "mlp": {"width": {"choice": [32, 64]}, "depth": {"int": [0, 2]}},
}


def test_every_family_has_a_supernet_contract_case():
    from automl.arch import ARCHS

    assert set(FAMILY_SPACES) == set(ARCHS.names())


@pytest.mark.parametrize("family", sorted(FAMILY_SPACES))
def test_every_family_shares_weights(task, family):
    arch = FAMILY_SPACES[family]
    net = supernet(space(arch, family), task)
    rng = np.random.default_rng(0)
    x = task.example_input(4)
    for config in (net.largest(rng), net.smallest(rng), net.sample(rng)):
        model = net.extract(config).eval()
        assert sum(p.numel() for p in model.parameters()) == \
            sum(p.numel() for p in task.build_model(family, config).parameters())
        with torch.no_grad():
            assert torch.allclose(model(x), net.forward(config, x), atol=1e-5)


def test_batch_norm_recalibration_replaces_the_statistics(task):
    model = task.build_model("cnn", {"width": 8, "depth": 1})
    model.features[1].running_mean.fill_(5.0)
    recalibrate_bn(model, task.train_loader(batch_size=32, seed=0), 64)
    assert model.features[1].running_mean.abs().max() < 5.0
    assert not model.training


def test_training_writes_a_manifest_and_weights_that_load_safely(trained, task):
    out, manifest = trained
    assert manifest["family"] == "cnn" and manifest["training"]["epochs"] == 3
    assert manifest["accuracy"]["largest"]["arch"]["width"] == 16
    assert manifest["accuracy"]["largest"]["accuracy"] > 0.6  # three epochs of digits, above chance
    assert len(manifest["accuracy"]["random"]) == 2
    assert not (out / "train_state.pt").exists()
    tensors = torch.load(out / WEIGHTS, weights_only=True)
    assert "block0.conv.weight" in tensors
    net, _ = load_supernet(out, manifest["sha256"])
    largest = manifest["accuracy"]["largest"]
    assert evaluate_subnet(net, largest["arch"], task, 256) == pytest.approx(largest["accuracy"], abs=1e-4)


def test_interrupted_training_resumes_where_it_stopped(tmp_path, trained):
    _, full = trained

    def stop_after_first(line):
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_supernet(space(), tmp_path, SupernetTraining(epochs=3, eval_subnets=2), log=stop_after_first)
    lines = []
    resumed = train_supernet(space(), tmp_path, SupernetTraining(epochs=3, eval_subnets=2), log=lines.append)
    assert lines[0] == "automl supernet: resuming after epoch 2 of 3"
    assert sum(line.startswith("epoch ") for line in lines) == 1
    assert resumed["accuracy"] == full["accuracy"]  # the same weights as the run never stopped


def test_a_directory_holding_other_work_is_refused(tmp_path, trained):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other work.*--force"):
        train_supernet(space(), tmp_path, SupernetTraining(epochs=1), log=lambda m: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    out, manifest = trained
    with pytest.raises(ConfigError, match="a trained supernet of this space.*--force"):
        train_supernet(space(), out, SupernetTraining(epochs=1), log=lambda m: None)
    assert load_supernet(out, manifest["sha256"])[1]["training"]["epochs"] == 3  # untouched


def test_a_recipe_inherits_its_weights_and_replays_them(trained, task, tmp_path):
    out, manifest = trained
    s = space(supernet={"path": str(out)})
    config = {"arch.width": 16, "arch.depth": 3, "arch.kernel": 5, "arch.pooling": "max", "train.epochs": 0}
    recipe = recipe_from_config(s, config)
    assert recipe.supernet.sha256 == manifest["sha256"]
    recipe.save(tmp_path / "r.yaml")
    again = Recipe.load(tmp_path / "r.yaml")
    result = apply_recipe(again, tmp_path / "apply", task=task)
    net, _ = load_supernet(out)
    expected = evaluate_subnet(net, {"width": 16, "depth": 3, "kernel": 5, "pooling": "max"}, task, 256)
    assert result.metrics["torch_accuracy"] == pytest.approx(expected, abs=1e-4)
    assert result.metrics["accuracy"] > 0.6


def test_changed_supernet_weights_are_refused(trained, tmp_path, task):
    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    recipe = recipe_from_config(space(supernet={"path": str(copy)}), {"arch.width": 8, "arch.depth": 1,
                                                                      "arch.kernel": 3, "arch.pooling": "max"})
    torch.save({k: v + 1 for k, v in torch.load(copy / WEIGHTS, weights_only=True).items()}, copy / WEIGHTS)
    with pytest.raises(ConfigError, match="sha256 differs"):
        apply_recipe(recipe, tmp_path / "apply", task=task)


def test_space_errors_name_the_key(trained, tmp_path):
    out, _ = trained
    with pytest.raises(ConfigError, match="supernet.path.*no trained supernet"):
        space(supernet={"path": str(tmp_path)})
    with pytest.raises(ConfigError, match="supernet.*bogus"):
        space(supernet={"path": str(out), "bogus": 1})


def test_a_space_wider_than_the_supernet_is_refused_before_the_search(trained):
    from automl.supernet.inherit import check_space

    out, _ = trained
    wide = space({**SMALL, "width": {"choice": [8, 64]}}, supernet={"path": str(out)})
    with pytest.raises(ConfigError, match="does not fit in the supernet"):
        check_space(wide)
    check_space(space(supernet={"path": str(out)}))  # its own space fits


def test_cli_refuses_bad_flags(trained, tmp_path, capsys):
    from automl.cli import main

    assert main(["supernet", "train", "--out", str(tmp_path / "s"), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    out, _ = trained
    assert main(["search", "--supernet", str(out), "--candidates", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--candidates" in capsys.readouterr().err
    assert main(["search", "--supernet", str(out), "--measure-front", "--out", str(tmp_path / "r")]) == 2
    assert "--measure-front" in capsys.readouterr().err
    assert main(["search", "--supernet", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no trained supernet" in capsys.readouterr().err
    assert main(["search", "--supernet", str(out), "--candidates", "50", "--predictor-samples", "50",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--predictor-samples" in capsys.readouterr().err
    assert main(["search", "--predictor-samples", "30", "--out", str(tmp_path / "r")]) == 2
    assert "applies to a supernet search only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_trials_of_a_space_naming_a_supernet_start_from_inherited_weights(trained, tmp_path, capsys):
    from automl.cli import main

    out, manifest = trained
    space_file = tmp_path / "space.yaml"
    space_file.write_text("version: 1\ntask: digits\narch: {family: cnn, width: {choice: [8, 16]}, "
                          "depth: {int: [1, 3]}, kernel: {choice: [3, 5]}, pooling: {choice: [max, stride]}}\n"
                          f"supernet: {{path: '{out}'}}\n"
                          "train: {epochs: 0}\ncompression:\n  quantization: {method: {choice: [none, int8_ptq]}}\n"
                          "objectives: {accuracy: max, latency_ms: min}\nbudget: {trials: 20, seed: 1}\n")
    run = tmp_path / "run"
    assert main(["search", "--space", str(space_file), "--trials", "4", "--out", str(run), "--no-profile"]) == 0
    recipes = sorted((run / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = Recipe.load(path)
        assert recipe.train.epochs == 0  # scored as inherited: no training at all
        assert recipe.supernet.sha256 == manifest["sha256"]
    rows = (run / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and sum(",completed," in row for row in rows[1:]) >= 2
    assert all(",completed," in row or "chance level" in row for row in rows[1:])  # a weak small sub-network


@pytest.mark.ray
@pytest.mark.slow
def test_supernet_search_scores_candidates_applies_the_front_and_resumes(trained, tmp_path):
    from automl.search.supernet_search import CANDIDATES, SupernetSearch, resume_supernet_search, run_supernet_search

    out, manifest = trained
    s = space(supernet={"path": str(out)}, budget={"concurrency": 2, "seed": 0},
              compression={"quantization": {"method": {"choice": ["none", "int8_ptq"]}}},
              objectives={"accuracy": "max", "macs": "min"})
    s = parse_space({**s.raw, "train": {"epochs": 1, "lr": {"float": [1e-3, 1e-2], "log": True}}}, s.source)
    run = tmp_path / "run"
    outcome = run_supernet_search(s, run, SupernetSearch(candidates=30, front_size=3), log=lambda m: None)
    lines = (run / CANDIDATES).read_text().splitlines()
    assert len(lines) == 30
    info = outcome.report["supernet"]
    assert info["candidates"] == 30 and info["candidates_per_minute"] > 0 and info["cost_basis"] == "macs"
    assert 1 <= len(outcome.rows) <= 3 and all(r["status"] == "completed" for r in outcome.rows)
    for row in outcome.rows:
        assert row["config"]["train.epochs"] == 1 and row["config"]["train.lr"] == pytest.approx(1e-3)
        assert "proxy_accuracy" in row["metrics"] and row["metrics"]["precision"] in ("fp32", "int8_static")
    recipe = Recipe.load(next((run / "recipes").glob("*.yaml")))
    assert recipe.supernet.sha256 == manifest["sha256"]
    # a stopped search resumes: scored candidates and applied points are not repeated
    (run / CANDIDATES).write_text("\n".join(lines[:20]) + "\n")
    again = resume_supernet_search(run, log=lambda m: None)
    assert len((run / CANDIDATES).read_text().splitlines()) == 30
    assert [json.loads(x)["config"] for x in (run / CANDIDATES).read_text().splitlines()[:20]] == \
        [json.loads(x)["config"] for x in lines[:20]]
    assert {r["trial_id"] for r in again.rows} >= {r["trial_id"] for r in outcome.rows} - {None}


@pytest.mark.ray
@pytest.mark.slow
def test_a_predictor_scores_most_candidates_and_its_front_is_measured_before_use(trained, tmp_path, monkeypatch):
    from automl.search import supernet_search
    from automl.search.supernet_search import CANDIDATES, SupernetSearch, resume_supernet_search, run_supernet_search

    monkeypatch.setattr(supernet_search, "STUDY_WINDOW", 30)  # the study rolls over twice, candidates in flight

    out, _ = trained
    s = space(supernet={"path": str(out)}, budget={"concurrency": 2, "seed": 0},
              compression={"quantization": {"method": {"choice": ["none", "int8_ptq"]}}},
              objectives={"accuracy": "max", "macs": "min"})
    s = parse_space({**s.raw, "train": {"epochs": 1}}, s.source)
    run = tmp_path / "run"
    options = SupernetSearch(candidates=80, front_size=2, predictor_samples=25)
    outcome = run_supernet_search(s, run, options, log=lambda m: None)
    rows = [json.loads(x) for x in (run / CANDIDATES).read_text().splitlines()]
    scored = [r for r in rows if "verifies" not in r]
    verified = [r for r in rows if "verifies" in r]
    assert len(scored) == 80 and sum(bool(r["metrics"].get("predicted")) for r in scored) >= 50
    assert all(not r["metrics"].get("predicted") for r in scored[:25])  # measured until the predictor is fitted
    predicted = {r["number"] for r in scored if r["metrics"].get("predicted")}
    assert verified and {r["verifies"] for r in verified} <= predicted
    assert all(not r["metrics"].get("predicted") and "accuracy" in r["metrics"] for r in verified)
    info = outcome.report["supernet"]["predictor"]
    assert info["samples"] == 25 and info["verified"] == len(verified) and "accuracy" in info["held_out"]
    # the front applied comes from measured candidates only
    for row in outcome.rows:
        assert "proxy_predicted" not in row["metrics"]
    again = resume_supernet_search(run, log=lambda m: None)  # nothing left to score or verify
    assert (run / CANDIDATES).read_text().splitlines() == [json.dumps(r, sort_keys=True) for r in rows]
    assert {r["trial_id"] for r in again.rows} == {r["trial_id"] for r in outcome.rows}


def test_the_predictor_learns_a_ranking_and_handles_inactive_parameters():
    from automl.search.predictor import CandidatePredictor
    from automl.spaces import sample_config

    s = space(compression={"pruning": {"method": {"choice": ["none", "magnitude"]},
                                       "ratio": {"float": [0.3, 0.9], "when": {"pruning.method": "magnitude"}}}},
              objectives={"accuracy": "max", "macs": "min"})
    configs = [sample_config(s, seed=i) for i in range(120)]
    assert any("pruning.ratio" not in c for c in configs) and any("pruning.ratio" in c for c in configs)

    def truth(c):  # wider is better, pruning costs in proportion to its ratio
        return {"accuracy": 0.5 + c["arch.width"] / 64 - 0.3 * c.get("pruning.ratio", 0.0), "size_kb": c["arch.width"]}

    predictor = CandidatePredictor(s, seed=0)
    quality = predictor.fit(configs[:100], [truth(c) for c in configs[:100]])
    assert quality["accuracy"]["kendall_tau"] > 0.7 and quality["accuracy"]["held_out"] == 20
    guesses = predictor.predict(configs[100:])
    from scipy.stats import kendalltau

    assert kendalltau([g["accuracy"] for g in guesses], [truth(c)["accuracy"] for c in configs[100:]]).statistic > 0.7


def test_front_pick_leaves_out_chance_and_dominated_candidates_and_spreads():
    from automl.search.supernet_search import pick_front

    s = space(objectives={"accuracy": "max", "macs": "min"})
    rows = [{"number": i, "values": [acc, macs], "metrics": {"accuracy": acc}} for i, (acc, macs) in enumerate([
        (0.11, 1.0),   # at chance level (10 classes): not picked although the cheapest
        (0.60, 2.0), (0.80, 4.0), (0.90, 8.0), (0.95, 16.0), (0.99, 64.0),
        (0.70, 8.0),   # dominated by (0.90, 8.0)
    ])]
    rows.append({"number": 7, "values": None, "metrics": {"error": "refused"}})
    picked = pick_front(rows, s, 3, num_classes=10)
    numbers = [r["number"] for r in picked]
    assert len(numbers) == 3 and 0 not in numbers and 6 not in numbers and 7 not in numbers
    assert numbers == [2, 3, 4]  # the knee of the front adds the most hypervolume; sorted by the last objective
    assert [r["number"] for r in pick_front(rows, s, 10, num_classes=10)] == [1, 2, 3, 4, 5]


def test_candidates_of_one_deployed_structure_are_priced_once(task):
    """The pricing cache keys on what the cost depends on: architecture, shape-changing options, precision."""
    from automl.search.proxy import cost_key, priced_metrics

    s = space(compression={"pruning": {"method": {"choice": ["magnitude", "structured"]}, "ratio": {"float": [0.3, 0.8]}},
                           "quantization": {"method": {"choice": ["none", "int8_ptq"]}}},
              objectives={"accuracy": "max", "macs": "min"})
    base = {"arch.width": 16, "arch.depth": 2, "arch.kernel": 3, "arch.pooling": "max", "pruning.method": "magnitude",
            "pruning.ratio": 0.3, "quantization.method": "none"}
    same = cost_key(s, base)
    assert cost_key(s, {**base, "pruning.ratio": 0.7}) == same                       # masks: same structure
    assert cost_key(s, {**base, "arch.width": 8}) != same
    assert cost_key(s, {**base, "quantization.method": "int8_ptq"}) != same          # another precision
    thinned = {**base, "pruning.method": "structured"}
    assert cost_key(s, thinned) != cost_key(s, {**thinned, "pruning.ratio": 0.7})    # thinning: another shape
    cache = {}
    for config in (base, {**base, "pruning.ratio": 0.7}, thinned):
        assert priced_metrics(s, config, task, cache=cache) == priced_metrics(s, config, task)
    assert len(cache) == 2


def test_a_long_candidate_search_rolls_its_study_over_and_keeps_the_elites():
    """Past STUDY_WINDOW trials the search asks a fresh study seeded with NSGA-II's survivors (asking a big
    study scans all its trials), so evolution continues from them as generation 0."""
    import optuna

    from automl.search.supernet_search import SupernetSearch, _new_study, _rolled
    from automl.spaces import define_by_run

    s = space(objectives={"accuracy": "max", "macs": "min"}, budget={"seed": 0, "trials": 24})
    options, suggest = SupernetSearch(candidates=24), define_by_run(s)
    study = _new_study(s, options, 0)
    for _ in range(40):
        trial = study.ask()
        suggest(trial)
        study.tell(trial, [trial.params["arch.width"] / 16, trial.params["arch.depth"]])
    fresh = _rolled(study, s, options, 40)
    key = study.sampler._get_generation_key()
    population = study.sampler._population_size
    assert len(fresh.trials) == population and all(t.system_attrs[key] == 0 for t in fresh.trials)
    best = max(t.values[0] - t.values[1] for t in study.trials)
    assert max(t.values[0] - t.values[1] for t in fresh.trials) == best  # the best trade-off survives
    child = fresh.ask()
    suggest(child)
    assert fresh._storage.get_trial(child._trial_id).system_attrs[key] == 1  # bred from the carried elites
    assert isinstance(fresh.sampler, optuna.samplers.NSGAIISampler)
