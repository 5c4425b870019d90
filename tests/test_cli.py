"""End to end: ``classp-fused run`` on tiny configurations, resume, and every bad-input case."""
import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from classp_fused.cl.folders import LOCK_NAME
from classp_fused.cl.methods import METHODS
from classp_fused.cli import main

from test_cl_streams import write_idx_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--seeds", "1", "--epochs", "1", "--max-per-task", "40"]


def run_main(capsys, *argv):
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(root: Path) -> dict[str, Optional[bytes]]:
    """Every entry under ``root``, hidden ones included: relative path -> bytes (None: folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


def assert_refused(capsys, root: Path, argv: list, message: str) -> str:
    """``main(argv)`` exits with 2 and one error line holding ``message``, and every entry under
    ``root`` is as it was (names and bytes); returns the line."""
    before = snapshot(root)
    code = main(argv)
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert (code, stdout) == (2, ""), stderr
    assert len(lines) == 1 and lines[0].startswith("classp-fused: error: "), stderr
    assert message in lines[0]
    assert snapshot(root) == before
    return lines[0]


def cell_files(out: Path) -> dict[str, int]:
    """Cell checkpoint path (relative) -> modification time in ns."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}


def check_results(out: Path, benchmarks: dict[str, tuple[int, list[str]]], seeds: int):
    """results.json, results.csv and the plots exist and hold sensible values.

    ``benchmarks`` maps each expected benchmark to its number of tasks and its methods.
    """
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(benchmarks)
    for name, (tasks, methods) in benchmarks.items():
        entry = results["benchmarks"][name]
        assert len(entry["tasks"]) == tasks
        assert list(entry["methods"]) == methods
        for method, summary in entry["methods"].items():
            assert len(summary["seeds"]) == seeds
            matrix = np.array(summary["acc_matrix"]["mean"])
            assert matrix.shape == (tasks, tasks)
            assert np.all((matrix >= 0) & (matrix <= 1))
            per_seed = np.array(summary["acc_matrix"]["per_seed"])
            assert per_seed.shape == (seeds, tasks, tasks)
            assert summary["finished_seeds"] == summary["seeds"] and summary["diverged"] == []
            for key in ("avg_acc", "bwt", "forgetting", "own_acc", "state_bytes", "cpu_seconds",
                        "seconds", "peak_rss_delta_bytes"):
                assert set(summary[key]) == {"mean", "std", "per_seed"}
                assert len(summary[key]["per_seed"]) == seeds
            assert 0.0 <= summary["avg_acc"]["mean"] <= 1.0
            assert summary["avg_acc"]["per_seed"][0] == pytest.approx(per_seed[0, -1].mean())
            assert -1.0 <= summary["bwt"]["mean"] <= 1.0
            assert summary["seconds"]["mean"] > 0 and summary["cpu_seconds"]["mean"] > 0
            assert summary["own_acc"]["per_seed"][0] == pytest.approx(np.diag(per_seed[0]).mean())
            if method.startswith("classp"):
                density = summary["update_density"]["mean"]
                assert len(density) == tasks and all(0.0 <= d <= 1.0 for d in density)
                assert summary["state_bytes"]["mean"] > 0
            else:
                assert "update_density" not in summary
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(methods) for _, methods in benchmarks.values()) * seeds
    assert all(0.0 <= float(row["avg_acc"]) <= 1.0 and row["diverged"] == "" for row in rows)
    assert (out / "results.md").read_text().startswith("| benchmark | method | n | avg acc |")
    for name in benchmarks:
        for kind in ("acc-matrix", "task-accuracy"):
            assert (out / "plots" / f"{name}-{kind}.png").read_bytes()[:8] == PNG_MAGIC
    return results


def test_run_in_process_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_main(capsys, *TINY, "--methods", "sgd,classp", "--out", str(out))
    assert code == 0, stderr
    results = check_results(out, {"split-digits": (5, ["sgd", "classp"]),
                                  "permuted-digits": (5, ["sgd", "classp"])}, 1)
    assert results["benchmarks"]["split-digits"]["methods"]["sgd"]["state_bytes"]["mean"] == 0
    assert "| benchmark | method | n | avg acc |" in stdout
    assert "| split-digits | classp | 1 |" in stdout
    assert str(out / "plots" / "permuted-digits-acc-matrix.png") in stdout
    assert stdout.rstrip().splitlines()[-1].endswith("s CPU; no cell diverged")
    assert "[4/4] permuted-digits classp seed 0: avg acc" in stderr
    assert len(cell_files(out)) == 4
    # stderr is no terminal here: a line per cell, no progress bar redrawn with carriage returns
    assert "\r" not in stderr and len(stderr.splitlines()) == 4
    assert not (out / LOCK_NAME).exists()


