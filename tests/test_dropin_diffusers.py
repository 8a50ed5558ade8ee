"""vlfast's schedulers wherever diffusers' pipelines, training scripts and tests touch a scheduler.

The config surface (save / load / from_config / register_to_config / compatibles / config entries read as
attributes), step's signature and outputs, _get_variance, add_noise's broadcasting, set_timesteps'
arguments, the bounded DDIM tables, diffusers' DDPM and DDIM pipelines with a list of generators saved
and reloaded, and the same surface without diffusers (a subprocess where it cannot be imported).
"""

import inspect
import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import torch

import vlfast
from vlfast.schedulers import DDIMScheduler, DDPMScheduler
from vlfast.schedulers._base import MAX_ETA_TABLES
from vlfast.testing import assert_close, assert_low_precision_close

from conftest import backend_params

OURS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
KINDS = list(OURS)
BACKENDS = backend_params()


@pytest.fixture(scope="module")
def dif():
    return pytest.importorskip("diffusers")


def theirs_cls(dif, kind):
    return getattr(dif, OURS[kind].__name__)


def public(config) -> dict:
    """A config without diffusers' bookkeeping entries (_class_name, _use_default_values, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- pipelines
def tiny_unet(dif):
    torch.manual_seed(0)
    return dif.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                           norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)


@pytest.mark.parametrize("kind,eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 1.0)],
                         ids=["ddpm", "ddim-eta0", "ddim-eta1"])
def test_pipeline_with_generator_list_saves_and_reloads(dif, tmp_path, kind, eta):
    """A diffusers pipeline with our scheduler and one generator per sample gives diffusers' own images
    (the random streams are the same: torch.randn per sample), and save_pretrained / from_pretrained
    reload our scheduler class, giving the same images."""
    pipeline_cls = dif.DDPMPipeline if kind == "ddpm" else dif.DDIMPipeline
    unet = tiny_unet(dif)

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        kw = {} if eta is None else dict(eta=eta)
        return pipe(batch_size=2, num_inference_steps=3, generator=gens(0, 1), output_type="np", **kw).images

    pipe = pipeline_cls(unet=unet, scheduler=OURS[kind]())
    pipe.scheduler = OURS[kind].from_config(pipe.scheduler.config)  # DDIMPipeline's __init__ converts to its own
    images = run(pipe)
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    np.testing.assert_allclose(images, run(pipeline_cls(unet=unet, scheduler=theirs_cls(dif, kind)())),
                               rtol=1e-5, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == [OURS[kind].__module__, OURS[kind].__name__]
    assert type(OURS[kind].from_pretrained(tmp_path, subfolder="scheduler")) is OURS[kind]
    loaded = pipeline_cls.from_pretrained(tmp_path)
    if kind == "ddim":  # DDIMPipeline's __init__ converts what it loaded (ours) to diffusers' DDIMScheduler
        np.testing.assert_allclose(run(loaded), images, rtol=1e-5, atol=1e-5)
        loaded.scheduler = OURS[kind].from_config(loaded.scheduler.config)
    assert type(loaded.scheduler) is OURS[kind]
    np.testing.assert_array_equal(run(loaded), images)


# ---------------------------------------------------------------- the config surface
@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_and_from_pretrained(dif, tmp_path, kind):
    ours = OURS[kind](beta_schedule="scaled_linear", clip_sample=False, timestep_spacing="trailing")
    ours.save_pretrained(tmp_path / "ours")
    ours.save_config(tmp_path / "config")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == OURS[kind].__name__ and public(saved) == public(ours.config)
    assert json.loads((tmp_path / "config" / "scheduler_config.json").read_text()) == saved
    again = OURS[kind].from_pretrained(tmp_path / "ours")
    assert type(again) is OURS[kind] and public(again.config) == public(ours.config)
    assert public(theirs_cls(dif, kind).from_pretrained(tmp_path / "ours").config) == public(ours.config)
    theirs_cls(dif, kind)(beta_end=0.03).save_pretrained(tmp_path / "theirs")
    loaded, unused = OURS[kind].from_pretrained(tmp_path / "theirs", return_unused_kwargs=True)
    assert loaded.config.beta_end == 0.03 and "_diffusers_version" in unused


SOURCES = {  # a scheduler whose config is converted: its defaults (_use_default_values) are not carried over
    "euler": lambda dif: dif.EulerDiscreteScheduler(),
    "dpm": lambda dif: dif.DPMSolverMultistepScheduler(beta_schedule="scaled_linear"),
    "pndm-offset": lambda dif: dif.PNDMScheduler(steps_offset=1, timestep_spacing="trailing"),
    "unipc": lambda dif: dif.UniPCMultistepScheduler(timestep_spacing="leading"),
    "ddpm": lambda dif: dif.DDPMScheduler(clip_sample=False),
    "ddim": lambda dif: dif.DDIMScheduler(timestep_spacing="linspace", set_alpha_to_one=False),
    "vlfast-ddpm": lambda dif: DDPMScheduler(steps_offset=1),
    "vlfast-ddim": lambda dif: DDIMScheduler(timestep_spacing="trailing"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", list(SOURCES))
def test_from_config_matches_diffusers(dif, kind, source):
    """from_config of another scheduler's config gives diffusers' config and timesteps (e.g. Euler's default
    "linspace" spacing is not taken over: diffusers' from_config drops the entries left at their defaults)."""
    config = SOURCES[source](dif).config
    ours, theirs = OURS[kind].from_config(config), theirs_cls(dif, kind).from_config(config)
    assert type(ours) is OURS[kind]
    assert public(ours.config) == public(theirs.config)
    for n in (10, 25):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert torch.equal(ours.timesteps, theirs.timesteps), (n, ours.timesteps, theirs.timesteps)
    (_, unused), (_, their_unused) = (cls.from_config(config, return_unused_kwargs=True, foo=1)
                                      for cls in (OURS[kind], theirs_cls(dif, kind)))
    assert set(unused) == set(their_unused) and unused["foo"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_register_to_config_compatibles_and_attributes(dif, kind):
    ours, theirs = OURS[kind](clip_sample_range=2.0), theirs_cls(dif, kind)(clip_sample_range=2.0)
    assert set(ours.config["_use_default_values"]) == set(theirs.config["_use_default_values"])
    ours.register_to_config(foo=1)
    assert ours.config["foo"] == 1 and ours.config.clip_sample_range == 2.0
    names = {c.__name__ for c in ours.compatibles}
    assert {DDPMScheduler, DDIMScheduler} <= set(ours.compatibles)
    assert {c.__name__ for c in theirs.compatibles} <= names
    assert ours.has_compatibles and ours.config_name == theirs.config_name == "scheduler_config.json"
    # Config entries read as attributes of the scheduler: the same value and the same warning as diffusers'.
    for key in public(theirs.config):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            value = getattr(ours, key)
        with warnings.catch_warnings(record=True) as want:
            warnings.simplefilter("always")
            their_value = getattr(theirs, key)
        assert value == their_value, key
        assert [w.category for w in got] == [w.category for w in want], key
    with pytest.raises(AttributeError):
        ours.no_such_attribute


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                           "learned", "learned_range"])
def test_ddpm_get_variance_matches_diffusers(dif, variance_type):
    ours, theirs = DDPMScheduler(variance_type=variance_type), dif.DDPMScheduler(variance_type=variance_type)
    v = randn(2, 3, 4, 4, seed=1).tanh()
    for steps in (None, 10):
        if steps:
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
        for t in ([999, 500, 1, 0] if steps is None else theirs.timesteps.tolist()):
            for kw in ({}, dict(predicted_variance=v), dict(predicted_variance=v, variance_type="fixed_large")):
                if "learned" in (kw.get("variance_type") or variance_type) and not kw:
                    continue
                torch.testing.assert_close(ours._get_variance(t, **kw), theirs._get_variance(t, **kw), rtol=0, atol=0)


