"""Quickstart: from nothing to a small language model that writes like the Python docs.

    python experiments/quickstart.py [--workdir runs/quickstart]

1. reads the embedded corpus (docstrings of this Python's standard library + pydoc topics),
2. trains a SentencePiece BPE tokenizer on it,
3. pretrains the `tiny` config (4-layer Llama-style, ~5M parameters) for 400 steps on this machine's
   devices, logging loss, tokens/s, MFU and validation bits per byte against a unigram baseline,
4. samples a few completions from the saved checkpoint, exactly as `lmjax sample` does.

Running it again resumes from the last checkpoint (and, once finished, only samples).
"""

import argparse
import time

from lmjax.config import load_config
from lmjax.infer.sampler import Sampler
from lmjax.train.loop import train
from lmjax.workdir import open_workdir, restore_model

PROMPTS = ["Return the", "This module provides", "The with statement", "Raise ValueError if"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/quickstart", help="run directory")
    args = parser.parse_args()

    start = time.time()
    print(f"[quickstart] pretraining configs/tiny.py into {args.workdir} (about 7 minutes on 2 CPU cores)")
    result = train(load_config("configs/tiny.py"), args.workdir)
    print(f"[quickstart] val bits/byte {result['val_bpb']:.3f} vs {result['unigram_bpb']:.3f} for a unigram model")

    cfg, graphdef, params, tokenizer = restore_model(open_workdir(args.workdir))
    sampler = Sampler(cfg.model, graphdef, params, tokenizer)
    texts = sampler.generate(PROMPTS, max_new_tokens=48, temperature=0.7, top_p=0.9, stop=["\n\n"], seed=0)
    print("[quickstart] samples from the saved checkpoint:")
    for prompt, text in zip(PROMPTS, texts, strict=True):
        print(f"  {prompt}{text}".replace("\n", " / "))
    print(f"[quickstart] done in {time.time() - start:.0f}s. Try:\n"
          f"  .venv/bin/lmjax sample --workdir {args.workdir} --prompt 'Return a list of'\n"
          f"  .venv/bin/tensorboard --logdir {args.workdir}/tb   (if tensorboard is installed)\n"
          f"  loss curve: {args.workdir}/loss.png")


if __name__ == "__main__":
    main()
