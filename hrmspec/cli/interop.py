"""The commands that convert checkpoints to and from other tools: import-hf, export-hf, import-hrm, export-hrm,
and lm-eval.

`lm-eval` is lm-eval's own command line with the `hrmspec` model registered. lm-eval releases that
discover plugins by entry point find the model on their own (`lm_eval --model hrmspec ...`); the
ones that do not (0.4.13 and before) resolve `--model` against their built-in registry only, so this
command registers the model, then hands every argument to lm-eval unchanged. torch, transformers and
lm-eval are imported when a command runs."""

from __future__ import annotations

import contextlib
import importlib.util

from hrmspec.errors import HrmspecError


def _out(args, source):
    """The folder a conversion writes: --out itself, or with --overwrite a new folder that replaces it whole
    when the conversion succeeds (files.replacing)."""
    from hrmspec.runtime.artifacts.files import replacing

    return replacing(args.out, source=source) if args.overwrite else contextlib.nullcontext(args.out)


def cmd_import_hf(args) -> int:
    from hrmspec.runtime.interop.convert import import_hf

    with _out(args, args.dir) as out:
        import_hf(args.dir, out)
    print(f"wrote {args.out}")
    return 0


def cmd_export_hf(args) -> int:
    from hrmspec.runtime.interop.convert import export_hf

    with _out(args, args.ckpt) as out:
        export_hf(args.ckpt, out)
    print(f"wrote {args.out}")
    return 0


def cmd_import_hrm(args) -> int:
    from hrmspec.runtime.interop.hrm_checkpoint import import_hrm

    with _out(args, args.ckpt) as out:
        import_hrm(args.ckpt, out, config=args.config, seq_len=args.seq_len)
    print(f"wrote {args.out}")
    return 0


def cmd_export_hrm(args) -> int:
    from hrmspec.runtime.interop.hrm_checkpoint import export_hrm

    with _out(args, args.ckpt) as out:
        export_hrm(args.ckpt, out, forward_dtype=args.forward_dtype)
    print(f"wrote {args.out}/model.pt and {args.out}/all_config.yaml")
    return 0


def cmd_lm_eval(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise HrmspecError("lm-eval is not installed: pip install 'hrmspec[eval]' (or lm-eval itself)")
    from hrmspec.runtime.evaluate.lm_harness import run_cli

    return run_cli(args.args)


def _register_lm_eval(sub, name: str) -> None:
    # '+' as the only option prefix: every '--flag' after the command is lm-eval's, --help included
    p = sub.add_parser(name, add_help=False, prefix_chars="+",
                       help="run lm-evaluation-harness with hrmspec models registered: hrmspec lm-eval --model "
                       "hrmspec --model_args path=RUN_DIR --tasks ... (arguments as lm_eval takes them)")
    p.add_argument("args", nargs="*", help="lm_eval's arguments")
    p.set_defaults(func=cmd_lm_eval)


def _register_import_hf(sub, name: str) -> None:
    p = sub.add_parser(name, help="convert a transformers hrm_text checkpoint to an hrmspec checkpoint")
    p.add_argument("dir", help="a directory with config.json and model.safetensors")
    p.add_argument("--out", required=True, help="the hrmspec checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a checkpoint or a folder of files) whole, once the conversion has "
                   "succeeded; never the input, a run folder or a run's checkpoints")
    p.set_defaults(func=cmd_import_hf)


def _register_export_hf(sub, name: str) -> None:
    p = sub.add_parser(name, help="write an hrmspec checkpoint as a transformers hrm_text checkpoint")
    p.add_argument("ckpt", help="an hrmspec checkpoint directory (spec.yaml + model.safetensors)")
    p.add_argument("--out", required=True, help="the directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a checkpoint or a folder of files) whole, once the conversion has "
                   "succeeded; never the input, a run folder or a run's checkpoints")
    p.set_defaults(func=cmd_export_hf)


def _register_import_hrm(sub, name: str) -> None:
    p = sub.add_parser(name, help="convert an official HRM / TRM checkpoint (pretrain.py) to an hrmspec "
                       "checkpoint")
    p.add_argument("ckpt", help="a checkpoint file step_<N> as pretrain.py writes it (or its directory)")
    p.add_argument("--config", help="its all_config.yaml (default: the one beside the checkpoint)")
    p.add_argument("--seq-len", type=int, help="the dataset's sequence length (81 for 9 x 9 Sudoku, 900 for ARC); "
                   "needed unless the model has learned positions")
    p.add_argument("--out", required=True, help="the hrmspec checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a checkpoint or a folder of files) whole, once the conversion has "
                   "succeeded; never the input, a run folder or a run's checkpoints")
    p.set_defaults(func=cmd_import_hrm)


def _register_export_hrm(sub, name: str) -> None:
    p = sub.add_parser(name, help="write an hrmspec checkpoint as an official HRM / TRM checkpoint")
    p.add_argument("ckpt", help="an hrmspec checkpoint directory (spec.yaml + model.safetensors) or a training run")
    p.add_argument("--out", required=True, help="the directory to write model.pt and all_config.yaml to")
    p.add_argument("--forward-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="the official model's forward_dtype, which H_init and L_init are written in (default bfloat16)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (a checkpoint or a folder of files) whole, once the conversion has "
                   "succeeded; never the input, a run folder or a run's checkpoints")
    p.set_defaults(func=cmd_export_hrm)



COMMANDS: list[tuple[str, object]] = [
    ("import-hf", _register_import_hf),
    ("export-hf", _register_export_hf),
    ("import-hrm", _register_import_hrm),
    ("export-hrm", _register_export_hrm),
    ("lm-eval", _register_lm_eval),
]
