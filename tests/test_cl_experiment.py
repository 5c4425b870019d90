"""The harness as a Python API: divergence as a result, locking, Ctrl-C, resume by settings
and by the checks of cell files, Fashion-MNIST benchmarks on synthetic IDX files, validation
splits and tuning."""
import importlib
import json
import os
import shutil
import stat
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from classp_fused.cl import experiment as experiment_module
from classp_fused.cl.benchmarks import BENCHMARKS
from classp_fused.cl.experiment import (CellFileWarning, ConfigError, ExperimentConfig,
                                        Interrupted, run_experiment)
from classp_fused.cl.folders import LOCK_NAME, lock_folder
from classp_fused.cl.report import aggregate, atomic_write, markdown_table
from classp_fused.cl.streams import digits_dataset, split_stream, validation_stream
from classp_fused.cl.tune import GRID_SIZE, GRIDS, tune
from classp_fused.cli import main

from test_cl_streams import write_idx_dir
from test_cli import snapshot

tune_module = importlib.import_module("classp_fused.cl.tune")  # classp_fused.cl.tune is tune()

TINY = dict(seeds=(0,), epochs=(1,), max_per_task=40, progress=False)
#: An SGD step this large overflows the logits at once.
EXPLODING_SGD = {"sgd": {"lr": 1e30}}


def config(tmp_path, **kwargs) -> ExperimentConfig:
    return ExperimentConfig(**{"benchmarks": ("split-digits",), "methods": ("sgd",),
                               "out": str(tmp_path / "out"), **TINY, **kwargs})


def test_run_experiment_is_callable_from_python(tmp_path):
    result = run_experiment(config(tmp_path, methods=("sgd", "classp"), plots=False))
    summary = result.results["split-digits"]["methods"]
    assert set(summary) == {"sgd", "classp"} and result.cells_run == 2
    assert result.table.startswith("| benchmark | method | n |")
    assert [p.name for p in result.files] == ["results.json", "results.csv", "results.md"]
    assert not (tmp_path / "out" / "plots").exists()
    assert result.summary_line.endswith("no cell diverged")


def test_divergence_is_recorded_reported_and_plotted(tmp_path):
    result = run_experiment(config(tmp_path, methods=("sgd", "classp"), seeds=(0, 1),
                                   hparams=EXPLODING_SGD))
    cell = json.loads((tmp_path / "out/cells/split-digits/sgd/seed1.json").read_text())
    stop = cell["diverged"]
    assert stop["task"] == 0 and stop["epoch"] == 0 and stop["step"] <= 1
    assert stop["what"] in ("loss", "parameter")
    assert cell["acc_matrix"] == []
    sgd = result.results["split-digits"]["methods"]["sgd"]
    assert sgd["finished_seeds"] == [] and [d["seed"] for d in sgd["diverged"]] == [0, 1]
    assert sgd["avg_acc"]["mean"] is None
    row = next(line for line in result.table.splitlines() if "| sgd |" in line)
    assert "| 0 | n/a |" in row and row.endswith("| diverged 2/2 |")
    assert result.summary_line.endswith("diverged: split-digits/sgd 2/2")
    for kind in ("acc-matrix", "task-accuracy"):
        assert (tmp_path / "out/plots" / f"split-digits-{kind}.png").stat().st_size > 0
    csv_rows = (tmp_path / "out/results.csv").read_text().splitlines()
    assert sum("task 0 epoch 0" in line for line in csv_rows) == 2


def _cell(seed, matrix, diverged=None):
    return {"benchmark": "b", "method": "m", "seed": seed, "tasks": ["t0", "t1"],
            "settings": {"hparams": {}}, "acc_matrix": matrix, "diverged": diverged,
            "state_bytes": 8, "cpu_seconds": 1.0, "seconds": 2.0, "peak_rss_delta_bytes": 0,
            "update_density": None}


