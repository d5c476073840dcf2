"""Strict YAML reading (duplicate keys, float forms, errors) and atomic writing."""
import os
import stat
from pathlib import Path

import pytest

from automl.errors import ConfigError
from automl.io import atomic_write_text, dump_yaml, load_yaml, parse_yaml, write_json, write_yaml


def test_duplicate_key_names_file_key_and_line(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("version: 1\narch:\n  width: 8\n  depth: 2\n  width: 16\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "duplicate key 'width'" in msg
    assert "line 5" in msg
    assert "Fix:" in msg
    assert info.value.key == "width"
    assert info.value.file == str(path)


def test_duplicate_top_level_key():
    with pytest.raises(ConfigError, match=r"duplicate key 'task'"):
        parse_yaml("task: digits\ntask: other\n", "x.yaml")


def test_same_key_in_different_mappings_is_fine():
    assert parse_yaml("a: {k: 1}\nb: {k: 2}\n") == {"a": {"k": 1}, "b": {"k": 2}}


def test_merge_key_override_is_not_a_duplicate():
    data = parse_yaml("base: &b {a: 1, c: 3}\nx:\n  <<: *b\n  a: 2\n")
    assert data["x"] == {"a": 2, "c": 3}
    # With several merged maps the first one wins, explicit keys win over all of them.
    data = parse_yaml("a: &a {k: 1, j: 0}\nb: &b {k: 2, l: 5}\nx:\n  <<: [*a, *b]\n  j: 9\n")
    assert data["x"] == {"k": 1, "l": 5, "j": 9}


def test_merge_key_still_rejects_explicit_duplicates():
    with pytest.raises(ConfigError, match=r"duplicate key 'a' \(line 5\)"):
        parse_yaml("base: &b {a: 1}\nx:\n  <<: *b\n  a: 2\n  a: 3\n")


@pytest.mark.parametrize("text, expected", [
    ("1e-3", 1e-3), ("1E+5", 1e5), (".5e2", 50.0), ("-2e-4", -2e-4), ("1e3", 1000.0),
    ("+1e5", 1e5), ("1.5", 1.5), ("1.", 1.0), ("-.5", -0.5), ("3.0e-2", 0.03),
])
def test_exponent_forms_parse_as_floats(text, expected):
    value = parse_yaml(f"v: {text}")["v"]
    assert type(value) is float
    assert value == pytest.approx(expected, rel=0, abs=0)


@pytest.mark.parametrize("text", ["'1e-3'", '"1E+5"', "'.5e2'"])
def test_quoted_numbers_stay_strings(text):
    value = parse_yaml(f"v: {text}")["v"]
    assert type(value) is str
    assert value == text.strip("'\"")


@pytest.mark.parametrize("text, expected", [("12", 12), ("-3", -3), ("0", 0), ("1_000", 1000)])
def test_ints_stay_ints(text, expected):
    value = parse_yaml(f"v: {text}")["v"]
    assert type(value) is int
    assert value == expected


def test_yaml11_surprises_stay_strings():
    # YAML 1.1 reads 010 as 8, 12:30 as 750 and no/on/yes as booleans; a config never means that.
    data = parse_yaml("a: 010\nb: 12:30\nc: no\nd: on\ne: yes\nf: true\ng: False\nh: 0x10\n")
    assert data == {"a": "010", "b": "12:30", "c": "no", "d": "on", "e": "yes", "f": True, "g": False, "h": 16}


def test_leading_zero_int_is_a_type_error_where_an_int_is_expected(tmp_path):
    from automl.spaces import load_space

    path = tmp_path / "s.yaml"
    path.write_text("version: 1\ntask: digits\narch: {family: cnn, width: 010}\nobjectives: {accuracy: max}\n")
    with pytest.raises(ConfigError, match=r"arch.width: expected an integer \(got '010'\)"):
        load_space(path)


def test_non_numbers_stay_strings():
    data = parse_yaml("a: 1.2.3\nb: e5\nc: 1e\nd: abc\ne: re:conv.*\n")
    assert data == {"a": "1.2.3", "b": "e5", "c": "1e", "d": "abc", "e": "re:conv.*"}


def test_special_floats():
    data = parse_yaml("a: .inf\nb: -.inf\nc: .nan\n")
    assert data["a"] == float("inf") and data["b"] == float("-inf")
    assert data["c"] != data["c"]


def test_invalid_syntax_gives_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\narch:\n  width: [8, 16\n  depth: 2\n")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "invalid YAML" in msg
    assert "line " in msg
    assert "Fix: correct the YAML syntax" in msg


def test_invalid_syntax_reports_the_right_line():
    with pytest.raises(ConfigError) as info:
        parse_yaml("a: 1\nb: 2\nc: : :\n  - x\n", "src.yaml")
    assert info.value.file == "src.yaml"
    assert info.value.key == "line 3"


def test_several_documents_are_an_error():
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        parse_yaml("a: 1\n---\nb: 2\n", "multi.yaml")
    assert info.value.file == "multi.yaml"


def test_unhashable_key_is_config_error():
    with pytest.raises(ConfigError, match="a mapping key must be a scalar"):
        parse_yaml("? [a, b]\n: 1\n", "k.yaml")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    assert "file not found" in str(info.value)
    assert str(path) in str(info.value)
    assert "Fix: check the path" in str(info.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a YAML file, got a directory"):
        load_yaml(tmp_path)


def test_empty_file_is_none(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) is None


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    atomic_write_text(path, "first\n")
    assert path.read_text() == "first\n"
    atomic_write_text(path, "second, ünïcode\n")
    assert path.read_text(encoding="utf-8") == "second, ünïcode\n"
    assert sorted(os.listdir(path.parent)) == ["out.txt"]


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def broken_replace(src, dst):
        assert os.path.basename(src).startswith(".out.txt.") and os.path.exists(src)
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_permissions_like_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    new = atomic_write_text(tmp_path / "new.txt", "x")
    assert stat.S_IMODE(os.stat(new).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)  # not mkstemp's 0600
    os.chmod(new, 0o640)
    atomic_write_text(new, "y")
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o640  # an existing file keeps its mode


def test_write_yaml_load_yaml_round_trip(tmp_path):
    data = {
        "version": 1,
        "floats": [1e-3, 1e-05, 1e20, 0.1, -2.5, 3.0],
        "ints": [0, 7, -12, 10_000],
        "strings": ["1e-3", "1e10", "010", "-.5", "yes", "null", "true", "re:conv.*", ""],
        "nested": {"b": None, "a": True, "list": [{"x": 1}]},
        "unicode": "naïve",
    }
    path = write_yaml(tmp_path / "d.yaml", data)
    loaded = load_yaml(path)
    assert loaded == data
    assert list(loaded) == list(data)  # key order kept
    assert [type(v) for v in loaded["strings"]] == [str] * len(data["strings"])
    assert [type(v) for v in loaded["floats"]] == [float] * len(data["floats"])


def test_dump_yaml_quotes_strings_that_read_as_floats():
    # A 16-hex-digit hash such as '8e91234567890123' must not come back as a float (inf).
    text = dump_yaml({"h": "8e91234567890123", "k": "1e10"})
    assert parse_yaml(text) == {"h": "8e91234567890123", "k": "1e10"}


def test_write_json(tmp_path):
    path = write_json(tmp_path / "m.json", {"a": 1, "b": [1.5]})
    assert path.read_text() == '{\n  "a": 1,\n  "b": [\n    1.5\n  ]\n}\n'


def test_config_errors_survive_pickling_unchanged():
    import pickle

    from automl.errors import ConfigError, ProfileError, UnknownNameError

    for err in (ProfileError("missing op", file="p.yaml", key="entries", value="conv", fix="re-profile"),
                UnknownNameError("unknown method", key="method", value="x", fix="use y"),
                ConfigError("no value here", key="k")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err)
        assert (again.file, again.key, again.fix) == (err.file, err.key, err.fix)


def test_atomic_write_through_a_symbolic_link(tmp_path):
    """A linked file (a shipped profile listed elsewhere) is rewritten in place; the link stays a link."""
    (tmp_path / "pkg").mkdir()
    target = tmp_path / "pkg" / "p.yaml"
    target.write_text("old\n")
    link = tmp_path / "p.yaml"
    link.symlink_to(Path("pkg") / "p.yaml")
    atomic_write_text(link, "new\n")
    assert link.is_symlink() and target.read_text() == "new\n" and link.read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["p.yaml"]


def _nested_aliases(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines + ["top: [" + ", ".join([f"*a{levels - 1}"] * width) + "]"]) + "\n"


def test_alias_bomb_is_refused_quickly():
    import time

    started = time.time()
    with pytest.raises(ConfigError, match=r"bomb.yaml: the YAML expands to 4.41e\+09 nodes through its aliases"):
        parse_yaml(_nested_aliases(9), "bomb.yaml")
    assert time.time() - started < 5
    assert parse_yaml(_nested_aliases(3), "small.yaml")["top"][0][0][0] == ["x"] * 9  # aliases still work


def test_merge_key_bomb_is_refused():
    lines = ["m0: &m0 {k: 1}"]
    lines += [f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + f"], k{i}: 1}}" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="expands to .* nodes"):
        parse_yaml("\n".join(lines) + "\n", "merge.yaml")


def test_non_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"version: 1\ntask: \"\xff\"\n")
    with pytest.raises(ConfigError, match=r"space.yaml: not UTF-8 text \(byte 0xff at offset 18\).*Fix: save"):
        load_yaml(path)


def test_values_in_messages_are_bounded():
    huge = "t" * 1_000_000
    nested = [[[[list(range(1000))]]]] * 1000
    for value in (huge, nested):
        assert len(str(ConfigError("bad task", key="task", value=value, fix="shorter"))) < 600
    assert "(got ['int8_ptq', 'magnitude'])" in str(ConfigError("x", value=["int8_ptq", "magnitude"]))
