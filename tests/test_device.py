"""The precision policy (capsv.device): `auto` picks by the card, and training and scoring ask the same policy.

No GPU is needed: a torch.device("cuda") can be named without one, and the compute capability is faked by
patching capsv.device.cuda_capability, the one place the policy reads it.
"""
import pytest
import torch

from capsv import device as policy
from capsv import trainer
from capsv.config import load_config
from capsv.scoring import scoring_precision

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def restore_tf32():
    """gpu_switches sets the global TF32 flags for a CUDA device; put them back."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("capability,expected", [
    ((9, 0), "bf16"),   # H100, H200
    ((8, 0), "bf16"),   # A100
    ((8, 9), "bf16"),   # L4
    ((7, 5), "fp16"),   # T4: bf16 emulated
    ((7, 0), "fp16"),   # V100, the paper's card
    ((6, 0), "fp16"),   # P100
])
def test_auto_picks_bf16_on_native_cards_and_fp16_with_a_scaler_below(monkeypatch, restore_tf32, capability, expected):
    monkeypatch.setattr(policy, "cuda_capability", lambda device: capability)
    train_cfg = load_config(None)["train"]
    assert train_cfg["amp"] == "auto"
    # training, scoring (also a score file's eval settings from before eval.precision existed) and the policy
    chosen = [trainer.gpu_switches(train_cfg, CUDA, 1)["precision"], scoring_precision({"precision": "auto"}, CUDA),
              scoring_precision({}, CUDA), policy.resolve_precision("auto", CUDA)]
    assert {(p.name, p.device_type) for p in chosen} == {(expected, "cuda")}
    assert all(p.scaled == (expected == "fp16") for p in chosen)   # fp16 gradients need loss scaling
    assert chosen[0].dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]
    assert chosen[1].record() == {"precision": expected, "device_type": "cuda"}
    assert str(chosen[0]) == f"auto -> {expected} on cuda"


@pytest.mark.parametrize("capability", [(7, 0), (9, 0)])
def test_an_explicit_setting_holds_on_any_card(monkeypatch, capability):
    monkeypatch.setattr(policy, "cuda_capability", lambda device: capability)
    assert policy.resolve_precision("bf16", CUDA).name == "bf16"
    assert policy.resolve_precision("fp16", CUDA).name == "fp16"
    assert policy.resolve_precision("off", CUDA).name == "fp32"


def test_the_cpu_runs_fp32_unless_asked(monkeypatch):
    monkeypatch.setattr(policy, "cuda_capability", lambda device: pytest.fail("the CPU has no compute capability"))
    x, w = torch.randn(1, 1, 8, 8), torch.randn(2, 1, 3, 3)
    auto = policy.resolve_precision("auto", CPU)
    assert (auto.name, auto.dtype, auto.scaled) == ("fp32", None, False)
    with auto.autocast():
        assert torch.nn.functional.conv2d(x, w).dtype == torch.float32
    bf16 = policy.resolve_precision("bf16", CPU)
    with bf16.autocast():   # the GPU's code path, on the CPU
        assert torch.nn.functional.conv2d(x, w).dtype == torch.bfloat16
    fp16 = policy.resolve_precision("fp16", CPU)
    assert fp16.grad_scaler().is_enabled() and not bf16.grad_scaler().is_enabled()
    assert scoring_precision({"precision": "auto"}, CPU).name == "fp32"


def test_a_precision_mismatch_is_one_line_and_a_match_is_silent():
    used = policy.resolve_precision("auto", CPU)
    assert policy.same_precision({"precision": "fp32", "device_type": "cuda"}, used) is None
    assert policy.same_precision(None, used) is None   # files from before precisions were recorded
    line = policy.same_precision({"precision": "bf16", "device_type": "cuda"}, used)
    assert "\n" not in line and "fp32 on cpu" in line and "bf16 on cuda" in line


def test_an_unknown_setting_is_refused():
    with pytest.raises(policy.UserError, match="'fp8' is not one of auto, bf16, fp16, off"):
        policy.resolve_precision("fp8", CPU)
