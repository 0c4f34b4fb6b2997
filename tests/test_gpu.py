"""CUDA paths: skipped without a GPU (the `gpu` marker), run on any machine that has one."""

import numpy as np
import pytest
import torch

from kmim.extractors import ExtractorSpec, TimmExtractor
from kmim.pipeline.kmeans import Assigner
from kmim.trainer.config import ModelConfig
from kmim.trainer.model import MaskedImageModel
from kmim.trainer.train import autocast_dtype

pytestmark = pytest.mark.gpu


def test_timm_extractor_on_cuda_with_bf16_matches_cpu():
    views = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    spec = ExtractorSpec("timm:test_vit", 32, 16)
    cpu = TimmExtractor(spec, "cpu")(views)
    gpu = TimmExtractor(spec, "cuda")(views)
    assert gpu.dtype == torch.float32 and torch.allclose(cpu, gpu, atol=0.1, rtol=0.05)


def test_trainer_uses_bf16_autocast_on_cuda():
    device = torch.device("cuda")
    assert autocast_dtype("auto", device) == torch.bfloat16
    model = MaskedImageModel(ModelConfig(), 16).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 32, 32, device=device), torch.randint(0, 16, (2, 64), device=device))
    loss.backward()
    assert torch.isfinite(loss)


def test_faiss_gpu_index_when_available():
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss without GPU support (install the `gpu` extra)")
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((1000, 16)).astype(np.float32), rng.standard_normal((8, 16)).astype(np.float32)
    assert np.array_equal(Assigner(c, use_gpu=True).assign(x)[1], Assigner(c).assign(x)[1])


def test_torch_cuda_assignment_equals_the_cpu_search():
    rng = np.random.default_rng(1)
    x, c = (
        rng.standard_normal((5000, 64)).astype(np.float32),
        rng.standard_normal((300, 64)).astype(np.float32),
    )
    on_gpu = Assigner(c, use_gpu=True, backend="torch")
    assert on_gpu.on_gpu
    d2, labels = on_gpu.assign(x)
    ref_d2, ref_labels = Assigner(c).assign(x)
    assert (labels == ref_labels).mean() > 0.999 and np.allclose(d2, ref_d2, rtol=1e-3, atol=1e-2)