def test_means_and_spreads_are_over_the_seeds_that_finished():
    stop = {"task": 1, "epoch": 0, "step": 7, "what": "loss"}
    cells = [_cell(0, [[0.9, 0.1], [0.7, 0.8]]), _cell(1, [[0.9, 0.2]], stop),
             _cell(2, [[0.8, 0.1], [0.5, 0.9]])]
    m = aggregate(cells)["b"]["methods"]["m"]
    assert m["finished_seeds"] == [0, 2] and m["diverged"] == [{"seed": 1, **stop}]
    assert m["avg_acc"]["mean"] == pytest.approx((0.75 + 0.7) / 2)
    assert m["avg_acc"]["std"] == pytest.approx(np.std([0.75, 0.7], ddof=1))
    assert m["own_acc"]["per_seed"] == pytest.approx([0.85, 0.85])
    assert "| b | m | 2 | 0.725 ± 0.035 |" in markdown_table(aggregate(cells))


def test_a_second_run_into_a_locked_out_stops_at_once(tmp_path, capsys):
    out = tmp_path / "out"
    lock = lock_folder(out)
    try:
        code = main(["run", "--seeds", "1", "--out", str(out)])
    finally:
        lock.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "another run or tune is writing there" in err[0]
    assert not (out / "cells").exists()


def test_ctrl_c_keeps_finished_cells_and_exits_130(tmp_path, capsys, monkeypatch):
    real = experiment_module.run_cell
    calls = []

    def interrupted_second_cell(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment_module, "run_cell", interrupted_second_cell)
    argv = ["run", "--benchmark", "split-digits", "--methods", "sgd", "--seeds", "3",
            "--epochs", "1", "--max-per-task", "40", "--out", str(tmp_path / "out")]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"classp-fused: interrupted: 1 finished cells kept in {tmp_path / 'out'};"
                       " rerun with --resume to continue")
    assert [p.name for p in (tmp_path / "out/cells/split-digits/sgd").iterdir()] == ["seed0.json"]
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    assert main([*argv, "--resume"]) == 0
    assert "2 cells run, 1 kept" in capsys.readouterr().out
    with pytest.raises(Interrupted):  # the API raises a KeyboardInterrupt subclass
        calls.clear()
        run_experiment(config(tmp_path, seeds=(5, 6), out=str(tmp_path / "api")))


@pytest.mark.parametrize("change", [{"epochs": (2,)}, {"max_per_task": 30},
                                    {"scenario": "class"}, {"batch_size": 16}])
def test_resume_never_keeps_a_cell_run_under_other_settings(tmp_path, change):
    assert run_experiment(config(tmp_path, plots=False)).cells_run == 1
    with pytest.warns(CellFileWarning, match=f"run with other settings \\({next(iter(change))}\\)"):
        again = run_experiment(config(tmp_path, plots=False, resume=True, **change))
    assert (again.cells_run, again.cells_kept) == (1, 0)
    stored = json.loads((tmp_path / "out/cells/split-digits/sgd/seed0.json").read_text())
    key, value = next(iter(change.items()))
    assert stored["settings"][key] == (list(value) if isinstance(value, tuple) else value)
    assert run_experiment(config(tmp_path, plots=False, resume=True, **change)).cells_kept == 1


def _set_density(cell):
    cell["update_density"] = [0.5] * 5


