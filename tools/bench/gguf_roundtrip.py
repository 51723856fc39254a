"""An exported lmjax run through llama.cpp: `lmjax export hf`, then llama.cpp's own converter to GGUF, then greedy
decoding in llama.cpp (llama-cpp-python) against lmjax's greedy decoding of the same chat prompts.

    .venv/bin/python tools/bench/gguf_roundtrip.py --workdir runs/quickstart/sft

Prints, per prompt, how many of the greedy tokens agree before the first difference, and whether llama.cpp's
tokenizer (read from the GGUF) gives lmjax's ids on the prompts' text. Needs llama.cpp's converter and
llama-cpp-python in their own venv (tools/bench/serve_artefacts.py documents how they are built, ~25 min once);
not in CI. The comparison is in float32 (an f32 GGUF); lmjax decodes without a cache here, the plainest reference.
"""

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_artefacts import DEFAULT_CONVERTER_GLOB, DEFAULT_LLAMACPP_PYTHON, make_gguf  # noqa: E402

from lmjax.input.specs import read_chat  # noqa: E402
from lmjax.interop.hf_export import export_hf  # noqa: E402
from lmjax.run.restore import restore_model  # noqa: E402
from lmjax.run.workdir import open_workdir  # noqa: E402
from lmjax.text.chat_template import encode_chat  # noqa: E402

# Runs in llama.cpp's venv: reads {"gguf", "prompts", "texts", "new_tokens"} on stdin, writes greedy ids and the
# ids its tokenizer gives each text.
LLAMACPP_SIDE = """
import json, sys
import llama_cpp
job = json.load(sys.stdin)
llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=2, verbose=False)
out = {"greedy": [], "tokenized": []}
for prompt in job["prompts"]:
    ids = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        if token in job["stop"] or len(ids) == job["new_tokens"]:
            break
        ids.append(token)
    out["greedy"].append(ids)
for text in job["texts"]:
    out["tokenized"].append(llm.tokenize(text.encode(), add_bos=False, special=False))
print(json.dumps(out))
"""


def lmjax_greedy(run: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations by the plain forward pass (no cache) in float32, stopped at the run's stop ids."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(run))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.float32), params))
    forward = jax.jit(lambda t: model(t, jnp.arange(t.shape[1])[None], jnp.ones_like(t))[0][0, -1])
    outputs = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(new_tokens):
            token = int(jnp.argmax(forward(jnp.asarray([ids], jnp.int32))[:cfg.model.vocab_size]))
            if token in tokenizer.stop_ids:
                break
            ids.append(token)
        outputs.append(ids[len(prompt):])
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quickstart/sft"), help="a llama-family run")
    parser.add_argument("--prompts", type=int, default=16, help="held-out chat questions to decode")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--llamacpp-python", type=Path, default=DEFAULT_LLAMACPP_PYTHON)
    parser.add_argument("--converter", default=DEFAULT_CONVERTER_GLOB, help="llama.cpp's convert_hf_to_gguf.py")
    args = parser.parse_args()
    converters = sorted(glob.glob(str(args.converter)))
    if not converters or not args.llamacpp_python.is_file():
        sys.exit(f"needs llama.cpp's converter ({args.converter}) and llama-cpp-python ({args.llamacpp_python})")
    _, _, _, tokenizer, step = restore_model(open_workdir(args.workdir))
    questions = [c[:1] for c in read_chat("stdlib:heldout") if c[0]["role"] == "user"][:args.prompts]
    prompts = [encode_chat(q, tokenizer, add_generation_prompt=True)[0].tolist() for q in questions]
    texts = [q[0]["content"] for q in questions]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        hf_dir = export_hf(args.workdir, Path(tmp) / "hf")
        gguf = make_gguf(Path(tmp) / "model-f32.gguf", hf_dir, args.llamacpp_python, Path(converters[-1]))
        print(f"exported and converted {args.workdir} (step {step}) in {time.time() - start:.1f}s", flush=True)
        job = {"gguf": str(gguf), "prompts": prompts, "texts": texts, "new_tokens": args.new_tokens,
               "stop": tokenizer.stop_ids, "n_ctx": open_workdir(args.workdir).load_config().model.seq_len}
        done = subprocess.run([str(args.llamacpp_python), "-c", LLAMACPP_SIDE], input=json.dumps(job),
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"llama.cpp failed:\n{done.stderr[-3000:]}")
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = lmjax_greedy(args.workdir, prompts, args.new_tokens)
    same_ids = sum(t == tokenizer.encode(x) for t, x in zip(theirs["tokenized"], texts, strict=True))
    print(f"llama.cpp's tokenizer gives lmjax's ids on {same_ids}/{len(texts)} prompt texts")
    print("| prompt | lmjax tokens | llama.cpp tokens | equal prefix | identical |")
    print("|---|---|---|---|---|")
    agreed = 0
    for i, (a, b) in enumerate(zip(ours, theirs["greedy"], strict=True)):
        prefix = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agreed += a == b
        print(f"| {i} | {len(a)} | {len(b)} | {prefix} | {a == b} |")
    print(f"greedy output identical on {agreed}/{len(ours)} prompts "
          f"({np.mean([len(a) for a in ours]):.1f} tokens each on average)")


if __name__ == "__main__":
    main()