def test_all_methods_run_on_split_digits(tmp_path, capsys):
    out = tmp_path / "all"
    code, stdout, stderr = run_main(capsys, *TINY, "--benchmark", "split-digits",
                                    "--scenario", "class", "--out", str(out))
    assert code == 0, stderr
    from classp_fused.cl.methods import METHODS
    results = check_results(out, {"split-digits": (5, list(METHODS))}, 1)
    methods = results["benchmarks"]["split-digits"]["methods"]
    # EWC separate holds every task in one importance-anchor pair plus a float64 residual per
    # parameter tensor (the model has six), online EWC and MAS one pair.
    assert (methods["ewc"]["state_bytes"]["mean"]
            == methods["online-ewc"]["state_bytes"]["mean"] + 6 * 8)
    assert methods["mas"]["state_bytes"]["mean"] == methods["online-ewc"]["state_bytes"]["mean"]


def test_module_entry_point_with_config_file(tmp_path):
    out = tmp_path / "from-config"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"benchmark": ["permuted-digits"], "methods": "sgd,mas",
                                  "seeds": [3, 5], "epochs": 1, "max_per_task": 30,
                                  "hparams": {"mas": {"lam": 0.5}}, "out": "ignored"}))
    proc = subprocess.run([sys.executable, "-m", "classp_fused", "run", "--config", str(config),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not Path("ignored").exists()
    results = check_results(out, {"permuted-digits": (5, ["sgd", "mas"])}, 2)
    mas = results["benchmarks"]["permuted-digits"]["methods"]["mas"]
    assert mas["seeds"] == [3, 5]
    assert mas["hparams"]["lam"] == 0.5
    assert "| permuted-digits | mas |" in proc.stdout


def test_resume_runs_only_missing_cells(tmp_path, capsys):
    out = tmp_path / "resume"
    argv = [*TINY, "--seeds", "2", "--benchmark", "split-digits", "--methods", "sgd,classp",
            "--out", str(out)]
    assert run_main(capsys, *argv)[0] == 0
    before = cell_files(out)
    assert len(before) == 4
    deleted = "cells/split-digits/classp/seed1.json"
    (out / deleted).unlink()
    # a kill while writing leaves at most a stray temp file and a corrupt cell is not reused
    (out / "cells/split-digits/sgd/.seed0.json.x.tmp").write_text("{")
    corrupt = "cells/split-digits/sgd/seed1.json"
    (out / corrupt).write_text('{"benchmark": "split-')

    code, stdout, _ = run_main(capsys, *argv, "--resume")
    assert code == 0
    after = cell_files(out)
    assert set(after) == set(before)
    rerun = {path for path in after if after[path] != before.get(path)}
    assert rerun == {deleted, corrupt}
    assert "2 cells run, 2 kept" in stdout.splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert (results["settings"]["cells_run"], results["settings"]["cells_kept"]) == (2, 2)
    check_results(out, {"split-digits": (5, ["sgd", "classp"])}, 2)


def test_resume_reruns_cells_whose_settings_changed(tmp_path, capsys):
    out = tmp_path / "changed"
    argv = [*TINY, "--benchmark", "split-digits", "--methods", "sgd,adam", "--out", str(out)]
    assert run_main(capsys, *argv)[0] == 0
    code, stdout, _ = run_main(capsys, *argv, "--hparam", "adam.lr=0.01", "--resume")
    assert code == 0
    assert "1 cells run, 1 kept" in stdout
    adam = json.loads((out / "cells/split-digits/adam/seed0.json").read_text())
    assert adam["settings"]["hparams"]["lr"] == 0.01


def test_domain_sequence_and_paper_protocol_on_idx_dirs(tmp_path, capsys, monkeypatch):
    # fewer consolidation samples than training examples: importance on a subset only
    monkeypatch.setattr("classp_fused.cl.train.CONSOLIDATION_SAMPLES", 24)
    mnist = write_idx_dir(tmp_path / "mnist", n_train=40, n_test=20, size=12, seed=1)
    fashion = write_idx_dir(tmp_path / "fashion", n_train=40, n_test=20, size=12, gz=False, seed=2)
    out = tmp_path / "vision"
    code, stdout, stderr = run_main(capsys, "--benchmark", "mnist-fashion,paper-vision",
                                    "--mnist-dir", str(mnist), "--fashion-dir", str(fashion),
                                    "--seeds", "1", "--out", str(out))
    assert code == 0, stderr
    from classp_fused.cl.methods import METHODS
    paper_methods = ["classp-legacy", "classp", "ewc", "sgd"]
    results = check_results(out, {"mnist-fashion": (2, list(METHODS)),
                                  "paper-vision": (2, paper_methods)}, 1)
    paper = results["benchmarks"]["paper-vision"]
    assert paper["tasks"] == ["mnist", "fashion-mnist"]
    legacy = paper["methods"]["classp-legacy"]
    assert legacy["hparams"]["per_task"] == [{"apply_scaling": False, "threshold": 0.5},
                                             {"apply_scaling": True, "threshold": 0.0}]
    # the per-tensor gate ignores threshold 0.5: every element is updated
    assert legacy["update_density"]["mean"] == [1.0, 1.0]
    assert paper["methods"]["ewc"]["hparams"]["lam"] == 10000.0
    cell = json.loads((out / "cells/paper-vision/sgd/seed0.json").read_text())
    assert cell["settings"]["epochs"] == [4, 1] and cell["settings"]["batch_size"] == 32


def test_listings(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "classp+mas" in listing and "threshold=" in listing
    assert main(["benchmarks"]) == 0
    assert "paper-vision" in capsys.readouterr().out


def malformed_idx_dir(tmp_path: Path) -> Path:
    directory = write_idx_dir(tmp_path / "malformed")
    good = gzip.decompress((directory / "train-images-idx3-ubyte.gz").read_bytes())
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good[:-5]))
    return directory


BAD_INPUTS = {
    "unknown method": (["--methods", "sgd,nope"], "unknown method 'nope'"),
    "unknown benchmark": (["--benchmark", "split-digits,cifar"], "unknown benchmark 'cifar'"),
    "missing mnist option": (["--benchmark", "mnist-fashion"], "needs --mnist-dir"),
    "missing dataset dir": (["--benchmark", "mnist-fashion", "--mnist-dir", "{tmp}/none"],
                            "dataset directory does not exist"),
    "malformed idx": (["--benchmark", "paper-vision", "--mnist-dir", "{malformed}",
                       "--fashion-dir", "{malformed}"], "train-images-idx3-ubyte.gz: IDX payload"),
    "unwritable out": (["--out", "{file}/sub"], "is not a directory"),
    "out is a file": (["--out", "{file}"], "is not a directory"),
    "unknown hparam": (["--hparam", "classp.momentum=0.9"], "has no hyperparameter 'momentum'"),
    "bad hparam value": (["--hparam", "classp.threshold=-1"], "classp: threshold must be"),
    "bad hparam syntax": (["--hparam", "classp"], "METHOD.KEY=VALUE"),
    "zero seeds": (["--seeds", "0"], "positive integer"),
    "huge seed count": (["--seeds", "99999999999999999999"], "at most 10000 seeds"),
    "seed beyond 32 bits": (["--seeds", "4294967296,"], "seeds in [0, 4294967296)"),
    "negative seed": (["--seeds", "3,-1"], "seeds in [0, 4294967296)"),
    "meta device": (["--device", "meta"], "device meta: expected cpu or cuda"),
    "unknown device": (["--device", "gpu"], "device: "),
    "out cannot be created": (["--out", "/proc/classp-fused-test/out"],
                              "out /proc/classp-fused-test/out: "),
    "bad epochs": (["--epochs", "two"], "positive integer"),
    "unknown flag": (["--fast"], "unrecognized arguments"),
    "config not json": (["--config", "{file}"], "cannot read config"),
    "config unknown key": (["--config", "{config}"], "unknown option 'speed'"),
    "sgd lr not a number": (["--hparam", "sgd.lr=NaN"], "sgd: lr must be a finite number"),
    "per_task value": (["--hparam", 'classp.per_task=[{{"threshold": -1}}]'],
                       "per_task[0].threshold must be a finite number >= 0, got -1"),
    "resume and overwrite": (["--resume", "--overwrite"], "give one"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    argv, message = BAD_INPUTS[case]
    a_file = tmp_path / "a-file"
    a_file.write_text("not json")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"speed": 2}))
    fill = {"tmp": str(tmp_path), "file": str(a_file), "config": str(config),
            "malformed": str(malformed_idx_dir(tmp_path)) if case == "malformed idx" else ""}
    argv = [arg.format(**fill) for arg in argv]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    entries_before = sorted(os.listdir(tmp_path))
    code, stdout, stderr = run_main(capsys, *argv)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("classp-fused: error: ")
    assert message in lines[0]
    assert sorted(os.listdir(tmp_path)) == entries_before
    assert a_file.read_text() == "not json"


