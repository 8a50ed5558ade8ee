"""Distributed training: the drop-ins and converted models under DistributedDataParallel and FSDP2
(``fully_shard``) give the unconverted model's gradients and steps; checkpoints move between the two.

One spawned run of two CPU processes over gloo does every distributed case (starting the processes costs
seconds); each case's outcome (the comparisons that failed, with their messages, or the traceback) comes
back through a file and is checked by the test of that case. Every case compares the converted model with
the unconverted one trained the same way, and, where the model has no BatchNorm (whose batch statistics are
per process), with the unconverted model trained in one process on the whole batch: with a loss that is a
mean over the batch and equal halves per process, the averaged gradients are the whole batch's.
"""

import copy
import os
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import vlfast
from vlfast.models import MODELS, elbo_loss, example_input

WORLD = 2
TIMEOUT_S = 300  # the whole spawned run; a collective gives up after COLLECTIVE_TIMEOUT_S
COLLECTIVE_TIMEOUT_S = 120
NAMES = sorted(MODELS)
F64, F32 = torch.float64, torch.float32
TOL = {F64: {"atol": 1e-12, "rtol": 1e-10}, F32: {"atol": 1e-5, "rtol": 1e-4}}  # float64 is exact to ~1e-15
# (model, dtype) trained under each wrapper. "blocks": the drop-ins with their fused extras (_Blocks).
DDP_CASES = [("blocks", F64), ("ddpm_unet", F64), ("vae", F64), ("context", F64), ("unet", F64), ("blocks", F32)]
FSDP_CASES = [("blocks", F64), ("ddpm_unet", F64), ("vae", F64), ("vae", F32)]


def _id(name, dtype):
    return f"{name}-{str(dtype).removeprefix('torch.')}"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class _Blocks(nn.Module):
    """A small network of the drop-ins using what they fuse (``fused=True``: GroupNorm's add and scale-shift,
    Conv2d's residual, the activations) or of the torch layers with the same computation written out. The two
    have one state_dict and, from one seed, the same parameters."""

    def __init__(self, fused: bool):
        super().__init__()
        vn = vlfast.nn
        gn, conv, up = (vn.GroupNorm, vn.Conv2d, vn.ConvTranspose2d) if fused else (nn.GroupNorm, nn.Conv2d,
                                                                                      nn.ConvTranspose2d)
        act = {"activation": "silu"} if fused else {}
        self.fused = fused
        self.emb = nn.Linear(4, 8)
        self.conv_in = conv(3, 8, 3, padding=1)
        self.norm1 = gn(4, 8, **act)
        self.conv = conv(8, 8, 3, padding=2, dilation=2, **act)
        self.up = up(8, 4, 2, stride=2, **act)
        self.scale_shift = nn.Linear(8, 8)
        self.norm2 = gn(2, 4, **act)

    def forward(self, x, e):
        temb = self.emb(e)
        scale, shift = self.scale_shift(temb).chunk(2, dim=1)
        h0 = self.conv_in(x)
        if self.fused:
            h = self.norm1(h0, add=temb)
            h = self.conv(h, residual=h0)
            return self.norm2(self.up(h), scale=scale, shift=shift)
        silu = nn.functional.silu
        h = silu(self.norm1(h0 + temb[:, :, None, None]))
        h = silu(self.conv(h) + h0)
        h = silu(self.up(h))
        return silu(self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def _build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]()


def _pair(name, dtype):
    """(unconverted, converted) models of ``dtype`` with the same parameters, ready to train: dropout off (the
    one-process reference draws other masks), the VAE in eval mode (z = mu, no noise). The converted one is
    converted in float32, then ``.to(dtype)``."""
    if name == "blocks":
        torch.manual_seed(0)
        ref, fast = _Blocks(False), _Blocks(True)
        fast.load_state_dict(ref.state_dict())
    else:
        ref = _build(name)
        fast = vlfast.nn.convert(copy.deepcopy(ref), conv2d="all")
    for model in (ref, fast):
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model.to(dtype).train(name != "vae")
    return ref, fast


def _data(name, dtype):
    """(inputs, target) of a batch of one sample per process (GroupNorm's statistics are per sample)."""
    batch = WORLD
    g = torch.Generator().manual_seed(1)
    if name == "blocks":
        args = (torch.randn(batch, 3, 8, 8, generator=g, dtype=dtype), torch.randn(batch, 4, generator=g, dtype=dtype))
        return args, torch.randn(batch, 4, 16, 16, generator=g, dtype=dtype)
    args = example_input(name, batch=batch, dtype=dtype)
    shape = {"unet": (batch, 2, *args[0].shape[2:])}.get(name, args[0].shape)
    return args, torch.randn(shape, generator=g, dtype=dtype)


