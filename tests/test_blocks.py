"""The fused blocks of ``convert()`` (vlfast.blocks): diffusers' ResnetBlock2D and Upsample2D, vlfast.models'
DDPM ResBlock and Upsample, and convolution + eval-mode BatchNorm + activation in an nn.Sequential (the
seed U-Net's DoubleConv).

Every diffusers block configuration a small ``UNet2DModel`` takes, a ``UNet2DConditionModel`` and an
``AutoencoderKL`` are converted and compared with the unconverted model (float64 on ``auto``, float32 with
the Triton kernels forced; forward and every parameter's gradient, train and eval); the fused paths are
counted so that a silent fallback fails; a part with a hook, a parametrization or an activation vlfast
does not fuse makes its block take diffusers' own forward. The converted models keep their state_dict,
hooks, ``save_pretrained``/``from_pretrained``, dropout's random stream, autocast's dtypes and the
low-precision rule (error at most twice PyTorch's own in bfloat16), and compile.
"""

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlfast
import vlfast.blocks._common as fused
import vlfast.blocks.sequential as sequential
from vlfast import backends
from vlfast.blocks import upsample_conv_weight
from vlfast.ops import _overrides
from vlfast.testing import assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from diffusers.models.upsampling import Upsample2D  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = [] if backends.not_supported_reasons("triton", device=DEVICE) else ["triton"]

# UNet2DModel configurations: every down/up block type built of ResnetBlock2D/Upsample2D, both time-embedding
# norms, the Fourier time embedding, activations fused (silu, relu) and not (mish), dropout.
CONFIGS = {
    "down-up": dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")),
    "attn-scale-shift": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), resnet_time_scale_shift="scale_shift"),
    "resnet-up-down": dict(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "fourier-relu": dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         time_embedding_type="fourier", act_fn="relu"),
    "mish": dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 act_fn="mish"),
    "dropout": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                    dropout=0.3),
}


def unet2d(config: str, dtype=torch.float64, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, **CONFIGS[config], **kw).to(DEVICE, dtype)


def inputs(dtype=torch.float64, n: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=dtype).to(DEVICE)
    return x, torch.randint(0, 1000, (n,), generator=g).to(DEVICE)


class Calls:
    """Counts the fused calls of vlfast.blocks: GroupNorm with and without the time embedding, the
    convolution with the shortcut in its epilogue, the upsampling transposed convolution."""

    def __init__(self, monkeypatch):
        self.count = Counter()
        for name in ("group_norm", "conv2d", "conv_transpose2d"):
            monkeypatch.setattr(fused, name, self.spy(name, getattr(fused, name)))
        monkeypatch.setattr(sequential, "conv2d", self.spy("folded conv2d", sequential.conv2d))

    def spy(self, name, fn):
        def call(*args, **kwargs):
            extra = [k for k in ("add", "scale", "residual") if kwargs.get(k) is not None]
            self.count[name + "".join("+" + k for k in extra)] += 1
            return fn(*args, **kwargs)
        return call


def blocks_in(model) -> Counter:
    return Counter(type(m).__name__ for m in model.modules())


def grads(model) -> dict:
    return {name: p.grad for name, p in model.named_parameters()}


def compare(plain, fast, run, tol=None, modes=("train", "eval")):
    """Outputs and parameter gradients of ``run(model)`` (a tensor) on both models, in each mode."""
    tol = tol or {}
    for mode in modes:
        getattr(plain, mode)(), getattr(fast, mode)()
        for model in (plain, fast):
            model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        want = run(plain)
        torch.manual_seed(5)
        got = run(fast)
        if want.requires_grad:  # (an Upsample2D without a convolution has no parameters)
            want.square().sum().backward()
            got.square().sum().backward()
        assert_close(got, want, name=f"{mode} output", **tol)
        wg, gg = grads(plain), grads(fast)
        assert wg.keys() == gg.keys()
        for name in wg:
            if wg[name] is None:
                assert gg[name] is None, name
                continue
            assert_close(gg[name], wg[name], name=f"{mode} grad of {name}", **tol)