def test_bad_input_through_the_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "classp_fused", "run", "--methods", "nope",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("classp-fused: error: unknown method 'nope'")
    assert not (tmp_path / "out").exists()


def test_tune_command_writes_a_config_that_run_takes(tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--benchmark", "split-digits", "--methods", "sgd", "--seeds", "1000,",
                 "--epochs", "1", "--max-per-task", "40", "--validation", "0.25",
                 "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned["tuning"]["validation"] == 0.25 and len(tuned["tuning"]["trials"]["sgd"]) == 12
    assert stdout.startswith(f"sgd          lr={tuned['hparams']['sgd']['lr']}")
    assert f"run --config {out / 'tuned.json'}" in stdout
    assert "12/12" in stderr
    assert main(["tune", "--benchmark", "split-digits,permuted-digits", "--out", str(out)]) == 2
    assert "tune: expected one benchmark, got 2" in capsys.readouterr().err
    assert main(["tune", "--benchmark", "split-digits", "--validation", "1.5"]) == 2
    assert "expected a fraction in (0, 1)" in capsys.readouterr().err


SMALL_RUN = ["run", *TINY, "--benchmark", "split-digits", "--methods", "sgd,classp"]
CLASSP_CELL = "cells/split-digits/classp/seed0.json"
SGD_CELL = "cells/split-digits/sgd/seed0.json"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished SMALL_RUN (two cells); tests change a copy of it (copy_of)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([*SMALL_RUN, "--out", str(out)]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


@pytest.mark.parametrize("damage, reason", [
    (lambda cell: cell["acc_matrix"][4].__setitem__(0, 7.0),
     "acc_matrix[4][0] is 7.0, expected an accuracy in [0, 1]"),
    (lambda cell: cell.pop("state_bytes"), "missing state_bytes"),
    (lambda cell: cell.update(diverged={"task": 2, "epoch": 0, "step": 3, "what": "loss"}),
     "expected 2 rows of 5 accuracies"),
], ids=["accuracy 7", "missing field", "rows past a divergence"])
def test_resume_runs_a_cell_again_when_its_file_fails_its_checks(finished_run, tmp_path, capsys,
                                                                damage, reason):
    out = copy_of(finished_run, tmp_path)
    cell = json.loads((out / CLASSP_CELL).read_text())
    damage(cell)
    (out / CLASSP_CELL).write_text(json.dumps(cell))
    before = snapshot(out)
    code, stdout, stderr = run_main(capsys, *SMALL_RUN[1:], "--resume", "--out", str(out))
    assert code == 0, stderr
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"classp-fused: warning: {out / CLASSP_CELL}: not reused (")
    assert reason in warnings[0] and warnings[0].endswith("running the cell again")
    assert "1 cells run, 1 kept" in stdout
    after = snapshot(out)
    assert set(after) == set(before) and after[SGD_CELL] == before[SGD_CELL]
    assert after[CLASSP_CELL] != before[CLASSP_CELL]
    rerun = json.loads(after[CLASSP_CELL])
    assert rerun["diverged"] is None and len(rerun["acc_matrix"]) == 5
    matrix = np.array(json.loads(after["results.json"])["benchmarks"]["split-digits"]["methods"]
                      ["classp"]["acc_matrix"]["per_seed"])
    assert matrix.shape == (1, 5, 5) and np.all((matrix >= 0) & (matrix <= 1))


def test_something_in_the_way_of_a_result_file_is_refused_before_anything_is_written(
        finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    (out / CLASSP_CELL).unlink()
    (out / CLASSP_CELL).mkdir()
    for flag in ("--resume", "--overwrite"):
        assert_refused(capsys, tmp_path, [*SMALL_RUN, flag, "--out", str(out)],
                       f"{out / CLASSP_CELL} is a directory, in the way of a result file")
    shutil.rmtree(out / "cells/split-digits")
    (out / "cells/split-digits").write_text("not a folder")
    assert_refused(capsys, tmp_path, [*SMALL_RUN, "--resume", "--out", str(out)],
                   f"{out / 'cells/split-digits'} is in the way of the results")


#: Out-of-range values of every hyperparameter any method has (JSON, as --hparam reads them).
BAD_VALUES = {"lr": ["NaN", "-Infinity", "-0.1", '"fast"', "true", "1e999"],
              "threshold": ["NaN", "-1"], "relative_threshold": ["-0.5", "Infinity"],
              "eps": ["Infinity", "-1e-9"], "power": ["0", "NaN"],
              "apply_scaling": ["1", '"yes"'], "lam": ["NaN", "-1"], "gamma": ["0", "1.5"],
              "fisher": ['"exactly"'], "per_sample": ["0"], "accumulate": ['"mean"'],
              "penalty": ['"implicit"'], "state_dtype": ['"fp16"', "8"],
              "importance_dtype": ['"fp32"', "null"]}


def test_every_hyperparameter_of_every_method_is_checked_before_the_run(tmp_path, capsys):
    out = str(tmp_path / "out")
    for method, spec in METHODS.items():
        for key in spec.defaults:
            for value in BAD_VALUES[key]:
                assert_refused(capsys, tmp_path,
                               ["run", "--benchmark", "split-digits", "--methods", method,
                                "--hparam", f"{method}.{key}={value}", "--out", out],
                               f"{method}: {key} must be")
    # a method the run leaves out is checked as well
    assert_refused(capsys, tmp_path, ["run", "--methods", "sgd", "--hparam", "adam.lr=NaN",
                                      "--out", out], "hparams adam: lr must be a finite number")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("hparam, message", [
    ('classp.per_task=[{"threshold": -1}]', "per_task[0].threshold must be a finite number"),
    ('classp-legacy.per_task=[{"apply_scaling": false}, {"lr": NaN}]', "per_task[1].lr must be"),
    ('classp.per_task=[{"apply_scaling": 1}]', "per_task[0].apply_scaling must be one of"),
    ('sgd.per_task=[{"momentum": 0.9}]', "per_task[0] sets 'momentum', which is not one of"),
    ('ewc.per_task=[{"lam": 1.0}]', "['lam'] are not param-group settings of SGD"),
    ('mas.per_task={"lr": 0.1}', "per_task must be a list of settings objects"),
])
def test_per_task_settings_are_checked_before_the_run(tmp_path, capsys, hparam, message):
    method = hparam.split(".")[0]
    assert_refused(capsys, tmp_path, ["run", *TINY, "--benchmark", "split-digits", "--methods",
                                      method, "--hparam", hparam, "--out", str(tmp_path / "out")],
                   message)


@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_refused_in_one_line(tmp_path, capsys, depth):
    deep = "[" * depth + "]" * depth
    config = tmp_path / "deep.json"
    config.write_text('{"hparams": {"sgd": {"lr": ' + deep + "}}}")
    out = str(tmp_path / "out")
    assert_refused(capsys, tmp_path, ["run", "--config", str(config), "--out", out],
                   f"config {config}: JSON nested deeper than 32 levels")
    assert_refused(capsys, tmp_path, ["run", "--hparam", "sgd.lr=" + deep, "--out", out],
                   "--hparam sgd.lr: JSON nested deeper than 32 levels")


def test_a_folder_with_results_needs_resume_or_overwrite(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    argv = [*SMALL_RUN, "--out", str(out)]
    line = assert_refused(capsys, tmp_path, argv, f"out {out} holds results of an earlier run")
    assert "--resume" in line and "--overwrite" in line
    assert_refused(capsys, tmp_path, [*argv, "--resume", "--overwrite"], "give one")
    # an interrupted run leaves only cells: they are results too
    for name in ("results.json", "results.csv", "results.md"):
        (out / name).unlink()
    shutil.rmtree(out / "plots")
    assert_refused(capsys, tmp_path, argv, "holds results of an earlier run (cells)")

    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    code, stdout, stderr = run_main(capsys, *argv[1:], "--overwrite")
    assert code == 0, stderr
    assert "2 cells run, 0 kept" in stdout
    after = snapshot(out)
    assert set(after) - set(before) == {"results.json", "results.csv", "results.md", "plots",
                                        "plots/split-digits-acc-matrix.png",
                                        "plots/split-digits-task-accuracy.png"}
    assert set(before) <= set(after) and after["notes.txt"] == b"mine"
    assert after[SGD_CELL] != before[SGD_CELL] and LOCK_NAME not in after