def _loss(name, model, args, target):
    """A mean over the batch, so the processes' averaged gradients are the whole batch's."""
    out = model(*args)
    if name == "vae":  # per element (not the sum's thousands, which SGD at lr 0.1 would diverge on)
        return elbo_loss(args[0], *out) / args[0][0].numel()
    return (out - target).square().mean()


def _full(t):
    """A detached copy of the whole tensor (an FSDP2 DTensor gathered from every process)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()


def _train(name, model, inner, args, target):
    """Two SGD steps (momentum, so the second depends on the first) of ``model`` (a wrapper of ``inner``, or
    ``inner`` itself); the losses, the full gradients of both steps and the parameters after them."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = {}
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        loss = _loss(name, model, args, target)
        loss.backward()
        out[f"loss{step}"] = {"loss": loss.detach().clone()}
        out[f"grad{step}"] = {n: _full(p.grad) for n, p in inner.named_parameters()}
        opt.step()
    out["param"] = {n: _full(p) for n, p in inner.named_parameters()}
    return out


class _Checks:
    """The comparisons of one case: the failed ones' messages and the largest difference of each."""

    def __init__(self):
        self.problems, self.max_abs = [], {}

    def close(self, label, got: dict, want: dict, tol: dict):
        if sorted(got) != sorted(want):
            self.problems.append(f"{label}: names differ: {sorted(set(got) ^ set(want))}")
            return
        worst = 0.0
        for key in want:
            worst = max(worst, float((got[key] - want[key]).abs().max()))
            try:
                torch.testing.assert_close(got[key], want[key], **tol)
            except AssertionError as e:
                self.problems.append(f"{label}, {key}: {e}")
        self.max_abs[label] = worst

    def trained(self, label, got: dict, want: dict, tol: dict):
        for part in got:
            self.close(f"{label} {part}", got[part], want[part], tol)

    def result(self, **extra):
        return {"problems": self.problems, "max_abs": self.max_abs, **extra}


DROP_INS = (vlfast.nn.GroupNorm, vlfast.nn.Conv2d, vlfast.nn.ConvTranspose2d)


def _vlfast_kinds(model):
    """The names of the vlfast drop-ins in ``model``."""
    return sorted({cls.__name__ for m in model.modules() for cls in DROP_INS if isinstance(m, cls)})


def _has_batch_norm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


_SINGLE = {}  # (name, dtype) -> _train of the unconverted model in one process on the whole batch


def _train_case(rank, name, dtype, wrap):
    """Train the converted and the unconverted model under ``wrap`` on this process's half of the batch; compare
    them, and with the unconverted model trained in this process alone on the whole batch."""
    args, target = _data(name, dtype)
    local_args = tuple(a.chunk(WORLD)[rank] for a in args)
    local_target = target.chunk(WORLD)[rank]
    ref, fast = _pair(name, dtype)
    kinds = _vlfast_kinds(fast)
    single = None
    if not _has_batch_norm(ref):  # computed once for DDP and FSDP2
        if (name, dtype) not in _SINGLE:
            solo = copy.deepcopy(ref)
            _SINGLE[name, dtype] = _train(name, solo, solo, args, target)
        single = _SINGLE[name, dtype]
    got = _train(name, wrap(fast), fast, local_args, local_target)
    want = _train(name, wrap(ref), ref, local_args, local_target)
    checks = _Checks()
    checks.trained("converted vs unconverted:", got, want, TOL[dtype])
    if single is not None:
        got = {k: v for k, v in got.items() if not k.startswith("loss")}  # this half's loss, not the batch's
        checks.trained("converted vs one process, whole batch:", got, single, TOL[dtype])
    return checks, fast, kinds


def _ddp_case(rank, name, dtype):
    from torch.nn.parallel import DistributedDataParallel as DDP
    checks, _, kinds = _train_case(rank, name, dtype, DDP)
    return checks.result(kinds=kinds)


