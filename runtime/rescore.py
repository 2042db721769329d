"""Re-scoring an archive on a Ray cluster: what a calibration, threshold or package would
have said of parts already made.

The archive's images are taken in the order the line took them (modification time, then
path) and cut into the line's batches, so every part is scored with the same companions as
`musc-edge run --once` over the same folder would give it. Ray Data spreads the batches over
actors, one per worker, each holding the package, its runner, MuSc and the calibration's
known-good parts, and each reading, preprocessing and scoring a whole batch with the line's
own `score_batch`. The driver takes the answers back in order, judges them with the line's
`Verdicts` and commits each batch to `OUT/results.jsonl` with the line's `Journal`: durable
before the next, and at a restart the files already there are skipped, so an interrupted
re-score resumes where it stopped. At the end the records are also written as Parquet, and a
summary counts the parts that would have been rejected per folder and per day.

Ray is the `cluster` extra; this module imports it only when a re-score runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge.errors import UsageError
from musc_edge.files import file_sha256
from musc_edge.images import ImageReadError, list_images, read_image
from musc_edge.musc import RELIABLE_BATCH
from musc_edge.runtime.cluster import join_ray, use_assigned_cpus
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.record import Key, ResultRecord, Timings
from musc_edge.runtime.scoring import Item
from musc_edge.runtime.verdicts import ANOMALOUS, Verdicts
from musc_edge.runtime.wire import answer_numbers

PARQUET_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
NUMBERS = ("score", "raw_score", "reference_score", "features_ms", "score_ms")  # None: NaN


@dataclass(frozen=True)
class ArchivedPart:
    """One archive image: its path and the key the line would have answered it under."""

    path: Path
    key: Key

    @property
    def file(self) -> str:
        return self.key[0]


def archive_parts(archive: Path, answered: set[Key]) -> list[ArchivedPart]:
    """The archive's images not answered yet, in the line's order (mtime, then path)."""
    root, paths = archive_paths(archive)
    parts = []
    for path in paths:
        try:
            info = path.stat()
            key = (name_in(path, root), info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        except OSError:  # a listed file that is gone: an error record, the rest still scored
            key = (name_in(path, root), 0, 0, 0)
        if key not in answered:
            parts.append(ArchivedPart(path, key))
    return sorted(parts, key=lambda part: (part.key[2], part.file))


def archive_paths(archive: Path) -> tuple[Path, list[Path]]:
    """The folder records name files from, and the images: a folder's (recursively), or
    those a list file names, one path per line (relative to the list's folder; # comments)."""
    if archive.is_dir():
        return archive, list_images(archive)
    if archive.is_file():
        lines = (line.strip() for line in archive.read_text().splitlines())
        listed = [line for line in lines if line and not line.startswith("#")]
        return archive.parent, [archive.parent / line for line in listed]
    raise UsageError(f"--archive {archive}: give a folder of images or a file listing them")


def name_in(path: Path, root: Path) -> str:
    """The file's name in its record: relative to the archive, else as given."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def plan_batches(parts: Sequence[ArchivedPart], batch_size: int) -> list[dict[str, Any]]:
    """The line's batches, as Ray rows: a batch too small to be judged alone (the tail) also
    carries the batch before it, whose images the line gives it as references."""
    rows = []
    for start in range(0, len(parts), batch_size):
        chunk = parts[start : start + batch_size]
        previous = parts[max(0, start - batch_size) : start] if len(chunk) < RELIABLE_BATCH else []
        rows.append(
            {"index": len(rows), "parts": row_parts(chunk), "previous": row_parts(previous)}
        )
    return rows


def row_parts(parts: Sequence[ArchivedPart]) -> str:
    """Parts as a JSON text column (Ray rows hold plain values)."""
    return json.dumps([[str(part.path), *part.key] for part in parts])


def parts_of(text: str) -> list[ArchivedPart]:
    return [ArchivedPart(Path(path), (file, *numbers)) for path, file, *numbers in json.loads(text)]


class BatchScorer:
    """A Ray Data actor: reads, preprocesses and scores whole batches, as the line does."""

    def __init__(
        self, model: str, calibration: str | None, engine: str, batch_size: int, mutual: bool
    ) -> None:
        import ray

        from musc_edge.calibration import load_calibration
        from musc_edge.musc import MuSc
        from musc_edge.package import load_package
        from musc_edge.runtime.known_good import KnownGood
        from musc_edge.runtime.runners import open_runner

        use_assigned_cpus()
        self.package = load_package(Path(model))
        self.runner = open_runner(self.package, engine)
        self.musc = MuSc.for_package(self.package)
        self.preprocess = self.package.preprocessing()
        self.batch_size = batch_size
        self.node = ray.get_runtime_context().get_node_id()  # where this actor runs
        self.known_good = None
        if calibration is not None:
            loaded = load_calibration(Path(calibration), self.package)
            self.known_good = KnownGood(loaded, 0, self.musc.precision.dtype, mutual)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        answers: list[dict[str, Any]] = []
        for index, text, previous in zip(
            rows["index"], rows["parts"], rows["previous"], strict=True
        ):
            answers += self.score(int(index), parts_of(text), parts_of(previous))
        return {name: [answer.get(name) for answer in answers] for name in ANSWER_FIELDS}

    def score(
        self, index: int, parts: list[ArchivedPart], previous: list[ArchivedPart]
    ) -> list[dict[str, Any]]:
        """One batch's answers (and its unreadable files), in the batch's order."""
        from musc_edge.profile import Profile
        from musc_edge.runtime.scoring import score_after

        items, failed = self.items(parts)
        earlier = self.items(previous)[0] if previous else []
        profile = Profile()
        with profile.stage("score"):
            scored = (
                score_after(items, earlier, self.musc, "batch", self.known_good, self.batch_size)
                if items
                else []
            )
        by_file = {answer.item.arrival.file: answer for answer in scored}
        score_ms = profile.ms.get("score", 0.0)
        out = []
        for part in parts:
            row = {
                "batch": index,
                "path": str(part.path),
                "key": json.dumps(part.key),
                "node": self.node,
            }
            if part.file in failed:
                out.append({**row, "error": failed[part.file]})
                continue
            answer = by_file[part.file]
            out.append(
                {
                    **row,
                    "sha256": answer.item.arrival.sha256,
                    **answer_numbers(answer),
                    "features_ms": answer.item.features_ms,
                    "score_ms": score_ms,
                }
            )
        return out

    def items(self, parts: list[ArchivedPart]) -> tuple[list[Item], dict[str, str]]:
        """The readable parts as the line's items (features extracted); why the rest failed."""
        from musc_edge.runtime.camera import Arrival

        arrivals, failed = [], {}
        for part in parts:
            try:
                image = read_image(part.path)
                arrivals.append(
                    Arrival(
                        part.path, part.key, 0.0, file_sha256(part.path), image, image.shape[:2]
                    )
                )
            except (ImageReadError, OSError) as error:
                failed[part.file] = str(error)
        if not arrivals:
            return [], failed
        started = time.perf_counter()
        images = np.stack([self.preprocess(a.image) for a in arrivals])
        tokens, embeddings = self.runner.in_chunks(images)  # as the line takes them
        per_image_ms = 1000 * (time.perf_counter() - started) / len(arrivals)
        no_preview = np.zeros((1, 1, 3), np.uint8)  # a re-score draws no overlays
        items = [
            Item(
                a, [layer[i] for layer in tokens], embeddings[i], no_preview, a.shape, per_image_ms
            )
            for i, a in enumerate(arrivals)
        ]
        return items, failed


ANSWER_FIELDS = (
    "batch", "path", "key", "node", "error", "sha256", "score", "raw_score", "reference_score",
    "repeated", "compared", "warning", "features_ms", "score_ms",
)  # fmt: skip


@dataclass
class RescoredAnswer:
    """What `Verdicts.decide` reads of an answer."""

    score: float
    compared: int
    repeated: bool


@dataclass
class Summary:
    """Parts rejected (at the line's own threshold), per folder and per day, and the parts
    above each `--threshold` given."""

    thresholds: list[float]
    groups: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # this run's parts per Ray node

    def add_node(self, node: str, parts: int) -> None:
        self.nodes[node] = self.nodes.get(node, 0) + parts

    def add(self, record: ResultRecord) -> None:
        day = datetime.fromtimestamp(record.mtime_ns / 1e9, timezone.utc).date().isoformat()
        folder = str(Path(record.file).parent)
        for kind, name in (("folder", folder), ("day", day)):
            counts = self.groups.setdefault(kind, {}).setdefault(name, self.empty())
            counts["parts"] += 1
            if record.error is not None:
                counts["failed"] += 1
                continue
            counts["scored"] += 1
            counts["rejected"] += record.label == ANOMALOUS
            for value in self.thresholds:
                counts[f"above {value:g}"] += record.score > value

    def empty(self) -> dict[str, int]:
        above = [f"above {value:g}" for value in self.thresholds]
        return dict.fromkeys(["parts", "scored", "failed", "rejected", *above], 0)

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, **self.groups, "nodes": self.nodes}


