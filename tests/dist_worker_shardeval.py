"""Evaluation with the weights sharded (FSDP2) over torchrun ranks, for tests/test_evals_sharded.py.

    torchrun --nproc_per_node 2 tests/dist_worker_shardeval.py CKPT ADAPTER OUT

Every rank runs the TruthfulQA command line with ``--shard-weights on`` into OUT/tqa, then
`results` (scoring, greedy generation with uneven stops, sampling) on the sharded model; rank r
writes OUT/rank{r}.json. The test runs `results` in a single process too and compares.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import parallel  # noqa: E402
from evals import load_eval_model, run_cli, truthfulqa  # noqa: E402

# Five conversations in batches of two: three batches, so one rank has one batch fewer.
CONVERSATIONS = [[{"role": "user", "content": text}] for text in (
    "Hello there.", "What is two plus two? Answer with only A or B.", "A", "Tell me a story about a dog and a cat.",
    "Why?")]


def results(ckpt: str, adapter: str) -> dict:
    """Scores and completions of CONVERSATIONS (5 conversations in batches of 2), fp32, and how
    the model was held: sharded under torchrun, whole in a single process."""
    em = load_eval_model(ckpt, [adapter], template="seed-oss", dtype="float32", shard_weights="on", batch_size=2)
    gen, _ = em.generator(0)
    gen.progress = False
    scores = gen.score_choices(CONVERSATIONS, ["A", "B"], batch_size=2)
    scoring_idle = gen.forward.idle_passes
    greedy = gen.generate(CONVERSATIONS, max_new_tokens=6, batch_size=2)
    # Uneven stops: the first completion's second token ends a turn too, so sequences, batches
    # and ranks finish after different numbers of decoding steps.
    gen.stop_ids = gen.stop_ids | {greedy[0].token_ids[1]}
    stopped = gen.generate(CONVERSATIONS, max_new_tokens=6, batch_size=2)
    sampled = gen.generate(CONVERSATIONS, max_new_tokens=4, temperature=1.0, top_p=0.9, seed=3, batch_size=2)
    # TruthfulQA's expected statistic: a tree of decoding prefixes per conversation, of a size
    # that depends on the model's distributions (8 to 13 nodes here), 4 extended per pass.
    expected = gen.answer_stats(CONVERSATIONS, ["A", "B"], temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=3,
                                choices=["A", "B"], sample_seed=1, batch_size=2, min_mass=1e-4, max_rows=4)
    judged = judge_shares(em, [f"Rate from 0 to 100: {c.text}" for c in greedy])
    weight = em.model.model.layers[0].mlp.up_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return {
        "scores": [[s.logprobs, s.argmax_id, s.argmax_logprob] for s in scores],
        "greedy": [[c.token_ids, c.stopped] for c in greedy],
        "stopped": [[c.token_ids, c.stopped] for c in stopped],
        "sampled": [[c.token_ids, c.stopped] for c in sampled],
        "judged": judged,
        "expected": [asdict(s) for s in expected],
        "weights": em.meta["weights"],
        "sharded": parallel.is_sharded(em.model),
        "local_rows": [local.shape[0], weight.shape[0]],
        "scoring_idle_passes": scoring_idle,
        "idle_passes": gen.forward.idle_passes,
    }


def judge_shares(em, prompts: list[str]) -> list[dict]:
    """The local judge (`evals.judges.LocalJudge`, a token tree of passes per batch) on `prompts`
    in batches of 2, each rank judging whole batches of a contiguous share as `evals.freeform`
    does (3 batches: 1 on rank 0, 2 on rank 1, the last one smaller), gathered in order."""
    from evals.judges import LocalJudge

    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if parallel.is_distributed() else (0, 1)
    n = -(-len(prompts) // 2)
    mine = [asdict(j) for j, _ in LocalJudge(em, batch_size=2).judge(prompts[n * rank // world * 2: n * (rank + 1) // world * 2])]
    if world == 1:
        return mine
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return [j for part in parts for j in part]


def main(ckpt: str, adapter: str, out: str) -> None:
    dist = parallel.init_distributed()
    torch.set_num_threads(1)
    args = ["--model", ckpt, "--adapter", adapter, "--template", "seed-oss", "--limit", "7", "--batch-size", "3",
            "--dtype", "float32", "--shard-weights", "on", "--out", str(Path(out) / "tqa")]
    if run_cli(truthfulqa.main, args) != 0:
        raise SystemExit(f"rank {dist.rank}: truthfulqa failed")
    (Path(out) / f"rank{dist.rank}.json").write_text(json.dumps(results(ckpt, adapter)))
    parallel.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
