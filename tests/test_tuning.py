"""The per-card tables of measured backend orders (vlfast.tuning): keys, lookup, card rules, the benchmarks'
recording and the table built from their rows, and auto following a table (eager, cached plans, compiled)."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import vlfast
from vlfast import backends, tuning
from vlfast.ops import conv2d, group_norm
from vlfast.ops._common import layout_class
from vlfast.ops.conv2d import OP as CONV2D
from vlfast.ops.conv_transpose import OP as CONV_T
from vlfast.ops.ddpm import OP as DDPM
from vlfast.ops.group_norm import OP as GN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = tuning.card("cpu")[0]


def table(entries, card=CPU, device_type="cpu", capability=None):
    """A table in the file format; ``entries``: {op: {key: order}} (forward)."""
    return {"format": tuning.FORMAT, "card": card, "device_type": device_type, "capability": capability,
            "measured": {"date": "2026-12-01"},
            "entries": {op: {"forward": {k: {"order": list(o), "rel": {}, "cases": 1} for k, o in es.items()}}
                        for op, es in entries.items()}}


def gn_inputs(shape=(2, 8, 5, 7), groups=4, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, groups


# ---------------------------------------------------------------- keys
def test_size_and_channel_classes():
    assert [tuning.size_class(n) for n in (0, 1, 2, 3, 5, 6, 300, 3000, 1 << 20)] == \
        ["2^0", "2^0", "2^2", "2^2", "2^2", "2^2", "2^8", "2^12", "2^20"]
    assert [tuning.channel_class(c, "cin") for c in (1, 2, 3, 64, 65, 96, 128)] == \
        ["cin1", "cin2", "cin4", "cin64", "cin128", "cin128", "cin128"]
    assert layout_class(torch.empty(2, 3, 4, 5)) == "nchw"
    assert layout_class(torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last)) == "channels_last"
    assert layout_class(torch.empty(2, 1, 4, 5).to(memory_format=torch.channels_last)) == "nchw"  # both
    assert layout_class(torch.empty(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d)) == "channels_last"
    assert layout_class(torch.empty(3, 4)) == "nchw"
    assert tuning.slug("NVIDIA H200") == "nvidia-h200"
    assert tuning.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_keys_of_each_op():
    x, g = gn_inputs((4, 256, 64, 64), 32, torch.bfloat16, channels_last=True)
    gi = GN.check(x, g, None, None, 1e-5, None, None, None, None, None)
    assert tuning.key("group_norm", gi) == "bfloat16/channels_last/n2^22/g2^16"
    x = torch.empty(8, 64, 128, 128, dtype=torch.float16).to(memory_format=torch.channels_last)
    w = torch.empty(64, 64, 3, 3, dtype=torch.float16)
    out = torch.empty(8, 64, 128, 128, dtype=torch.float16)
    ci = CONV2D.check(x, w, None, 1, 4, 4, 1, "relu", None, out)
    assert tuning.key("conv2d", ci) == "float16/channels_last/dense/k3x3s1x1/d4/cin64/cout64/px2^18/out"
    dw = CONV2D.check(torch.empty(2, 12, 9, 9), torch.empty(12, 1, 5, 3), None, 2, 1, 1, 12, None,
                      torch.empty(2, 12, 4, 5), None)
    assert tuning.key("conv2d", dw) == "float32/nchw/depthwise/k5x3s2x2/d1/cin1/cout1/px2^6/res"
    ti = CONV_T.check(torch.empty(3, 96, 16, 16), torch.empty(96, 48, 4, 4), None, 2, 1, 0, 1, 1, None, None)
    assert tuning.key("conv_transpose2d", ti) == "float32/nchw/dense/k4x4s2x2/pad/cin128/cout64/px2^10/plain"
    gemm = CONV_T.check(torch.empty(3, 96, 16, 16), torch.empty(96, 24, 2, 2), None, 2, 0, 0, 2, 1, None, None)
    assert tuning.key("conv_transpose2d", gemm) == "float32/nchw/grouped/k2x2s2x2/p0/cin64/cout32/px2^10/plain"
    s = torch.empty(16, 3, 256, 256)
    di = DDPM.check(s, s, torch.rand(12, 8), 5, None, None, 1.0, 1.0, 0, True, None, 0, 0, None, False, False)
    assert tuning.key("ddpm_step", di) == "float32/dense/n2^22"


def test_every_call_reports_its_key():
    x, g = gn_inputs()
    for _ in range(2):  # the first call plans, the second runs the cached plan: both say it
        group_norm(x, g)
        assert vlfast.last_backend("group_norm", "key") == "float32/nchw/n2^10/g2^6"


# ---------------------------------------------------------------- tables and lookup
def test_table_rejects_what_is_not_a_table():
    with pytest.raises(ValueError, match="format"):
        tuning.Table({"format": 99})
    with pytest.raises(ValueError, match="card"):
        tuning.Table({"format": tuning.FORMAT, "device_type": "cpu", "entries": {}})
    with pytest.raises(ValueError, match="order must name vlfast backends"):
        tuning.Table(table({"group_norm": {"float32/nchw": ["cudnn"]}}))
    with pytest.raises(ValueError, match="order must name vlfast backends"):
        tuning.Table(table({"group_norm": {"float32/nchw": []}}))


def test_longest_prefix_wins_and_dtype_and_layout_must_match():
    t = tuning.Table(table({"group_norm": {"float32/nchw": ["reference"],
                                           "float32/nchw/n2^8": ["cpp", "reference"],
                                           "float32": ["cpp"]}}))
    assert t.match("group_norm", "forward", "float32/nchw/n2^8/g2^4") == ("float32/nchw/n2^8",
                                                                       t.data["entries"]["group_norm"]["forward"]
                                                                       ["float32/nchw/n2^8"])
    assert t.match("group_norm", "forward", "float32/nchw/n2^12/g2^4")[0] == "float32/nchw"
    assert t.match("group_norm", "forward", "float32/channels_last/n2^8/g2^4") is None  # "float32" alone: never
    assert t.match("group_norm", "backward", "float32/nchw/n2^8/g2^4") is None
    assert t.match("conv2d", "forward", "float32/nchw") is None


def test_auto_follows_the_table_and_nothing_else_does():
    x, g = gn_inputs()
    group_norm(x, g)
    assert vlfast.last_backend("group_norm") == "cpp"  # the CPU's default
    want = torch.nn.functional.group_norm(x.double(), g).float()
    with tuning.use_table(table({"group_norm": {"float32/nchw": ["reference", "cpp"]}})):
        for _ in range(2):  # planned under the table, then the cached plan
            torch.testing.assert_close(group_norm(x, g), want)
            assert vlfast.last_backend("group_norm") == "reference"
        group_norm(x, g, backend="cpp")  # forced: the table is not asked
        assert vlfast.last_backend("group_norm") == "cpp"
        xc, _ = gn_inputs(channels_last=True)
        group_norm(xc, g)  # no entry for channels_last: the rule (the device's default)
        assert vlfast.last_backend("group_norm") == "cpp"
    group_norm(x, g)  # the plans made under the table are gone with it
    assert vlfast.last_backend("group_norm") == "cpp"


def test_a_backend_that_cannot_run_is_skipped():
    x, g = gn_inputs()
    with tuning.use_table(table({"group_norm": {"float32/nchw": ["cuda", "reference", "cpp"]}})):
        group_norm(x, g)
        assert vlfast.last_backend("group_norm") == "reference"
    with tuning.use_table(table({"group_norm": {"float64/nchw": ["cuda"]}})):
        group_norm(x.double(), g)  # no kernel takes float64: the reference, never an error
        assert vlfast.last_backend("group_norm") == "reference"


def test_a_table_of_another_device_type_is_not_used():
    x, g = gn_inputs()
    cuda = table({"group_norm": {"float32/nchw": ["reference"]}}, card="NVIDIA H200", device_type="cuda",
                 capability="9.0")
    with tuning.use_table(cuda):
        group_norm(x, g)
        assert vlfast.last_backend("group_norm") == "cpp"


def test_decision_says_what_the_table_made_of_a_call():
    x = torch.empty(2, 8, 9, 9)
    w = torch.empty(8, 8, 3, 3)
    inputs = CONV2D.check(x, w, None, 1, 2, 2, 1, None, None, None)
    d = tuning.decision("conv2d", inputs)
    assert d["key"] == "float32/nchw/dense/k3x3s1x1/d2/cin8/cout8/px2^8/plain" and d["order"] is None
    assert d["matched"] is None and d["rule"] is None  # on a CPU: the device's default
    with tuning.use_table(table({"conv2d": {"float32/nchw/dense/k3x3s1x1": ["triton", "reference"]}})) as t:
        d = tuning.decision("conv2d", inputs)
        assert d["matched"] == "float32/nchw/dense/k3x3s1x1" and d["order"] == ("triton", "reference")
        assert d["why"] == "use_table" and t.card == CPU
        y = conv2d(torch.randn(2, 8, 9, 9), torch.randn(8, 8, 3, 3), None, 1, 2, 2)
        assert vlfast.last_backend("conv2d") == "triton" and y.shape == (2, 8, 9, 9)


def test_compiled_code_takes_the_tables_order():
    x, g = gn_inputs()
    fn = torch.compile(lambda x: group_norm(x, g, activation="silu"), fullgraph=True, dynamic=True)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x, g))
    with tuning.use_table(table({"group_norm": {"float32/nchw": ["reference", "cpp"]}})):
        torch._dynamo.reset()
        torch.testing.assert_close(fn(x), want)
        assert vlfast.last_backend("group_norm") == "reference"  # chosen while tracing
    torch._dynamo.reset()


# ---------------------------------------------------------------- which table a device uses
@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Package tables from tmp_path, a pretend H200, and the table caches cleared around the test."""
    def clear():
        tuning._table_for.cache_clear()
        tuning._load.cache_clear()
        tuning._environment.cache_clear()
    real_card = tuning.card
    monkeypatch.setattr(tuning, "HERE", str(tmp_path))
    monkeypatch.setattr(tuning, "card", lambda t, i=None: ("NVIDIA H200", "9.0") if t == "cuda" else real_card(t))
    monkeypatch.delenv("VLFAST_TUNING", raising=False)
    clear()
    yield tmp_path
    clear()


