import copy

import pytest
import torch

from yoloprune.graphs.errors import RuntimeSetupError
from yoloprune.kernels.torch_runtime import TorchRunner, TorchSettings, gpu_info


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


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_fp16_runner_matches_fp32(tiny_model, cuda_graph):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    settings = TorchSettings(device="cuda", precision="fp16", cuda_graph=cuda_graph)
    runner = TorchRunner(tiny_model, 2, 64, settings).activate()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = tiny_model(images)[0]
    got = runner.infer(images.cuda().half()).float().cpu()
    # fp16: scores to ~1e-2, boxes (pixels) to ~0.5 px
    torch.testing.assert_close(got[..., 4:], want[..., 4:], rtol=0, atol=2e-2)
    torch.testing.assert_close(got[..., :4], want[..., :4], rtol=1e-2, atol=0.5)
    assert runner.time(runs=10, warmup=3).median_ms > 0
    assert gpu_info()["gpu"]