def test_ddim_get_variance_matches_diffusers(dif):
    ours, theirs = DDIMScheduler(set_alpha_to_one=False), dif.DDIMScheduler(set_alpha_to_one=False)
    for t, prev in ((999, 899), (500, 400), (50, -50), (0, -100)):
        torch.testing.assert_close(ours._get_variance(t, prev), theirs._get_variance(t, prev), rtol=0, atol=0)


# ---------------------------------------------------------------- step: signature and outputs
@pytest.mark.parametrize("kind", KINDS)
def test_step_signature_and_outputs(dif, kind):
    """step takes diffusers' positional arguments in diffusers' order (vlfast's extras keyword-only), and its
    output indexes like diffusers' (out[0], out["prev_sample"], out.to_tuple(), attributes)."""
    theirs = theirs_cls(dif, kind)
    for name in ("step", "set_timesteps", "add_noise", "get_velocity", "scale_model_input", "__init__"):
        ours_params = inspect.signature(getattr(OURS[kind], name)).parameters.values()
        positional = [p.name for p in ours_params if p.kind != p.KEYWORD_ONLY]
        assert positional == list(inspect.signature(getattr(theirs, name)).parameters), name
    sched = OURS[kind]()
    sched.set_timesteps(10)
    x, m = randn(2, 3, 4, 4, seed=2), randn(2, 3, 4, 4, seed=3)
    t = sched.timesteps[1]
    # DDPM: (generator, return_dict); DDIM: (eta, use_clipped_model_output, generator, variance_noise, return_dict)
    args = (None, False) if kind == "ddpm" else (0.0, False, None, None, False)
    prev, x0 = sched.step(m, t, x, *args)
    out = sched.step(m, t, x, generator=torch.Generator().manual_seed(0)) if kind == "ddpm" else sched.step(m, t, x)
    assert isinstance(out, dif.utils.BaseOutput)
    if kind == "ddim":
        torch.testing.assert_close(out.prev_sample, prev, rtol=0, atol=0)
    assert out[0] is out.prev_sample is out["prev_sample"] and out[1] is out.pred_original_sample
    assert out.to_tuple() == (out.prev_sample, out.pred_original_sample) and list(out.keys()) == [
        "prev_sample", "pred_original_sample"]
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=0)
    short = sched.step(m, t, x, return_pred_original_sample=False)
    assert short.pred_original_sample is None and len(short.to_tuple()) == 1