#: Ways a stored cell file can be damaged (its classp cell, or the text of the file), and the
#: reason the run gives for running it again.
DAMAGE = {
    "accuracy above 1": (lambda c: c["acc_matrix"][0].__setitem__(1, 7.0),
                         "acc_matrix[0][1] is 7.0"),
    "NaN accuracy": (lambda c: c["acc_matrix"][2].__setitem__(2, float("nan")),
                     "acc_matrix[2][2] is nan"),
    "accuracy as text": (lambda c: c["acc_matrix"][0].__setitem__(0, "0.9"), "acc_matrix[0][0]"),
    "matrix as text": (lambda c: c.__setitem__("acc_matrix", "high"), "acc_matrix is 'high'"),
    "a row short": (lambda c: c["acc_matrix"].pop(), "expected 5 rows of 5 accuracies"),
    "missing field": (lambda c: c.pop("seconds"), "missing seconds"),
    "unexpected field": (lambda c: c.__setitem__("note", 1), "unexpected note"),
    "another seed": (lambda c: c.__setitem__("seed", 1), "seed is 1, expected 0"),
    "seed as a boolean": (lambda c: c.__setitem__("seed", False), "seed is False, expected 0"),
    "renamed task": (lambda c: c["tasks"].__setitem__(0, "cats"), "tasks are"),
    "divergence without its place": (lambda c: c.__setitem__("diverged", {"task": 1}),
                                     "diverged is"),
    "divergence past the tasks": (lambda c: c.__setitem__(
        "diverged", {"task": 7, "epoch": 0, "step": 0, "what": "loss"}), "diverged.task is 7"),
    "divergence past the epochs": (lambda c: c.__setitem__(
        "diverged", {"task": 1, "epoch": 3, "step": 0, "what": "loss"}), "diverged.epoch is 3"),
    "divergence of something else": (lambda c: c.__setitem__(
        "diverged", {"task": 0, "epoch": 0, "step": 0, "what": "mood"}), "diverged.what"),
    "unstable task not finished": (lambda c: c.__setitem__("unstable_tasks", [9]),
                                   "unstable_tasks is [9]"),
    "negative time": (lambda c: c.__setitem__("cpu_seconds", -1.0), "cpu_seconds is -1.0"),
    "fractional bytes": (lambda c: c.__setitem__("state_bytes", 1.5), "state_bytes is 1.5"),
    "density missing": (lambda c: c.__setitem__("update_density", None), "update_density is None"),
    "density above 1": (lambda c: c["update_density"].__setitem__(0, 2.0), "update_density is"),
    "not an object": ("[]", "expected a JSON object, got list"),
    "not JSON": ('{"benchmark": "split-', "not JSON"),
    "empty": ("", "not JSON"),
    "not UTF-8": (b"\xff\xfe", "not UTF-8"),
    "nested too deeply": ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run of sgd and classp on one seed, and its config (copy before changing)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    done = ExperimentConfig(benchmarks=("split-digits",), methods=("sgd", "classp"),
                            out=str(out), plots=False, **TINY)
    assert run_experiment(done).cells_run == 2
    return done


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_runs_again_every_cell_file_that_fails_its_checks(finished, tmp_path, case):
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    damage, reason = DAMAGE[case]
    path = out / "cells/split-digits/classp/seed0.json"
    if callable(damage):
        cell = json.loads(path.read_text())
        damage(cell)
        damage = json.dumps(cell)
    path.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
    sgd = (out / "cells/split-digits/sgd/seed0.json").read_bytes()
    with pytest.warns(CellFileWarning) as caught:
        result = run_experiment(replace(finished, out=str(out), resume=True))
    messages = [str(w.message) for w in caught if w.category is CellFileWarning]
    assert len(messages) == 1 and messages[0].startswith(f"{path}: not reused (")
    assert reason in messages[0] and messages[0].endswith("); running the cell again")
    assert (result.cells_run, result.cells_kept) == (1, 1)
    assert (out / "cells/split-digits/sgd/seed0.json").read_bytes() == sgd
    rerun = json.loads(path.read_text())
    assert len(rerun["acc_matrix"]) == 5 and len(rerun["update_density"]) == 5


def test_resume_keeps_every_cell_that_passes_its_checks_divergences_included(tmp_path):
    first = run_experiment(config(tmp_path, methods=("sgd", "classp"), seeds=(0, 1),
                                  hparams=EXPLODING_SGD, plots=False))
    assert len(first.results["split-digits"]["methods"]["sgd"]["diverged"]) == 2
    before = snapshot(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CellFileWarning)
        again = run_experiment(config(tmp_path, methods=("sgd", "classp"), seeds=(0, 1),
                                      hparams=EXPLODING_SGD, plots=False, resume=True))
    assert (again.cells_run, again.cells_kept) == (0, 4)
    after = snapshot(tmp_path / "out")
    assert {k for k in after if after[k] != before[k]} <= {"results.json", "results.csv",
                                                            "results.md"}
    assert again.results["split-digits"]["methods"]["sgd"]["diverged"] == \
        first.results["split-digits"]["methods"]["sgd"]["diverged"]


def test_a_tune_owns_its_whole_tree_while_it_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "tune"
    small = ["--benchmark", "split-digits", "--methods", "sgd", "--seeds", "1", "--epochs", "1",
             "--max-per-task", "40"]
    intruders = {  # argv -> what the refusal says
        ("run", *small, "--out", str(out / "grid/sgd/1")): f"inside {out}, which another run",
        ("run", *small, "--out", str(out / "grid")): f"inside {out}, which another run",
        ("run", *small, "--out", str(out)): "another run or tune is writing there",
        ("tune", *small, "--out", str(out / "grid/sgd")): f"inside {out}, which another run"}
    refusals = []
    real = tune_module.run_planned

    def run_point_with_intruders(point_config, cells, dirs):
        if not refusals:  # the first configuration: the tune holds its folder, nothing ran yet
            for argv, message in intruders.items():
                before = snapshot(out)
                code = main(list(argv))
                lines = capsys.readouterr().err.strip().splitlines()
                refusals.append((code, len(lines) == 1 and message in lines[0],
                                 snapshot(out) == before))
        return real(point_config, cells, dirs)

    monkeypatch.setattr(tune_module, "run_planned", run_point_with_intruders)
    tuned = tune(config(tmp_path, seeds=(1000,), out=str(out)),
                 grids={"sgd": [{"lr": 0.05}, {"lr": 0.1}]})
    assert refusals == [(2, True, True)] * len(intruders)
    assert len(tuned["tuning"]["trials"]["sgd"]) == 2
    grid = json.loads((out / "grid/sgd/1/cells/split-digits/sgd/seed1000.json").read_text())
    assert grid["settings"]["hparams"]["lr"] == 0.1 and grid["settings"]["validation"] == 0.2
    assert not [p for p in out.rglob("*") if p.name == LOCK_NAME]


def test_a_run_owns_its_folder_while_it_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = experiment_module.run_cell
    refusals = []

    def run_cell_with_intruders(*args, **kwargs):
        if not refusals:
            for inner, message in ((out / "cells/split-digits", f"inside {out}, which another"),
                                   (out, "another run or tune is writing there")):
                before = snapshot(out)
                code = main(["run", "--benchmark", "split-digits", "--out", str(inner)])
                lines = capsys.readouterr().err.strip().splitlines()
                refusals.append((code, len(lines) == 1 and message in lines[0],
                                 snapshot(out) == before))
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment_module, "run_cell", run_cell_with_intruders)
    run_experiment(config(tmp_path, plots=False))
    assert refusals == [(2, True, True)] * 2
    assert not (out / LOCK_NAME).exists()


