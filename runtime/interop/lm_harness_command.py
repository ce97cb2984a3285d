"""`hrmspec lm-eval ARGS...`: lm-eval's own command line with the `hrmspec` model registered.

lm-eval releases that discover plugins by entry point find the model on their own (`lm_eval --model
hrmspec ...`); the ones that do not (0.4.13 and before) resolve `--model` against their built-in registry
only, so this command registers the model, then hands every argument to lm-eval unchanged. lm-eval is
imported when the command runs, so the rest of the CLI starts without it."""

from __future__ import annotations

import importlib.util

from hrmspec.errors import HrmspecError


def cmd_lm_eval(args) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        raise HrmspecError("lm-eval is not installed: pip install 'hrmspec[eval]' (or lm-eval itself)")
    from hrmspec.runtime.interop.lm_harness import run_cli

    return run_cli(args.args)


def register_lm_eval(sub, name: str) -> None:
    # '+' as the only option prefix: every '--flag' after the command is lm-eval's, --help included
    p = sub.add_parser(name, add_help=False, prefix_chars="+",
                       help="run lm-evaluation-harness with hrmspec models registered: hrmspec lm-eval --model "
                       "hrmspec --model_args path=RUN_DIR --tasks ... (arguments as lm_eval takes them)")
    p.add_argument("args", nargs="*", help="lm_eval's arguments")
    p.set_defaults(func=cmd_lm_eval)
