"""``python -m vlfast info``, ``bench``, ``sample``, ``profile`` and ``tuning``."""

import argparse
import importlib
import sys

import torch


def info() -> None:
    import vlfast
    from vlfast import backends
    from vlfast.bench.common import headline, machine

    print(f"vlfast {vlfast.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(headline(machine(device)))
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"backends on {dev} tensors:")
        for name, reasons in backends.available(dev).items():
            print(f"  {name:9s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    print(f"auto picks, fastest first: cpu {backends.PRIORITY['cpu']}, cuda {backends.PRIORITY['cuda']}, "
          "unless the op's rule or the card's tuning table says otherwise:")
    from vlfast import tuning
    for dev in ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]:
        table, why = tuning.table_for(torch.device(dev))
        print(f"  {dev}: " + (f"tuning table {table.source or table.card} ({why})" if table else why))


def bench(argv) -> None:
    from vlfast import bench as vb

    p = argparse.ArgumentParser(prog="python -m vlfast bench",
                                description="Compare vlfast with eager PyTorch and torch.compile on this machine.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", nargs="*", default=list(vb.OPS), choices=vb.OPS)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--plot", help="also draw the vlfast rows' speed-ups as a PNG (needs matplotlib)")
    p.add_argument("--tuning", help="also write the tuning table of this device measured by the run to this JSON "
                                    "file (see `python -m vlfast tuning --help`)")
    args = p.parse_args(argv)
    device = _device(args.device)
    info, copy_gbps, rows = vb.run(device, args.ops, compile_=not args.no_compile)
    vb.report(info, copy_gbps, rows, args.json)
    if args.tuning:
        from dataclasses import asdict

        from vlfast import tuning
        table = tuning.build([asdict(r) for r in rows], info)
        table.save(args.tuning)
        print(f"wrote {args.tuning}")
    if args.plot:
        from vlfast.bench import plot
        from vlfast.bench.common import headline
        try:
            plot.bench(rows, args.plot, title=headline(info))
        except (ImportError, ValueError) as e:
            sys.exit(f"--plot: {e}")
        print(f"wrote {args.plot}")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"--device: not a device: {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name}: no CUDA device here")
    return device


def _load_model(spec: str, batch: int, shape_arg):
    """(model, (B, C, H, W)) for ``spec``: a ``vlfast.models`` registry name or ``module:attribute`` (a module or
    a callable returning one; its sample shape from ``--shape C,H,W``)."""
    if ":" not in spec:
        try:
            from vlfast import models
        except ImportError as e:
            sys.exit(f"{spec!r} is no registry name (vlfast.models cannot be imported: {e}); give module:attribute")
        if spec not in models.MODELS:
            sys.exit(f"unknown model {spec!r}; one of {sorted(models.MODELS)}, or module:attribute")
        model = models.MODELS[spec]()
        if shape_arg is None:
            return model, tuple(models.example_input(spec, batch)[0].shape)
    else:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            sys.exit(f"cannot load model {spec!r}: {e}")
        model = obj if isinstance(obj, torch.nn.Module) else obj()
        if shape_arg is None:
            sys.exit(f"--shape C,H,W is needed for {spec!r} (only registry models know their input shape)")
    try:
        chw = tuple(int(v) for v in shape_arg.split(","))
    except ValueError:
        chw = ()
    if len(chw) != 3 or min(chw) < 1:
        sys.exit(f"--shape must be C,H,W (three positive ints); got {shape_arg!r}")
    return model, (batch, *chw)


