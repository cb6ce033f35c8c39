import pytest
from torch import nn

import segtrain
from segtrain.registry import LOSSES, MODELS, Registry
from segtrain.errors import UnknownNameError


def test_duplicate_name_raises():
    registry = Registry("thing")
    registry.register("a")(int)
    with pytest.raises(KeyError, match="already registered"):
        registry.register("a")(float)


def test_unknown_name_lists_known_names_and_suggests():
    with pytest.raises(UnknownNameError) as error:
        MODELS.get("unte")
    message = str(error.value)
    assert message.startswith("model=unte: unknown model; known: ")
    assert "unet" in message and "Did you mean model=unet?" in message


def test_builtins_are_registered_by_importing_the_package():
    assert "unet" in segtrain.MODELS
    assert {"shapes", "shapes3d"} <= set(segtrain.DATASETS.names())
    assert "ce" in segtrain.LOSSES


def test_user_registered_model_is_built_from_config(tmp_path):
    from segtrain.build import build_model

    @MODELS.register("tiny_test_model")
    class Tiny(nn.Module):
        def __init__(self, in_channels: int, out_channels: int, hidden: int = 2):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, 1)
            self.hidden = hidden

    try:
        model = build_model({"name": "tiny_test_model", "in_channels": 3, "hidden": 7}, out_channels=5)
        assert isinstance(model, Tiny) and model.hidden == 7 and model.conv.out_channels == 5
    finally:
        MODELS._entries.pop("tiny_test_model")


def test_target_points_at_any_importable_class():
    from segtrain.build import build_model

    model = build_model({"_target_": "segtrain.models.unet.UNet", "in_channels": 1, "width": 4, "depth": 1}, 3)
    assert model.head.out_channels == 3


def test_unknown_loss_fails_before_any_work(tmp_path):
    from conftest import TINY, run_train_py

    process = run_train_py([f"hydra.run.dir={tmp_path}", *TINY, "loss.name=focall"])
    assert process.returncode == 1
    assert "Traceback" not in process.stdout + process.stderr, "a user error prints its message, not a traceback"
    assert "loss=focall: unknown loss; known:" in (process.stdout + process.stderr)
    assert "Did you mean loss=focal?" in (process.stdout + process.stderr) or "focal" not in LOSSES
    assert not (tmp_path / "metrics.json").exists()


def test_imports_key_registers_a_users_loss_by_name(tmp_path):
    import json

    from conftest import TINY, run_train_py

    (tmp_path / "my_losses.py").write_text(
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "from segtrain.registry import LOSSES\n\n"
        "@LOSSES.register('my_ce')\n"
        "class MyCE(nn.Module):\n"
        "    sigmoid = False\n"
        "    def __init__(self, **ignored):\n"
        "        super().__init__()\n"
        "    def forward(self, logits, target):\n"
        "        return F.cross_entropy(logits, target)\n"
    )
    import os

    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env_path}" if env_path else str(tmp_path)
    try:
        process = run_train_py([f"hydra.run.dir={tmp_path / 'run'}", *TINY, "trainer.max_epochs=1", "imports=[my_losses]", "~loss", "+loss.name=my_ce"])
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["finished"]
    missing = run_train_py([f"hydra.run.dir={tmp_path / 'bad'}", *TINY, "imports=[no_such_module]"])
    assert missing.returncode == 1 and "imports: cannot import 'no_such_module'" in missing.stdout + missing.stderr


def test_a_key_the_model_does_not_take_is_named():
    """An old config's model.num_classes (the builder now gives out_channels) is one line naming the key."""
    from segtrain.build import build_model
    from segtrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.num_classes: not a parameter of model=unet .*the builder gives it out_channels"):
        build_model({"name": "unet", "in_channels": 1, "num_classes": 3}, 3)
