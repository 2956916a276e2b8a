"""``tensorcache load PATH --prefix model/rev/``: a safetensors checkpoint into the cluster.

The work is tensorcache/torch/loader.py (streaming, verification, the
manifest written last); this is the command around it.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path", help="a .safetensors file, a model.safetensors.index.json, or a directory of either"
    )
    p.add_argument("--prefix", required=True, help="revision prefix, ending with '/': model/rev/")
    p.add_argument("--router", default="127.0.0.1:7070", help="router host:port")
    p.add_argument("--pin", action="store_true", help="pin every tensor (never evicted)")
    p.add_argument(
        "--no-verify", action="store_true", help="skip reading every tensor back to compare CRCs"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per RPC (default 60)")


def run(args: argparse.Namespace) -> int:
    from tensorcache.client.api import connect
    from tensorcache.sizes import format_size
    from tensorcache.torch.loader import load_checkpoint, open_and_describe
    from tensorcache.torch.revision import check_prefix

    check_prefix(args.prefix)
    ckpt = open_and_describe(args.path)  # validated before connecting: bad files fail fast
    print(
        f"{args.path}: {len(ckpt.tensors)} tensors in {len(ckpt.files)} file(s), "
        f"{format_size(ckpt.nbytes)} (largest {format_size(ckpt.largest)})",
        flush=True,
    )
    with connect(args.router, timeout_s=args.timeout) as c:
        report = load_checkpoint(
            c,
            args.path,
            args.prefix,
            pin=args.pin,
            verify=not args.no_verify,
            progress=not args.no_progress,
        )
    if report.already:
        print(f"revision {args.prefix} is already in the cluster: nothing to do")
        return 0
    print(
        f"loaded {report.tensors} tensors, {format_size(report.nbytes)} into {args.prefix} "
        f"in {report.seconds:.2f}s ({report.gbps:.2f} GB/s)"
        f"{', verified' if report.verified else ''}{', pinned' if args.pin else ''}"
    )
    return 0
