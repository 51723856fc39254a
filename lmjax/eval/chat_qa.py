"""Question answering on held-out chat data: greedy replies scored by the generation metrics of
lmjax/eval/metrics.py (BLEU, chrF, ROUGE, METEOR, exact match, with bootstrap intervals)."""

from collections.abc import Sequence

from lmjax.config import DataError
from lmjax.eval.metrics import generation_metrics
from lmjax.infer.sampler import Sampler
from lmjax.input.specs import read_chat
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.text.chat_template import Message, encode_chat

Conversation = list[Message]


def qa_pairs(conversations: Sequence[Conversation]) -> list[tuple[Conversation, str]]:
    """(prompt messages before the last assistant turn, that turn's content) for evaluation."""
    pairs = []
    for conversation in conversations:
        last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None)
        if last is not None:
            pairs.append((list(conversation[:last]), conversation[last]["content"]))
    return pairs


def answer(sampler: Sampler, prompts: Sequence[list[dict]], max_new_tokens: int = 48,
           batch_size: int = 16) -> list[str]:
    """Greedy assistant replies to conversations (each ending with a user turn), in fixed-size batches
    so the decode step compiles once."""
    replies = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        ids = [encode_chat(messages, sampler.tokenizer, add_generation_prompt=True)[0] for messages in batch]
        ids += [ids[-1]] * (batch_size - len(ids))
        replies += sampler.generate([], max_new_tokens, temperature=0.0, prompt_ids=ids)[:len(batch)]
    return [r.strip() for r in replies]


def score(replies: Sequence[str], references: Sequence[str]) -> dict:
    """`generation_metrics` of the replies under "metrics", and, for existing callers, the point values of
    ROUGE-L F1 (stemmed) and exact match (case-folded, whitespace collapsed) and the number of questions."""
    metrics = generation_metrics(replies, references)
    return {"rouge_l": metrics["rouge_l"].value, "exact_match": metrics["exact_match"].value,
            "questions": len(replies), "metrics": metrics}


def fits(sampler: Sampler, prompt: list[dict], reply_tokens: int = 8) -> bool:
    """Whether a conversation, as a prompt, leaves room for a reply in the sampler's context (longer ones are
    left out of evaluations, as the server would refuse them)."""
    return len(encode_chat(prompt, sampler.tokenizer, add_generation_prompt=True)[0]) + reply_tokens <= sampler.max_len


def evaluate_workdir(workdir: str, source: str = "stdlib:heldout", limit: int = 128,
                     step: int | None = None) -> tuple[dict, list[tuple[str, str, str]]]:
    """Scores a run on the first `limit` questions of a chat source; returns the metrics and
    (question, reply, reference) triples."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(workdir), step)
    sampler = Sampler(cfg.model, graphdef, params, tokenizer)
    pairs = qa_pairs(read_chat(source))
    if not pairs:
        raise DataError(f"chat source {source!r} holds no conversation with an assistant reply to score")
    pairs = [p for p in pairs if fits(sampler, p[0])][:limit]
    if not pairs:
        raise DataError(f"no question of chat source {source!r} fits the model's context of {sampler.max_len}")
    replies = answer(sampler, [prompt for prompt, _ in pairs])
    references = [reference for _, reference in pairs]
    questions = [prompt[-1]["content"] for prompt, _ in pairs]
    return score(replies, references), list(zip(questions, replies, references, strict=True))
