"""Provenance records: the code's commit and dirtiness, file hashes, the config hash."""

import subprocess
import sys

import pytest

from cmmas import provenance as prov


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    folder = tmp_path / "repo"
    (folder / "pkg").mkdir(parents=True)
    (folder / "pkg" / "a.py").write_text("x = 1\n")
    _git(folder, "init", "-q")
    _git(folder, "add", "pkg/a.py")
    _git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    prov.code_state.cache_clear()
    yield folder
    prov.code_state.cache_clear()


def test_code_state_of_a_clean_checkout_names_its_commit(repo):
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    state = prov.code_state(repo / "pkg")
    assert state == {"commit": head, "dirty": False, "changed": []}


def test_untracked_files_do_not_make_the_tree_dirty_but_a_changed_tracked_one_does(repo):
    (repo / "runs").mkdir()
    (repo / "runs" / "summary.json").write_text("{}")
    assert prov.code_state(repo)["dirty"] is False
    prov.code_state.cache_clear()
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    state = prov.code_state(repo)
    assert state["dirty"] is True and state["changed"] == ["pkg/a.py"]


def test_code_state_is_asked_once_per_process(repo):
    first = prov.code_state(repo)
    (repo / "pkg" / "a.py").write_text("x = 3\n")
    assert prov.code_state(repo) is first


def test_outside_a_checkout_the_installed_version_stands_in(tmp_path):
    prov.code_state.cache_clear()
    state = prov.code_state(tmp_path)
    assert state["commit"] is None and "version" in state


def test_model_hashes_change_when_the_model_or_its_card_changes(tmp_path):
    model = tmp_path / "model.keras"
    model.write_bytes(b"weights-1")
    first = prov.provenance(models={"reg": model})["models"]["reg"]
    assert first["path"] == str(model.resolve()) and first["card_sha256"] is None
    (tmp_path / "model.keras.json").write_text('{"grid": 1}')
    carded = prov.provenance(models={"reg": model})["models"]["reg"]
    assert carded["sha256"] == first["sha256"] and carded["card_sha256"] is not None
    model.write_bytes(b"weights-2")
    (tmp_path / "model.keras.json").write_text('{"grid": 2}')
    changed = prov.provenance(models={"reg": model})["models"]["reg"]
    assert changed["sha256"] != first["sha256"] and changed["card_sha256"] != carded["card_sha256"]


def test_config_hash_is_stable_under_key_order_and_changes_with_a_value():
    a = {"steps": 500, "lr": 1e-3, "nested": {"x": [1, 2], "y": "z"}}
    b = {"nested": {"y": "z", "x": [1, 2]}, "lr": 1e-3, "steps": 500}
    assert prov.config_hash(a) == prov.config_hash(b)
    assert prov.config_hash(a) != prov.config_hash({**a, "steps": 501})
    assert len(prov.config_hash(a)) == 12


def test_provenance_records_data_cases_config_and_versions_without_importing_tensorflow(tmp_path):
    record = prov.provenance(config={"path": tmp_path, "k": 3}, data=tmp_path, cases=("mr_01", "mr_02"))
    assert record["data"] == str(tmp_path.resolve()) and record["cases"] == ["mr_01", "mr_02"]
    assert record["config"] == {"path": str(tmp_path), "k": 3}
    assert record["config_hash"] == prov.config_hash({"k": 3, "path": str(tmp_path)})
    assert record["time"].endswith("+00:00") and "python" in record["versions"]
    assert ("tensorflow" in record["versions"]) == ("tensorflow" in sys.modules)
    code = subprocess.run([sys.executable, "-c", "import sys, cmmas.provenance as p; p.provenance(); "
                           "print('tensorflow' in sys.modules)"], capture_output=True, text=True, check=True)
    assert code.stdout.strip() == "False"


def test_a_bench_json_holds_provenance_command_and_rows(tmp_path, monkeypatch):
    import json

    from cmmas.scripts import write_bench_json

    monkeypatch.setattr(sys, "argv", ["bench/bench_x.py", "--out", str(tmp_path)])
    path = write_bench_json(tmp_path / "bench_x.json", [{"target": "mr_01", "seconds": 4.0}], data=tmp_path,
                            cases=["mr_01"])
    record = json.loads(path.read_text())
    assert record["command"] == f"bench/bench_x.py --out {tmp_path}"
    assert record["rows"] == [{"target": "mr_01", "seconds": 4.0}]
    assert record["provenance"]["cases"] == ["mr_01"] and "code" in record["provenance"]
