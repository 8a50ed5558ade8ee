"""vlfast.models: the lecture's networks of plain torch layers, and vlfast.nn.convert on them."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast import models
from vlfast.models import MODELS, example_input

NAMES = sorted(MODELS)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _tiny_ddpm():
    torch.manual_seed(0)
    return models.DDPMUNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), groups=4, resolution=16)


def _build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]()


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_backward(name):
    model = _build(name).train()
    args = example_input(name, batch=2)
    x = args[0].requires_grad_()
    out = _first(model(*args))
    expected = {"unet": (2, 2, 32, 32), "fcn32s": (2, 5, 64, 64), "fcn8s": (2, 5, 64, 64)}
    assert out.shape == expected.get(name, x.shape)
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_converted_matches(name):
    """convert(conv2d="all") on a deep copy: the same outputs and gradients in eval mode (fp32)."""
    model = _build(name).eval()
    fast = vlfast.nn.convert(copy.deepcopy(model), conv2d="all")
    args = example_input(name, batch=2)
    x_ref = args[0].clone().requires_grad_()
    x_fast = args[0].clone().requires_grad_()
    out_ref = _first(model(x_ref, *args[1:]))
    out_fast = _first(fast(x_fast, *args[1:]))
    torch.testing.assert_close(out_fast, out_ref, atol=1e-4, rtol=1e-4)
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1))
    (out_ref * w).sum().backward()
    (out_fast * w).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    fast_params = dict(fast.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(fast_params[pname].grad, p.grad, atol=2e-4, rtol=1e-4, msg=lambda m: f"{pname}: {m}")


def test_convert_switches_modules():
    fast = vlfast.nn.convert(_build("fcn8s"), conv2d="all")
    kinds = {type(m) for m in fast.modules()}
    assert vlfast.nn.ConvTranspose2d in kinds and vlfast.nn.Conv2d in kinds
    assert torch.nn.ConvTranspose2d not in kinds and torch.nn.Conv2d not in kinds
    ctx = vlfast.nn.convert(_build("context"))  # default: the dilated convolutions only
    dilated = [m for m in ctx.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation != (1, 1)]
    assert dilated and all(type(m) is vlfast.nn.Conv2d for m in dilated)


def test_unet_paper_size_and_odd_input():
    assert sum(p.numel() for p in models.UNet(3, 2).parameters()) == 31_037_698  # the port's 31.0M
    for bilinear in (False, True):
        model = models.UNet(1, 3, bilinear=bilinear, base=4).eval()
        assert model(torch.randn(1, 1, 37, 45)).shape == (1, 3, 37, 45)  # padded back to the skips' sizes


def test_ddpm_unet_paper_size():
    assert round(sum(p.numel() for p in models.DDPMUNet().parameters()) / 1e6, 1) == 35.7  # Ho et al.: 35.7M


@pytest.mark.parametrize("k", [4, 5, 16, 64])
def test_bilinear_kernel_values(k):
    w = models.bilinear_kernel(3, 2, k)
    assert w.shape == (3, 2, k, k)
    assert w[2].abs().sum() == 0 and w[0, 1].abs().sum() == 0  # channel c -> c only
    torch.testing.assert_close(w[1, 1], w[0, 0])
    factor = (k + 1) // 2
    assert w[0, 0].max() <= 1 and abs(float(w[0, 0].sum()) - factor ** 2) < 1e-4  # a partition of unity x s^2


@pytest.mark.parametrize("stride", [2, 8, 32])
def test_bilinear_upsampler_is_bilinear_interpolation(stride):
    """With padding s/2 the initialised transposed convolution is F.interpolate(bilinear, align_corners=False)
    away from the border (where interpolate clamps and the transposed convolution sees zeros)."""
    up = models.bilinear_upsampler(3, stride)
    x = torch.randn(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = up(x)
    want = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    assert got.shape == want.shape == (2, 3, 6 * stride, 7 * stride)
    b = stride  # one input pixel's span from each border
    torch.testing.assert_close(got[..., b:-b, b:-b], want[..., b:-b, b:-b], atol=1e-5, rtol=1e-5)
    # A linear ramp stays a ramp: exact interpolation of a linear function.
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 8, 8)
    with torch.no_grad():
        out = up(ramp.contiguous())[..., b:-b, b:-b]
    torch.testing.assert_close(out.diff(dim=-1), torch.full_like(out.diff(dim=-1), 1.0 / stride))


@pytest.mark.parametrize("d", [1, 2, 4, 8, 16])
def test_context_module_keeps_size(d):
    m = models.ContextModule(4, dilations=(d,) * 2)
    assert m(torch.randn(1, 4, 11, 13)).shape == (1, 4, 11, 13)


def test_context_module_identity_init():
    m = models.ContextModule(4, identity_init=True)
    x = torch.rand(2, 4, 20, 20)
    torch.testing.assert_close(m(x), x)
    convs = [c for c in m if isinstance(c, torch.nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == [1, 1, 2, 4, 8, 16, 1, 1] and convs[-1].kernel_size == (1, 1)
    assert isinstance(m[-1], torch.nn.Conv2d)  # no ReLU after the final 1x1


def test_aspp_without_pooling():
    m = models.ASPP(8, out_channels=8, rates=(1, 2), image_pooling=False).eval()
    assert len(m.branches) == 3 and m(torch.randn(1, 8, 9, 9)).shape == (1, 8, 9, 9)


def test_vae_elbo():
    model = _build("vae").train()
    (x,) = example_input("vae", batch=2)
    recon, mu, logvar = model(x, generator=torch.Generator().manual_seed(0))
    assert mu.shape == logvar.shape == (2, 4, 4, 4)
    loss = models.elbo_loss(x, recon, mu, logvar)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.encoder[0].weight.grad.abs().sum() > 0  # through the reparameterisation to the encoder
    # The KL term alone: 0 at the prior, the closed form elsewhere.
    z = torch.zeros(1, 3)
    assert models.elbo_loss(z, z, z, z) == 0
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    kl = 0.5 * (1.0 + (torch.e - 1 - 1))
    torch.testing.assert_close(models.elbo_loss(z[:, :2], z[:, :2], mu, logvar), torch.tensor(kl))


def test_vae_eval_is_deterministic():
    model = _build("vae").eval()
    (x,) = example_input("vae", batch=1)
    recon, mu, _ = model(x)
    torch.testing.assert_close(recon, model.decode(mu))


def test_ddpm_train_step():
    from vlfast.schedulers import DDPMScheduler
    model = _tiny_ddpm().train()
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = torch.Generator().manual_seed(0)
    losses = [float(models.ddpm_train_step(model, x0, sched, opt, generator=g)) for _ in range(1)]
    assert all(0 < v < 10 for v in losses)  # about 1 for an untrained eps prediction
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # The alphas_cumprod tensor works as the schedule too.
    loss = models.ddpm_train_step(model, x0, sched.alphas_cumprod, opt, generator=g)
    assert torch.isfinite(loss)


def test_timestep_embedding():
    emb = models.timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_ddpm_sample_matches_diffusers():
    """Algorithm 2 with vlfast's DDPMScheduler and with diffusers': with a list of per-sample generators both
    draw torch.randn per sample, so the samples agree."""
    diffusers = pytest.importorskip("diffusers")
    from vlfast.schedulers import DDPMScheduler
    model = _tiny_ddpm().eval()
    shape = (2, 3, 16, 16)
    out = []
    for cls in (DDPMScheduler, diffusers.DDPMScheduler):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(shape[0])]
        out.append(models.ddpm_sample(model, shape, cls(num_train_timesteps=1000), generator=gens,
                                      num_inference_steps=4))
    assert out[0].shape == shape and torch.isfinite(out[0]).all()
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


def test_ddpm_sample_single_generator():
    from vlfast.schedulers import DDPMScheduler
    model = _tiny_ddpm().eval()
    x = models.ddpm_sample(model, (1, 3, 16, 16), DDPMScheduler(), generator=torch.Generator().manual_seed(0),
                           num_inference_steps=2)
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()


def test_example_input_unknown():
    with pytest.raises(KeyError):
        example_input("resnet")