# ---------------------------------------------------------------- the folded upsampling convolution
@pytest.mark.parametrize("shape", [(2, 4, 7, 6), (1, 3, 1, 1), (3, 2, 1, 5), (1, 5, 13, 2), (0, 4, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_upsample_conv_is_nearest_upsampling_then_the_conv(shape, channels_last):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=torch.float64).to(DEVICE, memory_format=fmt).requires_grad_()
    conv = nn.Conv2d(shape[1], 6, 3, padding=1).to(DEVICE, torch.float64)
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = fused.upsample_conv(x, conv)
    assert got.shape == want.shape
    assert_close(got, want)
    if x.shape[0]:
        gw = torch.autograd.grad(want.square().sum(), (x, conv.weight, conv.bias))
        gg = torch.autograd.grad(got.square().sum(), (x, conv.weight, conv.bias))
        for name, a, b in zip(("input", "weight", "bias"), gg, gw):
            assert_close(a, b, name=f"grad of {name}")


def test_upsample_conv_weight_reads_the_weight_every_call():
    w = torch.randn(3, 2, 3, 3)
    first = upsample_conv_weight(w)
    w.data.mul_(2)
    torch.testing.assert_close(upsample_conv_weight(w), 2 * first)
    assert upsample_conv_weight(w.to(torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------- diffusers' models
@pytest.mark.parametrize("config", list(CONFIGS))
def test_unet2d_configurations_converted(config, monkeypatch):
    plain = unet2d(config)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    kinds = blocks_in(plain)
    assert type(fast.conv_in) is nn.Conv2d and fast.state_dict().keys() == plain.state_dict().keys()
    assert all(isinstance(m, vlfast.blocks.diffusers.ResnetBlock2D) for m in fast.modules()
               if isinstance(m, ResnetBlock2D))
    x, t = inputs()
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x, t).sample)
    # Two forwards (train, eval): each ResnetBlock2D fused twice (norm1; norm2 with the time embedding) and
    # its shortcut in conv2, each Upsample2D folded once; none of it where the activation is not fused.
    n_res, n_up = 2 * kinds["ResnetBlock2D"], 2 * sum(m.use_conv for m in plain.modules() if isinstance(m, Upsample2D))
    fused_act = config != "mish"
    want = {"group_norm": n_res, "group_norm+add": n_res, "conv2d+residual": n_res, "conv_transpose2d": n_up}
    if config == "attn-scale-shift":
        want["group_norm+scale"] = want.pop("group_norm+add")
    assert dict(calls.count) == ({k: v for k, v in want.items() if v} if fused_act
                                 else {k: v for k, v in want.items() if k == "conv_transpose2d" and v})


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("config", ["down-up", "attn-scale-shift"])
def test_unet2d_converted_on_the_triton_kernels(config, backend, monkeypatch):
    plain = unet2d(config, torch.float32)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x, t = inputs(torch.float32)
    with vlfast.use_backend(backend):
        compare(plain, fast, lambda m: m(x, t).sample, tol=dict(rtol=1e-4, atol=1e-4), modes=("train",))
    assert backends.last_backend("group_norm") == backend


def test_unet2d_condition_model_converted(monkeypatch):
    torch.manual_seed(0)
    plain = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).to(DEVICE, torch.float64)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x, t = inputs()
    text = torch.randn(2, 5, 8, dtype=torch.float64, device=DEVICE)
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x, t, encoder_hidden_states=text).sample)
    assert calls.count["group_norm+add"] == 2 * blocks_in(plain)["ResnetBlock2D"] > 0
    assert calls.count["conv_transpose2d"] == 2


def test_autoencoder_kl_converted(monkeypatch):
    """The VAE's ResnetBlock2D have no time embedding (temb_channels=None): norm2 without the add."""
    torch.manual_seed(0)
    plain = diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                    norm_num_groups=4, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2).to(DEVICE, torch.float64)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x, _ = inputs()
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x, sample_posterior=False).sample)
    n_res = blocks_in(plain)["ResnetBlock2D"]
    assert calls.count["group_norm"] == 2 * 2 * n_res and calls.count["conv2d+residual"] == 2 * n_res
    assert calls.count["conv_transpose2d"] == 2


# ---------------------------------------------------------------- ResnetBlock2D and Upsample2D options
RESNET_OPTIONS = {
    "shortcut-conv": dict(in_channels=8, out_channels=12, conv_shortcut=True),
    "1x1-shortcut-scaled": dict(in_channels=8, out_channels=12, output_scale_factor=2.0),
    "skip-time-act": dict(in_channels=8, skip_time_act=True),
    "scale-shift": dict(in_channels=8, time_embedding_norm="scale_shift"),
    "up": dict(in_channels=8, up=True),
    "down": dict(in_channels=8, out_channels=4, down=True),
    "sde-vp-up": dict(in_channels=8, up=True, kernel="sde_vp"),
    "groups-out": dict(in_channels=8, out_channels=12, groups_out=2),
}


