"""web: a web-scale pretraining corpus (Parquet shards of any `text` dataset, e.g. FineWeb-Edu) through the
whole cleaning pipeline; for the accelerator-scale recipes. The embedded stdlib corpus is prepared on its own
and mixed in at training time as 2% of the documents:

    # download the Parquet files yourself (hub CLI, gsutil, ...) into /data/web/, then
    lmjax data prepare --config configs/data/web.py --out /data/prepared/web
    lmjax data prepare --config configs/data/stdlib.py --out /data/prepared/stdlib
    lmjax data tokenize --source 'mix/cycle:/data/prepared/web@0.98|/data/prepared/stdlib@0.02' \\
        --val /data/prepared/web:val --tokenizer /data/prepared/web/tokenizer --seq-len 2048 --workers 16 \\
        --out /data/tokens/web-mix-2048
    lmjax train ... --config.data.train=/data/tokens/web-mix-2048 --config.data.val=/data/tokens/web-mix-2048:val

Training reads the token shards record by record through grain (lmjax/input/tokens.py): start-up time and
memory do not depend on the corpus size. The mixture is tokenized once, so `prepare` writes no token shards
of its own here (tokens.seq_len = 0); a run on the web corpus alone can set it to the model's seq_len and
train from /data/prepared/web directly.

Each component is deduplicated on its own, before the mixture: mixing inside prepare
(`sources='mix/cycle:...@0.98|stdlib:all@0.02'`) would let exact dedup drop every repeat that /cycle brings
back of the small stdlib component, leaving one copy of it (~6,000 documents) instead of 2%. While tokenizing,
/cycle repeats the stdlib train split until the web component has been read once. Documents that occur in
both components are not deduplicated against each other.

An accelerator config: not run here (the machine that runs the tests has no hub access). Expect the web card
to account for every document (prepare resumes from its last finished chunk if interrupted), and about 2% of
the training documents to come from /data/prepared/stdlib, each of them repeated about
0.02 / 0.98 * (web train documents) / (stdlib train documents) times.
"""

from lmjax.corpus.prepare import prepare_config


def get_config():
    c = prepare_config()
    c.sources = "parquet:/data/web/*.parquet"
    c.workers = 16
    c.chunk_docs = 200_000
    c.val_fraction = 0.005
    c.tokenizer.vocab_size = 32000
    c.tokens.seq_len = 0  # the recipes tokenize the mixture with `lmjax data tokenize` (see above)
    return c
