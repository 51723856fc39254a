"""lmjax as an lm-evaluation-harness model, in process: `lm_eval --model lmjax --model_args workdir=RUN`.

Importing this module registers the class under the name "lmjax" (lm-eval itself is an optional dependency:
`pip install lm-eval`). Log-likelihoods come from the same `LoglikScorer` as lmjax's own multiple-choice tasks,
so a task scores the same either way; rolling log-likelihoods use lm-eval's own disjoint windows of the model's
context; generation is greedy (lm-eval's `until`, `max_gen_toks`), the only decoding its tasks ask of a model.
"""

import lm_eval.models  # noqa: F401  (the harness's own models first: its registry imports them only while empty)
from lm_eval import utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmjax.eval.loglik import LoglikScorer
from lmjax.infer.sampler import Sampler
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir


@register_model("lmjax")
class LmjaxLM(LM):
    """An lmjax run directory behind lm-eval's model interface."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str = 16, max_gen_toks: int = 64,
                 **_ignored):
        super().__init__()
        cfg, graphdef, params, self.tokenizer, _ = restore_model(open_workdir(workdir), None if step is None
                                                                 else int(step))
        self.rows = int(batch_size) if str(batch_size).isdigit() else 16
        self.context = cfg.model.seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = LoglikScorer(graphdef, params, self.context, rows=self.rows)
        self.sampler = Sampler(cfg.model, graphdef, params, self.tokenizer)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's rule: trailing spaces of the context move to the continuation; the continuation's ids are
        those of the whole after the context's."""
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
        context_ids = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
        whole = [self.tokenizer.bos_id] + self.tokenizer.encode(context + continuation)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, request in enumerate(requests):
            for window in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tokenizer.encode(request.args[0]), prefix_token=self.tokenizer.bos_id,
                    max_seq_len=self.context, context_len=1)):
                windows.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self.scorer.score(windows), strict=True):
            totals[owner] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        replies = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
            limit = min(int(settings.get("max_gen_toks", self.max_gen_toks)), self.context - len(prompt))
            replies += self.sampler.generate([], max(limit, 1), temperature=0.0, stop=until, prompt_ids=[prompt])
        return replies
