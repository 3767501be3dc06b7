"""RIFE HDv3 IFNet: golden parity, the official flownet.pkl key rule, interpolation and the node."""

from __future__ import annotations

import pytest
import torch

from nodes import runtime
from nodes.nodes_video import SonicFrameInterpolate
from sonic_core.config import RIFE_STATE_PREFIX
from sonic_core.interpolate import interpolate, interpolated_length
from sonic_core.models.rife import IFNet, build_rife, load_rife, rife_state_dict
from sonic_core.weights import CheckpointError
from tests._golden import assert_close_rel, assert_same_math, load_json, with_weight_off

# values are in [0, 1]; measured 7.2e-7 (AVX2) and 1.1e-6 (ATen default kernels, 1 thread) against the
# official middle frames, 9x margin; the planted 1 % weight below misses by more than 10x.
PARITY_ATOL = 1e-5


def _save_pkl(state: dict[str, torch.Tensor], path) -> str:
    """Save like the official flownet.pkl: every key with the ``module.`` prefix."""
    torch.save({RIFE_STATE_PREFIX + k: v for k, v in state.items()}, str(path))
    return str(path)


def _golden_frames(golden) -> tuple[torch.Tensor, torch.Tensor]:
    if not golden.case.use_interframe:
        pytest.skip(f"golden case {golden.name} ran without RIFE (use_interframe false)")
    video = golden.t("out.video")[0].permute(1, 2, 3, 0)  # [3,F,H,W] -> [F,H,W,3]
    rife = golden.t("out.video_rife")[0].permute(1, 2, 3, 0)  # [3,2F-1,H,W] -> [2F-1,H,W,3]
    return video, rife


def _tiny_rife(seed: int = 0, channels: int = 8) -> IFNet:
    torch.manual_seed(seed)
    model = IFNet(channels)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_rife_parity_golden_from_pkl(golden, tmp_path, batch_size):
    """Odd frames of out.video_rife from out.video, with the weights loaded from a .pkl file."""
    path = _save_pkl(golden.weights("rife"), tmp_path / "flownet.pkl")
    model = load_rife(path, "cpu")
    video, expected = _golden_frames(golden)
    out = interpolate(model, video, multiplier=2, batch_size=batch_size)
    assert out.shape == expected.shape == (2 * video.shape[0] - 1, *video.shape[1:])
    assert torch.equal(out[0::2], video)  # originals are copied unchanged
    assert_close_rel(out[1::2], expected[1::2], rtol=0.0, atol=PARITY_ATOL, what="RIFE middle frames")
    bad = interpolate(with_weight_off(model), video, multiplier=2, batch_size=batch_size)
    err = (bad[1::2] - expected[1::2]).abs().max().item()
    assert err > 10 * PARITY_ATOL, f"planted bug (a RIFE weight 1 % off) within 10 x atol: {err:.2e}"


def test_rife_parity_golden_even_frames_are_inputs(golden):
    video, expected = _golden_frames(golden)
    assert_close_rel(expected[0::2], video, rtol=0.0, atol=0.0, what="golden even frames")


def test_rife_manifest_keys_load_strictly(tmp_path):
    ifnet_keys = load_json("fixtures", "manifests", "rife_ifnet_module_keys.json")["keys"]
    pkl = load_json("fixtures", "manifests", "rife_flownet_pkl_keys.json")["keys"]
    model = IFNet()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ifnet_keys
    assert rife_state_dict({k: torch.zeros(0) for k in pkl}).keys() == ifnet_keys.keys()
    torch.manual_seed(0)
    path = tmp_path / "flownet.pkl"
    torch.save({k: torch.randn(shape) for k, shape in pkl.items()}, str(path))  # keys as stored
    loaded = load_rife(str(path))
    assert set(loaded.state_dict()) == set(ifnet_keys)


