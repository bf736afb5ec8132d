"""`shard model`: register models and push their versions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shard.model.v1 import model_pb2, model_service_pb2, model_service_pb2_grpc
from shard_tool.output import Column, Format, emit, emit_data, transfer_progress
from shard_tool.publish import Publisher, directory_bytes
from shard_tool.session import TIMEOUT_S, all_pages, resource_name, session

app = typer.Typer(help="Models: create, push versions, list, inspect and remove.")

COLUMNS: list[Column] = [
    ("name", lambda m: m.name.removeprefix("models/")),
    ("owner", lambda m: m.owner),
    ("visibility", lambda m: model_pb2.Visibility.Name(m.visibility).removeprefix("VISIBILITY_")),
    ("rate limit", lambda m: m.rate_limit_rps or "-"),
    ("verified", lambda m: f"{m.verify_fraction:.0%}" if m.verify_fraction else "-"),
    ("description", lambda m: m.description),
]
VISIBILITY = {"private": model_pb2.VISIBILITY_PRIVATE, "public": model_pb2.VISIBILITY_PUBLIC}
Name = Annotated[str, typer.Argument(help="The model id (or models/<id>).")]
Stub = model_service_pb2_grpc.ModelServiceStub


def _visibility(value: str) -> model_pb2.Visibility.ValueType:
    if value not in VISIBILITY:
        raise typer.BadParameter("must be 'private' or 'public'", param_hint="--visibility")
    return VISIBILITY[value]


@app.command("create")
def create(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="The new model's id.")],
    visibility: Annotated[str, typer.Option(help="'private' or 'public'.")] = "private",
    description: Annotated[str, typer.Option(help="What the model does.")] = "",
    verify_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of answers re-run on a second node and compared (0 to 1); a node "
            "caught answering differently is quarantined.",
        ),
    ] = 0.0,
) -> None:
    """Register a model (its versions come with `shard model push`).

    Example: shard model create resnet50 --visibility public --verify-fraction 0.01
    """
    s = session(ctx)
    wanted = model_pb2.Model(
        visibility=_visibility(visibility),
        description=description,
        verify_fraction=verify_fraction,
    )
    request = model_service_pb2.CreateModelRequest(model_id=model, model=wanted)
    reply = s.call(Stub, lambda models: models.CreateModel(request, timeout=TIMEOUT_S))
    emit(reply.model, COLUMNS, s.output)


@app.command("push")
def push(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(help="A Triton model directory: config.pbtxt and version dirs.")
    ],
    visibility: Annotated[str, typer.Option(help="For a new model: 'private' or 'public'.")] = (
        "private"
    ),
) -> None:
    """Upload a Triton model directory as the model named after it, one version per numbered
    directory. Files the shard already stores are skipped, so a push that was cut off resumes.

    Example: shard model push ./models/simple --visibility public
    """
    if not (directory / "config.pbtxt").is_file():
        raise typer.BadParameter(f"{directory} has no config.pbtxt", param_hint="DIRECTORY")
    s = session(ctx)
    level = _visibility(visibility)
    total = directory_bytes(directory)
    quiet = s.output is not Format.TABLE

    async def work() -> None:
        with transfer_progress(quiet=quiet) as progress:
            task = progress.add_task(f"pushing {directory.name}", total=total)
            publisher = Publisher(
                channel=s.channel(s.context.registry),
                on_bytes=lambda n: progress.advance(task, n),
            )
            versions = await publisher.push_directory(directory, visibility=level)
        emit_data({"model": f"models/{directory.name}", "versions": versions}, s.output)

    s.run(work)


@app.command("ls")
def list_models(ctx: typer.Context) -> None:
    """List the models you can see.

    Example: shard model ls -o json
    """
    s = session(ctx)
    request = model_service_pb2.ListModelsRequest()
    found = s.call(Stub, lambda models: all_pages(models.ListModels, request, "models"))
    emit(found, COLUMNS, s.output)


@app.command("get")
def get(ctx: typer.Context, model: Name) -> None:
    """Show a model and its versions.

    Example: shard model get simple -o yaml
    """
    s = session(ctx)

    async def fetch(models: Stub) -> tuple[model_pb2.Model, list[model_pb2.ModelVersion]]:
        get = model_service_pb2.GetModelRequest(name=resource_name("models", model))
        found = (await models.GetModel(get, timeout=TIMEOUT_S)).model
        listing = model_service_pb2.ListModelVersionsRequest(parent=found.name)
        return found, await all_pages(models.ListModelVersions, listing, "model_versions")

    found, versions = s.call(Stub, fetch)
    emit(found, COLUMNS, s.output)
    if s.output is Format.TABLE:
        names = [v.name.rsplit("/", 1)[-1] for v in versions]
        typer.echo(f"versions: {', '.join(names) or '-'}")


@app.command("rm")
def remove(ctx: typer.Context, model: Name) -> None:
    """Delete a model (it must have no deployment).

    Example: shard model rm resnet50
    """
    s = session(ctx)
    request = model_service_pb2.DeleteModelRequest(name=resource_name("models", model))
    s.call(Stub, lambda models: models.DeleteModel(request, timeout=TIMEOUT_S))
    emit_data({"deleted": request.name}, s.output)
