"""The `elmo` command line: demo, train, eval, export, serve, query, head-demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from elmo_serve.commands import add_serve_commands
from elmo_serve.retrain import add_retrain_command

DEMO_RUN = "runs/demo"
DEMO_ARTIFACT = "artifacts/demo"


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends in "(default: X)" wherever a flag has a default to show and its help does not name one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or "(default" in text:
            return text
        if any(action.default is v for v in _NO_DEFAULT):
            return text
        return f"{text} (default: %(default)s)"


# no default to show: switches off unless given, suppressed ones, and None (whose help says what it means)
_NO_DEFAULT = (None, False, argparse.SUPPRESS)


_METAVARS = {int: "N", float: "X", str: "STR"}


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, defaults: bool = True) -> None:
    """--field-name for each field of a config dataclass, in the groups of its comments, with its comment as help
    and its default shown; booleans take an optional value (`--resume` or `--resume false`). defaults=False leaves
    flags not given out of the namespace (so a config file's values stand); the help still shows the default."""
    from training.config import field_choices, field_groups, field_help

    helps, choices = field_help(cls), field_choices(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for group, names in field_groups(cls):
        target = parser.add_argument_group(group) if group else parser
        for name in names:
            field = by_name[name]
            kwargs = {
                "dest": name,
                "default": field.default if defaults else argparse.SUPPRESS,
                "help": f"{helps[name]} (default: {_show(field.default)})".replace("%", "%%"),
            }
            if isinstance(field.default, bool):
                kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
            else:
                kind = type(field.default)
                kwargs.update(
                    type=kind, choices=choices.get(name), metavar=None if name in choices else _METAVARS[kind]
                )
            target.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _print_metrics(metrics: dict, title: str) -> None:
    print(title)
    print("| " + " | ".join(metrics) + " |")
    print("|" + "---:|" * len(metrics))
    print("| " + " | ".join(f"{v:.2f}" for v in metrics.values()) + " |")


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.train import train

    skip = ("command", "func", "config", "init_catalogue")
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    cfg = load_config(args.config, overrides)
    if args.init_catalogue is not None:
        cfg = _fold_init_catalogue(cfg, args.init_catalogue)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one worker of a torchrun group
        from training.worker import run_distributed

        result = run_distributed(cfg)
    elif cfg.workers > 0:
        from training.ray_train import fit

        metrics = fit(cfg)
        keys = [k for k in metrics if k.startswith(("P@", "nDCG@", "PSP@"))]
        _print_metrics({k: metrics[k] for k in keys}, f"test metrics (%), {cfg.workers} Ray Train workers")
        print(
            f"{metrics.get('step_ms', float('nan')):.1f} ms/step; run: {cfg.out}"
            + (f"; artifact: {cfg.export}" if cfg.export else "")
        )
        return 0
    else:
        result = train(cfg)
    if result.get("stopped"):
        print(f"stopped after step {result['step']}; resume with --resume --out {cfg.out}")
        return 0
    _print_metrics(result["metrics"], f"test metrics (%), {result['train_seconds']:.0f} s of training")
    print(f"run: {cfg.out}" + (f"; artifact: {cfg.export}" if cfg.export else ""))
    return 0


def _fold_init_catalogue(cfg, log: str):
    """cfg starting from its init_from artifact with the catalogue `log` folded in (`<out>/init-artifact`; a resumed
    run keeps the one its first command wrote)."""
    from dataclasses import replace

    from elmo_serve.fold import fold_catalogue

    if not cfg.init_from:
        raise ValueError("--init-catalogue LOG folds a live catalogue into the artifact of --init-from ARTIFACT")
    folded = Path(cfg.out) / "init-artifact"
    if cfg.resume and (folded / "manifest.json").is_file():
        return replace(cfg, init_from=str(folded))
    _print_folded(log, fold_catalogue(cfg.init_from, log, folded), f"into {folded}")
    return replace(cfg, init_from=str(folded))


def _print_folded(log: str, folded, where: str = "in") -> None:
    """What `fold_catalogue` folded (a `Folded`) `where`, one line."""
    print(
        f"catalogue {log} (version {folded.version}) folded {where}: {folded.added} added, "
        f"{folded.retitled} retitled, {folded.retired} retired labels"
    )


def _load_for_eval(path: Path):
    if (path / "manifest.json").is_file():
        from training.artifact import load_artifact
        from training.config import TrainConfig

        art = load_artifact(path)
        cfg = TrainConfig(
            **{
                k: v
                for k, v in art.manifest.get("training", {}).items()
                if k in {f.name for f in dataclasses.fields(TrainConfig)}
            }
        )
        return art.model, cfg
    from training.checkpoint import model_from_checkpoint

    model, cfg, _ = model_from_checkpoint(path)
    return model, cfg


def _cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluation import evaluate_on

    model, cfg = _load_for_eval(Path(args.path))
    if args.data is not None:
        cfg.data = args.data
    if args.format is not None:
        cfg.format = args.format
    cfg.train_rows, cfg.test_rows = 0, args.test_rows
    metrics = evaluate_on(model, cfg, args.split)
    _print_metrics(metrics, f"{args.path} on {cfg.data or 'the embedded default'} ({args.split}), %")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from elmo_serve.fold import fold_catalogue
    from training.artifact import load_artifact
    from training.checkpoint import export_run

    source, folded = Path(args.run), None
    if (source / "manifest.json").is_file():  # an artifact: only a catalogue makes a new one of it
        if args.catalogue is None:
            raise ValueError(f"{source} is an artifact: `elmo export ARTIFACT OUT --catalogue LOG` folds a log into it")
        folded = fold_catalogue(source, args.catalogue, args.artifact)
    elif args.catalogue is None:
        export_run(args.run, args.artifact, args.data)
    else:  # the run's artifact, then the log folded into it
        out = Path(args.artifact).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.run-") as tmp:
            folded = fold_catalogue(export_run(args.run, Path(tmp) / "artifact", args.data), args.catalogue, out)
    if folded is not None:
        _print_folded(args.catalogue, folded)
    path = Path(args.artifact)
    art = load_artifact(path)
    h = art.manifest["head"]
    print(f"artifact {path}: {art.num_labels} labels, head {h['dtype']} ({h['rows']} x {h['in_dim']})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from training.artifact import load_artifact
    from training.config import TrainConfig
    from training.train import train

    cfg = TrainConfig(
        checkpoint_every=-1,  # the demo exports directly; a checkpoint of the 310K-row table is ~0.8 GB
        data="",
        out=args.out,
        export=args.export,
        precision=args.precision,
        epochs=args.epochs,
        progress=not args.quiet,
    )
    print(
        "ELMO demo: the embedded default (this machine's apt package index, else a planted problem); "
        f"{cfg.precision} head, {cfg.epochs} epochs"
    )
    result = train(cfg)
    _print_metrics(result["metrics"], f"test metrics (%), {result['train_seconds']:.0f} s of training")
    art = load_artifact(cfg.export)
    print(
        f"artifact: {cfg.export} ({art.num_labels} labels, {art.manifest['head']['dtype']} head); "
        f"plots: {cfg.out}/training_curve.png, {cfg.out}/p_at_k_by_decile.png"
    )
    if args.no_serve:
        return 0
    return _serve_and_query(cfg.export, args.port, art.labels[0]["uid"] if art.labels else None)


DEMO_QUERIES = [
    "command line tool to compress and decompress archives",
    "python library for parsing and writing xml documents",
    "lightweight web server with fastcgi support",
]


def _serve_and_query(artifact: str, port: int, item_uid: str | None) -> int:
    """Serve the artifact with Ray Serve on 127.0.0.1, ask it over HTTP, print the answers, stop."""
    import threading

    from elmo_serve.client import ElmoClient, format_table
    from elmo_serve.commands import serve_command

    stop, status = threading.Event(), []
    server = threading.Thread(target=lambda: status.append(serve_command(artifact, port=port, stop=stop)))
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with ElmoClient(url) as client:
            deadline = time.monotonic() + 180
            while server.is_alive():
                try:
                    client.health()
                    break
                except Exception:  # not up yet
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the service did not answer at {url} within 180 s") from None
                    time.sleep(0.5)
            else:
                print("elmo demo: the service failed to start", file=sys.stderr)
                return 1
            out = client.predict(DEMO_QUERIES, k=5)
            for text, labels in zip(DEMO_QUERIES, out["results"], strict=True):
                print(f"\nPOST /v1/predict {text!r} (model {out['model_version']})\n{format_table(labels)}")
            if item_uid is not None:
                related = client.similar(uid=item_uid, k=5)
                print(f"\nPOST /v1/similar {item_uid!r}\n{format_table(related['results'])}")
    finally:
        stop.set()
        server.join()  # serve_command prints "service stopped"
    return 0 if status == [0] else 1


def _cmd_head_demo(args: argparse.Namespace) -> int:
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
    from training.config import TrainConfig, field_choices, field_help
    from training.head_demo import DemoConfig

    train_help = field_help(TrainConfig)
    parser = argparse.ArgumentParser(prog="elmo", description="ELMO Serve: low-precision extreme classification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train, evaluate and export the embedded default dataset")
    demo.add_argument("--out", default=DEMO_RUN, help="run directory (checkpoint, metrics, plots)")
    demo.add_argument("--export", default=DEMO_ARTIFACT, help="artifact directory")
    demo.add_argument(
        "--precision",
        default=TrainConfig.precision,
        choices=field_choices(TrainConfig)["precision"],
        help=train_help["precision"],
    )
    demo.add_argument("--epochs", type=int, default=TrainConfig.epochs, help=train_help["epochs"])
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--no-serve", action="store_true", help="stop after export (no Ray Serve, no HTTP queries)")
    demo.add_argument("--port", type=int, default=8000, help="port of the demo service on 127.0.0.1")
    demo.set_defaults(func=_cmd_demo)

    add_serve_commands(sub)
    add_retrain_command(sub)
    from elmo_serve.predict import add_predict_command

    add_predict_command(sub)

    tr = sub.add_parser(
        "train",
        help="train a model (config file and --key value flags)",
        description="Train a model. Values: TrainConfig's defaults <- --config FILE <- the flags given.",
    )
    tr.add_argument(
        "--config", default=None, metavar="FILE", help="a JSON or TOML file of TrainConfig keys (default: none)"
    )
    _add_dataclass_flags(tr, TrainConfig, defaults=False)
    warm = next(g for g in tr._action_groups if g.title == "warm start")  # beside --init-from
    warm.add_argument(
        "--init-catalogue",
        default=None,
        metavar="LOG",
        help="with --init-from: a live label catalogue log (elmo serve --catalogue) folded into that artifact first "
        "(written to <out>/init-artifact), so that the labels added to the service become trained labels "
        "(default: none)",
    )
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a run directory or an artifact on a dataset split")
    ev.add_argument("path", help="run directory (its checkpoint, any world size) or artifact directory")
    ev.add_argument("--data", default=None, help="dataset directory (default: the one it was trained on)")
    ev.add_argument(
        "--format",
        default=None,
        choices=field_choices(TrainConfig)["format"],
        help="the data's format (default: the one it was trained with)",
    )
    ev.add_argument("--split", default="tst", choices=["tst", "trn"], help="the test or the training split")
    ev.add_argument("--test-rows", type=int, default=0, dest="test_rows", help=train_help["test_rows"])
    ev.add_argument("--json", default=None, help="also write the metrics here (default: print only)")
    ev.set_defaults(func=_cmd_eval)

    ex = sub.add_parser(
        "export",
        help="write the artifact of a run directory, or fold a live label catalogue into an artifact",
        description="Write the artifact of a run directory (its checkpoint, any world size). With --catalogue, the "
        "changes of a live label catalogue log are folded in: added labels become labels of the artifact (their "
        "zero-shot rows, as served), retitled ones keep their new title and row, retired ones are left out (ids "
        "after them move; uids stay). Swapping the service to the result reconciles the log.",
    )
    ex.add_argument("run", help="run directory, or an artifact directory (then --catalogue is needed)")
    ex.add_argument("artifact", help="artifact directory to write")
    ex.add_argument("--data", default=None, help="dataset directory (default: the one it was trained on)")
    ex.add_argument(
        "--catalogue",
        default=None,
        metavar="LOG",
        help="a catalogue log (elmo serve --catalogue) of the run's or artifact's labels, to fold in (default: none)",
    )
    ex.set_defaults(func=_cmd_export)

    hd = sub.add_parser("head-demo", help="train the BF16/FP8 head alone on a planted problem, vs fp32")
    _add_dataclass_flags(hd, DemoConfig)
    hd.set_defaults(func=_cmd_head_demo)

    for command in (parser, *sub.choices.values()):
        command.formatter_class = _DefaultsFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"elmo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
