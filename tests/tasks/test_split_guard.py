"""The split lives in the checkpoint: eval refuses a changed split (task settings: exit 2, data: exit 3)
unless --new-tasks, which then says the tasks may overlap training."""

import json
import shutil

import pytest

from meta_train import checkpoint
from meta_train.cli import main
from spiky_table import write_power_csv

TASK = ["task.name=table", "task.task_column=exp", "task.target=power_w", "task.scaling.target=standard"]
FAST = ["train.iterations=4", "train.meta_batch=2", "train.shots=3", "train.query=3", "train.progress=false",
        "model.hidden=[8]"]
EVAL = ["--methods", "meta", "eval.tasks=4", "eval.shots=[3]", "eval.steps=[1]", "eval.query=4"]


@pytest.fixture
def run(tmp_path, capsys):
    csv_path = write_power_csv(tmp_path / "power.csv", tasks=10, rows=20)
    assert main(["train", "--out", str(tmp_path / "run"), f"task.path={csv_path}", *TASK, *FAST]) == 0
    capsys.readouterr()
    return tmp_path / "run", csv_path


def test_the_split_and_a_data_fingerprint_are_in_the_checkpoint(run):
    split = checkpoint.load(run[0])["split"]
    assert sorted(sum(split["split_tasks"].values(), [])) == sorted(f"E{i}" for i in range(10))
    assert split["settings"]["seed"] == 0 and split["settings"]["scaling"]["target"] == "standard"
    assert "path" not in split["settings"] and len(split["data_fingerprint"]) == 64


def test_eval_on_the_runs_own_split_runs_even_from_a_moved_file(run, tmp_path, capsys):
    path, csv_path = run
    moved = shutil.copy(csv_path, tmp_path / "elsewhere.csv")
    assert main(["eval", "--run", str(path), *EVAL, f"task.path={moved}"]) == 0
    out = capsys.readouterr().out
    assert "overlap" not in out and "query MSE" in out


def test_another_task_seed_is_refused_with_exit_code_2(run, capsys):
    path, _ = run
    assert main(["eval", "--run", str(path), *EVAL, "task.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "task split would differ" in err and "task.seed: 0 -> 1" in err and "--new-tasks" in err
    assert "meta-train tasks of the run" in err  # it names the leak
    assert not (path / "eval.json").exists()


def test_new_tasks_evaluates_anyway_and_says_so(run, capsys):
    path, _ = run
    assert main(["eval", "--run", str(path), *EVAL, "task.seed=1", "--new-tasks"]) == 0
    out = capsys.readouterr().out
    assert "may overlap the run's training tasks" in out and "task.seed: 0 -> 1" in out
    assert "may overlap" in json.loads((path / "eval.json").read_text())["split_note"]


@pytest.mark.parametrize("extra", ["experiment", "row"])
def test_an_appended_experiment_or_row_is_refused_with_exit_code_3(run, capsys, extra):
    path, csv_path = run
    with open(csv_path, "a") as f:
        f.write("E99,5000.0,0.1,1.0,5100.0\nE99,6000.0,0.2,2.0,5200.0\n" if extra == "experiment"
                else "E3,5000.0,0.1,1.0,5100.0\n")
    assert main(["eval", "--run", str(path), *EVAL]) == 3
    err = capsys.readouterr().err
    assert "the data differ from the ones the run was trained on" in err and "--new-tasks" in err
    assert main(["eval", "--run", str(path), *EVAL, "--new-tasks"]) == 0


def test_synthetic_sources_refuse_changed_task_settings_too(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "s"), *FAST]) == 0
    assert main(["eval", "--run", str(tmp_path / "s"), *EVAL, "task.amplitude_max=1.0"]) == 2
    assert "task.amplitude_max: 5.0 -> 1.0" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "s"), *EVAL]) == 0
