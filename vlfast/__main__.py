"""``python -m vlfast info``, ``python -m vlfast bench`` and ``python -m vlfast sample``."""

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
    print(f"auto picks, fastest first: cpu {backends.PRIORITY['cpu']}, cuda {backends.PRIORITY['cuda']}")


def bench(argv) -> None:
    from vlfast import bench as vb

    p = argparse.ArgumentParser(prog="python -m vlfast bench",
                                description="Compare vlfast with eager PyTorch and torch.compile on this machine.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", nargs="*", default=list(vb.OPS), choices=vb.OPS)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on a CPU)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    info, copy_gbps, rows = vb.run(device, args.ops, compile_=not args.no_compile)
    vb.report(info, copy_gbps, rows, args.json)


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
        obj = getattr(importlib.import_module(module), attr)
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
    device = torch.device(args.device)
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


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "info"
    if cmd == "info":
        info()
    elif cmd == "bench":
        bench(argv[1:])
    elif cmd == "sample":
        sample(argv[1:])
    else:
        sys.exit(f"usage: python -m vlfast [info | bench [--help] | sample MODEL [--help]]  (got {cmd!r})")


if __name__ == "__main__":
    main()