def _write(path, data):
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def test_card_rule_exact_then_same_capability_then_none(tables):
    _write(tables / "nvidia-h100.json", table({}, "NVIDIA H100 80GB HBM3", "cuda", "9.0"))
    _write(tables / "nvidia-a100.json", table({}, "NVIDIA A100-SXM4-80GB", "cuda", "8.0"))
    t, why = tuning.table_for(torch.device("cuda"))
    assert t.card == "NVIDIA H100 80GB HBM3" and "same compute capability" in why
    _write(tables / "nvidia-h200.json", table({}, "NVIDIA H200", "cuda", "9.0"))
    tuning._table_for.cache_clear()
    t, why = tuning.table_for(torch.device("cuda"))
    assert t.card == "NVIDIA H200" and why == "measured on this card (NVIDIA H200)"
    assert tuning.table_for(torch.device("cpu")) == (None, f"no table for {CPU}")


def test_no_capability_match_means_the_rules(tables):
    _write(tables / "nvidia-a100.json", table({}, "NVIDIA A100-SXM4-80GB", "cuda", "8.0"))
    assert tuning.table_for(torch.device("cuda"))[0] is None


def test_environment_table_first_and_off(tables, monkeypatch):
    _write(tables / "cpu.json", table({"group_norm": {"float32/nchw": ["cpp"]}}))
    mine = _write(tables / "mine.jsonx", table({"group_norm": {"float32/nchw": ["reference"]}}))
    monkeypatch.setenv("VLFAST_TUNING", mine)
    assert tuning.table_for(torch.device("cpu"))[0].source == mine
    monkeypatch.setenv("VLFAST_TUNING", "off")
    tuning._environment.cache_clear()
    tuning._table_for.cache_clear()
    assert tuning.table_for(torch.device("cpu")) == (None, "VLFAST_TUNING=off")


