"""The fused CPU focal kernel (segtrain/native): same values and gradients as the PyTorch ops,
on any thread count and memory layout; NaN stays NaN; built once and cached; without a
working compiler the losses fall back to PyTorch ops with a warning."""
from __future__ import annotations

import logging

import pytest
import torch

from segtrain import native
from segtrain.losses import build_loss

IGNORE = 255

needs_kernel = pytest.mark.skipif(native.library() is None, reason="no C compiler here: the kernel cannot be built")


def focal_outputs(logits, target, monkeypatch, use_native, **params):
    monkeypatch.setenv(native.ENV_SWITCH, "1" if use_native else "0")
    assert native.usable(logits) == use_native
    x = logits.detach().clone().requires_grad_()
    loss = build_loss("focal", ignore_index=IGNORE, reduction="none", **params)(x, target)
    # A non-uniform upstream gradient, so that the per-pixel coefficient is exercised.
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss))
    return loss.detach(), x.grad


def random_case(shape, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(shape, generator=generator, dtype=dtype)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.1] = IGNORE
    return logits, target


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 2.5])
@pytest.mark.parametrize("alpha", [None, [0.1, 0.2, 0.3, 0.25, 0.15]])
@pytest.mark.parametrize("shape", [(3, 5, 17, 23), (2, 5, 3, 7, 11), (4, 5)])
def test_kernel_matches_pytorch_ops(monkeypatch, dtype, gamma, alpha, shape):
    logits, target = random_case(shape, dtype)
    ours, ours_grad = focal_outputs(logits, target, monkeypatch, True, gamma=gamma, alpha=alpha)
    ops, ops_grad = focal_outputs(logits, target, monkeypatch, False, gamma=gamma, alpha=alpha)
    # The kernel takes 1 - p_t as -expm1(log p_t); the ops, 1 - p_t, off by up to 6e-8 near p_t = 1.
    tolerance = {"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(ours, ops, **tolerance)
    torch.testing.assert_close(ours_grad, ops_grad, **tolerance)
    assert (ours[target == IGNORE] == 0).all() and (ours_grad.movedim(1, -1)[target == IGNORE] == 0).all()


@needs_kernel
def test_thread_count_and_memory_layout_do_not_change_the_result(monkeypatch):
    logits, target = random_case((2, 5, 64, 130))  # 83,200 logits: split over 2 threads
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = focal_outputs(logits, target, monkeypatch, True)
        torch.set_num_threads(2)
        assert native._threads(logits) == 2
        two = focal_outputs(logits, target, monkeypatch, True)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, atol=0, rtol=0)
    channels_last = focal_outputs(logits.contiguous(memory_format=torch.channels_last), target, monkeypatch, True)
    torch.testing.assert_close(one, channels_last, atol=0, rtol=0)
    wide = torch.cat([logits, logits], dim=3)[..., :130]  # a strided view
    torch.testing.assert_close(one, focal_outputs(wide, target, monkeypatch, True), atol=0, rtol=0)


@pytest.mark.parametrize("use_native", [True, False])
def test_nan_logits_give_a_nan_loss(monkeypatch, use_native):
    if use_native and native.library() is None:
        pytest.skip("no C compiler here")
    logits, target = random_case((1, 3, 2, 2))
    target.fill_(0)
    logits[0, 2, 0, 0] = float("nan")  # not the target class, not the max: only the sum sees it
    loss, _ = focal_outputs(logits, target, monkeypatch, use_native)
    assert torch.isnan(loss[0, 0, 0]) and torch.isfinite(loss.view(-1)[1:]).all()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library() rebuilt from scratch into an empty cache directory, and reset afterwards."""
    monkeypatch.setenv("SEGTRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    native.library.cache_clear()
    yield tmp_path / "kernels"
    native.library.cache_clear()


@needs_kernel
def test_built_once_then_loaded_from_the_cache(fresh_build):
    assert native.library() is not None
    built = list(fresh_build.glob("focal-*.so"))
    assert len(built) == 1 and list(fresh_build.glob("*")) == built  # no half-written files left
    mtime = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert list(fresh_build.glob("focal-*.so")) == built and built[0].stat().st_mtime_ns == mtime


@needs_kernel
def test_a_library_that_fails_its_self_test_is_not_used(fresh_build, monkeypatch, caplog, tmp_path):
    # A "compiler" that builds a library with the kernel's symbols doing nothing: it loads,
    # but its values are wrong, so the self-test in a child process must reject it.
    fake = tmp_path / "fakecc"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fakecc 1.0; exit 0; }\n'
        'out=; prev=; for a in "$@"; do [ "$prev" = -o ] && out="$a"; prev="$a"; done\n'
        'for f in forward_f32 backward_f32 forward_f64 backward_f64; do echo "void segtrain_focal_$f(void) {}"; done > "$out.c"\n'
        'exec cc -shared -fPIC -o "$out" "$out.c"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with caplog.at_level(logging.WARNING, logger="segtrain.native"):
        assert native.library() is None
    assert "failed its self-test" in caplog.text and "got [0.0, 0.0" in caplog.text
    assert not any(path.suffix == ".so" for path in fresh_build.parent.rglob("*"))


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_the_pytorch_ops_take_over(fresh_build, monkeypatch, caplog, compiler):
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="segtrain.native"):
        assert native.library() is None
    expected = "no C compiler" if compiler.startswith("/") else "could not build the CPU focal-loss kernel"
    assert expected in caplog.text and "PyTorch ops" in caplog.text
    logits, target = random_case((2, 4, 5, 6))
    assert not native.usable(logits)
    loss = build_loss("focal", ignore_index=IGNORE)(logits.requires_grad_(), target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert not any(path.suffix == ".so" for path in fresh_build.parent.rglob("*"))


@needs_kernel
def test_the_kernel_refuses_tensors_that_do_not_fit():
    logits, target = random_case((2, 3, 4, 5))
    with pytest.raises(ValueError, match="focal kernel: expected"):
        native.focal_forward(logits, target.int(), None, 2.0)  # an int32 target would be read past its end
    with pytest.raises(ValueError, match="focal kernel: expected"):
        native.focal_forward(logits, target[:, :3].contiguous(), None, 2.0)
    with pytest.raises(ValueError, match="focal kernel: expected"):
        native.focal_forward(logits, target.clamp_max(2), torch.ones(2, 4), 2.0)