def sample(argv) -> None:
    from vlfast import nn as vnn
    from vlfast import sampling, schedulers

    p = argparse.ArgumentParser(prog="python -m vlfast sample",
                                description="Sample images with DDPM's Algorithm 2 and write them as one grid.")
    p.add_argument("model", help="a vlfast.models registry name (e.g. ddpm_unet) or module:attribute "
                                 "(a model, or a callable returning one; needs --shape)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default 50)")
    p.add_argument("--out", default="grid.png", help="the image grid to write (default grid.png)")
    p.add_argument("--batch", type=int, default=4, help="samples (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and a CPU generator (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scheduler", choices=("ddpm", "ddim"), default="ddpm")
    p.add_argument("--shape", help="C,H,W of one sample (default: the registry model's example input)")
    p.add_argument("--no-graph", action="store_true", help="run the eager loop, not one CUDA graph per step")
    p.add_argument("--no-convert", action="store_true", help="keep the model's torch layers (no vlfast.nn.convert)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        sys.exit("--steps and --batch must be positive")
    device = _device(args.device)
    torch.manual_seed(args.seed)  # the random weights, unless the model's module loads its own
    model, shape = _load_model(args.model, args.batch, args.shape)
    if not args.no_convert:
        model = vnn.convert(model)
    model = model.eval().to(device)
    cls = schedulers.DDPMScheduler if args.scheduler == "ddpm" else schedulers.DDIMScheduler
    generator = torch.Generator().manual_seed(args.seed)  # on the CPU: the same x_T on every device
    x = sampling.sample(model, cls(), shape, generator=generator, num_inference_steps=args.steps,
                        cuda_graph=not args.no_graph, progress=not args.quiet, device=device)
    image = sampling.save_grid(x, args.out)
    print(f"wrote {args.out}: {shape[0]} samples of {shape[1]}x{shape[2]}x{shape[3]}, {image.width}x{image.height} "
          f"pixels ({args.scheduler}, {args.steps} steps, {device})")


def profile(argv) -> None:
    from vlfast import nn as vnn
    from vlfast import profile as vp

    p = argparse.ArgumentParser(prog="python -m vlfast profile",
                                description="Where a model's time goes, eager against vlfast.nn.convert (and "
                                            "torch.compile), per layer and in all, on this machine's GPU or CPU.")
    p.add_argument("model", help="a vlfast.models registry name (e.g. ddpm_unet) or module:attribute "
                                 "(a model, or a callable returning one; needs --shape)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(vp.DTYPES), help="default bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--batch", type=int, default=2, help="samples (default 2)")
    p.add_argument("--shape", help="C,H,W of one sample (default: the registry model's example input)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="model and inputs in channels_last (default: on CUDA)")
    p.add_argument("--conv2d", choices=vnn.CONV2D_MODES, default="dilated",
                   help="which nn.Conv2d convert() swaps (default dilated)")
    p.add_argument("--compile", action="store_true", help="also time both under torch.compile (slow on a CPU)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward (train mode)")
    p.add_argument("--iters", type=int, default=5, help="hooked forwards for the layer times (default 5)")
    p.add_argument("--top", type=int, default=15, help="layers listed per variant (default 15)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the inputs (default 0)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--plot", help="also draw time by layer type and the speed-ups as a PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    for opt in ("batch", "iters", "top"):
        if getattr(args, opt) < 1:
            sys.exit(f"--{opt} must be positive; got {getattr(args, opt)}")
    device = _device(args.device)
    torch.manual_seed(args.seed)  # the random weights, unless the model's module loads its own
    model, shape = _load_model(args.model, args.batch, args.shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    inputs = (x,)
    if ":" not in args.model:  # the registry's other arguments (ddpm_unet's timesteps)
        from vlfast import models
        inputs += models.example_input(args.model, args.batch, seed=args.seed)[1:]
    log = None if args.quiet else (lambda msg: print(f"profile: {msg}", file=sys.stderr, flush=True))
    result = vp.profile_model(model, inputs, device=device, dtype=vp.DTYPES[args.dtype] if args.dtype else None,
                              channels_last=args.channels_last, compile_=args.compile, backward=args.backward,
                              conv2d=args.conv2d, iters=args.iters, name=args.model, log=log)
    print(vp.format_report(result, top=args.top))
    if args.json:
        import json
        import os
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            vp.plot(result, args.plot)
        except ImportError as e:
            sys.exit(f"--plot: {e}")
        print(f"wrote {args.plot}")


def tuning(argv) -> None:
    from vlfast import tuning as vt

    p = argparse.ArgumentParser(prog="python -m vlfast tuning", description=(
        "The per-card tables of measured backend orders that auto follows (vlfast.tuning). `show`: the table a "
        "device uses; `build`: a table from benchmark JSON files of one card (python -m vlfast bench --json, "
        "benchmarks/bench_*.py --json); copy it to vlfast/tuning/<card>.json to ship it, or point VLFAST_TUNING "
        "at it."))
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the table a device uses")
    show.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    show.add_argument("--table", help="print this table file instead")
    build = sub.add_parser("build", help="a table from benchmark JSON files")
    build.add_argument("results", nargs="+", help="benchmark JSON files, all measured on one card")
    build.add_argument("-o", "--out", help="write the table here (default: print it only)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            table, why = (vt.Table.load(args.table), "given") if args.table else vt.table_for(_device(args.device))
            print(vt.describe(table, why))
            return
        table = vt.build_from_files(args.results)
    except (OSError, ValueError) as e:
        sys.exit(f"python -m vlfast tuning {args.cmd}: {e}")
    print(vt.describe(table, "built from " + ", ".join(args.results)))
    if args.out:
        table.save(args.out)
        print(f"wrote {args.out}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "info"
    if cmd == "info":
        info()
    elif cmd == "bench":
        bench(argv[1:])
    elif cmd == "sample":
        sample(argv[1:])
    elif cmd == "profile":
        profile(argv[1:])
    elif cmd == "tuning":
        tuning(argv[1:])
    else:
        sys.exit("usage: python -m vlfast [info | bench [--help] | sample MODEL [--help] | profile MODEL [--help] "
                 "| tuning {show,build} [--help]]"
                 f"  (got {cmd!r})")


if __name__ == "__main__":
    main()
