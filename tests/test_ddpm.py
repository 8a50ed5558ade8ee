"""The fused DDPM/DDIM op on every backend against the float64 reference."""

import math

import pytest
import torch

import vlfast
from vlfast.ops.ddpm import fused_step
from vlfast.reference import ddpm as ref
from vlfast.reference.philox import randn_philox
from vlfast.testing import assert_close, assert_low_precision_close, ddpm_coef

from conftest import DT, backend_params, gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 11), (2, 3, 17, 19), (2, 4, 33, 40)]


pytestmark = pytest.mark.usefixtures("poison_empty")


make_coef = ddpm_coef


def inputs(shape, dtype, device, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, m, v, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
    v = v.abs()  # a predicted variance is positive
    if channels_last:
        x, m, v, z = (t.to(memory_format=torch.channels_last) for t in (x, m, v, z))
    return x, m, v, z


def run(backend, x, m, coef, t, **kw):
    with vlfast.use_backend(backend):
        out = fused_step(x, m, coef, t, **kw)
    assert vlfast.last_backend("ddpm_step") == backend
    return out


def expected(x, m, coef, t, dtype, **kw):
    """(float64 result, the same computed by the reference in ``dtype``)."""
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "thresh" else v)
            for k, v in kw.items()}
    hi = fused_step(x.double(), None if m is None else m.double(), coef, t, backend="reference", **kw64)
    lo = fused_step(x, m, coef, t, backend="reference", **kw)
    return hi, lo


def interpreter_ulps(device, backend, dtype) -> float:
    """2026-12: Triton 3.9's interpreter casts fp32 to bf16 by truncation, where a GPU rounds to nearest: the
    Triton kernel's bf16 outputs on CPU may be off by one more ulp."""
    return 1.0 if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16) else 0.0


def compare(got, hi, lo, dtype, name, ulps=0.0):
    if got is None:
        assert hi is None, name
        return
    assert got.dtype == dtype and got.shape == hi.shape, name
    if dtype == torch.float32:
        assert_close(got, hi, torch.float32, name=name)
    else:
        assert_low_precision_close(got, hi, lo, atol=2e-3, ulps=ulps, name=name)


OPTIONS = {
    "clip": dict(clip=1.0),
    "noclip-given-noise": dict(noise="z"),
    "thresh": dict(thresh="s"),
    "learned": dict(var_mode=ref.VAR_LEARNED, variance="v", noise="z"),
    "learned-range": dict(var_mode=ref.VAR_LEARNED_RANGE, variance="v", noise="z", clip=2.0),
    "drawn": dict(draw_noise=True, seed=1234, offset=3, write_noise=True),
    "drawn-learned-range": dict(draw_noise=True, seed=99, var_mode=ref.VAR_LEARNED_RANGE, variance="v"),
}


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_reference(device, backend, option, dtype, shape, channels_last):
    if backend == "triton" and device == "cpu" and math.prod(shape) > 2000:
        pytest.skip("interpreter: small shapes only")
    x, m, v, z = inputs(shape, dtype, device, channels_last)
    coef = make_coef().to(device)
    kw = dict(OPTIONS[option])
    kw = {k: {"z": z, "v": v}.get(val, val) if isinstance(val, str) else val for k, val in kw.items()}
    if kw.get("thresh") == "s":
        kw["thresh"] = torch.linspace(1.0, 1.5, shape[0], device=device)
    t = torch.arange(shape[0], device=device) % 12 if shape[0] > 1 else 5
    got = run(backend, x, m, coef, t, **kw)
    hi, lo = expected(x, m, coef, t, dtype, **kw)
    for name, g_, h_, l_ in zip(("prev", "x0", "noise"), got, hi, lo):
        compare(g_, h_, l_, dtype, f"{option}/{name}", interpreter_ulps(device, backend, dtype))
    if channels_last and shape[2] > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", backend_params())
