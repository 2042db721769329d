"""`musc-edge serve`: the plant's lines on Ray Serve, for stations running `run --remote`.

One deployment, `PlantScorer`, holds every line of `plant.yaml` (`plant.py`) in each replica;
replicas are placed on GPUs where the cluster has any (`gpus_per_replica`), spread over the
nodes with `max_replicas_per_node: 1`, and started again by Serve, here or on another node, when
one dies: they hold no state between requests, so nothing is lost with one. A request waits up
to `batch_wait_s` for other lines' batches (`@serve.batch`), so a GPU runs the backbone over
several stations' images at once. HTTP routes, all JSON but the request body:

- `GET /healthz`: the replica's lines, node and id;
- `GET /lines/NAME`: the line's `LineSpec` (what a station sends, how it judges);
- `POST /lines/NAME/score?window=N&map_norm=batch` with a `wire.encode_batch` body: the
  batch's answers, with the model and calibration they come from.

Ray (the `cluster` extra, with Serve) is imported only here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.exceptions import RayServeException
from starlette.requests import Request
from starlette.responses import JSONResponse

from musc_edge.errors import UsageError
from musc_edge.runtime.cluster import join_ray, use_assigned_cpus
from musc_edge.runtime.plant import LineBatch, PlantLines, PlantSettings, UnknownLine, load_plant
from musc_edge.runtime.wire import answer_to_json, decode_batch

APP_NAME = "musc-edge"


@serve.deployment(name="plant-scorer", health_check_period_s=5, max_ongoing_requests=8)
class PlantScorer:
    """Every line of the plant in one replica; see the module docstring."""

    def __init__(self, settings: PlantSettings) -> None:
        use_assigned_cpus()
        self.lines = PlantLines(settings)
        self.node = ray.get_runtime_context().get_node_id()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.score_batches.set_max_batch_size(settings.max_batch_size)
        self.score_batches.set_batch_wait_timeout_s(settings.batch_wait_s)

    async def __call__(self, request: Request) -> JSONResponse:
        route = request.url.path.strip("/").split("/")
        try:
            if request.method == "GET" and route == ["healthz"]:
                return self.reply({"status": "ok", "lines": sorted(self.lines.lines)})
            if request.method == "GET" and len(route) == 2 and route[0] == "lines":
                return self.reply(self.lines.line(route[1]).spec.to_json())
            if request.method == "POST" and len(route) == 3 and route[::2] == ["lines", "score"]:
                return await self.score(route[1], request)
        except UnknownLine as error:
            return self.reply({"error": str(error)}, 404)
        except UsageError as error:  # images of another size than the line's package takes
            return self.reply({"error": str(error)}, 400)
        return self.reply({"error": f"no route {request.method} {request.url.path}"}, 404)

    async def score(self, name: str, request: Request) -> JSONResponse:
        line = self.lines.line(name)
        try:
            images, previous = decode_batch(await request.body())
            window = int(request.query_params.get("window", 32))
        except ValueError as error:
            return self.reply({"error": f"line {name}: {error}"}, 400)
        map_norm = request.query_params.get("map_norm", "batch")
        batch = LineBatch(name, images, previous, map_norm, max(1, window))
        self.lines.check(batch)
        scored = await self.score_batches(batch)
        return self.reply(
            {
                "line": name,
                "model_sha256": line.spec.model_sha256,
                "calibration_sha256": line.spec.calibration_sha256,
                **scored,
            }
        )

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def score_batches(self, batches: list[LineBatch]) -> list[dict[str, Any]]:
        """Line batches gathered across stations, scored together (in a thread: the replica
        keeps answering health checks meanwhile); each says how many were gathered."""
        answers = await asyncio.to_thread(self.lines.score, batches)
        return [
            {"answers": [answer_to_json(a) for a in group], "gathered": len(batches)}
            for group in answers
        ]

    def reply(self, body: dict[str, Any], status: int = 200) -> JSONResponse:
        """Every answer says which replica on which node gave it."""
        return JSONResponse({**body, "node": self.node, "replica": self.replica}, status)


# Serve's proxy sends a request to a replica on its own node first; scoring is heavy, so the
# replicas should share the load instead. Read by the proxy, so it must be in the cluster's
# environment: set here for a local cluster, on `ray start` for one of your own.
SPREAD_REQUESTS = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}


def start_service(settings: PlantSettings, address: str | None) -> str:
    """Deploy the plant on the cluster at `address` (None: a local one); returns its URL."""
    for name, value in SPREAD_REQUESTS.items():
        os.environ.setdefault(name, value)
    join_ray(address)
    location = {"head": "HeadOnly", "every-node": "EveryNode"}[settings.proxy]
    serve.start(
        proxy_location=location, http_options={"host": settings.host, "port": settings.port}
    )
    serve.run(plant_app(settings), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def plant_app(settings: PlantSettings) -> Application:
    """The Serve application of plant.yaml: its replicas, their resources and placement."""
    gpus = settings.gpus_per_replica
    if gpus is None:  # asked of the cluster this runs on
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    options: dict[str, Any] = {
        "num_replicas": settings.replicas,
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica, "num_gpus": gpus},
    }
    if settings.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = settings.max_replicas_per_node
    return PlantScorer.options(**options).bind(settings)


def app_from_args(args: dict[str, str]) -> Application:
    """For Serve's own config (`import_path: musc_edge.runtime.service:app_from_args`, `args:
    {config: plant.yaml}`), as a KubeRay RayService deploys it; host, port and proxy are then
    the Serve config's."""
    return plant_app(load_plant(Path(args["config"])))


def running_replicas() -> int:
    """The plant's replicas Serve reports running (the `serve` command's status line)."""
    application = serve.status().applications.get(APP_NAME)
    deployment = application.deployments.get("plant-scorer") if application else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def stop_service() -> None:
    """Take the plant's application down and leave the cluster: only this application, so a
    cluster's other Serve applications keep running (a local instance ends with it)."""
    if not ray.is_initialized():
        return
    with contextlib.suppress(RayServeException):  # Serve never started: nothing to delete
        serve.delete(APP_NAME)
    ray.shutdown()
