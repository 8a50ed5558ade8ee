"""vlfast.schedulers against diffusers' DDPMScheduler / DDIMScheduler, on every backend.

Golden values: diffusers run in float64 on upcast inputs, with its float32 ``alphas_cumprod``
upcast too (diffusers' own float32 ``1 - ab_t / ab_prev`` loses ~5e-4 of beta_t at small t,
which our float64 table does not). Noise is injected: our ``noise=`` / ``variance_noise=``,
diffusers' ``randn_tensor`` patched to return it.
"""

import copy
import importlib.util
import pickle
from unittest import mock

import pytest
import torch

import vlfast
from vlfast.schedulers import DDIMScheduler, DDIMSchedulerOutput, DDPMScheduler, DDPMSchedulerOutput
from vlfast.testing import assert_close, assert_low_precision_close

from conftest import backend_params, gpu

OURS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
NO_KERNELS = pytest.mark.skip(reason="vlfast.kernels is not importable yet (package not installed)")
KERNELS = importlib.util.find_spec("vlfast.kernels") is not None
BACKENDS = [pytest.param(*p.values, id=p.id, marks=[NO_KERNELS] if p.values[1] == "triton" and not KERNELS else [])
            for p in backend_params()]
CUDA_BACKENDS = [p for p in BACKENDS if p.values[0] == "cuda"]


def shape_for(backend):
    return (2, 3, 5, 7) if backend == "triton" else (3, 5, 7, 11)  # the interpreter is slow


pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.fixture(scope="module")
def dif():
    return pytest.importorskip("diffusers")


def inputs(shape, kw=None, seed=0, dtype=torch.float32):
    """(x, model_output, noise); model_output has 2C channels for the learned variance types."""
    g = torch.Generator().manual_seed(seed)
    x, m, z, v = (torch.randn(shape, generator=g) for _ in range(4))
    vt = (kw or {}).get("variance_type")
    if vt in ("learned", "learned_range"):
        m = torch.cat([m, 0.01 * v.abs() if vt == "learned" else v.tanh()], 1)  # a variance / a value in [-1, 1]
    return x.to(dtype), m.to(dtype), z.to(dtype)


def pair(dif, kind, kw):
    """(ours, diffusers', diffusers' upcast to float64) schedulers with the same config."""
    dkw = dict(kw)
    if dkw.get("variance_type") == "fixed_large_log":
        dkw["variance_type"] = "fixed_large"  # diffusers' fixed_large_log is NaN; ours equals fixed_large
    theirs = getattr(dif, OURS[kind].__name__)(**dkw)
    hi = copy.deepcopy(theirs)
    hi.alphas_cumprod = hi.alphas_cumprod.double()
    if kind == "ddpm":
        hi.one = hi.one.double()
    else:
        hi.final_alpha_cumprod = hi.final_alpha_cumprod.double()
    return OURS[kind](**kw), theirs, hi


def diffusers_step(sched, kind, m, t, x, z, f64=True, **kw):
    """(prev, x0) of diffusers' step with noise z, per sample when t is a (B,) tensor."""
    if isinstance(t, torch.Tensor) and t.dim() == 1:
        outs = [diffusers_step(sched, kind, m[i:i + 1], int(t[i]), x[i:i + 1], z[i:i + 1], f64, **kw)
                for i in range(x.shape[0])]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    if f64:
        m, x, z = m.double(), x.double(), z.double()
    if kind == "ddim":
        return sched.step(m, t, x, variance_noise=z, return_dict=False, **kw)
    with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: z.to(k["dtype"])):
        return sched.step(m, t, x, return_dict=False)


def public(config) -> dict:
    """A config without diffusers' bookkeeping entries (_class_name, _use_default_values, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def interpreter_ulps(device, backend, dtype) -> float:
    """2026-12: Triton 3.9's interpreter casts fp32 to bf16 by truncation, where a GPU rounds to nearest: the
    Triton kernel's bf16 outputs on CPU may be off by one more ulp."""
    return 1.0 if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16) else 0.0


