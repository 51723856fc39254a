"""web: a web-scale pretraining corpus (Parquet shards of any `text` dataset, e.g. FineWeb-Edu) mixed with
the embedded stdlib corpus, through the whole cleaning pipeline; for the accelerator-scale recipes.

    # download the Parquet files yourself (hub CLI, gsutil, ...) into /data/web/, then
    lmjax data prepare --config configs/data/web.py --out /data/prepared/web \\
        --config.sources='mix/cycle:parquet:/data/web/*.parquet@0.98|stdlib:all@0.02'

An accelerator config: not run here (the machine that runs the tests has no hub access). Expect the card
to account for every document; prepare resumes from its last finished chunk if interrupted.
"""

from lmjax.data.prepare import prepare_config


def get_config():
    c = prepare_config()
    c.sources = "mix/cycle:parquet:/data/web/*.parquet@0.98|stdlib:all@0.02"
    c.workers = 16
    c.chunk_docs = 200_000
    c.val_fraction = 0.005
    c.tokenizer.vocab_size = 32000
    return c