def test_an_unreadable_table_is_ignored_with_a_warning(tables):
    (tables / "broken.json").write_text("{not json")
    _write(tables / "cpu.json", table({"group_norm": {"float32/nchw": ["reference"]}}))
    with pytest.warns(UserWarning, match="ignoring the tuning table .*broken.json"):
        t, _ = tuning.table_for(torch.device("cpu"))
    assert t.card == CPU


def test_a_broken_table_in_the_environment_never_breaks_a_call(tmp_path):
    bad = _write(tmp_path / "bad.json", {"format": 1, "card": "x"})
    code = ("import warnings, torch, vlfast\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    y = vlfast.ops.group_norm(torch.randn(2, 4, 3, 3), 2)\n"
            "print(vlfast.last_backend('group_norm'), any('ignoring the tuning table' in str(m.message) for m in w))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VLFAST_TUNING": bad}, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpp", "True"]


# ---------------------------------------------------------------- recording and building
def test_recording_counts_what_ran():
    x, g = gn_inputs()
    with tuning.recording() as rec:
        for _ in range(9):
            group_norm(x, g)
        group_norm(x, g, backend="reference")
    s = rec.summary()
    assert s == {"group_norm forward": {"key": "float32/nchw/n2^10/g2^6", "backend": "cpp", "share": 0.9}}
    assert not backends.recorders


