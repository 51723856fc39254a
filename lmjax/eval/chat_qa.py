"""Question answering on held-out chat data: greedy replies scored by ROUGE-L and exact match."""

from collections.abc import Sequence

from rouge_score import rouge_scorer

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


def score(replies: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 (stemmed) and the share of exact matches (after stripping whitespace)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, reply)["rougeL"].fmeasure for reply, ref in zip(replies, references, strict=True)]
    exact = [reply.strip() == ref.strip() for reply, ref in zip(replies, references, strict=True)]
    n = max(len(rouge), 1)
    return {"rouge_l": sum(rouge) / n, "exact_match": sum(exact) / n, "questions": len(rouge)}


def evaluate_workdir(workdir: str, source: str = "stdlib:heldout", limit: int = 128,
                     step: int | None = None) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Scores a run on the first `limit` questions of a chat source; returns the metrics and
    (question, reply, reference) triples."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(workdir), step)
    sampler = Sampler(cfg.model, graphdef, params, tokenizer)
    pairs = qa_pairs(read_chat(source))[:limit]
    replies = answer(sampler, [prompt for prompt, _ in pairs])
    references = [reference for _, reference in pairs]
    questions = [prompt[-1]["content"] for prompt, _ in pairs]
    return score(replies, references), list(zip(questions, replies, references, strict=True))
