"""`shard infer`: run a model once through the router."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tritonclient.grpc.aio as triton
import typer
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from shard_tool.output import Format, emit_data
from shard_tool.session import fail, session


def _load_json(path: Path) -> list[dict[str, Any]]:
    """The `inputs` of a KServe v2 JSON request file."""
    try:
        document = json.loads(path.read_text())
        inputs = document["inputs"]
        if not isinstance(inputs, list) or not inputs:
            raise ValueError("no inputs")
        return [
            {
                "name": str(t["name"]),
                "datatype": str(t["datatype"]),
                "shape": list(t["shape"]),
                "data": t["data"],
            }
            for t in inputs
        ]
    except OSError as error:
        raise typer.BadParameter(
            f"cannot read {path}: {error.strerror}", param_hint="--json"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise typer.BadParameter(
            f"{path} is not a KServe v2 request: "
            '{"inputs": [{"name", "datatype", "shape", "data"}]}',
            param_hint="--json",
        ) from None


def _array(value: str) -> np.ndarray[Any, Any]:
    """`--input` data: a `.npy` file (optionally `@path`) or a JSON array."""
    path = Path(value.removeprefix("@"))
    if value.startswith("@") or path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)  # type: ignore[no-any-return]
        except (OSError, ValueError) as error:
            raise typer.BadParameter(
                f"cannot read {path} as .npy: {error}", param_hint="--input"
            ) from None
    try:
        return np.asarray(json.loads(value))
    except ValueError:
        raise typer.BadParameter(
            f"{value[:40]!r} is neither a .npy file nor a JSON array", param_hint="--input"
        ) from None


def infer(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="The model to run.")],
    input_: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="NAME=[json array] or NAME=file.npy; repeatable."),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="A KServe v2 JSON request file with the inputs.")
    ] = None,
    version: Annotated[
        str, typer.Option(help="Model version; default: the deployment's split.")
    ] = "",
) -> None:
    """Run a model once with the given inputs; print its outputs.

    Example: shard infer simple -i INPUT0=a.npy -i INPUT1=b.npy -o json
    """
    if not input_ and json_file is None:
        raise typer.BadParameter("give inputs with --input NAME=VALUE or --json FILE")
    tensors = _load_json(json_file) if json_file else []
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for item in input_ or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--input")
        arrays[name] = _array(value)
    s = session(ctx)
    secret = s.context.secret()
    headers = {"authorization": f"Bearer {secret}"} if secret else {}

    async def work() -> None:
        client = triton.InferenceServerClient(
            s.context.router,
            ssl=s.context.tls,
            root_certificates=s.context.ca_file or None,
        )
        try:
            inputs = [
                _tensor(
                    t["name"],
                    t["datatype"],
                    np.asarray(
                        t["data"],
                        dtype=object
                        if t["datatype"] == "BYTES"
                        else triton_to_np_dtype(t["datatype"]),
                    ).reshape(t["shape"]),
                )
                for t in tensors
            ]
            if arrays:
                metadata = await client.get_model_metadata(
                    model, version, headers=headers, as_json=True
                )
                types = {t["name"]: t["datatype"] for t in metadata.get("inputs", [])}
                for name, array in arrays.items():
                    if name not in types:
                        raise typer.BadParameter(
                            f"{model} has no input {name!r} (inputs: {', '.join(types)})",
                            param_hint="--input",
                        )
                    inputs.append(_tensor(name, types[name], array))
            result = await client.infer(model, inputs, model_version=version, headers=headers)
        except InferenceServerException as error:
            fail(_explain(error, s.context.router))
        finally:
            await client.close()
        response = result.get_response(as_json=True)
        outputs = [
            {
                "name": out["name"],
                "datatype": out["datatype"],
                "shape": [int(d) for d in out["shape"]],
                "data": _plain(result.as_numpy(out["name"])),
            }
            for out in response["outputs"]
        ]
        document = {
            "model_name": response["model_name"],
            "model_version": response["model_version"],
            "outputs": outputs,
        }
        if s.output is Format.TABLE:
            for out in outputs:
                typer.echo(f"{out['name']} {out['datatype']} {out['shape']}: {out['data']}")
        else:
            emit_data(document, s.output)

    s.run(work)


def _from_json(tensor: dict[str, Any]) -> triton.InferInput:
    datatype = tensor["datatype"]
    try:
        dtype = object if datatype == "BYTES" else triton_to_np_dtype(datatype)
        array = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    except (TypeError, ValueError) as error:
        raise typer.BadParameter(
            f"input {tensor['name']!r}: {error}", param_hint="--json"
        ) from None
    return _tensor(tensor["name"], datatype, array)


def _tensor(name: str, datatype: str, array: np.ndarray[Any, Any]) -> triton.InferInput:
    if datatype == "BYTES":
        array = np.vectorize(
            lambda v: v if isinstance(v, bytes) else str(v).encode(), otypes=[object]
        )(array)
    else:
        try:
            array = array.astype(triton_to_np_dtype(datatype))
        except (TypeError, ValueError) as error:
            raise typer.BadParameter(f"input {name!r}: {error}", param_hint="--input") from None
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _plain(array: np.ndarray[Any, Any] | None) -> Any:
    if array is None:
        return None
    if array.dtype == object:
        return [
            v.decode(errors="replace") if isinstance(v, bytes) else v
            for v in array.reshape(-1).tolist()
        ]
    return array.tolist()


def _explain(error: InferenceServerException, router: str) -> str:
    status = error.status() or ""
    if "UNAVAILABLE" in status and "connect" in (error.message() or "").lower():
        return f"cannot reach the router at {router}: {error.message()} (is the shard running?)"
    return f"{error.message()} ({status.removeprefix('StatusCode.') or 'FAILED'})"