def test_a_tune_is_refused_while_a_run_writes_into_its_tree(tmp_path):
    out = tmp_path / "tune"
    held = lock_folder(out / "grid/sgd/0")
    try:
        before = snapshot(tmp_path)
        with pytest.raises(ConfigError, match="another run or tune is writing into"):
            tune(config(tmp_path, seeds=(1000,), out=str(out)), grids={"sgd": [{"lr": 0.05}]})
        assert snapshot(tmp_path) == before
    finally:
        held.release()
    assert snapshot(out) == {"grid": None, "grid/sgd": None, "grid/sgd/0": None}


def test_a_tune_into_an_earlier_tunes_folder_needs_resume_or_overwrite(tmp_path):
    grids = {"sgd": [{"lr": 0.05}]}
    tuned = tune(config(tmp_path, seeds=(1000,)), grids=grids)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match="holds results of an earlier run \\(tuned.json,"
                                          " tuning.md, grid\\); rerun with --resume"):
        tune(config(tmp_path, seeds=(1000,)), grids=grids)
    assert snapshot(tmp_path) == before
    assert tune(config(tmp_path, seeds=(1000,), resume=True), grids=grids)["hparams"] == \
        tuned["hparams"]
    after = snapshot(tmp_path)
    assert after["out/grid/sgd/0/cells/split-digits/sgd/seed1000.json"] == \
        before["out/grid/sgd/0/cells/split-digits/sgd/seed1000.json"]


