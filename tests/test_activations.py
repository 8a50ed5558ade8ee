"""The one activation table, vlfast/activations.py, and every place that repeats it.

Python (the ops' ACT_CODE / ACT_NAME, the reference's ACTIVATIONS / activate, vlfast.nn) and the Triton
constexprs import the table; the C++ sources can't, so their enums, their count of activations and the
codes their comments and messages spell out are parsed here and held equal to it. Then the compiled
kernels (Triton, and the C++ CPU kernel where vlfast._C has it) are run once per code against the
reference function of its name.
"""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlfast import activations as A

try:
    import triton
    import triton.language as tl
except ImportError:  # the Triton tests skip
    triton = None

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CPP_SUFFIXES = {".h", ".cuh", ".hpp", ".cpp", ".cu"}
# The C++ files that define the activation enum today: each must still yield one (a parser that finds
# nothing fails rather than passes).
ENUM_FILES = ("cpu/group_norm.h", "cuda/group_norm_kernels.cuh")


def symbol(name) -> str:
    """The C++ / Triton constant of an activation: ACT_NONE, ACT_SILU, ..."""
    return "ACT_" + (name or "none").upper()


EXPECTED = {symbol(name): code for name, code in A.CODE.items()}
# "0 none", "1 (silu)", "3 GELU": a code written next to its name, in a comment, a docstring or a message.
WRITTEN_CODE = re.compile(r"\b(\d+)\s*\(?\s*(%s)\b" % "|".join(re.escape(n or "none") for n in A.NAMES),
                          re.IGNORECASE)
# {"silu": 1, ...}: a Python copy of the table (use vlfast.activations.CODE instead).
DICT_CODE = re.compile(r"""["'](%s)["']\s*:\s*(\d+)\b""" % "|".join(re.escape(n) for n in A.NAMES[1:]))


def cpp_files():
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in CPP_SUFFIXES)
    assert files, f"no C++ sources under {CSRC}"
    return files


def strip_comments(src: str) -> str:
    """C++ source without its comments, newlines kept (so that offsets still give line numbers)."""
    src = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group()), src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def cpp_act_definitions(path: Path):
    """The ACT_* constants ``path`` defines: (enums, singles). enums: one {symbol: code} per enum with ACT_*
    enumerators (each must have an explicit ``= <int>``); singles: [(symbol, code)] of constexpr / const
    variables and #defines."""
    src = strip_comments(path.read_text())
    enums = []
    for m in re.finditer(r"\benum\b[^{};]*\{([^}]*)\}", src):
        if "ACT_" not in m.group(1):
            continue
        items = {}
        for item in filter(None, (s.strip() for s in m.group(1).split(","))):
            e = re.fullmatch(r"(ACT_\w+)\s*=\s*(\d+)", item)
            assert e, f"{path.relative_to(ROOT)}: enumerator {item!r}: want ACT_<NAME> = <code>, written out"
            assert e[1] not in items, f"{path.relative_to(ROOT)}: {e[1]} twice in one enum"
            items[e[1]] = int(e[2])
        enums.append(items)
    singles = [(s, int(v)) for s, v in re.findall(r"#\s*define\s+(ACT_\w+)\s+\(?(\d+)\)?", src)]
    singles += [(s, int(v)) for s, v in
                re.findall(r"\b(?:constexpr|const)\b[\w\s:<>]*?\b(ACT_\w+)\s*(?:=|\{)\s*(\d+)", src)]
    return enums, singles


# ---------------------------------------------------------------- the table


def test_table():
    assert A.NAMES[0] is None and len(set(A.NAMES)) == len(A.NAMES)
    assert all(isinstance(n, str) and n == n.lower() for n in A.NAMES[1:])
    assert A.CODE == {name: i for i, name in enumerate(A.NAMES)}
    assert A.NAME == {i: name for i, name in enumerate(A.NAMES)}
    for name in A.NAMES:
        assert A.code(name) == A.CODE[name] and A.NAME[A.code(name)] == name