def test_rife_load_rule_drops_unprefixed_entries(tmp_path):
    state = _tiny_rife().state_dict()
    path = tmp_path / "flownet.pkl"
    torch.save({**{RIFE_STATE_PREFIX + k: v for k, v in state.items()}, "epoch": torch.tensor(3)}, str(path))
    model = load_rife(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_rife_missing_and_unexpected_keys_are_named(tmp_path):
    state = dict(_tiny_rife().state_dict())
    del state["block1.conv1.0.bias"]
    state["block3.conv0.0.0.weight"] = torch.zeros(1)
    path = _save_pkl(state, tmp_path / "bad.pkl")
    with pytest.raises(CheckpointError) as err:
        load_rife(path)
    msg = str(err.value)
    assert "block1.conv1.0.bias" in msg and "block3.conv0.0.0.weight" in msg
    assert "1 missing" in msg and "1 unexpected" in msg


def test_rife_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pkl"
    torch.save({"module.x": torch.zeros(1), "obj": object()}, str(path))
    with pytest.raises(CheckpointError):
        load_rife(str(path))


def test_rife_multiplier_4_is_2x_twice():
    model = _tiny_rife(1)
    torch.manual_seed(2)
    frames = torch.rand(4, 32, 32, 3)
    x2 = interpolate(model, frames, 2)
    x4 = interpolate(model, frames, 4, batch_size=2)
    assert x4.shape[0] == interpolated_length(4, 4) == 4 * 4 - 3
    assert torch.equal(x4[0::4], frames)
    assert_same_math(x4[0::2], x2, "x4 even frames = x2")  # other batch sizes: same math, other kernels
    assert_same_math(x4, interpolate(model, x2, 2), "x4 = x2 twice")


def test_rife_odd_sizes_are_padded_and_cropped():
    model = _tiny_rife(3)
    frames = torch.rand(3, 37, 50, 3)
    out = interpolate(model, frames, 2)
    assert out.shape == (5, 37, 50, 3)
    assert out.min() >= 0 and out.max() <= 1
    # the frame content does not depend on the batch the pair is computed in (same math; other batch
    # sizes take other kernels: 1.0e-6 with ATEN_CPU_CAPABILITY=default, so SAME_MATH_ULPS)
    assert_same_math(out, interpolate(model, frames, 2, batch_size=1), "batch of 2 pairs vs 1")


def test_rife_bad_input_and_cancel():
    model = _tiny_rife()
    with pytest.raises(ValueError, match="multiplier 3"):
        interpolate(model, torch.rand(3, 32, 32, 3), 3)
    with pytest.raises(ValueError, match="at least 2 frames"):
        interpolate(model, torch.rand(1, 32, 32, 3), 2)
    calls = []

    def cancel(done, total):
        calls.append((done, total))
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        interpolate(model, torch.rand(6, 32, 32, 3), 2, batch_size=2, callback=cancel)
    assert calls == [(2, 5)]


def test_rife_node_loads_file_and_reports_fps(tmp_path, monkeypatch):
    state = _tiny_rife(4).state_dict()
    (tmp_path / "RIFE").mkdir()
    _save_pkl(state, tmp_path / "RIFE" / "flownet.pkl")
    monkeypatch.setenv(runtime.MODELS_ENV, str(tmp_path))
    node = SonicFrameInterpolate()
    assert "RIFE/flownet.pkl" in node.INPUT_TYPES()["required"]["rife_model"][0]
    frames = torch.rand(3, 32, 32, 3)
    out, fps = node.interpolate(frames, "RIFE/flownet.pkl", 2, 12.5, 2)
    assert out.shape == (5, 32, 32, 3) and fps == 25.0
    reference = interpolate(build_rife(state), frames, 2)
    assert_same_math(out.cpu(), reference, "node vs core")  # the same model and frames: measured 0
    with pytest.raises(FileNotFoundError):
        node.interpolate(frames, "RIFE/missing.pkl", 2, 12.5, 2)