def to(device, *ts):
    """Copies on ``device`` that keep each tensor's memory format."""
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]


def noisy(kind, z, eta=1.0):
    """step kwargs that inject the noise z (DDIM: with eta)."""
    return dict(eta=eta, variance_noise=z) if kind == "ddim" else dict(noise=z)


def ours_step(sched, kind, device, backend, m, t, x, z, **kw):
    """(prev, x0) of our step on ``device`` (a tensor t travels too), back on the CPU."""
    m, t, x, z = to(device, m, t, x, z)
    with vlfast.use_backend(backend):
        out = sched.step(m, t, x, **({"variance_noise": z} if kind == "ddim" else {"noise": z}), **kw)
    assert vlfast.last_backend("ddpm_step") == backend
    return out.prev_sample.cpu(), out.pred_original_sample.cpu()


def set_schedule(scheds, steps):
    for s in scheds:
        if steps is not None:
            s.set_timesteps(timesteps=steps) if isinstance(steps, list) else s.set_timesteps(steps)


# name: (kind, kwargs, set_timesteps argument, step kwargs); every option value at least once.
CASES = {
    "ddpm-linear-eps-small-clip": ("ddpm", {}, None, {}),
    "ddpm-scaled-v-smalllog-clip2": ("ddpm", dict(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                                  variance_type="fixed_small_log", clip_sample_range=2.0), None, {}),
    "ddpm-cos-sample-large-noclip": ("ddpm", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                                  variance_type="fixed_large", clip_sample=False), 10, {}),
    "ddpm-sigmoid-eps-largelog": ("ddpm", dict(beta_schedule="sigmoid", variance_type="fixed_large_log"), None, {}),
    "ddpm-learned-thresh": ("ddpm", dict(variance_type="learned", thresholding=True, dynamic_thresholding_ratio=0.9,
                                         sample_max_value=2.5), 20, {}),
    "ddpm-learnedrange-v-zerosnr-trailing": ("ddpm", dict(variance_type="learned_range", prediction_type="v_prediction",
                                                          rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                                             10, {}),
    "ddpm-sample-thresh-linspace": ("ddpm", dict(prediction_type="sample", thresholding=True, sample_max_value=1.5,
                                                 timestep_spacing="linspace"), 10, {}),
    "ddpm-leading-offset": ("ddpm", dict(steps_offset=1), 20, {}),
    "ddpm-custom-trained": ("ddpm", dict(num_train_timesteps=100, trained_betas=[1e-3 + 5e-4 * i for i in range(100)]),
                            [90, 61, 30, 4, 0], {}),
    "ddim-linear-eps-eta0": ("ddim", {}, 10, {}),
    "ddim-scaled-v-eta1-clipped-final": ("ddim", dict(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                                      set_alpha_to_one=False, timestep_spacing="trailing"),
                                         10, dict(eta=1.0, use_clipped_model_output=True)),
    "ddim-cos-sample-eta05-linspace": ("ddim", dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                                    clip_sample_range=1.5, timestep_spacing="linspace"),
                                       10, dict(eta=0.5)),
    "ddim-thresh-clipped-offset": ("ddim", dict(thresholding=True, steps_offset=1, sample_max_value=2.0),
                                   20, dict(eta=0.3, use_clipped_model_output=True)),
    "ddim-v-zerosnr-trailing": ("ddim", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                             timestep_spacing="trailing", clip_sample=False), 10, dict(eta=1.0)),
    "ddim-sample-noclip-7steps": ("ddim", dict(prediction_type="sample", clip_sample=False), 7, dict(eta=1.0)),
}
LOWP_CASES = ["ddpm-linear-eps-small-clip", "ddpm-learnedrange-v-zerosnr-trailing", "ddpm-learned-thresh",
              "ddim-scaled-v-eta1-clipped-final", "ddim-thresh-clipped-offset"]