def row(op, case, provider, us, ran=None, dtype="torch.bfloat16"):
    return {"op": op, "case": case, "dtype": dtype, "provider": provider,
            "timing": {"median": us, "p20": us, "p80": us, "ran": ran or {}}}


def ran(key, backend, op="conv2d", share=1.0, direction="forward"):
    return {f"{op} {direction}": {"key": key, "backend": backend, "share": share}}


K1 = "bfloat16/channels_last/dense/k3x3s1x1/d2/cin64/cout64/px2^18/plain"
K2 = "bfloat16/channels_last/dense/k3x3s1x1/d2/cin256/cout256/px2^16/plain"
K3 = "bfloat16/channels_last/dense/k3x3s1x1/d4/cin64/cout64/px2^18/plain"
MACHINE = {"device": "cuda", "name": "NVIDIA H200", "capability": "9.0", "date": "2026-12-01", "torch": "2.11"}


def test_build_ranks_measured_keys_and_their_prefixes():
    rows = [row("conv2d fwd", "a", "eager", 60.0), row("conv2d fwd", "a", "vlfast-triton", 30.0, ran(K1, "triton")),
            row("conv2d fwd", "a", "vlfast-auto", 31.0, ran(K1, "triton")),
            row("conv2d fwd", "a", "graph:vlfast-triton", 1.0, ran(K1, "triton")),  # graph rows: not per call
            row("conv2d fwd", "b", "eager", 100.0), row("conv2d fwd", "b", "vlfast-triton", 150.0, ran(K2, "triton")),
            row("conv2d fwd", "c", "eager", 70.0), row("conv2d fwd", "c", "vlfast-triton", 35.0, ran(K3, "triton")),
            row("conv2d fwd", "d", "eager", 10.0),  # no vlfast row: nothing to rank
            row("conv2d fwd", "e", "vlfast-triton", 5.0, ran(K1, "triton", share=0.5)),  # a chain of layers
            row("conv2d fwd+bwd", "f", "eager", 500.0),
            row("conv2d fwd+bwd", "f", "vlfast-triton", 100.0, {**ran(K1, "triton"), **ran(K1, "reference",
                                                                                          direction="backward")})]
    t = tuning.build(rows, MACHINE)
    assert (t.card, t.device_type, t.capability) == ("NVIDIA H200", "cuda", "9.0")
    fwd = t.data["entries"]["conv2d"]["forward"]
    assert "backward" not in t.data["entries"]["conv2d"]
    assert fwd[K1] == {"order": ["triton", "reference"], "rel": {"triton": 1.0, "reference": 2.0}, "cases": 1}
    assert fwd[K2]["order"] == ["reference", "triton"] and fwd[K3]["order"] == ["triton", "reference"]
    # The prefixes: at cin64 both measured keys favour Triton; over all three, Triton's geometric mean of
    # time / best is (1 * 1.5 * 1)^(1/3) = 1.14 against the reference's (2 * 1 * 2)^(1/3) = 1.59.
    root = fwd["bfloat16/channels_last"]
    assert root["order"] == ["triton", "reference"] and root["cases"] == 3
    assert root["rel"] == {"triton": round(1.5 ** (1 / 3), 4), "reference": round(4 ** (1 / 3), 4)}
    # Prefixes that order as their parent are left out: the lookup finds the parent, with the same order.
    assert "bfloat16/channels_last/dense" not in fwd and "bfloat16/channels_last/dense/k3x3s1x1/d2/cin64" not in fwd
    assert fwd["bfloat16/channels_last/dense/k3x3s1x1/d2/cin256"]["order"] == ["reference", "triton"]
    unseen = "bfloat16/channels_last/dense/k3x3s1x1/d8/cin64/cout64/px2^18/plain"
    assert t.match("conv2d", "forward", unseen)[1]["order"] == ["triton", "reference"]
    assert t.match("conv2d", "forward", K2.replace("px2^16", "px2^20"))[1]["order"] == ["reference", "triton"]
    for k in (K1, K2, K3):  # the pruning loses nothing: every lookup is what the full table would give
        assert t.match("conv2d", "forward", k)[0] == k


