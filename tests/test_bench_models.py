"""The whole-model benchmark (vlfast.bench.models) on the CPU at its tiny sizes, without torch.compile: every
model, direction and provider runs, is checked against the float32 eager model, and is timed."""

import pytest
import torch

from vlfast.bench import OPS
from vlfast.bench import models as bm

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def rows():
    mp = pytest.MonkeyPatch()
    mp.setattr(bm, "REP_MS", 1)  # the fewest timed calls: this checks the harness, not the speed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: a second thread only adds waits, long ones on a loaded machine
    try:
        return [r for _, thunk in bm.cases(torch.device("cpu"), shapes=bm.TINY_CONFIGS, compile_=False)
                for r in thunk()]
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def test_registered():
    assert OPS[-1] == "models"


def test_every_provider_checked_and_timed(rows):
    failed = [(r.case, r.provider, r.extra.get("error")) for r in rows if r.timing is None]
    assert not failed
    got = {(r.extra["model"], r.extra["direction"], r.provider) for r in rows}
    for model in ("seed_unet", "ddpm_unet", "vae_decoder"):
        assert {(model, "forward", p) for p in ("eager", "vlfast", "vlfast[all]")} <= got
        assert {(model, "train step", p) for p in ("eager", "vlfast")} <= got
    assert {("sampling", "2-step loop", p) for p in (bm.PIPELINE, "vlfast.sampling")} <= got
    for r in rows:
        assert r.op == "models" and r.timing.median > 0 and r.flops > 0 and r.extra["tflops"] > 0
        # The check against the float32 eager model ran, and passed, for every provider.
        assert r.extra["rel_err"] is not None and r.extra["rel_err"] <= 1e-3, (r.case, r.provider)
        assert r.extra["eager_rel_err"] is not None


def test_no_compile_rows_and_notes(rows):
    assert not any("compile" in r.provider for r in rows)
    assert "torch.compile not timed (--no-compile)" in bm.notes(rows)


def test_table(rows):
    table = bm.models_table(rows)
    assert "ddpm_unet forward 1x3x16x16 fp32" in table and "vs compile" in table
    line = next(x for x in table.splitlines() if "ddpm_unet forward" in x and " eager " in x)
    assert "1.00x" in line


def test_select():
    got = bm.select(bm.GPU_CONFIGS, ["ddpm_unet", "sampling"], quick=True, nchw=True)
    assert set(got) == {"ddpm_unet", "sampling"}
    assert not got["ddpm_unet"].train and not got["ddpm_unet"].channels_last and got["sampling"].steps == 10


def test_compile_cases_only_where_asked():
    labels = [lab for lab, _ in bm.cases(torch.device("cpu"))]
    assert labels[:2] == ["ddpm_unet forward 1x3x32x32 fp32 (base)", "ddpm_unet forward 1x3x32x32 fp32 (compile)"]
    assert sum(lab.endswith("(compile)") for lab in labels) == 1  # the DDPM U-Net's forward only, on a CPU
    assert not any(lab.endswith("(compile)") for lab, _ in bm.cases(torch.device("cpu"), compile_=False))


def test_a_wrong_provider_is_not_timed(monkeypatch):
    """A converted model whose output is off by 1 % gets a row without a timing, and the reason."""
    def wrong(model, **kw):
        model.register_forward_hook(lambda mod, args, out: out * 1.01)
        return model
    monkeypatch.setattr(bm, "convert", wrong)
    monkeypatch.setattr(bm, "REP_MS", 1)
    shapes = {"vae_decoder": bm.TINY_CONFIGS["vae_decoder"]._replace(train=False)}
    rows = [r for _, thunk in bm.cases(torch.device("cpu"), shapes=shapes, compile_=False) for r in thunk()]
    by = {r.provider: r for r in rows}
    assert by["eager"].timing is not None
    for name in ("vlfast", "vlfast[all]"):
        assert by[name].timing is None and "disagrees with the float32 model" in by[name].extra["error"]