# ---------------------------------------------------------------- add_noise, set_timesteps, tables
ADD_NOISE = {  # name: (sample shape, sample dtype, noise shape, noise dtype, timesteps)
    "noise-fp16": ((3, 2, 4, 5), torch.float32, (3, 2, 4, 5), torch.float16, torch.tensor([999, 0, 412])),
    "sample-fp16-noise-fp32": ((3, 2, 4, 5), torch.float16, (3, 2, 4, 5), torch.float32, torch.tensor([5, 600, 7])),
    "t-Bx1": ((3, 2, 4, 5), torch.float32, (3, 2, 4, 5), torch.float32, torch.tensor([[999], [0], [412]])),
    "t-1x1": ((3, 2, 4, 5), torch.float32, (3, 2, 4, 5), torch.float32, torch.tensor([[300]])),
    "t-0d": ((3, 2, 4, 5), torch.bfloat16, (3, 2, 4, 5), torch.bfloat16, torch.tensor(17)),
    "noise-1xCHW": ((3, 2, 4, 5), torch.float32, (1, 2, 4, 5), torch.float32, torch.tensor([999, 0, 412])),
    "sample-1xCHW-t-B": ((1, 2, 4, 5), torch.float32, (3, 2, 4, 5), torch.float32, torch.tensor([999, 0, 412])),
    "float64": ((3, 2, 4, 5), torch.float64, (3, 2, 4, 5), torch.float64, torch.tensor([999, 0, 412])),
}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADD_NOISE))
def test_add_noise_and_velocity_broadcast_as_diffusers(dif, device, backend, case):
    """diffusers' shapes and dtypes (broadcasting, promotion); values against diffusers in float64 (diffusers'
    own 1 - ab in fp16 / bf16 cancels: the low-precision rule, with it as PyTorch's own result)."""
    shape, dtype, noise_shape, noise_dtype, t = ADD_NOISE[case]
    ours, theirs = DDPMScheduler(beta_schedule="scaled_linear"), dif.DDPMScheduler(beta_schedule="scaled_linear")
    x, z = randn(*shape, seed=4, dtype=dtype), randn(*noise_shape, seed=5, dtype=noise_dtype)
    use = backend if dtype != torch.float64 else "reference"  # float64: the reference alone
    for name in ("add_noise", "get_velocity"):
        if name == "get_velocity" and noise_shape != shape:
            continue
        lowp = getattr(theirs, name)(x, z, t)
        want = getattr(theirs, name)(x.double(), z.double(), t)
        with vlfast.use_backend(use):
            got = getattr(ours, name)(x.to(device), z.to(device), t.to(device)).cpu()
        assert got.dtype == lowp.dtype and got.shape == lowp.shape, name
        if got.dtype in (torch.float32, torch.float64):
            assert_close(got, want, name=name)
        else:
            # 2026-12: Triton 3.9's interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest)
            interpreted = (device, backend, got.dtype, name) == ("cpu", "triton", torch.bfloat16, "add_noise")
            assert_low_precision_close(got, want, lowp, ulps=1.0 if interpreted else 0.0, name=name)