def test_build_ranks_partly_measured_backends_last_and_skips_mixed_keys():
    gn = "bfloat16/nchw/n2^22/g2^16"
    rows = [row("group_norm ddpm fwd", "a", "eager", 90.0),
            row("group_norm ddpm fwd", "a", "vlfast-cuda", 40.0, ran(gn, "cuda", "group_norm")),
            row("group_norm ddpm fwd", "a", "vlfast-triton", 30.0, ran(gn, "triton", "group_norm")),
            row("group_norm ddpm fwd", "b", "eager", 90.0),
            row("group_norm ddpm fwd", "b", "vlfast-cuda", 20.0, ran(gn, "cuda", "group_norm")),
            row("ddpm step", "c", "vlfast-cuda", 20.0, ran("float32/dense/n2^22", "cuda", "ddpm_step")),
            row("ddpm step", "c", "vlfast-triton", 25.0, ran("float32/dense/n2^20", "triton", "ddpm_step")),
            row("ddpm step", "c", "eager", 250.0)]
    t = tuning.build(rows, MACHINE)
    e = t.data["entries"]["group_norm"]["forward"][gn]
    # cuda and the reference (eager) were timed in both cases, Triton in one (where it won): after them.
    assert e["order"] == ["cuda", "reference", "triton"] and e["cases"] == 2
    assert "ddpm_step" not in t.data["entries"]  # two keys in one case: not one call's measurement
    t.save(os.devnull)