@pytest.mark.parametrize("bad, message", [
    ({"seeds": ()}, "seeds: expected 1 to"), ({"seeds": (2 ** 32,)}, "seeds: expected distinct"),
    ({"seeds": (1, 1)}, "seeds: expected distinct"), ({"epochs": (0,)}, "epochs: expected"),
    ({"batch_size": 0}, "batch_size: expected"), ({"validation": 1.0}, "validation: expected"),
    ({"scenario": "domain"}, "scenario: expected"), ({"device": "meta"}, "device meta"),
    ({"hparams": {"nope": {}}}, "hparams: unknown method 'nope'"),
    ({"hparams": {"sgd": 0.1}}, "hparams: expected a mapping"),
    ({"methods": "sgd"}, "methods: expected a list of names"),
    ({"hparams": {"sgd": {"lr": float("nan")}}}, "hparams sgd: lr must be a finite number"),
    ({"hparams": {"classp": {"per_task": [{"power": 0}]}}}, "per_task\\[0\\].power must be"),
    ({"resume": True, "overwrite": True}, "give one"),
    ({"overwrite": "yes"}, "overwrite: expected"),
    ({"record": {"x": object()}}, "record: not JSON"),
    ({"record": {"x": json.loads("[" * 40 + "]" * 40)}},
     "record: nested deeper than 32 levels")])
