"""python -m vlfast profile (vlfast.profile) and bench --plot on the CPU: the report, the JSON schema, the figures."""

import contextlib
import io
import json
import sys

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.modules import module as torch_module

from vlfast import profile as vp
from vlfast.__main__ import main
from vlfast.bench import plot
from vlfast.bench.common import Row, Timing

PNG = b"\x89PNG\r\n\x1a\n"
VARIANT_KEYS = {"forward_us", "forward_backward_us", "max_abs_diff", "peak_memory_mib"}
LAYER_KEYS = {"name", "type", "vlfast", "shape", "calls", "self_us", "share", "flops", "bytes", "tflops", "gbps"}


class Tiny(nn.Module):
    """A dilated conv + ReLU (fused by convert), GroupNorm, an up-conv; returns a tuple, as the VAE does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.GroupNorm(2, 8),
                                  nn.ConvTranspose2d(8, 3, 2, stride=2))

    def forward(self, x):
        return self.body(x), x.mean()


def tiny_model():
    torch.manual_seed(0)
    return Tiny()


def _no_global_hooks():
    return not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 1000
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    """One CPU run of `profile ddpm_unet --json --plot`: (result, text output, png path). --backward is tested
    on a smaller model (the CPU's forward + backward of this one takes seconds)."""
    tmp = tmp_path_factory.mktemp("profile")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["profile", "ddpm_unet", "--batch", "1", "--device", "cpu", "--iters", "2", "--top", "5",
              "--json", str(tmp / "p.json"), "--plot", str(tmp / "p.png"), "--quiet"])
    return json.loads((tmp / "p.json").read_text()), out.getvalue(), tmp / "p.png"


def test_json_schema(ddpm):
    result, _, _ = ddpm
    assert set(result) == {"machine", "model", "settings", "limits", "variants", "layers", "by_type", "by_op"}
    assert result["machine"]["device"] == "cpu" and result["machine"]["threads"] >= 1
    assert result["machine"]["load_average"] >= 0
    assert result["model"]["name"] == "ddpm_unet" and result["model"]["parameters"] > 0
    assert result["model"]["flops"] > 0
    assert result["model"]["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32"},
                                         {"shape": [1], "dtype": "int64"}]
    assert result["settings"] == {"device": "cpu", "dtype": "float32", "channels_last": False, "batch": 1,
                                  "compile": False, "backward": False, "conv2d": "dilated", "iters": 2}
    assert result["limits"]["copy_gbps"] > 0 and result["limits"]["matmul_tflops"] == 0
    assert set(result["variants"]) == {"eager", "vlfast"}
    for name, v in result["variants"].items():
        assert set(v) == VARIANT_KEYS
        assert v["forward_us"] > 0 and v["forward_backward_us"] is None and v["peak_memory_mib"] is None
        assert v["max_abs_diff"] < 1e-3, name
    assert set(result["layers"]) == set(result["by_type"]) == {"eager", "vlfast"} and result["by_op"] == {}
    for name, rows in result["layers"].items():
        assert rows and all(set(r) == LAYER_KEYS for r in rows)
        assert [r["self_us"] for r in rows] == sorted((r["self_us"] for r in rows), reverse=True)
        assert sum(r["share"] for r in rows) == pytest.approx(100, abs=0.01)
        assert all(r["calls"] >= 1 and r["self_us"] >= 0 for r in rows)
        assert sum(result["by_type"][name].values()) == pytest.approx(sum(r["self_us"] for r in rows))
        convs = [r for r in rows if r["type"] == "Conv2d"]
        assert convs and all(r["flops"] > 0 and r["bytes"] == 0 for r in convs)
        assert all(r["tflops"] > 0 for r in convs if r["self_us"] > 0)
    eager = {r["type"] for r in result["layers"]["eager"]}
    assert {"DDPMUNet", "Conv2d", "GroupNorm", "Linear", "ResBlock", "AttnBlock"} <= eager
    assert not any(r["vlfast"] for r in result["layers"]["eager"])
    assert any(r["vlfast"] for r in result["layers"]["vlfast"])  # converted modules ran, hooks or not
    norms = [r for r in result["layers"]["eager"] if r["type"] == "GroupNorm"]
    assert all(r["bytes"] > 0 and r["flops"] == 0 and r["shape"].startswith("1x") for r in norms)
    assert "(model)" in {r["name"] for r in result["layers"]["eager"]}


def test_text_report(ddpm):
    _, text, _ = ddpm
    for header in ("whole model (medians, us):", "variant", "fwd+bwd", "vs eager", "top 5 of",
                   "layers, eager", "layers, vlfast", "self us", "TFLOP/s", "% copy",
                   "share of the forward by layer type", "eager/vlfast", "model ddpm_unet",
                   "measured limits: copy", "CPU:"):
        assert header in text, header
    assert "forward + backward by op category" not in text
    lines = text.splitlines()
    top = next(i for i, x in enumerate(lines) if x.startswith("top 5 of") and "eager" in x)
    assert lines[top + 1].split()[:3] == ["layer", "type", "output"] and set(lines[top + 2]) <= {"-", " "}
    assert all(lines[k].strip() for k in range(top + 3, top + 8)) and not lines[top + 8].strip()  # five rows


def test_plot(ddpm):
    _, text, png = ddpm
    assert f"wrote {png}" in text
    _png(png)
    assert _no_global_hooks()


