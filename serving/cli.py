"""``kdops serve ...``: a typer sub-app the main CLI mounts (flows/cli.py). Triton is imported inside commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

app = typer.Typer(help="Triton Inference Server: start, deploy, hot swap, rollback, status.", no_args_is_help=True)

RepoOption = typer.Option(Path(".kdops/triton-repo"), "--repository", "-r", help="Model repository directory.")
ModelOption = typer.Option("student", "--model", "-m", help="Stable model name clients call.")
UrlOption = typer.Option(None, "--url", envvar="KDOPS_TRITON_URL", help="HTTP host:port of a running Triton (attach).")
GrpcOption = typer.Option(None, "--grpc-url", envvar="KDOPS_TRITON_GRPC_URL", help="gRPC host:port of that Triton (model control goes there).")
KeyOption = typer.Option(None, "--admin-key", envvar="KDOPS_TRITON_ADMIN_KEY", help="Key of the restricted model-control API.")
LogDirOption = typer.Option(None, "--prediction-log", help="Directory for the prediction log (default: off).")


def _client(url, grpc_url, key):
    from serving.client import ServingClient

    if not url:
        typer.echo("error: --url (or $KDOPS_TRITON_URL) is required; start a server with `kdops serve serve`.", err=True)
        raise typer.Exit(2)
    return ServingClient(url, key or "", grpc_url=grpc_url or "")


StreamingOption = typer.Option(False, "--streaming", help="Generation models: export a decoupled model that streams "
                               "text as it is generated (`generate --stream`, gRPC streams, HTTP generate_stream).")


RuntimeOption = typer.Option("auto", "--runtime", help="auto: a classifier with ONNX graphs (kdops.onnx_export) runs them on CPU "
                             "(ONNX Runtime, INT8 where its gate passed, no torch in the stub); torch: the torch student.")


def _swap_cfg(prediction_log, streaming: bool = False, runtime: str = "auto"):
    from serving.export import ExportConfig
    from serving.swap import SwapConfig

    if runtime not in ("auto", "torch"):
        raise typer.BadParameter("--runtime must be auto or torch")
    return SwapConfig(export=ExportConfig(prediction_log_dir=str(prediction_log or ""), streaming=streaming, runtime=runtime))


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1) from e


@app.command("serve")
def serve(
    repository: Path = RepoOption,
    model: str = ModelOption,
    student: Path = typer.Option(None, "--student", help="Deploy this student artifact dir at start."),
    http_port: int = typer.Option(8000, help="HTTP port (0: a free one)."),
    grpc_port: int = typer.Option(8001, help="gRPC port (0: a free one)."),
    metrics_port: int = typer.Option(8002, help="Metrics port (0: a free one)."),
    admin_key: str = KeyOption,
    log_file: Path = typer.Option(None, help="Server log file (default: in a temporary work dir)."),
    prediction_log: Path = LogDirOption,
    streaming: bool = StreamingOption,
    runtime: str = RuntimeOption,
) -> None:
    """Start the embedded tritonserver and keep it running until Ctrl-C."""
    from serving.server import ServerConfig, TritonServer
    from serving.swap import deploy

    cfg = ServerConfig(repository=str(repository), http_port=http_port, grpc_port=grpc_port,
                       metrics_port=metrics_port, admin_key=admin_key or "", log_file=str(log_file or ""))
    with TritonServer(cfg) as server:
        if student:
            deploy(server, model, student, cfg=_swap_cfg(prediction_log, streaming, runtime))
        typer.echo(json.dumps({"http": server.url, "grpc": server.grpc_url, "metrics": server.metrics_url,
                               "log": str(server.log_path), "repository": str(server.repository)}))
        if not admin_key:
            typer.echo(f"export KDOPS_TRITON_ADMIN_KEY={server.admin_key}", err=True)
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def _swap_cmd(note: str, student: Path, repository: Path, model: str, url, grpc_url, admin_key, prediction_log,
              streaming: bool, runtime: str) -> None:
    from serving.swap import hot_swap

    try:
        typer.echo(json.dumps(hot_swap(_client(url, grpc_url, admin_key), model, student, repository,
                                       _swap_cfg(prediction_log, streaming, runtime), note=note).to_dict()))
    except Exception as e:
        _fail(e)


@app.command("deploy")
def deploy_cmd(student: Path = typer.Argument(..., help="Student artifact dir."), repository: Path = RepoOption,
               model: str = ModelOption, url: str = UrlOption, grpc_url: str = GrpcOption, admin_key: str = KeyOption,
               prediction_log: Path = LogDirOption, streaming: bool = StreamingOption,
               runtime: str = RuntimeOption) -> None:
    """Export a student and serve it under the model name (first deployment or a new version)."""
    _swap_cmd("deploy", student, repository, model, url, grpc_url, admin_key, prediction_log, streaming, runtime)


@app.command("swap")
def swap_cmd(student: Path = typer.Argument(..., help="New student artifact dir."), repository: Path = RepoOption,
             model: str = ModelOption, url: str = UrlOption, grpc_url: str = GrpcOption, admin_key: str = KeyOption,
             prediction_log: Path = LogDirOption, streaming: bool = StreamingOption,
             runtime: str = RuntimeOption) -> None:
    """Hot swap: load beside the old version, verify, switch, unload the old. A failure keeps the old one."""
    _swap_cmd("swap", student, repository, model, url, grpc_url, admin_key, prediction_log, streaming, runtime)


@app.command("rollback")
def rollback_cmd(repository: Path = RepoOption, model: str = ModelOption, url: str = UrlOption,
                 grpc_url: str = GrpcOption, admin_key: str = KeyOption,
                 steps: int = typer.Option(1, help="How many swaps back."), prediction_log: Path = LogDirOption,
                 streaming: bool = StreamingOption, runtime: str = RuntimeOption) -> None:
    """Put a previous version back, by the same hot swap."""
    from serving.swap import rollback

    try:
        typer.echo(json.dumps(rollback(_client(url, grpc_url, admin_key), model, repository,
                                       _swap_cfg(prediction_log, streaming, runtime), steps).to_dict()))
    except Exception as e:
        _fail(e)


@app.command("status")
def status_cmd(repository: Path = RepoOption, model: str = ModelOption, url: str = UrlOption,
               grpc_url: str = GrpcOption, admin_key: str = KeyOption) -> None:
    """Active slot and version, swap history, and Triton's state of each slot."""
    from serving.swap import serving_status

    typer.echo(json.dumps(serving_status(_client(url, grpc_url, admin_key), model, repository), indent=2, default=str))




