import pytest
import torch

from segtrain.devices import resolve_device
from segtrain.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def test_empty_list_is_the_cpu():
    assert resolve_device([]) == torch.device("cpu")


def test_null_picks_cuda_0_or_the_cpu():
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == expected


@no_cuda
def test_cuda_index_without_cuda_names_problem_and_fix():
    with pytest.raises(ConfigError) as error:
        resolve_device([0])
    assert "CUDA is not available" in str(error.value) and "device_list=[]" in str(error.value)


def test_bad_entries():
    with pytest.raises(ConfigError, match="CUDA device indices"):
        resolve_device(["cuda:0"])


@no_cuda
def test_train_py_with_cuda_device_stops_before_any_work(tmp_path):
    from conftest import TINY, run_train_py

    process = run_train_py([f"hydra.run.dir={tmp_path}", *TINY, "device_list=[0]"])
    assert process.returncode == 1
    assert "Traceback" not in process.stdout + process.stderr, "a user error prints its message, not a traceback"
    assert "device_list=[0]: CUDA is not available" in (process.stdout + process.stderr)
    assert "use device_list=[]" in (process.stdout + process.stderr) or "with device_list=[]" in (process.stdout + process.stderr)
    assert not list(tmp_path.glob("events.out.tfevents.*"))