@pytest.mark.parametrize("bad", ["SiLU", "tanh", "", 0, 1, True, 1.0, b"silu", ["silu"], {"silu": 1}, object()],
                         ids=repr)
def test_code_rejects(bad):
    with pytest.raises(ValueError, match="activation must be one of"):
        A.code(bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        A.activate(torch.zeros(2), bad)
    with pytest.raises(ValueError, match="activation must be one of"):
        A.activation_grad(torch.zeros(2), bad)


def test_imports_neither_torch_nor_triton():
    """The table loads on its own (by path: vlfast/__init__ imports torch) without importing torch or Triton."""
    prog = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('acts', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert m.CODE['gelu'] == 3, m.CODE\n"
            "print(sorted(k for k in ('torch', 'triton', 'numpy') if k in sys.modules))")
    run = subprocess.run([sys.executable, "-c", prog, str(ROOT / "vlfast" / "activations.py")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------- Python: the same objects


def test_python_aliases():
    import vlfast.nn
    import vlfast.reference.conv_transpose as ref_ct
    import vlfast.reference.group_norm as ref_gn
    gn_ops, ct_ops = (importlib.import_module(f"vlfast.ops.{m}") for m in ("group_norm", "conv_transpose"))

    # The ops take codes and names from the table itself, and reject what it rejects with its message.
    assert gn_ops.ACT_NAME is A.NAME and ct_ops.ACT_NAME is A.NAME and ct_ops.ACT_CODE is A.CODE
    assert gn_ops.activation_code is A.code and ct_ops.activation_code is A.code
    for mod in (ref_gn, ref_ct):
        assert mod.ACTIVATIONS is A.NAMES, mod.__name__
    for mod in (ref_gn, ref_ct, vlfast.nn):
        assert mod.activate is A.activate, mod.__name__
    assert ref_gn.activation_grad is A.activation_grad


# Where activations differ most: NaN, the infinities, signed zeros, both tails, the extremes.
SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 50.0, -50.0,
           100.0, -100.0, 1e30, -1e30]
TORCH_ACT = {None: lambda y: y, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}
FLOATS = {torch.float32: "fp32", torch.float64: "fp64"}


def torch_act(name, y, g, compute=torch.float64):
    """(act(y), g * act'(y)) by PyTorch's own function and autograd computed in ``compute``, in y's dtype.

    float64 for the kernels: torch's float32 GELU on the CPU gives NaN at +inf in its vectorised loop and
    inf in its scalar one (torch 2.13); in float64 both give inf, as the formula does.
    """
    yc = y.to(compute).requires_grad_()
    out = TORCH_ACT[name](yc)
    (grad,) = torch.autograd.grad(out, yc, g.to(compute)) if name else (g.to(compute),)
    return out.detach().to(y.dtype), grad.to(y.dtype)


def assert_same(got, want, name):
    """The same NaN pattern (NaN in, NaN out), and close elsewhere (infinities equal)."""
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: NaN at {got.isnan().tolist()}, torch's at {want.isnan().tolist()}")
    rtol, atol = (1e-5, 1e-12) if got.dtype == torch.float32 else (1e-12, 1e-30)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def special_inputs(dtype, device="cpu"):
    y = torch.tensor(SPECIAL, dtype=dtype, device=device)
    g = torch.linspace(-1.0, 2.0, y.numel(), dtype=dtype, device=device)
    return y, g


def test_torch_semantics_at_nan():
    """What the activations are held to, stated once: PyTorch passes NaN through every forward, and ReLU's
    backward passes the incoming gradient at a NaN input (threshold_backward: 0 where y <= 0, else g)."""
    y = torch.tensor([float("nan"), 1.0, -1.0], requires_grad=True)
    for fn in TORCH_ACT.values():
        assert fn(y)[0].isnan()
    (grad,) = torch.autograd.grad(F.relu(y), y, torch.tensor([3.0, 3.0, 3.0]))
    assert grad.tolist() == [3.0, 3.0, 0.0]


@pytest.mark.parametrize("dtype", list(FLOATS), ids=FLOATS.get)
@pytest.mark.parametrize("name", A.NAMES, ids=str)
def test_reference_functions(name, dtype):
    """activate / activation_grad against torch's function and autograd in the same dtype, NaN and
    infinities included (ReLU's gradient at NaN: the incoming one, as threshold_backward)."""
    y, g = special_inputs(dtype)
    want, want_grad = torch_act(name, y, g, compute=dtype)
    assert_same(A.activate(y, name), want, f"activate({name})")
    assert_same(g * A.activation_grad(y, name), want_grad, f"activation_grad({name})")


# ---------------------------------------------------------------- C++: parsed


def test_cpp_enums():
    enums, singles = {}, []
    for path in cpp_files():
        e, s = cpp_act_definitions(path)
        rel = str(path.relative_to(CSRC))
        if e:
            enums[rel] = e
        singles += [(rel, sym, v) for sym, v in s]
    for rel in ENUM_FILES:
        assert rel in enums, f"found no ACT_* enum in csrc/{rel}"
    assert len(enums) >= len(ENUM_FILES)
    for rel, es in enums.items():
        for e in es:
            assert e == EXPECTED, f"csrc/{rel}: enum {e} != the table's {EXPECTED} (vlfast/activations.py)"
    for rel, sym, v in singles:
        assert EXPECTED.get(sym) == v, f"csrc/{rel}: {sym} = {v}; the table has {EXPECTED}"


def test_cpp_count():
    found = [(p.relative_to(CSRC), int(v)) for p in cpp_files()
             for v in re.findall(r"\bkActivations\s*=\s*(\d+)", strip_comments(p.read_text()))]
    assert found, "found no kActivations in csrc/"
    for rel, v in found:
        assert v == len(A.NAMES), f"csrc/{rel}: kActivations = {v}, the table has {len(A.NAMES)}"


def test_written_codes():
    """Comments, docstrings and error messages that list codes ("0 none, 1 silu, ..."), and Python dicts that
    copy the table ({"silu": 1, ...}), have the table's codes."""
    py = [p for d in ("vlfast", "kernels", "tests", "benchmarks", "tools") for p in sorted((ROOT / d).rglob("*.py"))
          if p.resolve() != Path(__file__).resolve()]
    seen = 0
    for path in cpp_files() + py:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            pairs = WRITTEN_CODE.findall(line)
            if path.suffix == ".py":
                pairs += [(code, name) for name, code in DICT_CODE.findall(line)]
            for code, name in pairs:
                seen += 1
                name = None if name.lower() == "none" else name.lower()
                assert int(code) == A.CODE[name], (
                    f"{path.relative_to(ROOT)}:{lineno}: {line.strip()!r} gives {name!r} code {code}, "
                    f"the table {A.CODE[name]}")
    assert seen >= len(A.NAMES), "found no written codes: is the pattern stale?"


# ---------------------------------------------------------------- Triton


def test_triton_constexprs():
    if triton is None:
        pytest.skip("no triton")
    import vlfast.kernels.activation as K

    assert K.__name__ == "vlfast.kernels.activation"
    consts = {k: v for k, v in vars(K).items() if k.startswith("ACT_")}
    assert all(isinstance(v, tl.constexpr) for v in consts.values()), consts
    assert {k: v.value for k, v in consts.items()} == EXPECTED
    # The repo root's kernels/ is vlfast.kernels, never a top-level package of its own.
    assert "kernels" not in sys.modules and "kernels.activation" not in sys.modules


if triton is not None:
    from vlfast.kernels.activation import act as _act
    from vlfast.kernels.activation import act_backward as _act_backward

    @triton.jit
    def _act_kernel(x_ptr, g_ptr, y_ptr, dx_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, _act(x, ACT), mask=mask)
        tl.store(dx_ptr + offs, _act_backward(g, x, ACT), mask=mask)


@pytest.mark.parametrize("dtype", list(FLOATS), ids=FLOATS.get)
@pytest.mark.parametrize("name", A.NAMES, ids=str)
def test_triton_act(name, dtype):
    """act / act_backward of each code against torch's function of its name and autograd, NaN and
    infinities included."""
    if triton is None:
        pytest.skip("no triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU runs under TRITON_INTERPRET=1 only")
    x, g = special_inputs(dtype, device)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    _act_kernel[(1,)](x, g, y, dx, x.numel(), ACT=A.code(name), BLOCK=triton.next_power_of_2(x.numel()))
    want, want_grad = torch_act(name, x.cpu(), g.cpu())
    assert_same(y.cpu(), want, f"act({name})")
    assert_same(dx.cpu(), want_grad, f"act_backward({name})")


# ---------------------------------------------------------------- C++: compiled (the CPU kernel)


def test_cpp_cpu_kernel_codes():
    """The built CPU GroupNorm kernel applies, for each code, the activation of its name, and rejects the
    first code past the table."""
    from vlfast.reference.group_norm import group_norm

    try:
        import vlfast._C  # noqa: F401  (registers torch.ops.vlfast)
    except ImportError:
        pytest.skip("vlfast._C is not built")
    if not hasattr(torch.ops.vlfast, "group_norm_fwd_kernel"):
        pytest.skip("vlfast._C has no group_norm_fwd_kernel")
    op = torch.ops.vlfast.group_norm_fwd_kernel
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    for name in A.NAMES:
        out = op(x, 2, None, None, 1e-5, None, None, None, A.code(name))[0]
        torch.testing.assert_close(out, group_norm(x, 2, activation=name), msg=f"code {A.code(name)} ({name})")
    with pytest.raises(RuntimeError, match="activation"):
        op(x, 2, None, None, 1e-5, None, None, None, len(A.NAMES))


@pytest.mark.parametrize("dtype", list(FLOATS), ids=FLOATS.get)
@pytest.mark.parametrize("name", A.NAMES, ids=str)
def test_cpp_cpu_kernel_special_values(name, dtype):
    """The CPU kernel's activation at NaN and the infinities, as torch's: the activation's input is made
    special channel by channel through ``shift`` (y = xhat + shift)."""
    try:
        import vlfast._C  # noqa: F401
    except ImportError:
        pytest.skip("vlfast._C is not built")
    if not hasattr(torch.ops.vlfast, "group_norm_fwd_kernel"):
        pytest.skip("vlfast._C has no group_norm_fwd_kernel")
    shift = torch.tensor([SPECIAL], dtype=dtype)
    c = shift.shape[1]
    x = torch.randn(1, c, 3, 7, generator=torch.Generator().manual_seed(0), dtype=dtype) * 1e-3
    out = torch.ops.vlfast.group_norm_fwd_kernel(x, c, None, None, 1e-5, None, None, shift, A.code(name))[0]
    from vlfast.reference.group_norm import group_norm
    y = group_norm(x.double(), c, shift=shift.double(), compute_dtype=torch.float64)
    want = torch_act(name, y, torch.ones_like(y))[0].to(dtype)
    assert torch.equal(out.isnan(), want.isnan()), f"{name}: NaN per channel {out.isnan().any((0, 2, 3)).tolist()}"
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_cpp_cpu_silu_far_left():
    """Past the point where torch's e^-y overflows, silu(y) is y * 0: -0, and NaN at -inf."""
    try:
        import vlfast._C  # noqa: F401
    except ImportError:
        pytest.skip("vlfast._C is not built")
    shift = torch.tensor([[-float("inf"), -1e30]])
    out = torch.ops.vlfast.group_norm_fwd_kernel(torch.zeros(1, 2, 4, 4), 2, None, None, 1e-5, None, None, shift,
                                                 A.code("silu"))[0]
    assert out[0, 0].isnan().all() and (out[0, 1] == 0).all()