def test_module_attribute_and_hooks(tmp_path, capsys):
    main(["profile", f"{__name__}:tiny_model", "--shape", "3,8,8", "--batch", "1", "--device", "cpu",
          "--iters", "2", "--json", str(tmp_path / "t.json"), "--quiet"])
    result = json.loads((tmp_path / "t.json").read_text())
    assert "whole model" in capsys.readouterr().out
    assert result["model"]["inputs"] == [{"shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert result["variants"]["eager"]["forward_backward_us"] is None and result["by_op"] == {}
    eager = {r["name"]: r for r in result["layers"]["eager"]}
    fused = {r["name"]: r for r in result["layers"]["vlfast"]}
    assert set(eager) == set(fused) == {"(model)", "body", "body.0", "body.1", "body.2", "body.3"}
    assert eager["body.1"]["type"] == "ReLU" and fused["body.1"]["type"] == "Identity"  # fused into body.0
    assert fused["body.0"]["vlfast"] and fused["body.2"]["vlfast"] and fused["body.3"]["vlfast"]
    conv = eager["body.0"]
    assert conv["flops"] == 2 * (1 * 8 * 8 * 8) * 3 * 9 and conv["shape"] == "1x8x8x8"
    up = eager["body.3"]
    assert up["flops"] == 2 * (1 * 8 * 8 * 8) * 3 * 4 and up["shape"] == "1x3x16x16"
    assert eager["body.2"]["bytes"] == 2 * 512 * 4
    assert _no_global_hooks()


def test_backward_leaves_model_alone(tmp_path):
    """backward=True: forward + backward times and the op categories; the model given is not changed."""
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = vp.profile_model(model, (torch.randn(2, 3, 8, 8),), device="cpu", iters=1, backward=True)
    assert type(model.body[0]) is nn.Conv2d and type(model.body[1]) is nn.ReLU and model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
    assert _no_global_hooks()
    assert result["settings"]["backward"] and result["settings"]["batch"] == 2
    assert all(v["forward_backward_us"] > 0 for v in result["variants"].values())
    assert set(result["by_op"]) == {"eager", "vlfast"}
    assert {"convolution", "norm"} <= set(result["by_op"]["eager"]) and result["by_op"]["vlfast"]
    assert set(result["by_op"]["eager"]) <= {c for c, _ in vp.OP_CATEGORIES} | {"elementwise/other"}
    text = vp.format_report(result, top=6)
    assert "forward + backward by op category" in text and "body.0" in text
    vp.plot(result, str(tmp_path / "fb.png"))  # with the forward + backward speed-ups
    _png(tmp_path / "fb.png")


def test_hooks_removed_on_error():
    def boom(module, args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with vp._global_hooks(boom, lambda *a: None):
            nn.Identity()(torch.ones(1))
    assert _no_global_hooks()


def test_compile(tmp_path):
    """--compile on the smallest model: four variants, speed-ups against torch.compile in the report."""
    main(["profile", f"{__name__}:tiny_model", "--shape", "3,8,8", "--batch", "1", "--device", "cpu",
          "--iters", "1", "--compile", "--json", str(tmp_path / "c.json"), "--quiet"])
    result = json.loads((tmp_path / "c.json").read_text())
    assert list(result["variants"]) == ["eager", "vlfast", "torch.compile", "vlfast+compile"]
    assert all(v["forward_us"] > 0 and v["max_abs_diff"] < 1e-4 for v in result["variants"].values())
    assert set(result["layers"]) == {"eager", "vlfast"}  # compiled variants are timed whole, not per layer


@pytest.mark.parametrize("argv, message", [
    (["nosuchmodel"], "unknown model"),
    ([f"{__name__}:tiny_model"], "--shape"),
    ([f"{__name__}:tiny_model", "--shape", "3,8"], "--shape"),
    ([f"{__name__}:no_such_attribute", "--shape", "3,8,8"], "cannot load model"),
    (["no_such_module_here:model", "--shape", "3,8,8"], "cannot load model"),
    (["context", "--batch", "0"], "--batch"),
    (["context", "--iters", "0"], "--iters"),
    (["context", "--device", "nodevice"], "--device"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(["profile", *argv])


@pytest.mark.parametrize("option", [["--dtype", "float8"], ["--conv2d", "some"]])
def test_bad_choices(option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "context", *option])
    assert e.value.code == 2 and option[0] in capsys.readouterr().err


def _row(op, case, provider, us):
    return Row(op, case, "float32", provider, Timing(us, us * 0.9, us * 1.1) if us else None)


def test_bench_plot_synthetic(tmp_path):
    rows = [_row("ddpm_step", "64x3x32x32", "eager", 100.0), _row("ddpm_step", "64x3x32x32", "torch.compile", 40.0),
            _row("ddpm_step", "64x3x32x32", "vlfast-cpp", 10.0), _row("ddpm_step", "64x3x32x32", "vlfast+x0", 12.0),
            _row("group_norm", "4x256x64x64", "eager", 50.0), _row("group_norm", "4x256x64x64", "vlfast", 80.0),
            _row("group_norm", "4x256x64x64", "vlfast-bad", None),
            _row("conv", "k2", "graph:eager", 30.0), _row("conv", "k2", "graph:vlfast", 20.0)]
    path = tmp_path / "b.png"
    plot.bench(rows, str(path), title="synthetic")
    _png(path)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.bench(rows[:2], str(tmp_path / "none.png"))


def test_bench_cli_plot(tmp_path, capsys, monkeypatch):
    import vlfast.bench as vb
    run = vb.run
    monkeypatch.setattr(vb, "run", lambda device, ops, **kw: run(device, ops, shapes=[(2, 3, 8, 8)], **kw))
    path = tmp_path / "bench.png"
    main(["bench", "--ops", "ddpm", "--device", "cpu", "--no-compile", "--plot", str(path)])
    assert f"wrote {path}" in capsys.readouterr().out
    _png(path)


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot.bench([_row("a", "b", "eager", 2.0), _row("a", "b", "vlfast", 1.0)], str(tmp_path / "x.png"))