@app.command("classify")
def classify_cmd(ctx: typer.Context, texts: list[str] = typer.Argument(..., help="One or more texts."),
                 model: str = typer.Option(None, "--model", "-m", help="Served model name (default: kdops.toml's [serve] model)."),
                 url: str = UrlOption) -> None:
    """Ask a served classifier (a student or a teacher) for labels; prints a JSON line per text with the label,
    its score (probability for a student) and the model version that answered."""
    from kdops.cli_common import session

    model = model or session(ctx).project.serve.model
    client = _client(url, None, None)
    try:
        out = client.infer(model, list(texts))
    except Exception as e:
        _fail(e)
    for text, label, probs, version in zip(texts, out.labels, out.probabilities, out.versions):
        typer.echo(json.dumps({"text": text, "label": label, "score": round(float(probs.max()), 4), "model_version": version}))


@app.command("generate")
def generate_cmd(prompts: list[str] = typer.Argument(..., help="One or more prompts."), model: str = ModelOption,
                 url: str = UrlOption, grpc_url: str = GrpcOption,
                 max_tokens: int = typer.Option(None, "--max-tokens", help="New tokens per prompt (default: the model's)."),
                 temperature: float = typer.Option(None, "--temperature", help="0 = greedy (default); > 0 samples."),
                 stream: bool = typer.Option(False, "--stream", help="Print text as a streaming model (deployed with "
                                             "--streaming) generates it: raw text for one prompt, else a JSON line per "
                                             "piece. Needs --grpc-url.")) -> None:
    """Ask a served generation model (a causal-LM student) for continuations; prints JSON lines."""
    client = _client(url, grpc_url, None)
    if stream:
        try:
            for piece in client.generate_stream(model, prompts, max_tokens, temperature):
                if len(prompts) == 1:
                    typer.echo(piece.text, nl=False)
                else:
                    typer.echo(json.dumps({"prompt": prompts[piece.row], "text": piece.text, "tokens": piece.tokens,
                                           "model_version": piece.version}))
        except Exception as e:
            _fail(e)
        if len(prompts) == 1:
            typer.echo("")
        return
    try:
        out = client.generate(model, prompts, max_tokens, temperature)
    except Exception as e:
        _fail(e)
    for p, text, n, v in zip(prompts, out.texts, out.tokens, out.versions):
        typer.echo(json.dumps({"prompt": p, "completion": text, "tokens": n, "model_version": v}))


@app.command("openai")
def openai_cmd(url: str = UrlOption, grpc_url: str = GrpcOption, model: str = ModelOption,
               tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer directory: required for an LM teacher "
                                              "(kdops_kind lm-teacher); for a student it only counts prompt tokens."),
               served_name: str = typer.Option(None, "--served-name", help="Model id clients send (default: --model)."),
               host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
               port: int = typer.Option(8080, "--port", help="Port to listen on (0: a free one)."),
               api_key_env: str = typer.Option("", "--api-key-env", help="Environment variable holding the key clients "
                                               "must send (Authorization: Bearer KEY); empty: no key.")) -> None:
    """An OpenAI-compatible HTTP front (/v1/models, /v1/completions, /v1/chat/completions, streaming) over a served
    causal-LM student or LM teacher; clients point their base URL at it. Runs until Ctrl-C."""
    from serving.openai_front import FrontConfig, serve_forever

    if not url:
        typer.echo("error: --url (or $KDOPS_TRITON_URL) is required: the Triton HTTP host:port.", err=True)
        raise typer.Exit(2)
    try:
        cfg = FrontConfig(url, model, grpc_url=grpc_url or "", served_name=served_name or "",
                          tokenizer=str(tokenizer or ""), host=host, port=port, api_key_env=api_key_env)
        serve_forever(cfg, lambda base: typer.echo(json.dumps({"base_url": base + "/v1", "model": cfg.name})))
    except ValueError as e:
        _fail(e)
    except KeyboardInterrupt:  # uvicorn stops gracefully, then re-raises the Ctrl-C
        pass
