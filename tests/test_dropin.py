"""Drop-in parity: what users do to the PyTorch layers and to whole models works the same on vlfast's.

A small U-Net of plain torch layers and a small diffusers ``UNet2DModel``, converted with
``vlfast.nn.convert``, go through AMP training steps, an EMA swap through ``.data``, ``inference_mode``,
a gradient penalty (double backward), ``torch.func``, ``torch.jit.trace``, threads and ``convert`` of a
tree with hooks, parametrizations and shared modules, each against the unconverted model. The modules
also run PyTorch's own module samples (``module_db``). Each test runs under ``auto`` and with the Triton
kernels forced (under the interpreter on the CPU).
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlfast
from conftest import pytorch_module_db, run_in_threads
from vlfast import backends
from vlfast.testing import assert_close

# The models run on the GPU where there is one (gpu_check.sh runs this file), else on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["auto"] + (["triton"] if not backends.not_supported_reasons("triton", device=DEVICE) else [])
# Under the interpreter tl.dot in bfloat16 is broken: the Triton runs use float16 autocast there.
AMP_DTYPE = {"auto": torch.bfloat16, "triton": torch.float16 if backends.interpret_mode() else torch.bfloat16}


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 convolutions in full precision on both sides of each comparison."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


class TinyUNet(nn.Module):
    """Conv + GroupNorm + SiLU down, a dilated context conv, a 2x2 stride-2 transposed convolution up, the
    skip concatenated."""

    def __init__(self, c: int = 8, groups: int = 4):
        super().__init__()
        self.inc = nn.Conv2d(3, c, 3, padding=1)
        self.context = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.norm1 = nn.GroupNorm(groups, c)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.norm2 = nn.GroupNorm(groups, 2 * c)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.norm3 = nn.GroupNorm(groups, 2 * c)
        self.out = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x):
        h1 = F.silu(self.norm1(self.context(self.inc(x))))
        h2 = F.silu(self.norm2(self.down(h1)))
        h = F.silu(self.norm3(torch.cat([self.up(h2), h1], 1)))
        return self.out(h)


def pair(dtype=torch.float32, seed: int = 0):
    """(plain model, converted deep copy) with the same parameters."""
    torch.manual_seed(seed)
    plain = TinyUNet().to(DEVICE, dtype)
    return plain, vlfast.nn.convert(copy.deepcopy(plain))


def images(dtype=torch.float32, n: int = 2, seed: int = 1, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype).to(DEVICE).requires_grad_(requires_grad)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with vlfast.use_backend(request.param):
        yield request.param


def kinds(model) -> set:
    return {type(m) for m in model.modules()}


def test_convert_swaps_every_layer_and_keeps_the_outputs(backend):
    plain, fast = pair()
    assert {vlfast.nn.GroupNorm, vlfast.nn.ConvTranspose2d, vlfast.nn.Conv2d} <= kinds(fast)
    assert type(fast.inc) is nn.Conv2d  # not dilated: left to PyTorch by default
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = images()
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(fast, mode)()
        assert_close(fast(x), plain(x))


# ---------------------------------------------------------------- PyTorch's own module samples
def module_samples():
    infos = pytorch_module_db()
    return [(infos[f"nn.{name}"], getattr(vlfast.nn, name)) for name in ("GroupNorm", "ConvTranspose2d", "Conv2d")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_module_db_samples(backend, dtype):
    """Every constructor and forward sample PyTorch tests nn.GroupNorm, nn.ConvTranspose2d and nn.Conv2d with
    (the installed torch's: e.g. GroupNorm's bias=False, every Conv2d padding_mode) gives torch's outputs and
    gradients."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32, float16 and bfloat16")
    for info, drop_in in module_samples():
        for sample in info.module_inputs_func(info, device=DEVICE.type, dtype=dtype, requires_grad=True, training=True):
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            theirs = info.module_cls(*args, **kwargs).to(DEVICE, dtype)
            ours = drop_in(*args, **kwargs).to(DEVICE, dtype)
            ours.load_state_dict(theirs.state_dict())
            inputs = sample.forward_input.args
            want, got = theirs(*inputs, **sample.forward_input.kwargs), ours(*inputs, **sample.forward_input.kwargs)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert_close(got, want, name=f"{info.name}{args}{kwargs}")
            if want.numel():
                leaves = [t for t in (*inputs, *theirs.parameters()) if t.requires_grad]
                mine = [t for t in (*inputs, *ours.parameters()) if t.requires_grad]
                g = torch.randn_like(want)
                for a, b in zip(torch.autograd.grad(got, mine, g), torch.autograd.grad(want, leaves, g)):
                    assert_close(a, b, name=f"{info.name}{args}{kwargs} gradient")


