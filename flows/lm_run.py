"""``kdops lm distill``: one causal-LM round on the shipped corpus through ``distill_lm_flow``, with the embedded
servers (Prefect API, SQLite MLflow, tritonserver) or remote ones by configuration.

A round continues the registry's LM champion when there is one (replaying the texts it was trained on) and is
gated against it; otherwise it carves a first student from the teacher. With a Triton (embedded or
``--triton-url``) the promoted student is hot-swapped in as a generation model and answers a few prompts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from kdops.gate import LMGateThresholds
from kdops.lm.distill import LMDistillConfig
from kdops.lm.rounds import LMShape
from kdops.paths import home

DEMO_PROMPTS = ("The movie was", "I really did not like", "A thoughtful, funny film about")


def champion_for_round(registry, model: str) -> tuple[dict | None, list[str]]:
    """``({"version", "artifact", "report"}, replay snapshot ids)`` of the LM champion, or ``(None, [])``.

    ``report`` is the summary the promotion recorded in the ledger (per-domain perplexities included)."""
    version = registry.champion(model)
    if version is None:
        return None, []
    entries = [e for e in registry.ledger(model) if e.get("action") == "promote" and e.get("version") == version]
    report = entries[-1].get("report_summary") if entries else None
    lineage = registry.lineage(model, version)
    snaps = lineage.get("snapshot_ids") or {}
    replay = [snaps["train"]] if snaps.get("train") else []
    replay += [s for s in (snaps.get("replay") or []) if s not in replay]
    return {"version": version, "artifact": str(registry.download(model, version)), "report": report}, replay


def run_lm_round_cli(domains: tuple[str, ...], train_sentences: int, eval_sentences: int, cfg: LMDistillConfig,
                     shape: LMShape, thresholds: LMGateThresholds, model: str, teacher_dir: Path | None, serve: bool,
                     triton_url: str, triton_grpc_url: str, triton_key: str, max_length: int, speed: bool,
                     seed: int, json_out: Path | None, echo=print) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from contextlib import ExitStack

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.lm import distill_lm_flow
    from flows.services import PrefectServer
    from flows.tasks import LoopContext, save_snapshot
    from kdops import corpora
    from kdops.lm.teacher import smollm2_dir
    from kdops.registry import Registry
    from serving.server import ServerConfig, TritonServer

    root = home()
    teacher = Path(teacher_dir) if teacher_dir else smollm2_dir()
    missing = [f for f in ("config.json", "model.safetensors") if not (teacher / f).is_file()]
    if missing:  # checked before any server starts
        raise FileNotFoundError(f"teacher directory {teacher}: {', '.join(missing)} missing (a causal LM saved with "
                                "save_pretrained(safe_serialization=True) and its tokenizer is expected)")
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    (root / "mlflow").mkdir(parents=True, exist_ok=True)
    train = corpora.load("sentiment", split="train", domains=domains).rows
    train = train.sample(n=min(train_sentences, len(train)), random_state=seed)[["text", "domain"]].assign(label=None)
    test = corpora.load("sentiment", split="test", domains=domains, limit_per_domain=eval_sentences).rows
    test = test[["text", "domain"]].assign(label=None)
    registry = Registry(tracking_uri=tracking_uri)
    champion, replay = champion_for_round(registry, model)
    repo = root / "triton-repo"
    t0 = time.time()
    with ExitStack() as stack:
        prefect = stack.enter_context(PrefectServer(root))
        stack.enter_context(temporary_settings({PREFECT_API_URL: prefect.url}))
        triton = None
        if serve:
            triton = stack.enter_context(TritonServer(ServerConfig(
                repository=str(repo), url=triton_url, grpc_url=triton_grpc_url, admin_key=triton_key,
                log_file="" if triton_url else str(root / "triton" / "tritonserver-lm.log"))))
        ctx = LoopContext(home=str(root), teacher_dir=str(teacher), tracking_uri=tracking_uri, model=model,
                          triton_url=triton.url if triton else "", triton_grpc_url=triton.grpc_url if triton else "",
                          triton_key=triton.admin_key if triton else "", repository=str(repo),
                          prediction_log=str(root / "predictions-lm"))
        if triton is not None and champion is not None:
            from flows.tasks import hot_swap_task
            from serving.swap import read_state

            # An embedded server starts empty; an attached one may already serve the champion.
            if not triton_url or read_state(repo, model)["active_slot"] is None:
                hot_swap_task.fn(ctx, champion["artifact"])
        echo(f"teacher {teacher}; champion {'v' + str(champion['version']) if champion else 'none (first round)'}; "
             f"{len(train)} training and {len(test)} evaluation sentences from {', '.join(domains)}")
        out = distill_lm_flow(ctx, save_snapshot(ctx, train, None), save_snapshot(ctx, test, None), cfg, shape,
                              thresholds, champion, deploy=triton is not None, max_length=max_length,
                              replay_ids=replay, speed=speed)
        samples = []
        if triton is not None and "promotion" in out:
            from serving.client import ServingClient

            gen = ServingClient(triton.url).generate(model, list(DEMO_PROMPTS), max_tokens=16, temperature=0.0)
            samples = [{"prompt": p, "completion": c, "version": v} for p, c, v in zip(DEMO_PROMPTS, gen.texts, gen.versions)]
    s = out["summary"]
    result = {"version": out["version"], "decision": out["decision"], "artifact": out["artifact"], "summary": s,
              "served": samples, "champion_before": champion["version"] if champion else None,
              "config": {"distill": asdict(cfg), "shape": asdict(shape), "domains": list(domains)},
              "seconds": round(time.time() - t0, 1)}
    echo(f"\nv{out['version']}: gate {out['decision']['action']} ({'; '.join(out['decision']['reasons'])})")
    echo(f"{'':<24}{'teacher':>12}{'student':>12}{'ratio':>10}")
    echo(f"{'perplexity':<24}{s['teacher_ppl']:>12.2f}{s['student_ppl']:>12.2f}{s['ppl_ratio']:>10.3f}")
    echo(f"{'parameters (M)':<24}{s['teacher_params'] / 1e6:>12.1f}{s['student_params'] / 1e6:>12.1f}{s['param_ratio']:>10.3f}")
    if s.get("speedup"):
        echo(f"{'generation tokens/s':<24}{s['teacher_tokens_per_s']:>12.1f}{s['student_tokens_per_s']:>12.1f}{s['speedup']:>10.2f}")
    for row in samples:
        echo(f"served {row['version']}: {row['prompt']!r} -> {row['completion']!r}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2, default=str))
        echo(f"JSON: {json_out}")
    return result