def records_of(
    rows: Iterator[dict[str, Any]],
    verdicts: Verdicts,
    first_batch: int,
    model_sha256: str,
    nodes: Callable[[str, int], None] = lambda node, parts: None,
) -> Iterator[list[ResultRecord]]:
    """The actors' answers, one batch at a time in order, judged as the line judges them;
    `nodes(node, parts)` hears where each part was scored."""
    batch: list[dict[str, Any]] = []
    for row in rows:
        nodes(row["node"], 1)
        if batch and row["batch"] != batch[0]["batch"]:
            yield judged(batch, verdicts, first_batch, model_sha256)
            batch = []
        batch.append(row)
    if batch:
        yield judged(batch, verdicts, first_batch, model_sha256)


def judged(
    rows: list[dict[str, Any]], verdicts: Verdicts, first_batch: int, model_sha256: str
) -> list[ResultRecord]:
    scored = [row for row in rows if row["error"] is None]
    decided = verdicts.decide(
        [RescoredAnswer(row["score"], row["compared"], row["repeated"]) for row in scored]
    )
    verdict_of = dict(zip((row["path"] for row in scored), decided, strict=True))
    records = []
    for row in rows:
        key = json.loads(row["key"])
        common = {
            "batch": first_batch + int(row["batch"]),
            "mode": "batch",
            "model_sha256": model_sha256,
        }
        if row["error"] is not None:
            records.append(ResultRecord(*key, None, error=row["error"], **common))
            continue
        verdict = verdict_of[row["path"]]
        records.append(
            ResultRecord(
                *key,
                row["sha256"],
                score=row["score"],
                raw_score=row["raw_score"],
                reference_score=row["reference_score"],
                label=verdict.label,
                threshold=verdict.threshold,
                threshold_basis=verdict.basis,
                calibrated=verdict.calibrated,
                shift=verdict.shift,
                repeated=verdict.repeated,
                warning="; ".join(filter(None, (row["warning"], verdict.why))) or None,
                timings=Timings(round(row["features_ms"], 2), round(row["score_ms"], 2)),
                **common,
            )
        )
    return records