COUNTS = [10, 10.0, 10.5, 7.0, np.int64(10), np.float32(10.0)]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' np.array(tensor)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_set_timesteps_takes_counts_as_diffusers(dif, kind, spacing):
    """A float count (or a numpy number) spaces the timesteps as diffusers does, or raises the same error."""
    ours, theirs = OURS[kind](timestep_spacing=spacing), theirs_cls(dif, kind)(timestep_spacing=spacing)
    x, m, z = randn(2, 3, 4, 4, seed=6), randn(2, 3, 4, 4, seed=7), randn(2, 3, 4, 4, seed=8)
    for n in COUNTS:
        try:
            theirs.set_timesteps(n)
        except Exception as error:
            with pytest.raises(type(error)):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert torch.equal(ours.timesteps, theirs.timesteps), n
        assert ours.num_inference_steps == theirs.num_inference_steps
        t = theirs.timesteps[1]
        if kind == "ddim":  # diffusers' DDIM step fails on a float count: compare with the int one
            if not float(n).is_integer():
                continue
            theirs.set_timesteps(int(n))
            want = theirs.step(m, t, x).prev_sample
            got = ours.step(m, t, x).prev_sample
        else:
            with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: z):
                want = theirs.step(m, t, x).prev_sample
            got = ours.step(m, t, x, noise=z).prev_sample
        assert_close(got, want, name=f"prev_sample for {n!r} steps")
    for custom in ([900, 500, 3, 0], np.array([700, 20]), torch.tensor([999, 1])):
        if kind == "ddpm":
            ours.set_timesteps(timesteps=custom)
            theirs.set_timesteps(timesteps=custom)
            assert torch.equal(ours.timesteps, theirs.timesteps) and ours.custom_timesteps


def test_ddim_tables_are_bounded():
    """One table per (eta, use_clipped_model_output), the MAX_ETA_TABLES most recently used kept per device."""
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    x, m, z = randn(2, 3, 4, 4, seed=9), randn(2, 3, 4, 4, seed=10), randn(2, 3, 4, 4, seed=11)
    t = sched.timesteps[2]
    first = sched.step(m, t, x, eta=0.05, variance_noise=z).prev_sample
    for i in range(1, 12):
        sched.step(m, t, x, eta=0.05 + 0.05 * i, variance_noise=z, use_clipped_model_output=bool(i % 2))
        sched.step(m, t, x, eta=0.0)  # used often: stays
    etas = [key for key, _, _ in sched._device if isinstance(key, tuple)]
    assert len(etas) <= MAX_ETA_TABLES and (0.0, False) in etas and set(sched._last_use) == set(sched._device)
    assert sum(isinstance(key, tuple) for key in sched._host) <= MAX_ETA_TABLES
    torch.testing.assert_close(sched.step(m, t, x, eta=0.05, variance_noise=z).prev_sample, first, rtol=0, atol=0)

    def sweep(offset):  # threads stepping with many etas at once: tables come and go, results stay right
        for i in range(20):
            eta = 0.01 * ((i + offset) % 9)
            got = sched.step(m, t, x, eta=eta, variance_noise=z, backend="reference").prev_sample
            torch.testing.assert_close(got, want[eta], rtol=0, atol=0)

    want = {0.01 * i: DDIMScheduler.from_config(sched.config) for i in range(9)}
    for eta, other in want.items():
        other.set_timesteps(10)
        want[eta] = other.step(m, t, x, eta=eta, variance_noise=z, backend="reference").prev_sample
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(sweep, range(4)))


