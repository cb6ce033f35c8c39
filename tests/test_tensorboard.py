"""TensorBoard answers questions: read back the event files, pictures, HParams and the live server."""
from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from conftest import REPO, TINY, TINY_3D, compose_config, run_train_py
from segtrain import visualize
from segtrain.build import build_datasets
from segtrain.checkpoint import load_checkpoint
from segtrain.run_log import HPARAM_METRICS

CLASS_NAMES = ["background", "ellipse", "rectangle", "triangle"]
TRAIN_TAGS = {"train/loss", "train/loss/ce", "train/loss/dice", "train/lr", "train/grad_norm", "train/images_per_second"}
VAL_TAGS = {"val/loss", "val/mIoU", "val/acc", "val/dice", *(f"val/IoU/{name}" for name in CLASS_NAMES)}


def accumulate(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def decode(image_event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """``python train.py`` with a two-term loss: 2 epochs of 6 steps, every step logged, 4 pictured samples."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    process = run_train_py([f"hydra.run.dir={run_dir}", *TINY, "loss=ce_dice"])
    assert process.returncode == 0, process.stderr[-3000:]
    return run_dir


def test_every_tag_at_the_global_step(tiny_run):
    accumulator = accumulate(tiny_run)
    tags = accumulator.Tags()
    assert TRAIN_TAGS | VAL_TAGS | set(HPARAM_METRICS) <= set(tags["scalars"]), tags["scalars"]
    assert "system/gpu_memory_gb" not in tags["scalars"], "GPU memory is logged on CUDA only"
    assert {"val/predictions", "val/confusion_matrix"} <= set(tags["images"])
    assert "config/text_summary" in tags["tensors"]

    for tag in TRAIN_TAGS:
        assert steps(accumulator, tag) == list(range(1, 13)), tag  # trainer.log_every=1
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    val_steps = [entry["step"] for entry in metrics["history"]]
    assert val_steps == [6, 12]
    for tag in VAL_TAGS:
        assert steps(accumulator, tag) == val_steps, tag  # the same x-axis as the training curves
    for tag in ("val/predictions", "val/confusion_matrix"):
        assert [event.step for event in accumulator.Images(tag)] == val_steps, tag
    assert accumulator.Scalars("val/mIoU")[-1].value == pytest.approx(metrics["final"]["mIoU"], rel=1e-6)
    assert accumulator.Scalars("val/best_mIoU")[-1].value == pytest.approx(metrics["best_miou"], rel=1e-6)
    assert 0 < metrics["log_seconds"] < metrics["wall_seconds"]
    # Sorted by name, as the Scalars tab shows them: the curves' groups only, no single values ahead of them.
    assert {tag.split("/")[0] for tag in accumulator.Tags()["scalars"]} <= {"system", "train", "val"}


def test_prediction_panel_shows_the_fixed_samples_in_the_palette(tiny_run):
    accumulator = accumulate(tiny_run)
    val_set = build_datasets(dict(compose_config(TINY).dataset))[1]
    indices, images, masks = visualize.fixed_samples(val_set, 4)
    palette = visualize.default_palette(4)
    labels = [f"#{row}" for row in range(4)]
    tile = (128, 128)  # 32-pixel samples enlarged 4x to trainer.log_image_size=128
    _, _, bottom, right = visualize.tile_box(3, 3, tile, labels)
    first, last = accumulator.Images("val/predictions")
    for event in (first, last):
        picture = decode(event)
        assert picture.shape[1] == event.width == right + visualize.GAP
        assert picture.shape[0] == event.height > bottom  # the legend sits below the grid
    picture = decode(last)
    for row, mask in enumerate(mask.numpy() for mask in masks):
        top, left, bottom, right = visualize.tile_box(row, 1, tile, labels)
        truth = picture[top:bottom, left:right]
        expected = mask.repeat(4, 0).repeat(4, 1)
        for label, colour in enumerate(palette):
            # The ground truth tile shows each class in its palette colour, pixel for pixel.
            assert (truth[expected == label] == colour).all(), (row, label)
        top, left, bottom, right = visualize.tile_box(row, 2, tile, labels)
        predicted_colours = {tuple(c) for c in picture[top:bottom, left:right].reshape(-1, 3)}
        assert predicted_colours <= {tuple(c) for c in palette}
    assert set(np.unique(torch.stack(masks).numpy())) == {0, 1, 2, 3}, "the fixed samples show every class"
    assert (decode(first)[:bottom] == picture[:bottom])[:, : visualize.tile_box(0, 2, tile, labels)[1]].all(), (
        "input and ground truth columns are the same samples at every validation"
    )


def test_samples_of_other_sizes_sit_at_the_top_left_of_white_cells():
    """Whole validation images differ in size: each tile fills the top left of its cell, pixel for pixel;
    the overlay is half image, half class colour, and the image itself where the class colour is black."""
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, size) for size in ((40, 56), (30, 50))]
    images = [rng.random((1, *mask.shape), dtype=np.float32) for mask in masks]
    palette = visualize.default_palette(3)
    predictions = [(mask + 1) % 3 for mask in masks]
    picture = visualize.prediction_panel(images, masks, predictions, ["a", "b", "c"], palette, tile_size=128)
    labels = ["#0", "#1"]
    enlarge = lambda array: array.repeat(2, 0).repeat(2, 1)  # the longer sides, 56 and 50, fit 128 twice
    for row, (image, mask, predicted) in enumerate(zip(images, masks, predictions)):
        rgb = enlarge(visualize.to_rgb(image)).astype(np.int64)
        predicted = enlarge(predicted)
        overlay = np.where(predicted[..., None] == 0, rgb, (rgb + palette[predicted] + 1) // 2)  # rounded half up
        expected = [rgb, palette[enlarge(mask)], palette[predicted], overlay]
        for column, tile in enumerate(expected):
            top, left, bottom, right = visualize.tile_box(row, column, (128, 128), labels)
            cell = picture[top:bottom, left:right]
            height, width = tile.shape[:2]
            assert (cell[:height, :width] == tile).all(), (row, column)
            assert (cell[height:] == 255).all() and (cell[:, width:] == 255).all(), (row, column)


def test_3d_panels_show_the_middle_slice_of_each_axis(tmp_path):
    import segtrain.run

    segtrain.run.train(compose_config([*TINY_3D, "trainer.log_images=2", "trainer.log_image_size=48"]), tmp_path)
    (event,) = accumulate(tmp_path).Images("val/predictions")
    labels = [f"#{sample} axis {axis}" for sample in range(2) for axis in range(3)]
    _, _, bottom, right = visualize.tile_box(5, 3, (48, 48), labels)  # 16-pixel volumes enlarged 3x
    assert event.width == right + visualize.GAP and event.height > bottom


def test_confusion_heatmap_darkens_with_the_row_fraction():
    dark = np.array([8, 48, 107])
    perfect = visualize.confusion_heatmap(np.eye(4) * 100, CLASS_NAMES)
    all_background = visualize.confusion_heatmap(np.tile([[50, 0, 0, 0]], (4, 1)), CLASS_NAMES)
    assert perfect.shape == all_background.shape and perfect.shape[0] > 4 * 48
    dark_pixels = [int((image == dark).all(-1).sum()) for image in (perfect, all_background)]
    cell_area = 48 * 48
    # Four full cells on the diagonal vs. the first column, each cell less its "1.00" label.
    assert dark_pixels[0] == dark_pixels[1] and 4 * cell_area * 0.8 < dark_pixels[0] <= 4 * cell_area
    assert (perfect != all_background).any()
    assert visualize.normalise_rows(np.array([[3, 1], [0, 0]])).tolist() == [[0.75, 0.25], [0.0, 0.0]]


def test_palette_maps_each_class_to_its_colour_and_ignored_pixels_to_white():
    palette = visualize.default_palette(30)
    assert len({tuple(colour) for colour in palette}) == 30, "every class has its own colour"
    mask = np.array([[0, 1, 2], [29, 255, -1]])
    colours = visualize.colourize(mask, palette)
    assert colours[0, 0].tolist() == [0, 0, 0] and colours[0, 1].tolist() == palette[1].tolist()
    assert colours[0, 2].tolist() == palette[2].tolist() and colours[1, 0].tolist() == palette[29].tolist()
    assert colours[1, 1].tolist() == colours[1, 2].tolist() == list(visualize.IGNORED_COLOUR)
    with pytest.raises(Exception, match="dataset.palette"):
        visualize.resolve_palette([[0, 0, 0]], None, 4)


def hparams_content(run_dir: Path) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    contents = accumulate(run_dir).PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content) for tag, content in contents.items()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """``python train.py -m ... optimizer.lr=0.01,0.001``: two jobs, one epoch each."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    overrides = [*TINY, "trainer.max_epochs=1", "trainer.log_images=1", "optimizer.lr=0.01,0.001"]
    process = run_train_py(["-m", f"hydra.sweep.dir={sweep_dir}", *overrides])
    assert process.returncode == 0, process.stderr[-3000:]
    return sweep_dir


def test_hparams_of_a_sweep_compare_the_jobs(sweep):
    overrides = [*TINY, "trainer.max_epochs=1", "trainer.log_images=1", "optimizer.lr=0.01"]
    expected_first = list(dict.fromkeys(override.partition("=")[0] for override in overrides))
    for job, lr in (("0", 0.01), ("1", 0.001)):
        run_dir = sweep / job
        # The session lives in the run's own event file: TensorBoard shows one run per job, no subfolders.
        assert [path.parent for path in run_dir.rglob("events.out.tfevents.*")] == [run_dir]
        content = hparams_content(run_dir)
        # No experiment summary: TensorBoard builds it from all jobs' sessions and lists the differing hparams first.
        assert "_hparams_/experiment" not in content
        start = content["_hparams_/session_start_info"].session_start_info
        # The job's overrides and the key values that tell runs apart (the others of them are overrides here),
        # nothing else: not the 60 keys of the whole config.
        assert set(start.hparams) == {*expected_first, "model.name", "dataset.name", "loss.name"}
        assert start.hparams["optimizer.lr"].string_value == str(lr)  # as given, not 0.0100
        assert start.hparams["dataset.batch_size"].string_value == "8"  # not 8.000
        assert start.hparams["loss.name"].string_value == "ce"
        assert start.hparams["trainer.progress_bar"].string_value == "false"
        assert content["_hparams_/session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
        metrics = json.loads((run_dir / "metrics.json").read_text())
        accumulator = accumulate(run_dir)
        assert accumulator.Scalars("val/best_mIoU")[-1].value == pytest.approx(metrics["best_miou"], rel=1e-6)
        assert accumulator.Scalars("val/final_loss")[-1].value == pytest.approx(metrics["final"]["loss"], rel=1e-6)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, data: bytes | None = None):
    headers = {"Content-Type": "application/json", "X-XSRF-Protected": "1"} if data else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_server_serves_the_sweep(sweep):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port),
         "--load_fast=false", "--reload_interval=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        tags: dict = {}
        for _ in range(60):  # TensorBoard starts, then loads the event files in the background
            try:
                tags = get_json(f"{base}/scalars/tags")
                if "val/mIoU" in tags.get("1", {}):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert {"0", "1"} <= set(tags), tags
        assert TRAIN_TAGS - {"train/loss/ce", "train/loss/dice"} | VAL_TAGS <= set(tags["0"])
        scalars = get_json(f"{base}/scalars/scalars?run=0&tag=val%2FmIoU")
        assert [point[1] for point in scalars] == [6]  # [wall_time, step, value]

        image_tags = get_json(f"{base}/images/tags")
        assert "val/predictions" in image_tags["0"]
        query = urllib.parse.urlencode({"run": "0", "tag": "val/predictions", "sample": 0})
        (entry,) = get_json(f"{base}/images/images?{query}")
        with urllib.request.urlopen(f"{base}/images/individualImage?{entry['query']}", timeout=10) as response:
            picture = Image.open(io.BytesIO(response.read()))
        (logged,) = accumulate(sweep / "0").Images("val/predictions")
        assert entry["step"] == 6 and picture.size == (logged.width, logged.height)

        # The HParams tab: the hyperparameter that differs between the jobs is listed (and ticked) first.
        experiment = get_json(f"{base}/hparams/experiment", json.dumps({"experimentName": ""}).encode())
        assert experiment["hparamInfos"][0]["name"] == "optimizer.lr" and experiment["hparamInfos"][0]["differs"]
        assert set(HPARAM_METRICS) <= {info["name"]["tag"] for info in experiment["metricInfos"]}
        # The table: one session per job, with the metrics as columns.
        request = json.dumps({"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [],
                              "startIndex": 0, "sliceSize": 10}).encode()
        groups = get_json(f"{base}/hparams/session_groups", request)
        table = {group["hparams"]["optimizer.lr"]: group["metricValues"] for group in groups["sessionGroups"]}
        assert sorted(table) == ["0.001", "0.01"]
        for (lr, values), job in zip(sorted(table.items(), reverse=True), ("0", "1")):
            best = json.loads((sweep / job / "metrics.json").read_text())["best_miou"]
            by_tag = {value["name"]["tag"]: value["value"] for value in values}
            assert by_tag["val/best_mIoU"] == pytest.approx(best, rel=1e-6), lr
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.mark.slow
def test_sigterm_leaves_the_scalars_in_the_event_file(tmp_path):
    """A run stopped by SIGTERM (a scheduler's pre-emption) keeps what it logged: flushed at validation and on the way out."""
    args = [sys.executable, str(REPO / "train.py"), f"hydra.run.dir={tmp_path}", *TINY, "trainer.max_epochs=200"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if list(tmp_path.glob("events.out.tfevents.*")) and "val/mIoU" in accumulate(tmp_path).Tags()["scalars"]:
                break
            time.sleep(0.5)
        assert process.poll() is None, process.stderr.read()[-3000:]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    accumulator = accumulate(tmp_path)
    assert steps(accumulator, "val/mIoU")[0] == 6
    assert [event.step for event in accumulator.Images("val/predictions")][0] == 6
    logged = steps(accumulator, "train/loss")
    assert logged == list(range(1, len(logged) + 1)) and logged[-1] >= 6
    assert process.returncode == 128 + signal.SIGTERM, process.stderr.read()[-3000:]
    # Stopped at a step boundary and closed the writer: every step up to last.pt's is in the event file.
    assert load_checkpoint(tmp_path / "last.pt")["state"]["step"] == logged[-1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless browser here (apt-get install chromium)")
def test_a_browser_screenshot_of_the_real_tensorboard(sweep, tmp_path):
    """docs/tensorboard_screenshot.py: TensorBoard served on the sweep, photographed by headless Chromium."""
    sys.path.insert(0, str(REPO / "docs"))
    import tensorboard_screenshot

    written = tensorboard_screenshot.main([str(sweep), "--out", str(tmp_path)])
    assert [path.name for path in written] == ["tensorboard_scalars_tab.png", "tensorboard_hparams_tab.png"]
    for path in written:
        picture = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert picture.shape == (1000, 1400) and picture.std() > 20, f"{path.name} looks blank"


def test_pictures_reuse_the_validation_pass(tmp_path):
    """The pictured samples' predictions come from validation itself: one forward pass per
    validation image, and the same classes as predicting the sample alone."""
    from conftest import TINY, compose_config
    from segtrain.build import build
    from segtrain.run import SilentRunLog, make_trainer
    from segtrain.task import classes_from_logits

    cfg = compose_config([*TINY, "dataset.val_samples=6", "+dataset.val_batch_size=4", "trainer.log_images=3"])
    components, run_cfg = build(cfg)
    pictured = {}

    class Pictures(SilentRunLog):
        def predictions(self, step, images, masks, predicted):
            pictured.update(images=images, predicted=predicted)

    trainer = make_trainer(cfg, components, run_cfg, tmp_path, Pictures())
    forwards = []
    components.model.register_forward_hook(lambda module, args, output: forwards.append(args[0].shape[0]))
    trainer.validate(1)
    assert sum(forwards) == 6, f"one forward pass per validation image, none for the pictures: {forwards}"
    assert len(pictured["predicted"]) == 3
    with torch.no_grad():
        for image, predicted in zip(pictured["images"], pictured["predicted"]):
            alone = classes_from_logits(components.model(image[None]))[0]
            assert torch.equal(alone, predicted)