LOWP = ((torch.float16, "fp16"), (torch.bfloat16, "bf16"))
DTYPE_CASES = [pytest.param(c, torch.float32, id=f"{c}-fp32") for c in CASES] + [
    pytest.param(c, d, id=f"{c}-{n}") for c in LOWP_CASES for d, n in LOWP]


def case_timesteps(sched, steps):
    if steps is None:
        return [999, 500, 1, 0]
    ts = sched.timesteps.tolist()
    return sorted({ts[0], ts[len(ts) // 2], ts[-1]}, reverse=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", DTYPE_CASES)
def test_step_matches_diffusers(dif, device, backend, case, dtype):
    """fp32: close to diffusers in float64; fp16/bf16: at most twice diffusers' own error in that dtype, plus atol."""
    kind, kw, steps, step_kw = CASES[case]
    ours, lo, hi = pair(dif, kind, kw)
    set_schedule((ours, lo, hi), steps)
    x, m, z = inputs(shape_for(backend), kw, dtype=dtype)
    for t in case_timesteps(ours, steps):
        got = ours_step(ours, kind, device, backend, m, t, x, z, **step_kw)
        want = diffusers_step(hi, kind, m, t, x, z, **step_kw)
        lowp = diffusers_step(lo, kind, m, t, x, z, f64=False, **step_kw) if dtype != torch.float32 else want
        for name, a, b, c in zip(("prev_sample", "pred_original_sample"), got, want, lowp):
            assert a.dtype == dtype
            if dtype == torch.float32:
                assert_close(a, b, name=f"{name} at t={t}")
            else:
                assert_low_precision_close(a, b, c, ulps=interpreter_ulps(device, backend, dtype),
                                           name=f"{name} at t={t}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("variant", ["1x1x1x1", "prime", "channels_last", "per_sample_t"])
@pytest.mark.parametrize("case", ["ddpm-linear-eps-small-clip", "ddpm-learned-thresh", "ddim-thresh-clipped-offset",
                                  "ddim-scaled-v-eta1-clipped-final"])
def test_step_shapes_layouts_per_sample(dif, device, backend, variant, case):
    """Odd shapes, channels_last, and a (B,) timestep tensor (diffusers run per sample)."""
    kind, kw, steps, step_kw = CASES[case]
    shape = {"1x1x1x1": (1, 1, 1, 1), "prime": shape_for(backend), "channels_last": (2, 4, 6, 5),
             "per_sample_t": (3, 2, 3, 5)}[variant]
    ours, _, hi = pair(dif, kind, kw)
    set_schedule((ours, hi), steps)
    x, m, z = inputs(shape, kw, seed=1)
    if variant == "channels_last":
        x, m = x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
    ts = ours.timesteps.tolist()
    t = torch.tensor([ts[0], ts[-1], ts[len(ts) // 2]]) if variant == "per_sample_t" else ours.timesteps[1]
    got = ours_step(ours, kind, device, backend, m, t, x, z, **step_kw)
    want = diffusers_step(hi, kind, m, t, x, z, **step_kw)
    for name, a, b in zip(("prev_sample", "pred_original_sample"), got, want):
        assert a.shape == x.shape
        assert_close(a, b, name=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_t0_adds_no_noise(device, backend, variance_type):
    kw = dict(variance_type=variance_type)
    sched = DDPMScheduler(**kw)
    x, m, z = to(device, *inputs((2, 3, 5, 7), kw, seed=3))
    gen = lambda s: torch.Generator(device).manual_seed(s)  # noqa: E731
    t = lambda *v: torch.tensor(v if len(v) > 1 else v[0], device=device)  # noqa: E731
    with vlfast.use_backend(backend):
        a = sched.step(m, 0, x, noise=z).prev_sample
        same = [sched.step(m, 0, x, noise=-z), sched.step(m, t(0), x, generator=gen(1)),
                sched.step(m, t(0, 0), x, generator=gen(2))]
        mixed = sched.step(m, t(0, 5), x, noise=z).prev_sample
        other = sched.step(m, 5, x, noise=-z).prev_sample
    for out in same:
        torch.testing.assert_close(out.prev_sample, a, rtol=0, atol=0)
    torch.testing.assert_close(mixed[0], a[0], rtol=0, atol=0)
    assert not torch.equal(mixed[1], other[1])


def standard_normal(drawn, sched, kind, m, t, x):
    """Whether (drawn - step with noise 0) / (step with noise 1 - step with noise 0) looks like N(0, 1)."""
    base, unit = (sched.step(m, t, x, **noisy(kind, torch.full_like(x, v))).prev_sample for v in (0.0, 1.0))
    eps = (drawn - base) / (unit - base)
    return abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("gen_device", ["cpu", "sample"])
def test_in_kernel_noise(device, backend, kind, gen_device):
    """Same seed, same output; another seed or the next step differs; the noise is standard normal."""
    if gen_device == "sample" and device == "cpu":
        pytest.skip("the same as a CPU generator")
    x, m, _ = to(device, *inputs((4, 8, 32), seed=4))
    seed = lambda s: torch.Generator(device if gen_device == "sample" else "cpu").manual_seed(s)  # noqa: E731

    def fresh():
        s = OURS[kind](clip_sample=False)
        s.set_timesteps(10, device=device)
        return s

    sched = fresh()
    t = sched.timesteps[3]  # a 0-d tensor on the device, as pipelines pass it
    eta = dict(eta=1.0) if kind == "ddim" else {}
    with vlfast.use_backend(backend):
        draw = lambda s, g: s.step(m, t, x, generator=g, **eta).prev_sample  # noqa: E731
        a = draw(sched, seed(0))
        torch.testing.assert_close(draw(fresh(), seed(0)), a, rtol=0, atol=0)
        sched.set_timesteps(10, device=device)  # restarts the noise counter: reproducible again
        torch.testing.assert_close(draw(sched, seed(0)), a, rtol=0, atol=0)
        assert not torch.equal(draw(fresh(), seed(1)), a)
        g = seed(0)
        assert not torch.equal(draw(sched, g), draw(sched, g))
        assert not torch.equal(draw(sched, None), draw(sched, None))
        assert standard_normal(a, sched, kind, m, t, x)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_add_noise_and_velocity(dif, device, backend):
    ours, theirs = DDPMScheduler(beta_schedule="scaled_linear"), dif.DDPMScheduler(beta_schedule="scaled_linear")
    x, _, z = inputs((3, 2, 3, 5), seed=5)
    xd, zd = to(device, x, z)
    for t in (torch.tensor([999, 0, 412]), torch.tensor(17), 17):
        with vlfast.use_backend(backend):
            out = ours.add_noise(xd, zd, *to(device, t)).cpu()
        assert_close(out, theirs.add_noise(x, z, torch.as_tensor(t)), name=f"add_noise at t={t}")
        t = torch.as_tensor(t)
        assert_close(ours.get_velocity(xd, zd, t.to(device)).cpu(), theirs.get_velocity(x, z, t), name="get_velocity")
    t = torch.tensor([999, 0, 412])
    with vlfast.use_backend(backend):
        out, eps = ours.add_noise_fresh(xd, t.to(device), generator=torch.Generator().manual_seed(0))
        again, _ = DDPMScheduler(beta_schedule="scaled_linear").add_noise_fresh(
            xd, t.to(device), generator=torch.Generator().manual_seed(0))
    assert eps.shape == x.shape and eps.dtype == x.dtype and eps.device == xd.device
    assert_close(out.cpu(), theirs.add_noise(x, eps.cpu(), t), name="add_noise_fresh")
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
@pytest.mark.parametrize("zero_snr", [False, True], ids=["default", "zerosnr-trailing"])
def test_sampling_loop(dif, device, backend, kind, eta, zero_snr):
    """Ten steps from pure noise with a toy model, noise injected, against diffusers in float64; with a
    zero terminal SNR the first step (t = 999, alphas_cumprod = 0) clips diffusers' infinite x0."""
    kw = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}
    ours, _, hi = pair(dif, kind, kw)
    set_schedule((ours, hi), 10)
    x, _, _ = inputs((2, 3, 4, 5), seed=6)
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(x.shape, generator=g) for _ in range(10)]
    model = lambda s, t: 0.9 * s + 0.05 * torch.sin(s * (t.double() / 100.0)).to(s.dtype)  # noqa: E731
    mine, ref = x.clone(), x.double()
    step_kw = dict(eta=eta) if kind == "ddim" else {}
    for i, t in enumerate(ours.timesteps):
        mine = ours_step(ours, kind, device, backend, model(mine, t), t, mine, noises[i], **step_kw)[0]
        ref = diffusers_step(hi, kind, model(ref, t), t, ref, noises[i], **step_kw)[0]
    assert_close(mine, ref, rtol=1e-4, atol=1e-4, name="sample after 10 steps")


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_set_timesteps_matches_diffusers(dif, kind, spacing, steps_offset):
    ours, theirs, _ = pair(dif, kind, dict(timestep_spacing=spacing, steps_offset=steps_offset))
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for n in (1, 3, 7, 10, 50, 999, 1000):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.dtype == theirs.timesteps.dtype
        assert torch.equal(ours.timesteps, theirs.timesteps), (n, ours.timesteps, theirs.timesteps)
        assert ours.num_inference_steps == theirs.num_inference_steps == n
        for t in theirs.timesteps[:5].tolist() if kind == "ddpm" else []:
            assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))


def test_custom_timesteps_and_table(dif):
    ours, theirs = DDPMScheduler(), dif.DDPMScheduler()
    x, m, z = inputs((2, 2, 3, 3))
    assert not torch.isnan(ours.step(m, 500, x, noise=z).prev_sample).any()  # every t before set_timesteps
    table = ours._table("step", x.device)
    for s in (ours, theirs):
        s.set_timesteps(timesteps=[999, 700, 300, 10, 0])
    assert ours._table("step", x.device) is table  # refreshed in place (a captured CUDA graph stays valid)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.custom_timesteps
    for t in [999, 700, 300, 10, 0]:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))
    with pytest.raises(ValueError, match="timestep 500 is not in the schedule"):
        ours.step(m, 500, x, noise=z)
    with pytest.raises(ValueError, match="timestep 500 is not in the schedule"):
        ours.step(m, torch.tensor([500, 300]), x, noise=z)  # a host tensor is checked like an int


@gpu
def test_device_timestep_out_of_schedule_gives_nan():
    ours = DDPMScheduler()
    ours.set_timesteps(timesteps=[999, 700, 300, 10, 0])
    x, m, z = to("cuda", *inputs((2, 2, 3, 3)))
    prev = ours.step(m, torch.tensor([500, 300], device="cuda"), x, noise=z).prev_sample  # read on the device
    assert torch.isnan(prev[0]).all() and not torch.isnan(prev[1]).any()


def test_fixed_large_log_equals_fixed_large():  # diffusers' own fixed_large_log is NaN: see DDPMScheduler
    x, m, z = inputs((2, 3, 4, 5), seed=8)
    a, b = DDPMScheduler(variance_type="fixed_large"), DDPMScheduler(variance_type="fixed_large_log")
    torch.testing.assert_close(b._table("step", x.device), a._table("step", x.device))
    for t in (999, 300, 1, 0):
        torch.testing.assert_close(b.step(m, t, x, noise=z).prev_sample, a.step(m, t, x, noise=z).prev_sample)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "zero_snr"])