def _ddp_state_dict_case(rank, name):
    """A DDP-wrapped converted model, one step trained: ``module.state_dict()`` (and ``state_dict()`` without
    its "module." prefix) loads strictly into a fresh unconverted model, which then computes the same."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
    from torch.nn.parallel import DistributedDataParallel as DDP
    fast = vlfast.nn.convert(_build(name), conv2d="all")
    args = example_input(name, batch=2 * WORLD)
    ddp = DDP(fast)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    _first(ddp(*(a.chunk(WORLD)[rank] for a in args))).square().mean().backward()
    opt.step()
    checks = _Checks()
    prefixed = ddp.state_dict()
    consume_prefix_in_state_dict_if_present(prefixed, "module.")
    for label, state in (("module.state_dict()", ddp.module.state_dict()), ("state_dict()", prefixed)):
        plain = _build(name, seed=1)
        plain.load_state_dict(state, strict=True)
        checks.close(f"{label} loaded", plain.state_dict(), fast.state_dict(), {"atol": 0, "rtol": 0})
        with torch.no_grad():
            checks.close(f"{label} outputs", {"out": _first(plain.eval()(*args))},
                         {"out": _first(fast.eval()(*args))}, {"atol": 1e-4, "rtol": 1e-4})
        fast.train()
    return checks.result()


_FSDP = {}  # (fully_shard, mesh) once the probe has run, or the reason FSDP2 cannot run here


def _fsdp_probe(rank):
    """Can the installed torch shard on the CPU over gloo? Tried on a plain torch model: forward, backward,
    the gathered gradient. Returns the reason where it cannot."""
    try:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(torch.randn(3, 4)).sum().backward()
        _full(model[0].weight.grad)
    except Exception as e:  # noqa: BLE001 - the reason to skip
        return (f"torch {torch.__version__} cannot run FSDP2 (fully_shard) on the CPU over gloo: "
                f"{type(e).__name__}: {e}")
    _FSDP["shard"], _FSDP["mesh"] = fully_shard, mesh
    return None


def _shard(model):
    """FSDP2 the way a training script does: each block (the modules of a ModuleList, else each top-level child
    with parameters), then the root."""
    fully_shard, mesh = _FSDP["shard"], _FSDP["mesh"]
    for child in model.children():
        for block in (child if isinstance(child, nn.ModuleList) else [child]):
            if next(block.parameters(), None) is not None:
                fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_case(rank, name, dtype):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    if "shard" not in _FSDP:
        return {"skip": _FSDP["reason"]}
    checks, fast, kinds = _train_case(rank, name, dtype, _shard)
    exact, full = {"atol": 0, "rtol": 0}, StateDictOptions(full_state_dict=True)
    # The sharded converted model's full state_dict loads strictly into a fresh unconverted model ...
    plain = (_Blocks(False) if name == "blocks" else _build(name, seed=1)).to(dtype)
    plain.load_state_dict(get_model_state_dict(fast, options=full), strict=True)
    checks.close("full state_dict into unconverted", {n: p.detach() for n, p in plain.named_parameters()},
                 {n: _full(p) for n, p in fast.named_parameters()}, exact)
    # ... and an unconverted model's (here: the untrained one's) into the sharded converted model.
    untrained = _pair(name, dtype)[0].state_dict()
    set_model_state_dict(fast, {k: v.clone() for k, v in untrained.items()}, options=full)  # (made DTensors)
    checks.close("unconverted state_dict into sharded", {n: _full(p) for n, p in fast.named_parameters()},
                 {n: p for n, p in untrained.items() if n in dict(fast.named_parameters())}, exact)
    return checks.result(kinds=kinds)


def _cases():
    """(key, function of the rank) of every distributed case, in the order every process runs them."""
    cases = [(f"ddp/{_id(n, d)}", lambda r, n=n, d=d: _ddp_case(r, n, d)) for n, d in DDP_CASES]
    cases += [(f"ddp-state-dict/{n}", lambda r, n=n: _ddp_state_dict_case(r, n)) for n in NAMES]
    cases.append(("fsdp-probe", lambda r: {"skip": _FSDP.setdefault("reason", _fsdp_probe(r))}))
    cases += [(f"fsdp/{_id(n, d)}", lambda r, n=n, d=d: _fsdp_case(r, n, d)) for n, d in FSDP_CASES]
    return cases


def _worker(rank, tmp):
    """One process: every case, its outcome written to ``rank<r>.pt`` after each (so a hang keeps the rest)."""
    torch.set_num_threads(1)
    # The VAE returns mu and logvar as views (chunk); the loss changes nothing in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    path = Path(tmp) / f"rank{rank}.pt"
    dist.init_process_group("gloo", init_method=f"file://{Path(tmp) / 'store'}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results, failed = {}, None
    try:
        for key, case in _cases():
            start = time.perf_counter()
            try:
                results[key] = case(rank)
            except Exception:  # noqa: BLE001 - reported by the case's test
                note = f"\n(after the failure of {failed} here: the processes may have been out of step)"
                results[key] = {"error": traceback.format_exc() + (note if failed else "")}
                failed = failed or key
            results[key]["seconds"] = time.perf_counter() - start
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """Run every distributed case in WORLD spawned processes; ([results of each rank], error or None)."""
    tmp = tmp_path_factory.mktemp("dist")
    assert "TRITON_INTERPRET" in os.environ  # set by conftest; the processes inherit the environment
    ctx = mp.start_processes(_worker, args=(str(tmp),), nprocs=WORLD, join=False, start_method="spawn")
    deadline, error = time.monotonic() + TIMEOUT_S, None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                error = f"the {WORLD} processes did not finish within {TIMEOUT_S} s"
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # outside a case: setting up
        error = f"a worker process failed: {e}"
    finally:
        for p in ctx.processes:  # this fixture's own processes
            if p.is_alive():
                p.terminate()
            p.join(10)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=True) if (tmp / f"rank{r}.pt").exists() else {}
               for r in range(WORLD)]
    return results, error


def _outcome(dist_results, key):
    """Each rank's result of case ``key``; fails with the case's traceback, skips with its reason."""
    results, error = dist_results
    out = []
    for rank, res in enumerate(results):
        if key not in res:
            pytest.fail(f"rank {rank} has no result for {key}: {error or 'the run stopped before it'}")
        if "error" in res[key]:
            pytest.fail(f"rank {rank}, {key}:\n{res[key]['error']}")
        out.append(res[key])
    if any(r.get("skip") for r in out):
        pytest.skip(next(r["skip"] for r in out if r.get("skip")))
    return out


def _check(dist_results, key):
    outs = _outcome(dist_results, key)
    problems = [f"rank {rank}: {p}" for rank, res in enumerate(outs) for p in res["problems"]]
    assert not problems, f"{key}: {len(problems)} comparisons failed:\n" + "\n".join(problems[:20])
    assert outs[0]["max_abs"], f"{key}: nothing compared"
    return outs


@pytest.mark.parametrize("name,dtype", [pytest.param(n, d, id=_id(n, d)) for n, d in DDP_CASES])
def test_ddp_trains_like_unconverted(dist_results, name, dtype):
    outs = _check(dist_results, f"ddp/{_id(name, dtype)}")
    assert outs[0]["kinds"], "the converted model has no vlfast module"


@pytest.mark.parametrize("name,dtype", [pytest.param(n, d, id=_id(n, d)) for n, d in FSDP_CASES])
def test_fsdp2_trains_like_unconverted(dist_results, name, dtype):
    outs = _check(dist_results, f"fsdp/{_id(name, dtype)}")
    assert outs[0]["kinds"], "the converted model has no vlfast module"


def test_distributed_cases_cover_every_drop_in(dist_results):
    kinds = set()
    for key in [f"ddp/{_id(n, d)}" for n, d in DDP_CASES]:
        kinds.update(_outcome(dist_results, key)[0]["kinds"])
    assert {"GroupNorm", "Conv2d", "ConvTranspose2d"} <= kinds


@pytest.mark.parametrize("name", NAMES)
def test_ddp_state_dict_loads_unconverted(dist_results, name):
    _check(dist_results, f"ddp-state-dict/{name}")


def _assert_same_state(model, state):
    got = model.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_interchange(name, tmp_path):
    """State dicts move between the converted and the unconverted model both ways (strict), directly and through
    a file read back with weights_only=True; each model then holds its source's tensors and computes what it
    computes."""
    args = example_input(name, batch=1)

    def run(model):
        with torch.no_grad():
            return _first(model.eval()(*args))

    ref = _build(name, seed=0)
    want = run(ref)
    fast = vlfast.nn.convert(_build(name, seed=1), conv2d="all")
    assert _vlfast_kinds(fast)
    assert not all(torch.equal(a, b) for a, b in zip(fast.parameters(), ref.parameters()))  # before loading
    fast.load_state_dict(ref.state_dict(), strict=True)  # unconverted -> converted
    _assert_same_state(fast, ref.state_dict())
    torch.testing.assert_close(run(fast), want, atol=1e-4, rtol=1e-4)
    back = _build(name, seed=2)
    back.load_state_dict(fast.state_dict(), strict=True)  # and back
    _assert_same_state(back, ref.state_dict())
    torch.testing.assert_close(run(back), want, atol=0, rtol=0)

    torch.save(fast.state_dict(), tmp_path / "converted.pt")
    torch.save(ref.state_dict(), tmp_path / "unconverted.pt")
    plain = _build(name, seed=3)
    plain.load_state_dict(torch.load(tmp_path / "converted.pt", weights_only=True), strict=True)
    _assert_same_state(plain, ref.state_dict())
    fast2 = vlfast.nn.convert(_build(name, seed=4), conv2d="all")
    fast2.load_state_dict(torch.load(tmp_path / "unconverted.pt", weights_only=True), strict=True)
    _assert_same_state(fast2, fast.state_dict())