def test_channel_half_of_model_output(device, backend):
    """Learned variance: model_output and variance are the two channel halves of one (B, 2C, H, W) tensor."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 6, 5, 7, generator=g).to(device)
    x = torch.randn(2, 3, 5, 7, generator=g).to(device)
    m, v = full.split(3, dim=1)
    v = v.abs()
    coef = make_coef().to(device)
    got = run(backend, x, m, coef, 3, variance=v, var_mode=ref.VAR_LEARNED, draw_noise=True, seed=5)
    want = fused_step(x, m.contiguous(), coef, 3, variance=v.contiguous(), var_mode=ref.VAR_LEARNED,
                      draw_noise=True, seed=5, backend="reference")
    assert_close(got[0], want[0], torch.float32)


@pytest.mark.parametrize("device,backend", backend_params())
def test_out_of_range_device_timestep_gives_nan(device, backend):
    x, m, _, _ = inputs((3, 2, 3, 3), torch.float32, device)
    coef = make_coef().to(device)
    t = torch.tensor([1, 12, -1], device=device)
    with vlfast.use_backend(backend):
        out = torch.ops.vlfast.ddpm_step(x, m, None, None, coef, t, 0, None, 1.0, 0, False, 0, 0, None,
                                         True, False, backend)
    assert not out[0][0].isnan().any()
    assert out[0][1:].isnan().all() and out[1][1:].isnan().all()


@pytest.mark.parametrize("device,backend", backend_params())
def test_batch_zero(device, backend):
    x = torch.empty(0, 3, 4, 4, device=device)
    got = run(backend, x, x.clone(), make_coef().to(device), 3, draw_noise=True, seed=1, write_noise=True)
    assert got[0].shape == x.shape and got[1].shape == x.shape and got[2].shape == x.shape


@pytest.mark.parametrize("device,backend", backend_params())
def test_rng_state_advances_and_offsets_noise(device, backend):
    x, m, _, _ = inputs((2, 3, 4, 5), torch.float32, device)
    coef = make_coef().to(device)
    state = torch.zeros(2, dtype=torch.int64, device=device)
    a = run(backend, x, m, coef, 4, draw_noise=True, seed=11, rng_state=state, write_noise=True)[2]
    assert state.tolist() == [1, 0]
    b = run(backend, x, m, coef, 4, draw_noise=True, seed=11, rng_state=state, write_noise=True)[2]
    assert state.tolist() == [2, 0]
    assert not torch.equal(a, b)
    # Same stream as an explicit offset: counter 1 + offset 0 == offset 1.
    c = run(backend, x, m, coef, 4, draw_noise=True, seed=11, offset=1, write_noise=True)[2]
    assert_close(b, c, torch.float32)


@pytest.mark.parametrize("device,backend", backend_params())
def test_noise_is_the_documented_stream(device, backend):
    """Backends draw the same numbers as the pure-PyTorch Philox of vlfast.reference.philox."""
    x = torch.zeros(3, 2, 5, 9, device=device)
    coef = torch.zeros(4, ref.N_COEF, device=device)
    got = run(backend, x, None, coef, 1, draw_noise=True, seed=2**40 + 17, offset=2**33 + 5, write_noise=True)[2]
    want = randn_philox(2**40 + 17, 2**33 + 5, 3, 90, device).reshape(3, 2, 5, 9)
    assert_close(got, want, torch.float32, rtol=1e-5, atol=2e-5)


def test_noise_statistics():
    """In-kernel noise: mean 0, variance 1, no correlation between neighbours, seeds and offsets differ."""
    z = randn_philox(7, 0, 4, 250_000).reshape(-1).double()
    assert abs(z.mean()) < 0.005 and abs(z.var() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < 0.005
    lanes = z.reshape(-1, 4)  # the four lanes of one Philox call
    assert torch.corrcoef(lanes.T).sub(torch.eye(4, dtype=torch.float64)).abs().max() < 0.005
    assert abs((z.abs() > 3).double().mean() - 0.0027) < 0.0005  # tails of a standard normal
    other_seed = randn_philox(8, 0, 4, 1000).reshape(-1)
    other_offset = randn_philox(7, 1, 4, 1000).reshape(-1)
    same = randn_philox(7, 0, 4, 1000).reshape(-1)
    assert torch.equal(same, randn_philox(7, 0, 4, 1000).reshape(-1))
    assert (other_seed - same).abs().mean() > 0.5
    assert (other_offset - same).abs().mean() > 0.5


@pytest.mark.parametrize("device,backend", backend_params())
def test_generator_seeding(device, backend):
    x, m, _, _ = inputs((2, 3, 4, 5), torch.float32, device)
    coef = make_coef().to(device)
    draw = lambda g: run(backend, x, m, coef, 4, draw_noise=True, generator=g, write_noise=True)[2]  # noqa: E731
    g1 = torch.Generator(device=device).manual_seed(0)
    a, b = draw(g1), draw(g1)
    a2 = draw(torch.Generator(device=device).manual_seed(0))
    c = draw(torch.Generator(device=device).manual_seed(1))
    assert torch.equal(a, a2) and not torch.equal(a, b) and not torch.equal(a, c)


BAD = [
    (dict(sample=torch.ones(2, 3, dtype=torch.int64)), TypeError, "sample"),
    (dict(sample=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "sample"),
    (dict(model_output=torch.ones(2, 4)), ValueError, "model_output"),
    (dict(model_output=torch.ones(2, 3, dtype=torch.float64)), TypeError, "model_output"),
    (dict(noise=torch.ones(3, 3)), ValueError, "noise"),
    (dict(timestep=12), ValueError, "timestep"),
    (dict(timestep=-1), ValueError, "timestep"),
    (dict(timestep=torch.tensor(1.0)), TypeError, "timestep"),
    (dict(timestep=torch.tensor([1, 2, 3])), ValueError, "timestep"),
    (dict(timestep=torch.tensor([1, 99])), ValueError, "timestep"),
    (dict(timestep="3"), TypeError, "timestep"),
]


@pytest.mark.parametrize("bad,exc,word", BAD, ids=[f"{w}-{i}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_input(bad, exc, word):
    args = dict(sample=torch.ones(2, 3), model_output=torch.ones(2, 3), timestep=3, noise=None)
    args.update(bad)
    with pytest.raises(exc, match=word):
        fused_step(args["sample"], args["model_output"], make_coef(), args["timestep"], noise=args["noise"])


def test_forced_backend_says_why():
    with pytest.raises(RuntimeError, match="cannot run"):
        fused_step(torch.ones(2, 3, dtype=torch.float64), None, make_coef(), 1, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        fused_step(torch.ones(2, 3), None, make_coef(), 1, backend="bogus")


def test_float64_falls_back_to_reference():
    fused_step(torch.ones(2, 3, dtype=torch.float64), None, make_coef(), 1)
    assert vlfast.last_backend("ddpm_step") == "reference"


@pytest.mark.parametrize("device,backend", backend_params())
def test_opcheck(device, backend):
    x, m, v, z = inputs((2, 3, 4, 5), torch.float32, device)
    coef = make_coef().to(device)
    state = torch.zeros(2, dtype=torch.int64, device=device)
    t = torch.tensor([1, 2], device=device)
    for args in [(x, m, None, z, coef, None, 3, None, 1.0, 0, False, 0, 0, None, True, True, backend),
                 (x, m, v, None, coef, t, 0, None, float("inf"), 2, True, 5, 0, state, False, True, backend)]:
        torch.library.opcheck(torch.ops.vlfast.ddpm_step.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("device,backend", backend_params())
def test_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("Inductor does not run the Triton interpreter")
    x, m, _, z = inputs((2, 3, 4, 5), torch.float32, device)
    coef = make_coef().to(device)
    torch.use_deterministic_algorithms(False)

    def step(x, m, z):
        return fused_step(x, m, coef, 3, noise=z, clip=1.0, backend=backend)[0] * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    assert_close(compiled(x, m, z), step(x, m, z), torch.float32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_draw_fresh_noise(backend):
    if vlfast.backends.not_supported_reasons(backend, device=torch.device("cuda")):
        pytest.skip(f"{backend} unavailable")
    x, m, _, _ = inputs((4, 3, 32, 32), torch.float32, "cuda")
    coef = make_coef().cuda()
    state = torch.zeros(2, dtype=torch.int64, device="cuda")
    step = lambda: fused_step(x, m, coef, 4, draw_noise=True, seed=3, rng_state=state,  # noqa: E731
                              write_noise=True, backend=backend)
    torch.use_deterministic_algorithms(False)
    step()  # warm up (compiles) outside the graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        prev, _, noise = step()
    graph.replay()
    first = noise.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, noise)
    want = randn_philox(3, int(state[0]) - 1, 4, 3 * 32 * 32, "cuda").reshape(noise.shape)
    assert_close(noise, want, torch.float32, rtol=1e-5, atol=2e-5)


def test_auto_order_can_be_replaced_per_input(monkeypatch):
    from vlfast import backends
    from vlfast.ops.ddpm import OP
    args = (torch.ones(2, 3), None, make_coef(), 1, None, None, None, None, 0, False, None, None, 0, None, True, False)
    inputs = OP.check(*args)
    monkeypatch.setattr(OP, "order", lambda direction, inputs: ("reference", "cpp"))
    assert backends.select("ddpm_step", "forward", inputs) == "reference"
    with backends.use_backend("cpp"):  # a forced backend is not overridden
        assert backends.select("ddpm_step", "forward", inputs) == "cpp"
    monkeypatch.setattr(OP, "order", lambda direction, inputs: ("reference",))  # the kernels don't pay here
    assert backends.select("ddpm_step", "forward", inputs) == "reference"
