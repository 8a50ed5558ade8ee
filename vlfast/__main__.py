"""``python -m vlfast info`` and ``python -m vlfast bench``."""

import argparse
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


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "info"
    if cmd == "info":
        info()
    elif cmd == "bench":
        bench(argv[1:])
    else:
        sys.exit(f"usage: python -m vlfast [info | bench [--help]]  (got {cmd!r})")


if __name__ == "__main__":
    main()