def test_constructors_take_the_installed_torchs_arguments():
    import inspect
    for theirs, ours in vlfast.nn.DROP_INS.items():
        want = list(inspect.signature(theirs.__init__).parameters)
        got = list(inspect.signature(ours.__init__).parameters)
        assert got == want + ["activation"]
    assert vlfast.nn.GroupNorm(2, 4, bias=False).bias is None
    assert vlfast.nn.ConvTranspose2d(4, 2, 3, bias=False, padding_mode="zeros", dtype=torch.float64).weight.dtype \
        == torch.float64


# ---------------------------------------------------------------- training
def sgd_steps(model, dtype, steps: int = 2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for k in range(steps):
        x = images(seed=10 + k)
        with torch.autocast(DEVICE.type, dtype=dtype):
            y = model(x)
            loss = F.mse_loss(y.float(), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_amp_training_steps(backend):
    """torch.autocast hands the layers 16-bit activations and float32 weights; each layer returns the dtype
    PyTorch's does and training follows PyTorch's within the autocast dtype's tolerance."""
    dtype = AMP_DTYPE[backend]
    plain, fast = pair()
    with torch.autocast(DEVICE.type, dtype=dtype):
        for layer in (fast.up, fast.norm2):
            x = torch.randn(2, 16, 4, 4, dtype=dtype, device=DEVICE)
            twin = plain.up if layer is fast.up else plain.norm2
            assert layer(x).dtype == twin(x).dtype
    want, got = sgd_steps(plain, dtype), sgd_steps(fast, dtype)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device_type", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_follows_pytorchs_policy_per_op(device_type, dtype):
    """conv_transpose2d runs in the autocast dtype; group_norm in float32 under CUDA autocast and as given
    under CPU autocast (its inputs untouched): the dtypes PyTorch returns, on every backend."""
    dev = torch.device(device_type)
    x, w, b = torch.randn(2, 4, 5, 5, device=dev), torch.randn(4, 3, 2, 2, device=dev), torch.randn(3, device=dev)
    gw, gb = torch.randn(4, device=dev), torch.randn(4, device=dev)
    for name in [n for n in backends.BACKENDS if not backends.not_supported_reasons(n, device=dev)]:
        with torch.autocast(device_type, dtype=dtype):
            want = F.conv_transpose2d(x, w, b, stride=2)
            for forced in [name] if "conv_transpose2d" in backends.OPS and name in ("reference", "triton") else []:
                if forced == "triton" and dtype == torch.bfloat16 and backends.interpret_mode():
                    continue  # bf16 tl.dot is broken under the interpreter
                got = vlfast.ops.conv_transpose2d(x, w, b, stride=2, backend=forced)
                assert got.dtype == want.dtype
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
            for given in (x, x.to(dtype)):
                want = F.group_norm(given, 2, gw, gb)
                got = vlfast.ops.group_norm(given, 2, gw, gb, backend=name)
                assert got.dtype == want.dtype, (name, given.dtype)
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_ema_swap_through_data_writes(backend):
    """diffusers' EMAModel writes the averaged weights with ``param.data.copy_`` (no version bump): the
    next call must see them, and the restored ones after ``restore``."""
    from diffusers.training_utils import EMAModel
    plain, fast = pair()
    x = images()
    fast(x)  # whatever a kernel keeps from this call must not outlive the weights
    ema = EMAModel(fast.parameters(), decay=0.5)
    with torch.no_grad():
        for p in fast.parameters():
            p.mul_(-1.5)  # a training step's update
    ema.step(fast.parameters())
    trained = fast(x)
    ema.store(fast.parameters())
    ema.copy_to(fast.parameters())
    averaged = copy.deepcopy(plain)
    for p, q in zip(averaged.parameters(), fast.parameters()):
        p.data.copy_(q.data)
    assert_close(fast(x), averaged(x))
    ema.restore(fast.parameters())
    assert_close(fast(x), trained)
    torch._foreach_mul_([p.data for p in fast.parameters()], 0.5)
    for p in plain.parameters():
        p.data.copy_(p.data * -0.75)
    assert_close(fast(x), plain(x))


def test_inference_mode(backend):
    """A model built, converted and run under inference_mode (its weights inference tensors), and run again
    outside it where PyTorch allows (no autograd)."""
    with torch.inference_mode():
        plain, fast = pair()
        x = images()
        assert_close(fast(x), plain(x))
    with torch.no_grad():
        assert_close(fast(images()), plain(images()))


@pytest.mark.parametrize("penalty", ["r1", "wgan-gp"])
def test_gradient_penalty_double_backward(backend, penalty):
    """R1 (|grad_x D(x)|^2) and WGAN-GP ((|grad_x D(x_hat)| - 1)^2): double backward through both layers."""
    dtype = torch.float64 if backend == "auto" else torch.float32
    plain, fast = pair(dtype)
    grads = []
    for model in (plain, fast):
        x = images(dtype, requires_grad=True)
        if penalty == "wgan-gp":
            x = (0.3 * x + 0.7 * images(dtype, seed=5)).detach().requires_grad_()
        (g,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
        norm = g.flatten(1).norm(dim=1)
        loss = norm.square().mean() if penalty == "r1" else (norm - 1).square().mean()
        model.zero_grad()
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **tol)


def test_gradgradcheck_of_both_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for layer in (vlfast.nn.GroupNorm(2, 4, activation="silu"), vlfast.nn.ConvTranspose2d(4, 2, 3, stride=2)):
        layer = layer.to(DEVICE, torch.float64)
        assert torch.autograd.gradgradcheck(lambda x, *p: layer(x), (x, *layer.parameters()))


def test_torch_func():
    """functional_call + grad, per-sample gradients by vmap, jacrev and jvp: PyTorch's answers (the layers
    run their reference, plain PyTorch, under the transforms)."""
    from torch.func import functional_call, grad, jacrev, jvp, vmap
    plain, fast = pair()
    x = images()
    results = []
    for model in (plain, fast):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xs):
            return functional_call(model, p, (xs,)).square().mean()

        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
        jac = jacrev(lambda xs: functional_call(model, params, (xs,)).sum((2, 3)))(x[:1])
        tangent = jvp(lambda xs: model(xs), (x,), (torch.ones_like(x),))[1]
        results.append((per_sample, jac, tangent))
    (ps0, j0, t0), (ps1, j1, t1) = results
    for k in ps0:
        assert_close(ps1[k], ps0[k], name=k)
    assert_close(j1, j0)
    assert_close(t1, t0)
    assert vlfast.last_backend("group_norm") == "reference"


def test_forward_mode_ad():
    import torch.autograd.forward_ad as fwad
    plain, fast = pair()
    x, t = images(), images(seed=7)
    tangents = []
    for model in (plain, fast):
        with fwad.dual_level():
            tangents.append(fwad.unpack_dual(model(fwad.make_dual(x, t))).tangent)
    assert_close(tangents[1], tangents[0])


def test_transforms_refuse_a_forced_kernel_backend():
    from torch.func import grad
    layer = vlfast.nn.ConvTranspose2d(4, 2, 2, stride=2).to(DEVICE)
    x = torch.randn(1, 4, 3, 3, device=DEVICE)
    for name in [n for n in backends.BACKENDS if n != "reference"]:
        with vlfast.use_backend(name), pytest.raises(RuntimeError, match=f"backend '{name}' cannot run"):
            grad(lambda x: layer(x).sum())(x)
    with vlfast.use_backend("reference"):
        grad(lambda x: layer(x).sum())(x)


# ---------------------------------------------------------------- convert on real module trees
def test_convert_keeps_hooks_parametrizations_attributes_and_sharing():
    torch.manual_seed(0)
    shared = nn.GroupNorm(2, 4)
    shared.tag = "kept"
    calls = []
    shared.register_forward_pre_hook(lambda m, a: calls.append("pre"))
    shared.register_forward_hook(lambda m, a, out: calls.append("post"))
    wn = torch.nn.utils.weight_norm(nn.ConvTranspose2d(4, 4, 2, stride=2))
    sn = torch.nn.utils.spectral_norm(nn.ConvTranspose2d(4, 4, 2, stride=2))
    pz = nn.ConvTranspose2d(4, 4, 2, stride=2)
    torch.nn.utils.parametrize.register_parametrization(pz, "weight", nn.Tanh())
    tree = nn.Sequential(shared, wn, nn.Sequential(shared, sn), pz)
    sn.eval()  # spectral_norm's power iteration updates buffers in training: compare in eval
    x = torch.randn(2, 4, 3, 3)
    want = tree(x)
    calls.clear()
    keys = tree.state_dict().keys()
    assert vlfast.nn.convert(tree) is tree
    assert tree[0] is shared and tree[2][0] is shared and type(shared) is vlfast.nn.GroupNorm
    assert isinstance(wn, vlfast.nn.ConvTranspose2d) and isinstance(sn, vlfast.nn.ConvTranspose2d)
    assert isinstance(pz, vlfast.nn.ConvTranspose2d) and torch.nn.utils.parametrize.is_parametrized(pz, "weight")
    assert shared.tag == "kept" and tree.state_dict().keys() == keys
    assert_close(tree(x), want)
    assert calls == ["pre", "post", "pre", "post"]
    torch.nn.utils.parametrize.remove_parametrizations(pz, "weight")
    assert type(pz) is vlfast.nn.ConvTranspose2d
    assert type(vlfast.nn.convert(nn.GroupNorm(1, 2))) is vlfast.nn.GroupNorm  # a top-level module


def test_convert_leaves_subclasses_with_a_warning():
    class MyNorm(nn.GroupNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyNorm(1, 2))
    with pytest.warns(UserWarning, match="MyNorm"):
        vlfast.nn.convert(model)
    assert type(model[0]) is MyNorm


# ---------------------------------------------------------------- tracing, compiling, threads
def test_jit_trace_records_the_custom_ops_and_saves(backend):
    plain, fast = pair()
    fast.eval()
    x = images()
    traced = torch.jit.trace(fast, x)
    assert "vlfast::" in str(traced.inlined_graph)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert_close(loaded(images(seed=3)), plain.eval()(images(seed=3)))


def test_torch_export_saves_and_loads(backend):
    plain, fast = pair()
    fast.eval(), plain.eval()
    program = torch.export.export(fast, (images(),))
    assert "vlfast." in str(program.graph)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    assert_close(torch.export.load(buf).module()(images(seed=4)), plain(images(seed=4)))


def test_compiled_code_follows_the_backend_request():
    """use_backend is guarded: compiled code recompiles under another request and reuses each graph after;
    a forced backend that cannot run raises, naming it."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    layer = vlfast.nn.GroupNorm(2, 4).to(DEVICE)
    f = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    f(x)
    with vlfast.use_backend("reference"):
        f(x)
        assert vlfast.last_backend("group_norm") == "reference"
    f(x)
    with vlfast.use_backend("reference"):
        f(x)
    assert counter.frame_count == 2
    other = "cpp" if DEVICE.type == "cuda" else "cuda"
    with vlfast.use_backend(other), pytest.raises(Exception, match=f"backend '{other}' cannot run"):
        torch.compile(vlfast.nn.GroupNorm(2, 4).to(DEVICE), backend=counter, fullgraph=True)(x)


def test_threads_share_a_converted_model(backend):
    plain, fast = pair()
    inputs = [images(seed=20 + k) for k in range(4)]
    wants = [plain(x) for x in inputs]

    def work(k):
        for _ in range(3):
            assert_close(fast(inputs[k]), wants[k])
    errors = run_in_threads(work, 4)
    assert not errors, errors[0]


# ---------------------------------------------------------------- a diffusers UNet2DModel
def tiny_unet2d(seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


def test_diffusers_unet2d_converted(backend):
    plain = tiny_unet2d()
    fast = vlfast.nn.convert(copy.deepcopy(plain))
    assert vlfast.nn.GroupNorm in kinds(fast)
    plain = plain.to(DEVICE)
    fast = fast.to(DEVICE)
    x, t = images(), torch.tensor([3, 700], device=DEVICE)
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(fast, mode)()
        assert_close(fast(x, t).sample, plain(x, t).sample, rtol=1e-4, atol=1e-4)
    dtype = AMP_DTYPE[backend]
    losses = []
    for model in (plain, fast):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with torch.autocast(DEVICE.type, dtype=dtype):
            loss = F.mse_loss(model(x, t).sample.float(), x)
        loss.backward()
        opt.step()
        losses.append(model(x, t).sample.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=5e-2, atol=5e-2)
