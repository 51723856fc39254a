"""stdlib: the embedded corpus (stdlib docstrings + pydoc topics) through the whole cleaning pipeline.

    lmjax data prepare --config configs/data/stdlib.py --out data/stdlib
    lmjax train --config configs/tiny.py --config.data.train=data/stdlib --config.data.val=data/stdlib:val \
        --workdir runs/tiny-prepared

Expect: about 6,800 documents in, a few hundred removed (mostly too-short docstrings and duplicates), a
handful of PII replacements (e-mail addresses in module headers), ~5% held out, in under 60 s.
"""

from lmjax.corpus.prepare import prepare_config


def get_config():
    c = prepare_config()
    c.sources = "stdlib:all"
    return c
