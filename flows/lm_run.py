"""``kdops lm distill``: one causal-LM round on the shipped corpus through ``distill_flow`` with an LM recipe, with the embedded
servers (Prefect API, SQLite MLflow, tritonserver) or remote ones by configuration.

A round continues the registry's LM champion when there is one (replaying the texts it was trained on) and is
gated against it; otherwise it carves a first student from the teacher. With a Triton (embedded or
``--triton-url``) the promoted student is hot-swapped in as a generation model and answers a few prompts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdops.paths import Home
from kdops.recipes import LMRecipe

DEMO_PROMPTS = ("The movie was", "I really did not like", "A thoughtful, funny film about")


def run_lm_round_cli(recipe: LMRecipe, domains: tuple[str, ...], eval_sentences: int, model: str,
                     teacher_dir: Path | None, serve: bool, triton_url: str, triton_grpc_url: str, triton_key: str,
                     speed: bool, seed: int, json_out: Path | None, echo=print) -> dict:
    """One LM round with ``recipe`` on the corpus ``domains``: continues the registry's LM champion (replaying its
    training text) when there is one, else carves a first student."""
    from contextlib import ExitStack

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.demo import _quiet_logs
    from flows.loop import distill_flow
    from flows.services import PrefectServer
    from flows.tasks import LoopContext, hot_swap_task, save_snapshot
    from kdops.lm.teacher import smollm2_dir
    from kdops.registry import Registry
    from serving.server import ServerConfig, TritonServer
    from serving.swap import read_state

    _quiet_logs()
    paths = Home.from_env()
    teacher = Path(teacher_dir) if teacher_dir else smollm2_dir()
    missing = [f for f in ("config.json", "model.safetensors") if not (teacher / f).is_file()]
    if missing:  # checked before any server starts
        raise FileNotFoundError(f"teacher directory {teacher}: {', '.join(missing)} missing (a causal LM saved with "
                                "save_pretrained(safe_serialization=True) and its tokenizer is expected)")
    train, test = _corpus(recipe, domains, eval_sentences, seed)
    paths.mlflow.mkdir(parents=True, exist_ok=True)
    registry = Registry(tracking_uri=paths.tracking_uri)
    champion = registry.champion_info(model) if registry.champion(model) is not None else None
    replay = [sid for sid in [(champion.lineage.get("snapshot_ids") or {}).get("train")] if sid] if champion else []
    t0 = time.time()
    with ExitStack() as stack:
        prefect = stack.enter_context(PrefectServer(paths.root))
        stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.url}))
        triton = None
        if serve:
            triton = stack.enter_context(TritonServer(ServerConfig(
                repository=str(paths.triton_repo), url=triton_url, grpc_url=triton_grpc_url, admin_key=triton_key,
                log_file="" if triton_url else str(paths.triton / "tritonserver-lm.log"))))
        ctx = LoopContext(home=str(paths.root), teacher_dir=str(teacher), tracking_uri=paths.tracking_uri, model=model,
                          triton_url=triton.url if triton else "", triton_grpc_url=triton.grpc_url if triton else "",
                          triton_key=triton.admin_key if triton else "", repository=str(paths.triton_repo),
                          prediction_log=str(paths.predictions("-lm")))
        # An embedded server starts empty; an attached one may already serve the champion.
        if triton is not None and champion is not None and (not triton_url or read_state(paths.triton_repo, model)["active_slot"] is None):
            hot_swap_task.fn(ctx, str(champion.artifact))
        echo(f"teacher {teacher}; recipe {recipe.name}; champion {'v' + str(champion.version) if champion else 'none (first round)'}; "
             f"{len(train)} training and {len(test)} evaluation sentences from {', '.join(domains)}")
        out = distill_flow(ctx, save_snapshot(ctx, train, None), save_snapshot(ctx, test, None), recipe, champion,
                           deploy=triton is not None, replay_ids=replay, speed=speed)
        samples = _served_samples(triton.url, model) if triton is not None and "promotion" in out else []
    result = {"version": out["version"], "decision": out["decision"], "artifact": out["artifact"],
              "summary": out["report"]["summary"], "served": samples,
              "champion_before": champion.version if champion else None,
              "config": {"recipe": recipe.to_dict(), "domains": list(domains)}, "seconds": round(time.time() - t0, 1)}
    _print_round(result, echo)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str))
        echo(f"JSON: {json_out}")
    return result


def _corpus(recipe: LMRecipe, domains: tuple[str, ...], eval_sentences: int, seed: int):
    """(training text: a seeded sample of the domains' train split, held-out text per domain), unlabelled."""
    from kdops import corpora

    train = corpora.load("sentiment", split="train", domains=domains).rows
    train = train.sample(n=min(recipe.train_sentences, len(train)), random_state=seed)[["text", "domain"]]
    test = corpora.load("sentiment", split="test", domains=domains, limit_per_domain=eval_sentences).rows
    return train.assign(label=None), test[["text", "domain"]].assign(label=None)


def _served_samples(url: str, model: str) -> list[dict]:
    from serving.client import ServingClient

    gen = ServingClient(url).generate(model, list(DEMO_PROMPTS), max_tokens=16, temperature=0.0)
    return [{"prompt": p, "completion": c, "version": v} for p, c, v in zip(DEMO_PROMPTS, gen.texts, gen.versions)]


def _print_round(result: dict, echo) -> None:
    s, d = result["summary"], result["decision"]
    echo(f"\nv{result['version']}: gate {d['action']} ({'; '.join(d['reasons'])})")
    echo(f"{'':<24}{'teacher':>12}{'student':>12}{'ratio':>10}")
    echo(f"{'perplexity':<24}{s['teacher_ppl']:>12.2f}{s['student_ppl']:>12.2f}{s['ppl_ratio']:>10.3f}")
    echo(f"{'parameters (M)':<24}{s['teacher_params'] / 1e6:>12.1f}{s['student_params'] / 1e6:>12.1f}{s['param_ratio']:>10.3f}")
    if s.get("speedup"):
        echo(f"{'generation tokens/s':<24}{s['teacher_tokens_per_s']:>12.1f}{s['student_tokens_per_s']:>12.1f}{s['speedup']:>10.2f}")
    for row in result["served"]:
        echo(f"served {row['version']}: {row['prompt']!r} -> {row['completion']!r}")
