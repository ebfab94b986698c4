"""`silc-bench` command line: run | ls | pretrain | train cat-seg / owl-det / lit-decoder | report | export leaderboard | compare."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from silc_bench.errors import UserError
from silc_bench.paths import CHECKPOINT_ENV, DATA_ENV

# Relative: resolved against the folder `silc-bench` runs in, not the package's own folder.
DEFAULT_OUT = "results/runs"
TRAINABLE = {"cat-seg": "CAT-Seg open-vocabulary segmentation head on a backbone (silc_bench/catseg/train.py)",
             "owl-det": "OWL-ViT open-vocabulary detection heads on a backbone (silc_bench/detection/train.py)",
             "lit-decoder": "LiT-Decoder text decoder on a frozen backbone (silc_bench/litdec/train.py)"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for options that have a real default; None / False defaults and help
    texts that already state their default are left as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def _positive(flag: str, value, minimum: int) -> None:
    if value is not None and value < minimum:
        what = "a positive number" if minimum == 1 else f"a number >= {minimum}"
        raise UserError(f"{flag} must be at least {minimum}, got {value}", fix=f"pass {flag} N with N {what}")


def _add_run(sub):
    p = sub.add_parser("run", help="evaluate models on a task's datasets and write result records",
                       formatter_class=_HelpFormatter)
    p.add_argument("task", help="task name (silc-bench ls tasks)")
    p.add_argument("--model", required=True, help="comma-separated: registry names, .npz paths, open_clip:ARCH:WEIGHTS "
                        "(open_clip:ARCH:random-init for untrained weights, on purpose), hf:DIR")
    p.add_argument("--datasets", help="comma-separated dataset names (default: the task's list)")
    p.add_argument("--data-root", help=f"folder holding the datasets (default ${DATA_ENV}, else ~/data)")
    p.add_argument("--checkpoint-dir", help=f"folder holding named checkpoints (default ${CHECKPOINT_ENV})")
    p.add_argument("--tokenizer", help="for a bare .npz: sentencepiece:FILE")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output folder for records and tables (relative paths are relative to the current directory)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch-size", type=int,
                   help="images or crops per forward (does not change the numbers; default: the task's choice for "
                        "the device, 16 on a GPU; zs-seg on a CPU: as many crops as fit 1024 tokens)")
    p.add_argument("--workers", type=int,
                   help="data-loader worker processes (0: decode in the main process; default: the cores beyond "
                        "two, at most 4, so 0 on a 2-core machine)")
    p.add_argument("--limit", type=int, help="first N images only (records are marked limited)")
    p.add_argument("--dense-mode", help="override the model's default dense path (e.g. map_value_no_mlp)")
    p.add_argument("--protocol", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol setting of the task spec (repeatable; recorded in every result)")
    p.add_argument("--force", action="store_true", help="recompute pairs whose record exists")
    p.add_argument("--no-cache", action="store_true", help="recompute cached class text embeddings")
    p.add_argument("--shard-size", type=int, default=32, help="images per resumable shard")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="numeric precision (autocast; fp16 on CUDA only); recorded, and part of the record's name")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's image path (for GPUs; the first images wait for the compiler); "
                        "recorded, and part of the record's name")
    p.add_argument("--save-predictions", action="store_true",
                   help="zs-seg / ov-seg: write each image's predicted class map (PNG) beside the record, for "
                        "`silc-bench report --html` (add --force if the record exists)")
    p.add_argument("--no-progress", action="store_true")


def _parse_overrides(items: list[str], task: dict) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in task.get("protocol", {}):
            known = ", ".join(task.get("protocol", {}))
            raise UserError(f"cannot apply --protocol {item!r}", fix=f"write KEY=VALUE with KEY one of: {known}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_run(args) -> int:
    from silc_bench import registry
    from silc_bench.results.record import atomic_write_text
    from silc_bench.results.report import build_table, load_records, load_tables_config, render_markdown
    from silc_bench.runner import RunOptions, default_device, parse_list, run

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}", fix="pass a positive number of images")
    if args.batch_size is not None:
        _positive("--batch-size", args.batch_size, 1)
    if args.workers is None:
        from silc_bench.data.loading import default_workers

        args.workers = default_workers()
    _positive("--workers", args.workers, 0)
    _positive("--shard-size", args.shard_size, 1)
    task = registry.task_spec(args.task)
    opts = RunOptions(
        data_root=args.data_root, out_dir=args.out, checkpoint_dir=args.checkpoint_dir, tokenizer=args.tokenizer,
        device=args.device or default_device(), batch_size=args.batch_size, workers=args.workers, limit=args.limit,
        protocol_overrides={**_parse_overrides(args.protocol, task), **({"dense_mode": args.dense_mode} if args.dense_mode else {})}, force=args.force, progress=not args.no_progress,
        cache=not args.no_cache, shard_size=args.shard_size, precision=args.precision, compile=args.compile,
        save_predictions=args.save_predictions,
    )
    from silc_bench.precision import check as check_precision

    check_precision(opts.precision, opts.device)  # before any model is loaded
    models = parse_list(args.model)
    datasets = parse_list(args.datasets) or task["datasets"]
    for name in datasets:
        registry.dataset_entry(name)  # fail on a typo before loading any model
    finished = False
    try:
        run(args.task, models, datasets, opts)
        rank_zero, finished = _is_rank_zero(), True
    finally:
        _leave_process_group(wait_for_all=finished)
    if not rank_zero:
        return 0
    # The table shows every record of the requested pairs, including ones skipped as already done.
    from silc_bench.runner import declared_roots, relativize

    roots = declared_roots(opts)
    wanted = {(relativize(m, roots), d) for m in models for d in datasets}  # records store relative specs
    records = [r for r in load_records([Path(args.out) / args.task])
               if (r["model"].get("spec"), r["dataset"]["name"]) in wanted and r["dataset"].get("limit") == args.limit
               and (r.get("precision") or {}).get("mode", "fp32") == args.precision
               and bool((r.get("precision") or {}).get("compiled")) == args.compile]
    number = (task.get("paper") or {}).get("table")
    if number is None:
        return 0
    table = render_markdown(build_table(number, load_tables_config()[number], records))
    atomic_write_text(Path(args.out) / args.task / "table.md", table)
    print(table)
    return 0


def _leave_process_group(wait_for_all: bool) -> None:
    """Under torchrun, every rank leaves the process group before the interpreter exits: a gloo
    group torn down at exit while another rank still works aborts the process ("terminate called
    without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def cmd_ls(args) -> int:
    from silc_bench import registry

    what = args.what
    tables = {"models": registry.models, "tasks": registry.tasks, "datasets": registry.datasets}
    for kind in ([what] if what else list(tables)):
        print(f"{kind}:")
        for name, entry in tables[kind]().items():
            info = entry.get("format") or entry.get("layout") or entry.get("description") or ""
            print(f"  {name:20s} {info}")
    return 0


def cmd_pretrain(args, rest) -> int:
    from silc_bench.pretrain.trainer import main as pretrain_main

    return pretrain_main(rest) or 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="silc-bench", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    ls = sub.add_parser("ls", help="list models, tasks and datasets", formatter_class=_HelpFormatter)
    ls.add_argument("what", nargs="?", choices=["models", "tasks", "datasets"], help="what to list (default: all three)")
    sub.add_parser("pretrain", help="reference pretraining (CLIP, SigLIP, SILC); see --help of the trainer", add_help=False)
    trainable = "\n".join(f"  {name:10s} {what}" for name, what in TRAINABLE.items())
    train = sub.add_parser(
        "train", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="silc-bench train {%s} [OPTIONS ...]" % ",".join(TRAINABLE),
        help="train a task head on a backbone: `silc-bench train cat-seg --model SPEC ...`",
        description=f"Train a task head on a backbone. Trainable:\n{trainable}\n\n"
                    f"`silc-bench train NAME --help` lists NAME's options.")
    train.add_argument("what", nargs="?", choices=list(TRAINABLE), help="what to train (listed above)")
    from silc_bench.results import compare, leaderboard, report

    report.add_arguments(sub.add_parser("report", help="paper tables (md, LaTeX, CSV) from result records",
                                        formatter_class=_HelpFormatter))
    export = sub.add_parser("export", help="export results").add_subparsers(dest="export_what", required=True)
    leaderboard.add_arguments(export.add_parser("leaderboard", help="one CSV row per (model, task, dataset, metric)",
                                                formatter_class=_HelpFormatter))
    compare.add_arguments(sub.add_parser("compare", help="regression gate: fail when a metric moved beyond tolerance",
                                         formatter_class=_HelpFormatter))
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "pretrain":
            return cmd_pretrain(args, rest)
        if args.command == "train":
            if args.what is None:  # `silc-bench train --help` (or nothing): what can be trained
                if any(a in ("-h", "--help") for a in rest):
                    train.print_help()
                    return 0
                train.error(f"choose what to train: {', '.join(TRAINABLE)} (silc-bench train --help)")
            if args.what == "owl-det":
                from silc_bench.detection.train import main as train_owl

                return train_owl(rest) or 0
            if args.what == "lit-decoder":
                from silc_bench.litdec.train import main as train_litdec

                return train_litdec(rest) or 0
            from silc_bench.catseg.train import main as train_catseg

            return train_catseg(rest) or 0
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        commands = {"run": cmd_run, "ls": cmd_ls, "report": report.main, "export": leaderboard.main, "compare": compare.main}
        return commands[args.command](args)
    except UserError as e:
        print(f"silc-bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
