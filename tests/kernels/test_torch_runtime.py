import copy

import pytest
import torch

from yoloprune.graphs.errors import RuntimeSetupError
from yoloprune.kernels.torch_runtime import TorchRunner, TorchSettings, gpu_info, memory_layout


def test_cpu_runner_reproduces_the_model(tiny_model):
    """Bit for bit: the runner is the model in channels_last (the layout it runs in; its
    kernels sum in another order than the contiguous model's, 0.03 px apart on decoded boxes)."""
    runner = TorchRunner(tiny_model, 2, 64, TorchSettings(device="cpu", precision="fp32"))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last)
    reference = copy.deepcopy(tiny_model).to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = reference(images)[0]
    with runner:
        assert torch.equal(runner.infer(images), want)
        timing = runner.time(runs=3, warmup=1)
    assert timing.runs == 3 and timing.median_ms > 0
    assert runner.model is None and runner.images is None  # released on exit
    assert runner.time(runs=2, warmup=0).runs == 2 and not runner.is_active  # time() alone


def test_fp16_and_graphs_need_cuda():
    with pytest.raises(RuntimeSetupError, match="need --device cuda"):
        TorchSettings(device="cpu", precision="fp16")
    with pytest.raises(RuntimeSetupError, match="precision"):
        TorchSettings(device="cpu", precision="bf8")


def test_cuda_missing_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeSetupError, match="needs a CUDA GPU"):
        TorchSettings(device="cuda")
    assert gpu_info() == {"gpu": None}


def _share_off(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> float:
    return ((got - want).abs() > rtol * want.abs() + atol).float().mean().item()


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_runner_computes_the_model(tiny_model, cuda_graph, monkeypatch):
    """The runner's mechanics (channels_last copy, CUDA graph replay, the new batch copied into
    the captured buffer) held tight in fp32 with TF32 off; then fp16, held statistically: this
    random-weight model amplifies rounding (fp32 summation order alone moves its boxes 0.03 px).
    On an H200 (2026-12-01, both graph modes alike) its two fp16 batches had 0.0 % / 0.3 % of
    scores more than 0.02 off and 1.4 % / 3.9 % of box values more than 1 % + 0.5 px off; a
    stale buffer, a wrong layout or a replay of the old batch are off nearly everywhere."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    seeded = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 64, 64, generator=seeded) for _ in range(2)]
    with torch.no_grad():
        wants = [tiny_model(images)[0] for images in batches]
    fp32 = TorchSettings(device="cuda", precision="fp32", cuda_graph=cuda_graph)
    with TorchRunner(tiny_model, 2, 64, fp32) as runner:
        for images, want in zip(batches, wants, strict=True):  # the 2nd: replay reads new input
            got = runner.infer(images.cuda()).cpu()
            torch.testing.assert_close(got[..., 4:], want[..., 4:], rtol=0, atol=1e-3)
            torch.testing.assert_close(got[..., :4], want[..., :4], rtol=1e-3, atol=0.5)
    fp16 = TorchSettings(device="cuda", precision="fp16", cuda_graph=cuda_graph)
    with TorchRunner(tiny_model, 2, 64, fp16) as runner:
        for images, want in zip(batches, wants, strict=True):
            got = runner.infer(images.cuda().half()).float().cpu()
            scores_off = _share_off(got[..., 4:], want[..., 4:], 0, 2e-2)
            boxes_off = _share_off(got[..., :4], want[..., :4], 1e-2, 0.5)
            stats = f"scores off {scores_off:.2%}, boxes off {boxes_off:.2%}"
            assert scores_off < 0.02 and boxes_off < 0.1, stats
        assert runner.time(runs=10, warmup=3).median_ms > 0
    assert gpu_info()["gpu"]


def test_fake_quantized_models_keep_the_default_layout():
    """Channels-last speeds float convolutions on the CPU; a model holding quantizer ranges
    (ModelOpt's ``_amax`` buffers) keeps the layout it was calibrated in."""
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    assert memory_layout(plain) == torch.channels_last
    quantized = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    quantized[0].register_buffer("_amax", torch.tensor(1.0))
    assert memory_layout(quantized) == torch.contiguous_format
