"""The pipeline's networks as the PyTorch modules themselves (`networks: torch`).

The same modules the ONNX graphs were exported from (export/specs.py GRAPHS: one signature
per network, tensor for tensor), loaded from the repository's `pytorch/` folder (written by
`--torch-weights`: our checkpoint format, EMA applied) and called on torch tensors on the
service's device. On a GPU the whole loop then stays on the device: TensorRT is not needed,
and it is what a GPU without TensorRT serves with. On the CPU the suite runs it through the
same code.

Precision per network, as the TensorRT engines have it (ExportSpec.engine_precision): the
text encoder and the UNet run in `precision` (weights cast once, not autocast per call: half
the memory and no cast per step), the VAE decoder in fp32, its GroupNorms over full-size
activations being this architecture's classic fp16 overflow. Attention's softmax runs in fp32
(PyTorch's fused SDPA kernels accumulate in fp32; ldm/modules/attention.py's math kernel
upcasts q k^T).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from server.contract import NETWORKS, PipelineInfo, ServingOptions

TensorFn = Callable[..., torch.Tensor]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(option: str, instance_gpu: int | None = None) -> torch.device:
    """ServingOptions.device as a torch device: `auto` is the Triton instance's GPU
    (`instance_gpu`), else the first GPU where there is one, else the CPU."""
    if option != "auto":
        if option.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {option}: this machine has no CUDA GPU")
        return torch.device(option)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", instance_gpu or 0)


def network_dtypes(precision: str, device: torch.device) -> dict[str, torch.dtype]:
    """{network: dtype}: `auto` is fp16 on a GPU and fp32 on the CPU; the VAE is fp32."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    reduced = DTYPES[precision]
    return {"text_encoder": reduced, "unet": reduced, "vae_decoder": torch.float32}


def graph_function(graph: torch.nn.Module, dtype: torch.dtype) -> TensorFn:
    """fn(*tensors) -> fp32 output: floating inputs cast to the module's `dtype`, integer ones
    (token ids, timesteps) left alone."""
    def call(*tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            args = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
            return graph(*args).float()

    return call


def model_functions(model, device: torch.device, precision: str = "fp32") -> dict[str, TensorFn]:
    """{network: tensor function} of a LatentDiffusion, moved to `device` and cast per network
    (network_dtypes). The model is changed in place."""
    from export.specs import GRAPHS

    dtypes = network_dtypes(precision, device)
    fns = {}
    for name in NETWORKS:
        graph = cast_module(GRAPHS[name](model).eval().to(device), dtypes[name])
        fns[name] = graph_function(graph, dtypes[name])
    return fns


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype`, except the UNet's GroupNorm32 layers: they compute in fp32 (as
    CompVis's fp16 UNet keeps its norms), so their affine weights stay fp32 too."""
    from ldm.modules.unet_blocks import GroupNorm32

    module.to(dtype)
    for m in module.modules():
        if isinstance(m, GroupNorm32):
            m.float()
    return module


def torch_networks(repository: str | Path, precision: str,
                   device: torch.device) -> dict[str, TensorFn]:
    """The repository's `pytorch/` weights as tensor functions on `device`."""
    from export.manifest import TORCH_WEIGHTS
    from ldm.pretrained import load_pretrained

    folder = Path(repository) / TORCH_WEIGHTS
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder}: no PyTorch weights (build the repository with "
                                "--torch-weights, or python -m server.build --networks torch)")
    return model_functions(load_pretrained(folder), device, precision)


def model_service(model, device: torch.device, precision: str = "fp32",
                  options: ServingOptions | None = None, batcher=None):
    """The served loop (server.txt2img.Txt2ImgService) straight on a LatentDiffusion's modules,
    without a repository: for checks on a machine that has only PyTorch (bench/device_check).
    The model is moved and cast in place."""
    from server.txt2img import Txt2ImgService

    cfg = model.config
    info = PipelineInfo(latent_channels=cfg.unet.in_channels,
                        downsample_factor=model.first_stage_model.downsample_factor,
                        parameterization=cfg.diffusion.parameterization,
                        max_seq_len=cfg.cond_stage.max_seq_len,
                        scale_factor=float(model.scale_factor))
    alphas = model.alphas_cumprod.detach().float().cpu().numpy()
    tokenizer = model.cond_stage_model.tknz_fn
    fns = model_functions(model, device, precision)
    options = options or ServingOptions(networks="torch", precision=precision, preview="none")
    return Txt2ImgService(info, alphas, tokenizer, fns["text_encoder"], fns["unet"],
                          fns["vae_decoder"], options, batcher, device)