@pytest.mark.parametrize("temb_batch", [2, 1])
@pytest.mark.parametrize("option", list(RESNET_OPTIONS))
def test_resnet_block_options(option, temb_batch):
    torch.manual_seed(0)
    plain = ResnetBlock2D(temb_channels=6, groups=4, **RESNET_OPTIONS[option]).to(DEVICE, torch.float64)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    assert type(fast) is vlfast.blocks.diffusers.ResnetBlock2D
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, device=DEVICE)
    temb = torch.randn(temb_batch, 6, dtype=torch.float64, device=DEVICE)
    compare(plain, fast, lambda m: m(x, temb))


def test_resnet_block_without_time_embedding_and_its_errors():
    torch.manual_seed(0)
    plain = ResnetBlock2D(in_channels=8, temb_channels=None, groups=4).double()
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    compare(plain, fast, lambda m: m(x, None))
    shifted = ResnetBlock2D(in_channels=8, groups=4, time_embedding_norm="scale_shift")
    with pytest.raises(Exception) as theirs:
        shifted(x.float(), None)
    with pytest.raises(theirs.type, match=str(theirs.value).split("(")[0]):  # diffusers' error, whatever it is
        vlfast.nn.convert(shifted)(x.float(), None)


@pytest.mark.parametrize("option", ["conv", "Conv2d_0", "output-size-doubled", "output-size-odd", "no-conv",
                                    "conv-transpose", "no-interpolate", "rms-norm", "channels-last"])
def test_upsample2d_options(option, monkeypatch):
    torch.manual_seed(0)
    kw = {"no-conv": dict(use_conv=False), "conv-transpose": dict(use_conv_transpose=True),
          "no-interpolate": dict(interpolate=False), "Conv2d_0": dict(name="Conv2d_0"),
          "rms-norm": dict(norm_type="rms_norm", eps=1e-6, elementwise_affine=True)}.get(option, {})
    plain = Upsample2D(6, use_conv=kw.pop("use_conv", True), out_channels=4, **kw).to(DEVICE, torch.float64)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, device=DEVICE)
    if option == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    size = {"output-size-doubled": (10, 14), "output-size-odd": (9, 13)}.get(option)
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x, size) if option != "no-interpolate" else m(x.repeat_interleave(2, -1)))
    folded = option in ("conv", "Conv2d_0", "output-size-doubled", "rms-norm", "channels-last")
    assert calls.count["conv_transpose2d"] == (2 if folded else 0)
    if option == "channels-last":
        assert fast(x).is_contiguous(memory_format=torch.channels_last)


def test_parts_with_hooks_or_parametrizations_fall_back(monkeypatch):
    """A hook on a part sees that part's call (the block runs diffusers' forward); so does a
    parametrized convolution; the other blocks stay fused."""
    plain = unet2d("down-up")
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    seen = []
    hooked = fast.down_blocks[0].resnets[0]
    hooked.norm2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    nn.utils.parametrizations.weight_norm(fast.up_blocks[0].upsamplers[0].conv)
    nn.utils.parametrizations.weight_norm(plain.up_blocks[0].upsamplers[0].conv)
    x, t = inputs()
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x, t).sample, modes=("eval",))
    assert seen == [(2, 8, 8, 8)]
    assert calls.count["group_norm+add"] == blocks_in(plain)["ResnetBlock2D"] - 1
    assert calls.count["conv_transpose2d"] == 0


def test_a_hook_on_the_block_itself_is_kept():
    fast = vlfast.nn.convert(unet2d("down-up"))
    seen = []
    fast.mid_block.resnets[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__module__))
    fast(*inputs())
    assert seen == ["vlfast.blocks.diffusers"]


def test_dropout_draws_the_same_random_stream():
    plain = unet2d("dropout")
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x, t = inputs()
    plain.train(), fast.train()
    torch.manual_seed(3)
    want = plain(x, t).sample
    torch.manual_seed(3)
    assert_close(fast(x, t).sample, want)


