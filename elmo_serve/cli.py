"""The `elmo` command line."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)


def _cmd_demo(args: argparse.Namespace) -> int:
    from training.head_demo import DemoConfig, run_demo

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}
    cfg = DemoConfig(**fields)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"ELMO head on a planted problem: {cfg.labels} labels, D={cfg.dim}, batch {cfg.batch}, {cfg.steps} steps, "
        f"device {device}"
    )
    rows = run_demo(cfg, device)
    print(f"{'head':>22} | {'test P@1':>8} | {'ms/step':>8}")
    for r in rows:
        print(f"{r['variant']:>22} | {r['p_at_1']:8.2f} | {r['ms_per_step']:8.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from training.head_demo import DemoConfig

    parser = argparse.ArgumentParser(prog="elmo", description="ELMO Serve: low-precision extreme classification")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the BF16/FP8 head on a planted problem and compare with fp32")
    _add_dataclass_flags(demo, DemoConfig)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
