"""vlfast.sampling: sample() against the plain loop diffusers' pipelines run, image helpers, the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import gpu
from vlfast import sampling
from vlfast.__main__ import main
from vlfast.schedulers import DDIMScheduler, DDPMScheduler

SHAPE = (2, 3, 8, 8)
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


class TinyEps(nn.Module):
    """A small noise predictor: (B, 3, H, W), t (0-d or (B,)) -> (B, 3, H, W); per-sample independent."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.inp = nn.Conv2d(channels, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1, 1, 1, 1) / 1000
        return self.out(torch.nn.functional.silu(self.norm(self.inp(x) + t)))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyEps().eval()


def plain_loop(model, scheduler, shape, generator, steps: int):
    """The loop of diffusers' DDPMPipeline (x_T on the generator's device), written out."""
    scheduler.set_timesteps(steps)
    if isinstance(generator, list):
        x = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    else:
        x = torch.randn(shape, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(x, t)
            out = out if isinstance(out, torch.Tensor) else out.sample
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("name", SCHEDULERS)
def test_sample_equals_plain_loop(name):
    model = tiny_model()
    got = sampling.sample(model, SCHEDULERS[name](), SHAPE, generator=torch.Generator().manual_seed(3),
                          num_inference_steps=3, progress=False)
    want = plain_loop(model, SCHEDULERS[name](), SHAPE, torch.Generator().manual_seed(3), 3)
    assert got.shape == SHAPE and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    other = sampling.sample(model, SCHEDULERS[name](), SHAPE, generator=torch.Generator().manual_seed(4),
                            num_inference_steps=3, progress=False)
    assert not torch.equal(got, other)


def test_generator_list_is_per_sample():
    model = tiny_model()
    both = sampling.sample(model, DDPMScheduler(), SHAPE, num_inference_steps=3, progress=False,
                           generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    for i, seed in enumerate((5, 6)):
        alone = sampling.sample(model, DDPMScheduler(), (1, *SHAPE[1:]), num_inference_steps=3, progress=False,
                                generator=[torch.Generator().manual_seed(seed)])
        torch.testing.assert_close(both[i:i + 1], alone)


def test_diffusers_scheduler_matches():
    """A diffusers DDPMScheduler runs too, and a list of generators gives vlfast's samples (same noise)."""
    diffusers = pytest.importorskip("diffusers")
    model = tiny_model()
    seeds = (7, 8)
    ours = sampling.sample(model, DDPMScheduler(), SHAPE, num_inference_steps=3, progress=False,
                           generator=[torch.Generator().manual_seed(s) for s in seeds])
    theirs = sampling.sample(model, diffusers.DDPMScheduler(), SHAPE, num_inference_steps=3, progress=False,
                             generator=[torch.Generator().manual_seed(s) for s in seeds])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_diffusers_unet_output():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    got = sampling.sample(unet, DDIMScheduler(), SHAPE, generator=torch.Generator().manual_seed(1),
                          num_inference_steps=3, progress=False)
    want = plain_loop(unet, DDIMScheduler(), SHAPE, torch.Generator().manual_seed(1), 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_progress_bar(capsys):
    model = tiny_model()
    sampling.sample(model, DDIMScheduler(), SHAPE, num_inference_steps=2, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    sampling.sample(model, DDIMScheduler(), SHAPE, num_inference_steps=2, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_randn_tensor_like_diffusers():
    torch_utils = pytest.importorskip("diffusers.utils.torch_utils")
    for gen in (lambda: torch.Generator().manual_seed(0),
                lambda: [torch.Generator().manual_seed(s) for s in (0, 1)],
                lambda: [torch.Generator().manual_seed(2)]):
        torch.testing.assert_close(sampling.randn_tensor(SHAPE, gen(), "cpu", torch.float32),
                                   torch_utils.randn_tensor(SHAPE, generator=gen(), device=torch.device("cpu"),
                                                            dtype=torch.float32), rtol=0, atol=0)
    with pytest.raises(ValueError, match="generators"):
        sampling.randn_tensor(SHAPE, [torch.Generator()] * 3)


def test_to_images():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).reshape(1, 1, 2, 3).expand(2, 3, 2, 3)
    images = sampling.to_images(x)
    assert images.dtype.name == "uint8" and images.shape == (2, 2, 3, 3)
    assert images[0, :, :, 0].ravel().tolist() == [0, 0, 128, 191, 255, 255]
    with pytest.raises(ValueError, match="N, C, H, W"):
        sampling.to_images(x[0])


@pytest.mark.parametrize("channels,nrow,size,mode", [(3, None, (18, 16), "RGB"), (3, 5, (30, 8), "RGB"),
                                                     (1, 2, (12, 24), "L"), (4, 4, (24, 16), "RGBA")])
def test_save_grid(tmp_path, channels, nrow, size, mode):
    x = torch.rand(5, channels, 8, 6) * 2 - 1
    path = tmp_path / "grid.png"
    sampling.save_grid(x, path, nrow=nrow)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size and image.mode == mode
        pixels = torch.from_numpy(np.asarray(image).copy())
    first = torch.from_numpy(sampling.to_images(x[:1])[0]).squeeze(-1)
    assert torch.equal(pixels[:8, :6], first)  # image 0 at the top left


@pytest.mark.parametrize("convert", [False, True], ids=["torch", "vlfast"])
def test_cli_module_attribute(tmp_path, capsys, convert):
    out = tmp_path / "grid.png"
    main(["sample", f"{__name__}:tiny_model", "--steps", "2", "--batch", "3", "--shape", "3,8,8", "--out", str(out),
          "--quiet"] + ([] if convert else ["--no-convert"]))
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    with pytest.raises(SystemExit, match="--shape"):
        main(["sample", f"{__name__}:tiny_model", "--out", str(out)])


def test_cli_registry(tmp_path):
    models = pytest.importorskip("vlfast.models")
    if "ddpm_unet" not in getattr(models, "MODELS", {}):
        pytest.skip("no ddpm_unet in vlfast.models")
    out = tmp_path / "grid.png"
    main(["sample", "ddpm_unet", "--steps", "2", "--batch", "1", "--scheduler", "ddim", "--out", str(out),
          "--quiet", "--no-convert"])
    with Image.open(out) as image:
        _, h, w = models.example_input("ddpm_unet", 1)[0].shape[1:]
        assert image.size == (w, h)


@gpu
@pytest.mark.parametrize("convert", [False, True], ids=["torch", "vlfast"])
def test_cuda_graph_equals_eager(convert):
    """DDIM with eta = 0 is deterministic: one CUDA graph per step gives the eager loop's samples."""
    from vlfast.nn import convert as to_vlfast
    model = tiny_model().cuda()
    if convert:
        model = to_vlfast(model)
    runs = {}
    for graph in (False, True):
        runs[graph] = sampling.sample(model, DDIMScheduler(), SHAPE, generator=torch.Generator().manual_seed(0),
                                      num_inference_steps=4, cuda_graph=graph, progress=False, device="cuda")
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)


@gpu
def test_cuda_graph_ddpm_reproducible():
    """A captured DDPM step draws fresh noise per replay (on-device counter), and a seed reproduces a run."""
    model = tiny_model().cuda()
    scheduler = DDPMScheduler()

    def run(seed, graph=True):
        gen = torch.Generator("cuda").manual_seed(seed)
        return sampling.sample(model, scheduler, SHAPE, generator=gen, num_inference_steps=4, cuda_graph=graph,
                               progress=False, device="cuda")
    first, again, other = run(0), run(0), run(1)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    eager = run(0, graph=False)  # same x_T, another (equally distributed) noise stream
    assert not torch.equal(first, eager)