# ---------------------------------------------------------------- timesteps as pipelines pass them, torch.compile
def noisy(kind, z):
    """step kwargs that inject the noise z (DDIM: with eta = 1)."""
    return dict(eta=1.0, variance_noise=z) if kind == "ddim" else dict(noise=z)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_host_timesteps_are_checked_like_ints(device, backend, kind):
    """A host timestep (int, numpy integer, CPU tensor of any allowed shape) outside the schedule raises; inside
    it, every form gives the int's result. (DDIM steps from any t < T: only out-of-range values raise.)"""
    sched = OURS[kind]()
    sched.set_timesteps(10)
    x, m, z = (randn(2, 3, 4, 5, seed=s).to(device) for s in (11, 12, 13))
    first = int(sched.timesteps[0])

    def forms(t):
        return [t, np.int64(t), np.int32(t), torch.tensor(t), torch.tensor([t]),
                torch.tensor([t, t], dtype=torch.int32)]

    with vlfast.use_backend(backend):
        for bad in ([550, 1000] if kind == "ddpm" else [1000, -1]):
            for t in forms(bad) + [torch.tensor([first, bad])]:
                with pytest.raises(ValueError, match="timestep"):
                    sched.step(m, t, x, **noisy(kind, z))
        good = int(sched.timesteps[3])
        want = sched.step(m, good, x, **noisy(kind, z)).prev_sample
        for t in forms(good):
            torch.testing.assert_close(sched.step(m, t, x, **noisy(kind, z)).prev_sample, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "auto"])
def test_first_step_compiles_fullgraph(kind, backend):
    """A fresh scheduler's first step after set_timesteps, under torch.compile(fullgraph=True)."""
    x, m, z = (randn(2, 3, 4, 5, seed=s) for s in (14, 15, 16))

    def run(sched, m, t, x, z):
        return sched.step(m, t, x, backend=backend, **noisy(kind, z)).prev_sample * 2

    compiled, eager = OURS[kind](), OURS[kind]()
    for s in (compiled, eager):
        s.set_timesteps(10)
    t = compiled.timesteps[1]  # a 0-d CPU tensor, as pipelines pass it
    step = torch.compile(lambda m, t, x, z: run(compiled, m, t, x, z), fullgraph=True, backend="aot_eager")
    assert_close(step(m, t, x, z), run(eager, m, t, x, z))


# ---------------------------------------------------------------- without diffusers
FALLBACK = r"""
import json, os, sys, warnings
sys.modules["diffusers"] = None  # as if diffusers were not installed
import torch
import vlfast
from vlfast.schedulers import DDIMScheduler, DDPMScheduler, _base

out_dir = sys.argv[1]
assert not _base.HAS_DIFFUSERS
x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
for cls in (DDPMScheduler, DDIMScheduler):
    s = cls(clip_sample_range=2.0)
    assert set(s.config["_use_default_values"]) == set(s.config) - {"clip_sample_range", "_use_default_values"}
    s.set_timesteps(10)
    out = s.step(m, s.timesteps[1], x, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert out[0] is out.prev_sample is out["prev_sample"] and out.to_tuple() == (out[0], out[1])
    assert len(s.step(m, s.timesteps[1], x, return_pred_original_sample=False).to_tuple()) == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert s.num_train_timesteps == s.config.num_train_timesteps == 1000
    assert [x.category for x in w] == [FutureWarning]
    s.register_to_config(foo=1)
    assert s.config["foo"] == 1 and s.compatibles == [DDPMScheduler, DDIMScheduler]
    s.save_pretrained(os.path.join(out_dir, cls.__name__))
    again = cls.from_pretrained(os.path.join(out_dir, cls.__name__))
    assert type(again) is cls and again.config.clip_sample_range == 2.0
    euler = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "linspace", "beta_end": 0.03,
             "_use_default_values": ["timestep_spacing"], "use_karras_sigmas": False}
    converted, unused = cls.from_config(euler, return_unused_kwargs=True)
    assert converted.config.timestep_spacing == "leading" and converted.config.beta_end == 0.03
    assert "use_karras_sigmas" in unused
assert DDPMScheduler().step(m, 5, x, None, False)[0].shape == x.shape
assert type(DDIMScheduler.from_config(DDPMScheduler(beta_end=0.03).config)) is DDIMScheduler
print("ok")
"""


def test_without_diffusers(tmp_path):
    """vlfast imports and the schedulers keep their surface where diffusers cannot be imported; what they
    save there, diffusers reads."""
    result = subprocess.run([sys.executable, "-c", FALLBACK, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    diffusers = pytest.importorskip("diffusers")
    for kind in KINDS:
        saved = tmp_path / OURS[kind].__name__
        theirs = theirs_cls(diffusers, kind).from_pretrained(saved)
        assert theirs.config.clip_sample_range == 2.0 and type(OURS[kind].from_pretrained(saved)) is OURS[kind]