# ---------------------------------------------------------------- what the converted model keeps
def test_state_dict_and_pretrained_round_trip(tmp_path):
    plain = unet2d("attn-scale-shift", torch.float32)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x, t = inputs(torch.float32)
    want = plain.eval()(x, t).sample
    fast.eval().save_pretrained(tmp_path / "fast")
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "fast").to(DEVICE).eval()
    assert type(back.down_blocks[0].resnets[0]) is ResnetBlock2D  # loads into diffusers' own classes
    assert_close(back(x, t).sample, want)
    again = vlfast.nn.convert(back)
    assert_close(again(x, t).sample, want)
    other = vlfast.nn.convert(unet2d("attn-scale-shift", torch.float32, seed=9)).eval()
    other.load_state_dict(plain.state_dict(), strict=True)
    assert_close(other(x, t).sample, want)
    torch.save(fast, tmp_path / "model.pt")  # the fused classes pickle by name
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded.mid_block.resnets[0]) is vlfast.blocks.diffusers.ResnetBlock2D
    assert_close(loaded(x, t).sample, want)


def test_convert_twice_and_without_blocks():
    plain = unet2d("down-up")
    fast = vlfast.nn.convert(vlfast.nn.convert(copy.deepcopy(plain)))
    assert blocks_in(fast) == blocks_in(plain)
    assert type(fast.mid_block.resnets[0]) is vlfast.blocks.diffusers.ResnetBlock2D
    layers_only = vlfast.nn.convert(copy.deepcopy(plain), blocks=False)
    assert type(layers_only.mid_block.resnets[0]) is ResnetBlock2D
    assert type(layers_only.mid_block.resnets[0].norm1) is vlfast.nn.GroupNorm
    x, t = inputs()
    assert_close(layers_only(x, t).sample, plain(x, t).sample)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bfloat16_model_within_twice_pytorchs_error(channels_last):
    """The converted model in bfloat16 against the float64 model: its error at most twice that of the
    unconverted model in bfloat16 (in the norm over the output), under autocast and as a bfloat16 model."""
    plain64 = unet2d("attn-scale-shift")
    x64, t = inputs(size=16)
    want = plain64.eval()(x64, t).sample
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for autocast in (False, True):
        dtype = torch.float32 if autocast else torch.bfloat16
        plain = copy.deepcopy(plain64).to(dtype, memory_format=fmt).eval()
        fast = vlfast.nn.convert(copy.deepcopy(plain))
        x = x64.to(dtype, memory_format=fmt)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            theirs, ours = plain(x, t).sample, fast(x, t).sample
        assert ours.dtype == theirs.dtype
        err = (ours.double() - want).norm() / want.norm()
        own = (theirs.double() - want).norm() / want.norm()
        assert err <= 2 * own + 1e-6, f"autocast={autocast}: error {err:.3g}, PyTorch's own {own:.3g}"


def test_compiles():
    plain = unet2d("attn-scale-shift", torch.float32).eval()
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x, t = inputs(torch.float32)
    compiled = torch.compile(fast, backend="aot_eager")  # Dynamo and AOTAutograd through the blocks' ops
    with torch.no_grad():
        assert_close(compiled(x, t).sample, plain(x, t).sample, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- vlfast.models' DDPM U-Net
def test_ddpm_unet_blocks(monkeypatch):
    from vlfast.models import MODELS, example_input
    from vlfast.models import ddpm_unet
    torch.manual_seed(0)
    plain = MODELS["ddpm_unet"]().to(DEVICE, torch.float64)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    n_res = sum(type(m) is ddpm_unet.ResBlock for m in plain.modules())
    n_up = sum(type(m) is ddpm_unet.Upsample for m in plain.modules())
    assert n_res and n_up
    assert sum(type(m) is vlfast.blocks.models.ResBlock for m in fast.modules()) == n_res
    x, t = (a.to(DEVICE) for a in example_input("ddpm_unet", 2, dtype=torch.float64))
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x, t))
    assert calls.count["group_norm+add"] == calls.count["conv2d+residual"] == 2 * n_res
    assert calls.count["conv_transpose2d"] == 2 * n_up
    last_up = [m for m in fast.modules() if isinstance(m, ddpm_unet.Upsample)][-1]
    last_up.conv.register_forward_hook(lambda *a: None)  # that Upsample's own forward from now on
    assert_close(fast.eval()(x, t), plain.eval()(x, t))


# ---------------------------------------------------------------- Conv2d -> BatchNorm2d -> activation
@pytest.fixture
def fold():
    """The fold forced on (by default it runs on CUDA tensors only)."""
    with _overrides.use(fold_batchnorm=True):
        yield


