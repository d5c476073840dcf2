"""A run directory's outputs change as one set: stale recipes go, a kill mid-write is repaired."""
import os

from automl.search.rundir import COMPLETE, STAGING, recover_outputs, write_output_set


def _write(files):
    def write(staging):
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        return len(files)
    return write


def test_a_new_set_replaces_the_old_one_and_drops_stale_recipes(tmp_path):
    assert write_output_set(tmp_path, _write({"trials.csv": "1", "recipes/a.yaml": "a", "recipes/b.yaml": "b"})) == 3
    write_output_set(tmp_path, _write({"trials.csv": "2", "recipes/b.yaml": "b2"}))
    assert (tmp_path / "trials.csv").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["b.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipes", "trials.csv"]
    write_output_set(tmp_path, _write({"trials.csv": "3"}))  # an empty front leaves no recipe behind
    assert list((tmp_path / "recipes").iterdir()) == []


def test_a_complete_set_cut_short_is_finished_by_recovery(tmp_path):
    write_output_set(tmp_path, _write({"trials.csv": "old", "front.csv": "old", "recipes/a.yaml": "a"}))
    staging = tmp_path / STAGING
    (staging / "recipes").mkdir(parents=True)
    (staging / "trials.csv").write_text("new")
    (staging / "front.csv").write_text("new")
    (staging / "recipes" / "b.yaml").write_text("b")
    (staging / COMPLETE).touch()
    os.replace(staging / "front.csv", tmp_path / "front.csv")  # killed after moving one file
    recover_outputs(tmp_path)
    assert (tmp_path / "trials.csv").read_text() == "new" and (tmp_path / "front.csv").read_text() == "new"
    assert [p.name for p in (tmp_path / "recipes").iterdir()] == ["b.yaml"] and not staging.exists()


def test_an_incomplete_set_and_temp_files_are_dropped(tmp_path):
    write_output_set(tmp_path, _write({"trials.csv": "old", "recipes/a.yaml": "a"}))
    (tmp_path / STAGING).mkdir()
    (tmp_path / STAGING / "trials.csv").write_text("half")
    (tmp_path / ".trials.csv.x1.tmp").write_text("half")
    (tmp_path / "recipes" / ".a.yaml.x2.tmp").write_text("half")
    (tmp_path / ".recipes-old").mkdir()
    recover_outputs(tmp_path)
    assert (tmp_path / "trials.csv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.yaml", "recipes", "trials.csv"]