def test_config_and_attributes_match_diffusers(dif, kind, schedule):
    ddpm_only = schedule in ("sigmoid", "laplace")
    if kind == "ddim" and ddpm_only:
        pytest.skip("diffusers' DDIM has no such beta_schedule")
    kw = dict(rescale_betas_zero_snr=True) if schedule == "zero_snr" else dict(beta_schedule=schedule)
    ours, theirs, _ = pair(dif, kind, kw)
    for name in ("betas", "alphas", "alphas_cumprod", "timesteps"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert public(ours.config) == public(theirs.config)
    assert set(ours.config["_use_default_values"]) == set(theirs.config["_use_default_values"])
    assert ours.config.num_train_timesteps == ours.config["num_train_timesteps"] == len(ours) == len(theirs)
    assert (ours.init_noise_sigma, ours.order) == (theirs.init_noise_sigma, theirs.order)
    x = torch.randn(1, 2, 3)
    assert ours.scale_model_input(x, 3) is x
    # from_config: diffusers' config (with _class_name etc.), the other scheduler's; kwargs override; and back
    converted = OURS[kind].from_config(theirs.config, clip_sample=False)
    assert public(converted.config) == dict(public(ours.config), clip_sample=False)
    if not ddpm_only:
        assert torch.equal(OURS[{"ddpm": "ddim", "ddim": "ddpm"}[kind]].from_config(ours.config).alphas_cumprod,
                           ours.alphas_cumprod)
    assert getattr(dif, OURS[kind].__name__).from_config(ours.config).config["beta_schedule"] == kw.get(
        "beta_schedule", "linear")
    assert pickle.loads(pickle.dumps(ours.config)) == ours.config and copy.deepcopy(ours).config == ours.config
    for mutate in (lambda: ours.config.update(clip_sample=False), lambda: ours.config.pop("clip_sample")):
        with pytest.raises(Exception):  # diffusers' FrozenDict (or ours without diffusers)
            mutate()
    ours.set_timesteps(10)
    x, m, z = inputs((1, 2, 3, 3))
    out = ours.step(m, ours.timesteps[0], x, **noisy(kind, z))
    assert isinstance(out, DDPMSchedulerOutput if kind == "ddpm" else DDIMSchedulerOutput)
    tup = ours.step(m, ours.timesteps[0], x, return_dict=False, **noisy(kind, z))
    torch.testing.assert_close(tup, (out.prev_sample, out.pred_original_sample), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_bad_options_raise(kind):
    bad = [("beta_schedule", "cosine"), ("prediction_type", "noise"), ("timestep_spacing", "uniform")]
    bad += [("variance_type", "small")] if kind == "ddpm" else [("beta_schedule", "sigmoid")]
    for arg, value in bad:
        with pytest.raises(ValueError, match=arg):
            OURS[kind](**{arg: value})


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("thresholding", [False, True], ids=["clip", "thresh"])
def test_bad_inputs_raise(kind, thresholding):
    sched = OURS[kind](thresholding=thresholding)
    x, m, z = inputs((2, 3, 4, 5))
    if kind == "ddim":
        with pytest.raises(ValueError, match="set_timesteps"):
            sched.step(m, 10, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(1001)
    sched.set_timesteps(1000)
    step = sched.step
    cases = [(ValueError, "model_output", lambda: step(m[:, :2], 10, x)),
             (TypeError, "sample", lambda: step(m.long(), 10, x.long())),
             (TypeError, "sample", lambda: step(m.to(torch.complex64), 10, x.to(torch.complex64))),
             (TypeError, "timestep", lambda: step(m, torch.tensor(10.0), x)),
             (ValueError, "timestep", lambda: step(m, 1000, x)),
             (ValueError, "timestep", lambda: step(m, -1, x)),
             (ValueError, "timestep", lambda: step(m, torch.tensor([1, 2, 3]), x))]
    if kind == "ddim":
        cases += [(ValueError, "variance_noise", lambda: step(m, 10, x, eta=1.0, variance_noise=z[:1])),
                  (ValueError, "generator",
                   lambda: step(m, 10, x, eta=1.0, variance_noise=z, generator=torch.Generator()))]
    else:
        cases += [(ValueError, "noise", lambda: step(m, 10, x, noise=z[:1])),
                  (ValueError, "descending", lambda: sched.set_timesteps(timesteps=[10, 20])),
                  (ValueError, "num_inference_steps", lambda: sched.set_timesteps(10, timesteps=[20, 10])),
                  (ValueError, "model_output", lambda: DDPMScheduler(variance_type="learned").step(m, 10, x))]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()


# ---------------------------------------------------------------- zero SNR, generator lists, float64
ZERO_SNR = {  # name: (kind, kwargs, step kwargs); "epsilon" with rescale_betas_zero_snr, first step t = 999
    "ddpm-clip": ("ddpm", {}, {}),
    "ddpm-clip2.5-v-large": ("ddpm", dict(clip_sample_range=2.5, variance_type="fixed_large"), {}),
    "ddpm-thresh": ("ddpm", dict(thresholding=True, sample_max_value=2.0), {}),
    "ddim-clip": ("ddim", {}, {}),
    "ddim-clip-eta1-clipped": ("ddim", {}, dict(eta=1.0, use_clipped_model_output=True)),
    "ddim-thresh-clipped": ("ddim", dict(thresholding=True), dict(eta=0.5, use_clipped_model_output=True)),
}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", list(ZERO_SNR))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_zero_snr_epsilon_first_step(dif, device, backend, case, dtype):
    """At alphas_cumprod = 0 diffusers' x0 is +-inf, clipped to +-clip_sample_range: ours is the same, finite.
    With thresholding diffusers' quantile of infinities is NaN; ours is the limit, x0 = +-1 (diffusers' result
    with clip_sample_range = 1)."""
    kind, kw, step_kw = ZERO_SNR[case]
    kw = dict(kw, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ours = OURS[kind](**kw)
    if kw.get("thresholding"):
        kw = dict(kw, thresholding=False, clip_sample_range=1.0)
    _, lo, hi = pair(dif, kind, kw)
    set_schedule((ours, lo, hi), 10)
    assert ours.alphas_cumprod[999] == 0 and int(ours.timesteps[0]) == 999
    x, m, z = inputs(shape_for(backend), dtype=dtype)
    got = ours_step(ours, kind, device, backend, m, 999, x, z, **step_kw)
    want = diffusers_step(hi, kind, m, 999, x, z, **step_kw)
    lowp = diffusers_step(lo, kind, m, 999, x, z, f64=False, **step_kw)
    for name, a, b, c in zip(("prev_sample", "pred_original_sample"), got, want, lowp):
        finite = torch.isfinite(b)  # diffusers: NaN only where x == m exactly (0 / 0)
        assert torch.isfinite(a).all() and finite.float().mean() > 0.95, name
        if dtype == torch.float32:
            assert_close(a[finite], b[finite], name=name)
        else:
            assert_low_precision_close(a[finite], b[finite], c[finite], ulps=interpreter_ulps(device, backend, dtype),
                                       name=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_generator_list_draws_per_sample(dif, device, backend, kind, dtype):
    """With a list of generators sample i's noise depends on generator i alone, and is diffusers' noise."""
    ours, lo, hi = pair(dif, kind, dict(clip_sample=False))
    set_schedule((ours, lo, hi), 10)
    x, m, _ = inputs((2, 3, 4, 5), seed=12, dtype=dtype)
    t = ours.timesteps[2]
    eta = dict(eta=1.0) if kind == "ddim" else {}

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    def ours_with(generators, i=slice(None)):
        xd, md = to(device, x[i], m[i])
        with vlfast.use_backend(backend):
            return ours.step(md, t, xd, generator=generators, **eta).prev_sample.cpu()

    both = ours_with(gens(3, 4))
    for i, seed in enumerate((3, 4)):
        torch.testing.assert_close(both[i:i + 1], ours_with(gens(seed), slice(i, i + 1)), rtol=0, atol=0)
    assert not torch.equal(ours_with(gens(4, 3)), both)
    with pytest.raises(ValueError, match="generators"):
        ours_with(gens(1, 2, 3))
    z = torch.cat([torch.randn((1,) + x.shape[1:], generator=g, dtype=dtype) for g in gens(3, 4)])
    want = diffusers_step(hi, kind, m, t, x, z, **eta)[0]
    theirs = lo.step(m, t, x, generator=gens(3, 4), **eta).prev_sample  # diffusers' own draw
    if dtype == torch.float32:
        assert_close(both, theirs, name="prev_sample")
    else:
        assert_low_precision_close(both, want, theirs, ulps=interpreter_ulps(device, backend, dtype),
                                   name="prev_sample")


@pytest.mark.parametrize("case", list(CASES))
def test_float64_matches_diffusers(dif, case):
    """float64 samples are computed in float64 (reference backend, float64 table): diffusers' float64 result."""
    kind, kw, steps, step_kw = CASES[case]
    ours, _, hi = pair(dif, kind, kw)
    set_schedule((ours, hi), steps)
    x, m, z = inputs((2, 3, 5, 7), kw, dtype=torch.float64)
    for t in case_timesteps(ours, steps):
        got = ours_step(ours, kind, "cpu", "reference", m, t, x, z, **step_kw)
        want = diffusers_step(hi, kind, m, t, x, z, **step_kw)
        for name, a, b in zip(("prev_sample", "pred_original_sample"), got, want):
            assert a.dtype == torch.float64
            assert_close(a, b, name=f"{name} at t={t}")


def _warm_up(fn):
    """Run ``fn`` twice on a side stream (Triton compiles, tables move), as CUDA graph capture needs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_replays_draw_fresh_noise(device, backend, kind):
    sched = OURS[kind](clip_sample=False, **(dict(thresholding=True) if kind == "ddpm" else {}))
    sched.set_timesteps(10, device=device)
    x, m, _ = to(device, *inputs((2, 4, 16, 16), seed=9))
    t = sched.timesteps[2]
    eta = dict(eta=1.0) if kind == "ddim" else {}
    with vlfast.use_backend(backend):
        _warm_up(lambda: sched.step(m, t, x, **eta))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sched.step(m, t, x, **eta).prev_sample
        replays = []
        for i in range(3):
            graph.replay()
            replays.append(out.clone())
            assert standard_normal(replays[-1], sched, kind, m, t, x), f"replay {i}"
            assert all(not torch.equal(replays[-1], o) for o in replays[:-1]), f"replay {i} repeats an earlier one"
        again = []
        for _ in range(2):  # set_timesteps updates the table and the counter in place: the graph stays valid
            sched.set_timesteps(10, device=device)
            graph.replay()
            again.append(out.clone())
        torch.testing.assert_close(again[0], again[1], rtol=0, atol=0)
        assert standard_normal(again[0], sched, kind, m, t, x)


@gpu
@pytest.mark.parametrize("device,backend", CUDA_BACKENDS)
def test_step_does_not_synchronize(device, backend):
    kw = dict(thresholding=True, variance_type="learned_range")
    ddpm, ddim = DDPMScheduler(**kw), DDIMScheduler()
    for s in (ddpm, ddim):
        s.set_timesteps(10, device=device)
    x, m, _ = to(device, *inputs((2, 4, 8, 8), kw, seed=10))
    t, per_sample = ddpm.timesteps[1], ddpm.timesteps[[1, 5]]

    def calls():
        ddpm.step(m, t, x)
        ddpm.step(m, per_sample, x)
        ddim.step(m[:, :4], ddim.timesteps[1], x, eta=1.0)
        ddim.add_noise_fresh(x, per_sample)
        ddim.add_noise(x, x, per_sample)

    with vlfast.use_backend(backend):
        _warm_up(calls)
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls()
        finally:
            torch.cuda.set_sync_debug_mode(0)