def test_bad_configuration_raises_before_writing(tmp_path, bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_experiment(config(tmp_path, **bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["split-fashion", "permuted-fashion"])
def test_fashion_benchmarks_run_on_idx_files(tmp_path, capsys, name):
    fashion = write_idx_dir(tmp_path / "fashion", n_train=60, n_test=30, size=10, seed=3)
    out = tmp_path / "out"
    code = main(["run", "--benchmark", name, "--methods", "sgd,classp", "--seeds", "1",
                 "--fashion-dir", str(fashion), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    entry = json.loads((out / "results.json").read_text())["benchmarks"][name]
    assert len(entry["tasks"]) == 5 and entry["settings"]["epochs"] == [1]
    assert entry["settings"]["data_dirs"] == {"fashion": str(fashion.resolve())}
    matrix = entry["methods"]["classp"]["acc_matrix"]["per_seed"][0]
    assert np.asarray(matrix).shape == (5, 5)


def test_fashion_benchmarks_read_debians_directory_by_default():
    assert all(BENCHMARKS[n].data_dirs == ("fashion",)
               for n in ("split-fashion", "permuted-fashion"))
    assert experiment_module.DEFAULT_DIRS["fashion"] == "/usr/share/datasets/fashion-mnist"


def test_validation_split_comes_from_training_data_only():
    stream = split_stream(digits_dataset(0), 5)
    held = validation_stream(stream, 0.25, seed=4)
    for before, after in zip(stream.tasks, held.tasks):
        assert len(after.x_train) + len(after.x_test) == len(before.x_train)
        rows = {tuple(x.flatten().tolist()) for x in before.x_train}
        assert all(tuple(x.flatten().tolist()) in rows for x in after.x_test)
        assert torch.equal(torch.cat([after.y_train, after.y_test]).sort().values,
                           before.y_train.sort().values)
    again = validation_stream(stream, 0.25, seed=4)
    assert torch.equal(again.tasks[0].x_test, held.tasks[0].x_test)
    with pytest.raises(ValueError, match="fraction"):
        validation_stream(stream, 0.0, seed=0)


def test_every_method_grid_has_the_same_size():
    assert {len(grid) for grid in GRIDS.values()} == {GRID_SIZE}
    classp = GRIDS["classp"]
    assert {p["apply_scaling"] for p in classp} == {True, False}
    assert {p["power"] for p in classp} == {1.0, 2.0} and {p["threshold"] for p in classp} > {0.0}
    assert {p["relative_threshold"] for p in classp} > {0.0}
    assert all(set(p) == {"lr", "lam"} for m in ("ewc", "mas") for p in GRIDS[m])
    both = GRIDS["classp+mas"]
    assert all(set(p) == {*classp[0], "lam"} for p in both)
    assert {p["power"] for p in both} == {1.0, 2.0} and len({p["lam"] for p in both}) == 3
    assert len({tuple(sorted(p.items())) for p in both}) == GRID_SIZE


def test_tune_scores_divergence_picks_on_validation_and_feeds_run(tmp_path, capsys):
    grids = {"sgd": [{"lr": 1e30}, {"lr": 0.05}, {"lr": 0.2}],
             "classp": GRIDS["classp"][:3]}
    tuned = tune(config(tmp_path, methods=("sgd", "classp"), seeds=(1000,),
                        out=str(tmp_path / "tune")), {"fashion_dir": "/x"}, grids)
    trials = tuned["tuning"]["trials"]
    assert trials["sgd"][0]["score"] is None and trials["sgd"][0]["diverged"] == "1/1"
    scored = [t for t in trials["sgd"] if t["score"] is not None]
    best = max(scored, key=lambda t: t["score"])
    assert tuned["hparams"]["sgd"] == best["hparams"] and best["picked"]
    assert tuned["tuning"]["validation"] == 0.2 and tuned["tuning"]["seeds"] == [1000]
    assert tuned["fashion_dir"] == "/x" and tuned["epochs"] == [1]
    cell = json.loads((tmp_path / "tune/grid/sgd/1/cells/split-digits/sgd/seed1000.json")
                      .read_text())
    assert cell["settings"]["validation"] == 0.2
    assert json.loads((tmp_path / "tune/tuned.json").read_text())["hparams"] == tuned["hparams"]
    assert "| sgd | lr=1e+30 | — | 1/1 |" in (tmp_path / "tune/tuning.md").read_text()

    tuned_file = tmp_path / "tune/tuned.json"
    data = json.loads(tuned_file.read_text())
    del data["fashion_dir"]
    tuned_file.write_text(json.dumps(data))
    out = tmp_path / "run"
    assert main(["run", "--config", str(tuned_file), "--seeds", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["record"]["config"]["tuning"]["seeds"] == [1000]
    sgd = results["benchmarks"]["split-digits"]["methods"]["sgd"]
    assert sgd["hparams"]["lr"] == best["hparams"]["lr"]
    assert results["benchmarks"]["split-digits"]["settings"]["validation"] is None


def test_tune_refuses_what_it_cannot_search(tmp_path):
    with pytest.raises(ConfigError, match="one benchmark"):
        tune(config(tmp_path, benchmarks=("split-digits", "permuted-digits")))
    with pytest.raises(ConfigError, match="no grid for method 'classp-legacy'"):
        tune(config(tmp_path, methods=("classp-legacy",)))
    assert not (tmp_path / "out").exists()


def test_permuted_streams_subsample_once_then_permute():
    stream = BENCHMARKS["permuted-digits"].stream(3, {}, 50)
    assert [len(t.x_train) for t in stream.tasks] == [50] * 5
    assert all(len(t.x_test) == 50 for t in stream.tasks)
    first, second = stream.tasks[0].x_train.flatten(1), stream.tasks[1].x_train.flatten(1)
    assert torch.equal(stream.tasks[0].y_train, stream.tasks[1].y_train)
    assert torch.equal(first.sort(dim=1).values, second.sort(dim=1).values)
    assert not torch.equal(first, second)
    assert BENCHMARKS["permuted-digits"].stream(3, {}, 50).tasks[2].x_test.equal(
        stream.tasks[2].x_test)


def test_proximal_penalty_stays_stable_where_the_explicit_one_diverges(tmp_path):
    stiff = {"lr": 0.1, "lam": 100.0}
    kwargs = dict(benchmarks=("split-digits",), methods=("mas",), seeds=(0,), epochs=(2,),
                  max_per_task=120, progress=False, plots=False)
    explicit = run_experiment(ExperimentConfig(hparams={"mas": stiff},
                                               out=str(tmp_path / "e"), **kwargs))
    proximal = run_experiment(ExperimentConfig(hparams={"mas": {**stiff, "penalty": "proximal"}},
                                               out=str(tmp_path / "p"), **kwargs))
    e = explicit.results["split-digits"]["methods"]["mas"]
    p = proximal.results["split-digits"]["methods"]["mas"]
    assert e["unstable"] and e["unstable"][0]["tasks"][0] == 0
    assert e["diverged"] and e["diverged"][0]["task"] >= 1
    assert p["diverged"] == [] and p["unstable"] == []
    assert p["hparams"]["penalty"] == "proximal" and p["avg_acc"]["mean"] > 0.5
    with pytest.raises(ConfigError, match="penalty must be one of explicit, proximal"):
        run_experiment(ExperimentConfig(hparams={"mas": {"penalty": "implicit"}},
                                        out=str(tmp_path / "x"), **kwargs))


def test_result_files_get_the_umask_mode_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
        os.umask(0o077)
        atomic_write(tmp_path / "b.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    assert (tmp_path / "a.json").read_bytes() == b"{}" and len(list(tmp_path.iterdir())) == 2
