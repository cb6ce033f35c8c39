"""What the command line tells a user: segtrain's --help, and a typo in a key as one line with the
closest known key, before any work."""
from __future__ import annotations

import pytest

import segtrain.run
from conftest import TINY, compose_config, run_train_py
from segtrain.errors import ConfigError
from segtrain.overrides import unknown_key_message


def test_help_shows_modes_examples_groups_and_outputs():
    process = run_train_py(["--help"])
    assert process.returncode == 0, process.stderr
    text = process.stdout
    assert text.startswith("segtrain: train semantic-segmentation networks")
    for mode in ("train", "eval", "predict", "export", "audit"):
        assert f"\n  {mode} " in text, mode
    assert text.count("python train.py") >= 6  # usage and five examples
    assert "loss: bce, ce, ce_dice, dice, focal" in text and "model: deeplabv3_mobilenet_v3_large" in text
    assert "outputs/<date>/<time>/" in text


def test_a_typo_in_a_key_is_one_line_with_the_closest_key(tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epoch=3"])
    assert process.returncode == 1
    assert len(process.stderr.strip().splitlines()) == 1
    assert process.stderr.startswith("segtrain: trainer.max_epoch: unknown key; did you mean trainer.max_epochs?")
    assert "Traceback" not in process.stdout + process.stderr and not (tmp_path / "run").exists(), "before any work"


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["model=unet3d", "model.widht=4"], "model.widht: unknown key; did you mean model.width?"),
        (["dataset.bach_size=4"], "dataset.bach_size: unknown key; did you mean dataset.batch_size?"),
        (["loss=focal", "loss.gama=1"], "loss.gama: unknown key; did you mean loss.gamma?"),
        (["+trainer.max_epoch=3"], "trainer.max_epoch: unknown key; did you mean trainer.max_epochs?"),
        (["-m", "loss=focal,ce", "loss.gama=1"], "loss.gama: unknown key; did you mean loss.gamma?"),
    ],
)
def test_unknown_keys_under_the_groups(arguments, expected):
    assert unknown_key_message(arguments).startswith(expected)


def test_known_keys_and_additions_pass():
    assert unknown_key_message(["trainer.max_epochs=3", "model=unet3d", "model.width=4", "loss=focal", "loss.gamma=1"]) is None
    assert unknown_key_message(["+model.my_param=1", "optimizer.lr=0.1", "seed=3"]) is None  # a class's own parameter; other groups
    assert unknown_key_message([]) is None
    # dataset=folder's root is ??? (required): a key all the same
    assert unknown_key_message(["dataset=folder", "dataset.root=data", "dataset.train_images=images"]) is None


def test_an_unknown_trainer_key_in_a_composed_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_epoch: unknown key; did you mean trainer.max_epochs\?"):
        segtrain.run.train(compose_config([*TINY, "+trainer.max_epoch=3"]), tmp_path)


def bar_output(tmp_path, *arguments: str, multirun: bool = False) -> str:
    """train.py with the progress bar on, stdout and stderr in one stream as a terminal shows them."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    process = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *(["-m"] if multirun else []), *[arg for arg in TINY if arg != "trainer.progress_bar=false"],
         "trainer.progress_bar=true", "trainer.log_every=2", "trainer.log_images=0", *arguments],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stdout[-3000:]
    return process.stdout


def test_the_progress_bar_tells_one_truth(tmp_path):
    output = bar_output(tmp_path, f"hydra.run.dir={tmp_path / 'run'}")
    segments = [segment for line in output.split("\n") for segment in line.split("\r") if segment.strip()]
    bars = [segment for segment in segments if "%|" in segment]
    assert any(bar.startswith("epoch 1:") for bar in bars) and any(bar.startswith("val 1:") for bar in bars)
    assert not any("it/s" in bar or "s/it" in bar for bar in bars), "one speed: images/s in the postfix"
    assert any("img/s=" in bar for bar in bars)
    # The postfix carries into the next epoch: its bar shows the last logged values from the start.
    assert all("img/s=" in bar for bar in bars if bar.startswith("epoch 2:   0%"))
    # Log lines start on a line of their own, never after a bar's text.
    logs = [segment for segment in segments if "][segtrain" in segment]
    assert logs and all(segment.startswith("[20") for segment in logs), [s for s in logs if not s.startswith("[20")][:3]


def test_a_sweeps_bars_name_their_job(tmp_path):
    output = bar_output(tmp_path, f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.max_epochs=1", multirun=True)
    assert "job 0 epoch 1:" in output and "job 0 val 1:" in output


def test_the_last_line_says_where_to_look(tmp_path):
    process = run_train_py([f"hydra.run.dir={tmp_path}", *TINY, "trainer.max_epochs=1", "trainer.log_images=0"])
    assert process.returncode == 0, process.stderr[-3000:]
    last = (process.stdout + process.stderr).strip().splitlines()[-1]
    assert last.endswith(f"run dir: {tmp_path}; best checkpoint: {tmp_path / 'best.pt'}; curves: tensorboard --logdir {tmp_path}")


def test_a_cpu_slowed_by_too_many_threads_says_so_once(monkeypatch, caplog):
    import types

    import segtrain.trainer
    import torch

    trainer = types.SimpleNamespace(device=torch.device("cpu"), first_speed=0.0, warned_contention=False)
    monkeypatch.setattr(segtrain.trainer.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(segtrain.trainer.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    with caplog.at_level("WARNING", logger="segtrain.trainer"):
        segtrain.trainer.Trainer.warn_if_cpu_contended(trainer, 100.0)  # the first logged speed
        segtrain.trainer.Trainer.warn_if_cpu_contended(trainer, 30.0)  # slow, but the cores are not oversubscribed
        assert caplog.text == ""
        monkeypatch.setattr(segtrain.trainer.os, "getloadavg", lambda: (5.0, 4.0, 3.0))
        segtrain.trainer.Trainer.warn_if_cpu_contended(trainer, 30.0)
        segtrain.trainer.Trainer.warn_if_cpu_contended(trainer, 20.0)
    assert caplog.text.count("training slowed to 30.0 images/s from 100.0 with load average 5.0 on 2 cores") == 1
    assert "OMP_NUM_THREADS" in caplog.text


def test_an_unknown_group_option_with_a_dotted_key_is_hydras_one_message(tmp_path):
    """The unknown-key pre-check leaves a missing option (model=unett) to Hydra's message, no traceback."""
    from conftest import run_train_py

    process = run_train_py([f"hydra.run.dir={tmp_path}", "model=unett", "model.width=4"])
    output = process.stdout + process.stderr
    assert process.returncode == 1 and "Traceback" not in output
    assert "Could not find 'model/unett'" in output


def test_a_value_left_at_question_marks_is_named(tmp_path):
    """The folder template run unfilled: one line naming the keys without a value, not int('???')."""
    from conftest import run_train_py

    process = run_train_py([f"hydra.run.dir={tmp_path}", "experiment=folder_template"])
    output = process.stdout + process.stderr
    assert process.returncode == 1 and "Traceback" not in output
    assert "dataset.num_classes, dataset.root: no value (??? in the config)" in output
