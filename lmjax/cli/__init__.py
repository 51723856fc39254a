"""The `lmjax` command: parses arguments and calls one function per subcommand.

    lmjax train  --config configs/tiny.py [--config.model.num_layers=2 ...] --workdir runs/x
    lmjax sample --workdir runs/x --prompt "Return the" [--max-new-tokens 100 --temperature 0.8 ...]
    lmjax chat   --workdir runs/x [--temperature 0.7 --top-p 0.9 --max-new-tokens 128 --system TEXT]
    lmjax demo   --workdir runs/x [--host 127.0.0.1 --port 7860 --step N --slots 8]
    lmjax serve  --workdir runs/x [--host 127.0.0.1 --port 8000 --api-keys keys.toml --slots 16 ...]
    lmjax compress --workdir runs/x --out runs/x-int8 [--quant int8|int4 --group-size 128 --prune wanda --sparsity 0.5]
    lmjax export hf --workdir runs/x --out hf/x [--lora merged|adapter]  (a directory transformers loads)
    lmjax import hf hf/x --workdir runs/y          (a Hugging Face directory as a run; see lmjax/interop/hf.py)
    lmjax eval lm --workdir runs/x --source stdlib:val [--stride S --max-docs N --batch B --json out.json]
    lmjax eval chat --workdir runs/x [--source stdlib:heldout --limit 128]
    lmjax eval robust --workdir runs/x [--eps 0.05,0.1,0.2 --strengths 0.1,0.2,0.4 --attack-steps 5 --json out.json]
    lmjax lora merge --workdir runs/lora --out runs/merged   (a LoRA run's adapters folded into a plain run)
    lmjax plan   --config configs/llama_7b.py [--devices 256] [--device-memory-gb 80] [--config.mesh.fsdp=-1]
    lmjax data prepare --config configs/data/stdlib.py --out data/stdlib
    lmjax feedback export --workdir runs/x --out prefs.jsonl   (preference pairs for train.objective=dpo)
    lmjax feedback purge --workdir runs/x (--older-than-days 30 | --conversation ID)
    lmjax tokenizer train --source stdlib --vocab-size 4096 --out tok/ ; lmjax tokenizer stats --tokenizer tok/

Config overrides are `--config.KEY=VALUE` (or `--config.KEY VALUE`); only the commands that build a config
(`train`, `plan`, `data prepare`) take them, the others refuse them. Errors in the user's input (configs,
data, workdirs, checkpoints: any `LmjaxError`) are printed as one line and exit with status 2; any other
exception is a bug and keeps its traceback. LMJAX_DEBUG=1 shows the traceback of every error.
"""

import os
import sys
from collections.abc import Sequence

from lmjax.cli.parser import build_parser
from lmjax.config import ConfigError, LmjaxError


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg} has no value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand; returns the exit status (2 for an `LmjaxError`, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = _split_overrides(argv)
        args = build_parser().parse_args(rest)
        if overrides and not args.takes_overrides:
            command = " ".join(v for k, v in vars(args).items() if k == "command" or k.endswith("_command"))
            raise ConfigError(f"lmjax {command} takes no --config overrides (got --config.{overrides[0]})")
        args.overrides = overrides
        args.func(args)
    except LmjaxError as e:
        if os.environ.get("LMJAX_DEBUG", "") not in ("", "0"):
            raise
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    return 0
