"""DDPM sampling (Ho et al. 2020, Algorithm 2) with any scheduler, one CUDA graph per step on the GPU.

:func:`sample` runs the loop diffusers' pipelines run::

    scheduler.set_timesteps(num_inference_steps, device=device)
    x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)   # x_T, as diffusers draws it
    for t in scheduler.timesteps:
        out = model(x, t)                                                      # a tensor, or out.sample
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x

On a CUDA device with a vlfast scheduler it captures one step (model + ``scheduler.step``) in a
``torch.cuda.CUDAGraph`` and replays it once per timestep. :func:`to_images` and :func:`save_grid` turn
the result into uint8 pixels and a PNG grid.
"""

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .schedulers._base import randn_tensor

__all__ = ["sample", "randn_tensor", "to_images", "save_grid"]

WARMUP_STEPS = 3  # eager steps on a side stream before capture (PyTorch's CUDA-graph docs use a few)


def _output(out) -> Tensor:
    """The model's prediction: a tensor, or the ``.sample`` of a diffusers ``UNet2DOutput``-like object."""
    return out if isinstance(out, Tensor) else out.sample


def _is_vlfast(scheduler) -> bool:
    from .schedulers._base import SchedulerBase
    return isinstance(scheduler, SchedulerBase)


def _defaults(model: nn.Module, device, dtype) -> tuple[torch.device, torch.dtype]:
    """``device`` / ``dtype``, or those of the model's first floating-point parameter (CPU, float32 without)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    return torch.empty(0, device=device).device, dtype  # normalised: "cuda" -> cuda:0


@torch.no_grad()
def sample(model: nn.Module, scheduler, shape: Sequence[int], *, generator=None, num_inference_steps: int = 50,
           cuda_graph: bool = True, progress: bool = True, device=None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Run the reverse process from x_T ~ N(0, I) to x_0; returns x_0, (B, C, H, W) like ``shape``.

    model: ``model(x, t) -> eps`` (or whatever the scheduler's ``prediction_type`` names), x (B, C, H, W),
    t a 0-d integer tensor on ``device``; the result a tensor like x, or an object with ``.sample`` (a
    diffusers ``UNet2DModel``). scheduler: a vlfast ``DDPMScheduler`` / ``DDIMScheduler``, or a diffusers
    scheduler with the same ``set_timesteps`` / ``step``. shape: (B, C, H, W). generator: None, a
    torch.Generator or a list of B of them (diffusers' convention: sample i depends on generator i alone).
    device / dtype: of x; by default the model's parameters'. Equivalent PyTorch code (which the eager path
    runs, so the same generator gives the same samples)::

        scheduler.set_timesteps(num_inference_steps, device=device)
        x = randn_tensor(shape, generator, device, dtype)
        for t in tqdm(scheduler.timesteps):
            x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample

    With ``cuda_graph`` (the default), a CUDA ``device``, a vlfast scheduler and a single generator (or
    None), one step (model, step, copy into x) is captured in a ``torch.cuda.CUDAGraph`` after warm-up on a
    side stream, and replayed per timestep with t in a static device tensor refreshed by a device-to-device
    copy from ``scheduler.timesteps``: no host synchronisation, one copy and one graph launch per step.
    vlfast's step reads the timestep on the device (its row of the coefficient table has no noise at t = 0, as diffusers
    adds none there), and a captured step draws its noise from the generator's seed and the scheduler's
    on-device counter (restarted by ``set_timesteps``), so a seed reproduces a graph run, and a
    deterministic scheduler (DDIM with eta = 0) gives the eager loop's result; a noisy one (DDPM) draws a
    different, equally distributed, noise stream than the eager loop.
    The eager loop runs instead (with a tqdm progress bar unless ``progress=False``) on the CPU, with
    ``cuda_graph=False``, with a list of generators (diffusers' per-sample noise is ``torch.randn`` per
    generator on the host side at every step, which a graph would replay frozen) and with a diffusers
    scheduler (its step works on the host: it reads the timestep there to index ``alphas_cumprod`` and find
    the previous timestep, which syncs and would be frozen into a graph, and keeps host-side state in some
    schedulers, e.g. ``_step_index``).
    """
    device, dtype = _defaults(model, device, dtype)
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    sigma = getattr(scheduler, "init_noise_sigma", 1.0)  # 1 for DDPM and DDIM, as in diffusers' pipelines
    if sigma != 1.0:
        x = x * sigma
    timesteps = scheduler.timesteps
    if cuda_graph and device.type == "cuda" and _is_vlfast(scheduler) and not isinstance(generator, (list, tuple)):
        return _sample_graph(model, scheduler, x, timesteps.to(device), generator, progress)
    from tqdm.auto import tqdm
    for t in tqdm(timesteps, disable=not progress, desc="sampling"):
        x = scheduler.step(_output(model(x, t)), t, x, generator=generator).prev_sample
    return x


def _sample_graph(model: nn.Module, scheduler, x: Tensor, timesteps: Tensor, generator, progress: bool) -> Tensor:
    """The loop of :func:`sample` as replays of one captured step; x: x_T, timesteps: (S,) int64 on x's device."""
    from tqdm.auto import tqdm
    device = x.device
    static_x = x.clone()               # x_t in, x_{t-1} out: the graph writes its result back here
    static_t = timesteps[0].clone()    # 0-d int64 on the device, refreshed before each replay

    def one_step() -> None:
        out = _output(model(static_x, static_t))
        static_x.copy_(scheduler.step(out, static_t, static_x, generator=generator).prev_sample)

    # Warm-up on a side stream (PyTorch's CUDA-graph docs): lazy initialisation, plan caches, cuBLAS
    # workspaces and the scheduler's device tables happen here, not during capture.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            one_step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    # The warm-up overwrote x; capture ran nothing (and eager steps leave the scheduler's on-device noise
    # counter alone, set_timesteps restarted it), so from x_T the replays are the whole run.
    static_x.copy_(x)
    for i in tqdm(range(timesteps.shape[0]), disable=not progress, desc="sampling (CUDA graph)"):
        static_t.copy_(timesteps[i])   # device to device: no host synchronisation
        graph.replay()
    return static_x.clone()


def to_images(x: Tensor) -> np.ndarray:
    """(N, C, H, W) samples in [-1, 1] -> (N, H, W, C) uint8 pixels.

    Equivalent PyTorch code: ``((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)``
    (computed in float32, on the CPU).
    """
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) samples; got shape {tuple(x.shape)}")
    pixels = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x: Union[Tensor, np.ndarray], path, nrow: Optional[int] = None):
    """Write the N samples as one PNG (or any format pillow infers from ``path``); returns the PIL image.

    x: (N, C, H, W) samples in [-1, 1] (see :func:`to_images`) or (N, H, W, C) uint8 pixels, C in
    {1, 3, 4}. nrow: images per row (torchvision's ``make_grid`` meaning), by default ceil(sqrt(N)).
    The grid has no padding: ``nrow * W`` by ``ceil(N / nrow) * H`` pixels, empty cells black.
    """
    from PIL import Image
    images = to_images(x) if isinstance(x, Tensor) else np.asarray(x)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) tensor or (N, H, W, C) uint8 pixels; got {images.dtype} "
                         f"of shape {images.shape}")
    n, h, w, c = images.shape
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    if c not in modes:
        raise ValueError(f"can save 1, 3 or 4 channels as an image; got {c}")
    nrow = max(1, math.ceil(math.sqrt(n))) if nrow is None else int(nrow)
    if nrow < 1:
        raise ValueError(f"nrow must be positive; got {nrow}")
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * h, nrow * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    image.save(path)
    return image