def trained_bn(model, x, steps: int = 2):
    """Running statistics that are not the initial (0, 1): a few training-mode forwards."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model


def test_seed_unet_folds_batchnorm_in_eval(fold, monkeypatch):
    from vlfast.models import MODELS, example_input
    from vlfast.models.unet import DoubleConv
    torch.manual_seed(0)
    (x,) = (a.to(DEVICE) for a in example_input("unet", 2, dtype=torch.float64))
    plain = trained_bn(MODELS["unet"]().to(DEVICE, torch.float64), x)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    n_double = sum(isinstance(m, DoubleConv) for m in plain.modules())
    assert sum(type(m) is vlfast.blocks.models.DoubleConv for m in fast.modules()) == n_double
    calls = Calls(monkeypatch)
    written = []
    monkeypatch.setattr(vlfast.blocks.models, "conv_transpose2d",
                        lambda *a, out, **k: written.append(out.shape) or vlfast.ops.conv_transpose2d(*a, out=out, **k))
    compare(plain, fast, lambda m: m(x))  # train: BatchNorm on batch statistics, nothing folded
    assert calls.count["folded conv2d"] == 2 * n_double  # eval only: two convolutions each
    assert len(written) == 2 * 4  # each up-conv into its half of the concatenation, train and eval
    torch.testing.assert_close(fast.state_dict(), plain.state_dict(), rtol=0, atol=0)  # the same running stats
    for fmt in (torch.channels_last, torch.contiguous_format):
        xf = x.to(memory_format=fmt)
        assert fast.eval()(xf).stride() == plain.eval()(xf).stride()
    odd = x[..., :-3, :-5]  # 29x27: pooled sizes floor, the up step pads: the unfused path
    written.clear()
    assert_close(fast(odd), plain(odd))
    assert len(written) < 4
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got, want = fast.float()(x.float()), plain.float()(x.float())
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("case", ["relu", "silu", "no-activation", "bias-no-affine", "grouped-strided",
                                  "channels-last"])
def test_sequential_conv_batchnorm_activation(fold, case, monkeypatch):
    torch.manual_seed(0)
    bias, affine = case == "bias-no-affine", case != "bias-no-affine"
    groups, stride = (2, 2) if case == "grouped-strided" else (1, 1)
    layers = [nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=bias, groups=groups),
              nn.BatchNorm2d(6, affine=affine)]
    layers += {"relu": [nn.ReLU(inplace=True)], "silu": [nn.SiLU()], "no-activation": []}.get(case, [nn.ReLU()])
    layers += [nn.Conv2d(6, 3, 1)]
    x = torch.randn(3, 4, 9, 7, dtype=torch.float64, device=DEVICE)
    if case == "channels-last":
        x = x.to(memory_format=torch.channels_last)
    plain = trained_bn(nn.Sequential(*layers).to(DEVICE, torch.float64), x)
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    assert type(fast) is vlfast.blocks.Sequential and type(fast[0]) is nn.Conv2d  # not dilated: left as it is
    calls = Calls(monkeypatch)
    compare(plain, fast, lambda m: m(x))
    assert calls.count["folded conv2d"] == 1
    if case == "channels-last":
        assert fast.eval()(x).is_contiguous(memory_format=torch.channels_last)


def test_folded_batchnorm_reads_live_statistics_and_honours_hooks(fold, monkeypatch):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double().eval()
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert_close(fast(x), plain(x))
    for model in (plain, fast):
        model[1].running_var.data.mul_(3)  # a .data write: the next call folds the new statistics
        model[1].running_mean.add_(0.5)
    assert_close(fast(x), plain(x))
    calls = Calls(monkeypatch)
    seen = []
    fast[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_close(fast(x), plain(x))
    assert seen == [(2, 4, 4, 4)] and calls.count["folded conv2d"] == 0
    untracked = vlfast.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    untracked.double().eval()(x)  # batch statistics in eval: nothing to fold
    assert calls.count["folded conv2d"] == 0
    assert type(vlfast.nn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))) is nn.Sequential


def test_folded_batchnorm_on_the_triton_kernels(fold):
    if not TRITON:
        pytest.skip("Triton cannot run here")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    plain = trained_bn(nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8),
                                     nn.ReLU()).to(DEVICE), x).eval()
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    with vlfast.use_backend("triton"):
        assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)
    assert backends.last_backend("conv2d") == "triton"


def test_batchnorm_fold_is_off_on_cpu_tensors_by_default(monkeypatch):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    calls = Calls(monkeypatch)
    x = torch.randn(2, 3, 6, 6)
    assert_close(fast(x), plain(x))
    assert calls.count["folded conv2d"] == 0
    with _overrides.use(fold_batchnorm=False):
        fast.to(DEVICE)(x.to(DEVICE))
    assert calls.count["folded conv2d"] == 0