def test_bench_rows_carry_what_ran_and_make_a_table(tmp_path):
    from dataclasses import asdict

    from vlfast.bench import run
    cpu = torch.device("cpu")
    info, _, rows = run(cpu, ("group_norm",), compile_=False, progress=False,
                        shapes=[(2, 64, 16, 16, torch.float32, False), (2, 64, 16, 16, torch.float32, True)])
    rows += run(cpu, ("ddpm",), compile_=False, progress=False, shapes=[(2, 3, 16, 16)])[2]
    vl = [r for r in rows if r.provider == "vlfast-cpp" and r.timing]
    assert vl and all(len(r.timing.ran) == 1 and next(iter(r.timing.ran.values()))["backend"] == "cpp" for r in vl)
    path = str(tmp_path / "bench.json")
    from vlfast.bench.common import write_json
    write_json(path, info, rows)
    t = tuning.build_from_files([path])
    assert t.card == CPU and t.device_type == "cpu"
    assert set(t.data["entries"]) == {"group_norm", "ddpm_step"}
    gn_keys = {r.timing.ran["group_norm forward"]["key"] for r in vl if "group_norm forward" in r.timing.ran}
    assert gn_keys and gn_keys <= set(t.data["entries"]["group_norm"]["forward"])
    t.save(str(tmp_path / "t.json"))
    with tuning.use_table(str(tmp_path / "t.json")) as loaded:
        assert loaded.data == json.loads(json.dumps(tuning.build([asdict(r) for r in rows], info).data))
    r = subprocess.run([sys.executable, "-m", "vlfast", "tuning", "show", "--table", str(tmp_path / "t.json")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "group_norm forward" in r.stdout and CPU in r.stdout, r.stderr


def test_build_passes_over_other_json(tmp_path):
    a = _write(tmp_path / "a.json", {"machine": {"name": "NVIDIA H200", "device": "cuda"}, "rows": []})
    other = _write(tmp_path / "tuning.json", table({}))
    with pytest.warns(UserWarning, match="tuning.json is not a benchmark's JSON"):
        assert tuning.build_from_files([a, other]).card == "NVIDIA H200"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no benchmark JSON"):
        tuning.build_from_files([other])


def test_build_refuses_files_of_two_cards(tmp_path):
    a = _write(tmp_path / "a.json", {"machine": {"name": "NVIDIA H100"}, "rows": []})
    b = _write(tmp_path / "b.json", {"machine": {"name": "NVIDIA H200"}, "rows": []})
    with pytest.raises(ValueError, match="measured on 'NVIDIA H200'"):
        tuning.build_from_files([a, b])
    r = subprocess.run([sys.executable, "-m", "vlfast", "tuning", "build", a, b], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode != 0 and "measured on" in r.stderr


def test_package_tables_are_valid():
    for path in tuning.package_tables():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = tuning.Table.load(path)
        assert os.path.basename(path) == tuning.slug(t.card) + ".json"
        assert t.device_type == "cuda" and t.capability


# ---------------------------------------------------------------- knobs: a backend's tiles and paths
TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1}


def test_tile_knob_is_checked_and_replaces_the_rule():
    from vlfast.ops import _overrides, igemm
    for bad in ({"BLOCK_Q": 16}, {"BLOCK_M": 24}, {"BLOCK_N": 512}, {"num_warps": 32}, {"num_warps": 3},
                {"num_stages": 9}, {"GROUP_M": 0}, {"BLOCK_K": True}, [16]):
        with pytest.raises(ValueError, match="igemm_tiles"):
            with _overrides.use(igemm_tiles=bad):
                pass
    rule = igemm.phase_config(4096, 64, 32, torch.bfloat16)
    with _overrides.use(igemm_tiles={"BLOCK_M": 32, "BLOCK_K": 128, "num_stages": 2}):
        cfg = igemm.phase_config(4096, 64, 32, torch.bfloat16)
        assert cfg == {**rule, "BLOCK_M": 32, "BLOCK_K": 32, "num_stages": 2}  # K no longer than Cin/G allows
        sub = igemm.subpixel_config(4096, 256, 64, 64, torch.bfloat16)
        assert sub["BLOCK_M"] == 32 and sub["BLOCK_K"] == 64 and sub["num_stages"] == 2


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_tile_knob_runs_right(op):
    from vlfast.ops import _overrides
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, 7, 9, generator=g)
    if op == "conv2d":
        w, b = torch.randn(20, 24, 3, 3, generator=g), torch.randn(20, generator=g)
        call = lambda **kw: conv2d(x, w, b, 1, 2, 2, activation="relu", **kw)  # noqa: E731
        want = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 1, 2, 2)).float()
    else:
        w, b = torch.randn(24, 20, 4, 4, generator=g), torch.randn(20, generator=g)
        call = lambda **kw: vlfast.ops.conv_transpose2d(x, w, b, stride=2, padding=1, **kw)  # noqa: E731
        want = torch.nn.functional.conv_transpose2d(x.double(), w.double(), b.double(), 2, 1).float()
    for tiles in (TILES, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}):
        with _overrides.use(igemm_tiles=tiles):
            torch.testing.assert_close(call(backend="triton"), want, rtol=1e-4, atol=1e-4)