def write_outputs(journal: Journal, out: Path, summary: Summary) -> None:
    """One pass over the journal: every record into the summary and into one Parquet table
    (timings and items as their JSON text), then summary.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in journal.records():
        summary.add(record)
        row = record.to_dict()
        row["timings"] = json.dumps(row["timings"])
        row["items"] = None if row["items"] is None else json.dumps(row["items"])
        rows.append(row)
    path = out / PARQUET_FILE
    pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet.tmp"))
    path.with_suffix(".parquet.tmp").replace(path)
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def answer_stream(
    rows: list[dict[str, Any]],
    model: Path,
    calibration: Path | None,
    engine: str,
    workers: int,
    batch_size: int,
    cpus_per_worker: float,
    mutual: bool,
) -> Iterator[dict[str, Any]]:
    """The Ray Data pipeline: the batches spread over `workers` actors, answers in order."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # answers in the line's order
    context.enable_progress_bars = False  # the command shows its own
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    answers = dataset.map_batches(
        BatchScorer,
        fn_constructor_kwargs={
            "model": str(model),
            "calibration": None if calibration is None else str(calibration),
            "engine": engine,
            "batch_size": batch_size,
            "mutual": mutual,
        },
        batch_size=1,
        # one batch at a time per actor: a batch is a whole task, so queueing a second on a
        # busy actor would only idle another
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=cpus_per_worker,
        scheduling_strategy="SPREAD",  # the workers over the nodes, not all on the first
    )
    return answers.iter_rows()


def run_rescore(
    archive: Path,
    model: Path,
    out: Path,
    calibration: Path | None,
    thresholds: Sequence[float],
    address: str | None,
    workers: int,
    batch_size: int,
    engine: str,
    cpus_per_worker: float = 1,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
    mutual: bool = False,
) -> Summary:
    """Re-score the archive's unanswered images into OUT; returns the whole summary."""
    import ray

    from musc_edge.calibration import load_calibration
    from musc_edge.package import load_package
    from musc_edge.runtime.known_good import KnownGood
    from musc_edge.runtime.line import refuse_other_model

    package = load_package(model)
    journal = Journal(out)
    refuse_other_model(journal, package.sha256, package.folder)
    known_good = None
    if calibration is not None:
        known_good = KnownGood(load_calibration(calibration, package), mutual=mutual)
    # labels as the line gives them (the calibration's threshold, else the history's); the
    # --threshold values are what-ifs for the summary
    # (its KnownGood refreshes nothing: a re-score never lets parts join the references)
    verdicts = Verdicts.for_line(None, known_good, journal.records(), batch_size)
    parts = archive_parts(archive, journal.keys)
    rows = plan_batches(parts, batch_size)
    summary = Summary(list(thresholds))
    if parts:
        join_ray(address)
        try:
            answers = answer_stream(
                rows, model, calibration, engine, workers, batch_size, cpus_per_worker, mutual
            )
            first = journal.last_batch + 1
            done = 0
            for records in records_of(answers, verdicts, first, package.sha256, summary.add_node):
                journal.commit(records)
                done += len(records)
                on_batch(done, len(parts))
        finally:
            ray.shutdown()
    write_outputs(journal, out, summary)
    return summary