def test_table_knobs_are_checked():
    with pytest.raises(ValueError, match="not knobs a plan reads"):
        tuning.Table({**table({}), "entries": {"group_norm": {"forward": {"float32/nchw": {
            "order": ["cpp"], "knobs": {"cpp": {"group_norm_cpu_cache": 0}}}}}}})
    with pytest.raises(ValueError, match="igemm_tiles"):
        tuning.Table({**table({}), "entries": {"conv2d": {"forward": {"float32/nchw": {
            "order": ["triton"], "knobs": {"triton": {"igemm_tiles": {"BLOCK_M": 7}}}}}}}})
    with pytest.raises(ValueError, match="backend"):
        tuning.Table({**table({}), "entries": {"conv2d": {"forward": {"float32/nchw": {
            "order": ["triton"], "knobs": {"cudnn": {}}}}}}})


def test_auto_plans_with_the_tables_knobs_at_the_measured_key():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 8, 9, 9, generator=g), torch.randn(8, 8, 3, 3, generator=g)
    want = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 2, 2).float()
    k = tuning.key("conv2d", CONV2D.check(x, w, None, 1, 2, 2, 1, None, None, None))
    data = table({"conv2d": {k: ["triton", "reference"], "float32/nchw": ["triton", "reference"]}})
    data["entries"]["conv2d"]["forward"][k]["knobs"] = {"triton": {"igemm_tiles": TILES}}
    data["entries"]["conv2d"]["forward"]["float32/nchw"]["knobs"] = {"triton": {"igemm_tiles": TILES}}
    with tuning.use_table(data):
        with tuning.recording() as rec:
            for _ in range(2):
                torch.testing.assert_close(conv2d(x, w, None, 1, 2, 2), want, rtol=1e-4, atol=1e-4)
        assert rec.summary()["conv2d forward"] == {"key": k, "backend": "triton", "share": 1.0,
                                                  "knobs": {"igemm_tiles": TILES}}
        assert tuning.decision("conv2d", CONV2D.check(x, w, None, 1, 2, 2, 1, None, None, None))["knobs"] == \
            {"triton": {"igemm_tiles": TILES}}
        with tuning.recording() as rec:  # another key under the same prefix: its order, not the knobs
            conv2d(x[:1], w, None, 1, 2, 2)
        assert rec.summary()["conv2d forward"]["backend"] == "triton"
        assert "knobs" not in rec.summary()["conv2d forward"]
        from vlfast.ops import _overrides
        with _overrides.use(igemm_tiles={"BLOCK_M": 32}), tuning.recording() as rec:  # the caller's knob wins
            conv2d(x, w, None, 1, 2, 2)
        assert rec.summary()["conv2d forward"]["knobs"] == {"igemm_tiles": {"BLOCK_M": 32}}


def test_build_keeps_the_knobs_a_backend_won_with():
    k = K1
    tiles = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}

    def r(case, provider, us, backend=None, knobs=None):
        got = ran(k, backend or provider.split("-")[1].split()[0])
        if knobs:
            got["conv2d forward"]["knobs"] = knobs
        return row("conv2d fwd", case, provider, us, got)
    rows = [row("conv2d fwd", "a", "eager", 60.0), r("a", "vlfast-triton", 40.0),
            r("a", "vlfast-triton tiles 64x128x64 w4 s4", 30.0, knobs={"igemm_tiles": tiles}),
            r("a", "vlfast-triton tiles 128x256x64 w8 s3", 45.0, knobs={"igemm_tiles": {**tiles, "BLOCK_N": 256}}),
            r("a", "vlfast-auto", 41.0, backend="triton")]
    t = tuning.build(rows, MACHINE)
    e = t.data["entries"]["conv2d"]["forward"][k]
    assert e["order"] == ["triton", "reference"] and e["rel"] == {"triton": 1.0, "reference": 2.0}
    assert e["knobs"] == {"triton": {"igemm_tiles": tiles}}
    assert "knobs" not in t.data["entries"]["conv2d"]["forward"]["bfloat16/channels_last"]
    # Two cases at one key that won with different tiles: no knobs (neither speaks for the key).
    rows += [row("conv2d fwd", "b", "eager", 60.0), r("b", "vlfast-triton", 20.0),
             r("b", "vlfast-triton tiles 64x128x64 w4 s4", 30.0, knobs={"igemm_tiles": tiles})]
    assert "knobs" not in tuning.build(rows, MACHINE).data["entries"]["conv2d"]["forward"][k]


def test_probes_run_through_the_op_and_are_recorded_with_their_knobs(monkeypatch):
    """The tuning probes (tools/probes.py) call the op under knobs, so a benchmark row of one records the
    key, the backend and the knobs the table keeps; tile probes only where asked, in 16-bit channels_last,
    never wider than the GEMM."""
    sys.path.insert(0, ROOT)
    from tools import probes
    x, w, b = torch.randn(2, 32, 5, 5), torch.randn(32), torch.randn(32)
    temb = torch.randn(2, 32)
    run = probes.forced_group_norm("ddpm", group_norm_single_max=0)
    with tuning.recording() as rec:
        y = run(x, w, b, temb, None, None)
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x + temb[:, :, None, None], probes.G, w, b))
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    assert rec.summary()["group_norm forward"]["backend"] == "triton"
    assert rec.summary()["group_norm forward"]["knobs"] == {"group_norm_single_max": 0}
    monkeypatch.delenv("VLFAST_TILE_PROBES", raising=False)
    assert probes._tiles(256, 256, torch.bfloat16, True) == []
    monkeypatch.setenv("VLFAST_TILE_PROBES", "1")
    assert len(probes._tiles(256, 256, torch.bfloat16, True)) == 3
    assert [t["BLOCK_N"] for t in probes._tiles(128, 128, torch.bfloat16, True)] == [64, 128]
    assert probes._tiles(12, 64, torch.bfloat16, True) == []
    assert probes._tiles(256, 256, torch.float32, True) == [] and probes._tiles(256, 256, torch.bfloat16, False) == []


def test_build_attributes_the_backward_from_forward_and_backward_rows():
    gn = "bfloat16/nchw/n2^22/g2^16"

    def both(backend_f, backend_b):
        return {**ran(gn, backend_f, "group_norm"), **ran(gn, backend_b, "group_norm", direction="backward")}
    rows = [row("group_norm ddpm fwd", "a", "eager", 100.0),
            row("group_norm ddpm fwd", "a", "vlfast-cuda", 40.0, ran(gn, "cuda", "group_norm")),
            row("group_norm ddpm fwd", "a", "vlfast-triton", 30.0, ran(gn, "triton", "group_norm")),
            row("group_norm ddpm fwd+bwd", "a", "eager", 400.0),                  # reference backward 300
            row("group_norm ddpm fwd+bwd", "a", "vlfast-cuda", 140.0, both("cuda", "cuda")),        # 100
            row("group_norm ddpm fwd+bwd", "a", "vlfast-triton", 230.0, both("triton", "triton")),  # 200
            row("group_norm ddpm fwd+bwd", "a", "vlfast-auto", 130.0, both("triton", "cuda"))]
    t = tuning.build(rows, MACHINE)
    assert t.data["entries"]["group_norm"]["forward"][gn]["order"] == ["triton", "cuda", "reference"]
    bwd = t.data["entries"]["group_norm"]["backward"][gn]
    assert bwd["order"] == ["cuda", "triton", "reference"]
    assert bwd["rel"] == {"cuda": 1.0, "triton": 2.0, "reference": 3.0}
    # A forward + backward row without its forward-alone counterpart, or with another forward backend there,
    # says nothing of the backward.
    rows[5] = row("group_norm ddpm fwd+bwd", "a", "vlfast-triton", 230.0, both("cuda", "triton"))
    bwd = tuning.build(rows, MACHINE).data["entries"]["group_norm"]["backward"][gn]
    assert bwd["order"] == ["cuda", "reference"]
    with tuning.use_table(tuning.build(rows, MACHINE).data | {"card": CPU, "device_type": "cpu"}):
        x, g = gn_inputs((2, 8, 4, 4))
        xx = x.bfloat16().requires_grad_()
        assert tuning.lookup("group_norm", "backward", gn, torch.device("cpu")) == ("cuda", "reference")
        group_norm(xx, g).sum().backward()  # cuda cannot run here: the next, the reference
        assert vlfast.last_backend("group_norm", "backward") == "reference"
