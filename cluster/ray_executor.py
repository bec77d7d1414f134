"""Run a merge's ShardJobs on Ray: long-lived worker actors, bounded work in flight, retried on worker loss.

One actor per GPU (``num_gpus=1``) when the cluster has GPUs, else one per CPU slot (``num_cpus=1``), spread
over the nodes. Each actor declares the memory its largest job needs (``ShardJob.peak_bytes`` from the plan
plus the runtime), so Ray never places more workers on a node than fit. Every actor runs the engine's own job
function (:func:`omnimerge.engine.execute.execute_job`, i.e. ``run_shard_job``) unchanged, so the output is
byte-identical to the local executor's.

Storage:
    ``shared`` (default): workers read inputs straight from the shared filesystem and write their shard into
    the staging directory themselves; only the job spec and a small :class:`ShardResult` cross the object
    store.
    ``none``: each worker resolves the sources on its own node (hub ids into the node's cache, pinned to the
    planned revision, fingerprints checked), writes into a private scratch directory and returns the shard's
    bytes (numpy, zero-copy on the coordinator) for the coordinator to verify and write into staging. The
    bytes of jobs in flight are bounded by ``max_inflight_bytes``.

Faults: a worker process that dies (or a node that goes away) fails its calls; the coordinator retries those
jobs on another live worker (up to ``max_job_attempts`` per shard) while Ray restarts the actor
(``max_restarts``). A job's writes are idempotent (temporary name, then rename), so a retry is safe.
Application errors are not retried: they reach the caller as the engine raised them (the message names the
shard, the tensor and the recipe), the actors are stopped and the staging directory stays for a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from omnimerge.engine.errors import OmnimergeError, PlanError, ShardJobError, SourceError, SourceNotFoundError
from omnimerge.engine.execute import JobContext, ShardResult, choose_device, record_path
from omnimerge.engine.plan import ShardJob
from omnimerge.engine.staging_claim import STAGING_STATE, check_staging_claim, temp_shard_name

try:  # the sweep engine's dispatcher (runs a sweep context's jobs too); older engines: run_shard_job
    from omnimerge.engine.execute import execute_job as _execute_job
except ImportError:  # pragma: no cover - depends on the engine version
    from omnimerge.engine.execute import run_shard_job as _execute_job

__all__ = ["RaySessionInfo", "ray_session", "RayExecutor", "store_shard_bytes", "STORAGE_MODES",
           "default_worker_env"]

log = logging.getLogger(__name__)

STORAGE_MODES = ("shared", "none")
RUNTIME_BYTES = 512 * 1024**2  # Python + torch + Ray in one worker, on top of a job's own estimate
_POLL_S = 1.0
HOLD_ENV = "OMNIMERGE_HOLD"  # test hook, like OMNIMERGE_FAULT: "<shard file or *>:<hold file>" (see RayExecutor)
_HOLD_MAX_S = 300.0
_MAX_PING_FAILURES = 30  # consecutive failed pings (about one a second) before a worker counts as gone


def default_worker_env() -> dict[str, str]:
    """Environment of the worker actors: OpenMP threads sleep when idle (``OMP_WAIT_POLICY=PASSIVE``) unless
    this process's environment says otherwise.

    libgomp's default spins after every parallel region; with several worker processes on the same cores the
    spinning threads take the CPU the working ones need (a 1024² SVD ran 10–20× slower that way here).
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# -- session -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RaySessionInfo:
    """The Ray connection a merge runs on."""

    address: str  # the GCS address actually connected to
    requested: str | None  # what the user asked for (None: a local instance)
    started_here: bool  # this process started the instance and stops it afterwards
    nodes: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        how = "local instance" if self.started_here else f"joined {self.requested or 'existing session'}"
        return f"{how} at {self.address}: {self.nodes} node(s), {self.cpus:g} CPU, {self.gpus:g} GPU"


def _session_info(requested: str | None, started_here: bool) -> RaySessionInfo:
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - Ray Client sessions do not expose it
        address = requested or "ray"
    return RaySessionInfo(address, requested, started_here, nodes, res.get("CPU", 0.0), res.get("GPU", 0.0))


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_kwargs: Any) -> Iterator[RaySessionInfo]:
    """Connect to Ray for the duration of a ``with`` block.

    Args:
        address: ``None`` starts a fresh local instance (``address="local"``) and stops it on exit; ``"auto"``
            or ``"ray://host:port"`` joins an existing cluster and only disconnects on exit (someone else's
            cluster is never shut down). If this process is already connected, that connection is used and
            left open.
        init_kwargs: passed to ``ray.init`` (e.g. ``num_cpus``, ``object_store_memory``, ``_temp_dir``).
    """
    import ray

    if ray.is_initialized():
        yield _session_info(address, started_here=False)
        return
    kwargs: dict[str, Any] = {"include_dashboard": False}
    kwargs.update(init_kwargs)
    if address is None:
        # Ray starts workers at nice 15; on a busy machine a merge's workers then starve behind everything
        # else (measured: 381 s vs 270 s for the same merge under load). A local instance is ours: normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local" if address is None else address, **kwargs)
    try:
        info = _session_info(address, started_here=address is None)
        log.info("Ray: %s", info.describe())
        yield info
    finally:
        ray.shutdown()  # stops a local instance; for a joined cluster it only disconnects this driver


# -- coordinator-side shard storage (no shared filesystem) ---------------------------------------------------


def store_shard_bytes(staging: Path, result: ShardResult, data: Any, label: str = "recipe") -> ShardResult:
    """Write a shard computed on another node into ``staging`` and record it, after checking its bytes.

    ``data`` is the shard file's bytes (``bytes``, ``memoryview`` or a uint8 numpy array). Size and sha256 must
    match what the worker measured, so staging never holds a shard its record does not vouch for; and staging
    must still belong to the plan the shard was computed for (``result.plan_digest``).
    """
    view = memoryview(data).cast("B")
    if view.nbytes != result.size or hashlib.sha256(view).hexdigest() != result.sha256:
        raise ShardJobError(
            f"Shard '{result.filename}' arrived with {view.nbytes} bytes that do not match its worker's record "
            f"({result.size} bytes, sha256 {result.sha256[:16]}…); it was corrupted in transit. Rerun the same "
            "command to redo it.")
    if result.plan_digest:
        check_staging_claim(staging, result.plan_digest, result.filename, label)
    else:
        staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / temp_shard_name(result.filename, result.plan_digest, uuid.uuid4().hex[:8])
    try:
        with open(tmp, "wb") as f:
            f.write(view)
        os.replace(tmp, staging / result.filename)
    finally:
        tmp.unlink(missing_ok=True)
    rec = record_path(staging, result.filename)
    rec.parent.mkdir(parents=True, exist_ok=True)
    rec_tmp = rec.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
    rec_tmp.write_text(json.dumps(result.to_json()))
    os.replace(rec_tmp, rec)
    return result


# -- the worker actor ----------------------------------------------------------------------------------------


class _ShardWorker:
    """One long-lived worker (a Ray actor): runs ShardJobs one at a time on its GPU, or on CPU."""

    def __init__(self, slot: str, device: str, storage: str, scratch_root: str | None,
                 hold: str | None = None, threads: int | None = None) -> None:
        import ray
        import torch

        self.slot = slot
        self.hold = hold
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.storage = storage
        rt = ray.get_runtime_context()
        self.node_id = rt.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if device == "auto" and not self.gpu_ids:
            device = "cpu"  # a CPU slot on a GPU node must not compute on a GPU Ray gave to another worker
        self.device = choose_device(device)  # cuda only where this process sees a GPU: else a clean CPU fallback
        self.scratch: Path | None = None
        if storage == "none":
            if scratch_root:
                Path(scratch_root).mkdir(parents=True, exist_ok=True)
            self.scratch = Path(tempfile.mkdtemp(prefix=f"omnimerge-{slot}-", dir=scratch_root))
        self._ctx_key: str | None = None
        self._ctx: Any = None

    def info(self) -> dict[str, Any]:
        return {"slot": self.slot, "node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid(),
                "device": self.device, "gpu_ids": self.gpu_ids, "threads": self.threads,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "scratch": str(self.scratch) if self.scratch else None}

    def _context(self, box: list, key: str) -> Any:
        if key != self._ctx_key:
            import ray

            ctx = ray.get(box[0])
            if isinstance(ctx, JobContext):
                ctx = dataclasses.replace(ctx, device=self.device)
                if self.storage == "none":
                    ctx = self._localize(ctx)
            self._ctx, self._ctx_key = ctx, key
        return self._ctx

    def _localize(self, ctx: JobContext) -> JobContext:
        """Sources as seen from this node (own hub cache / same local path, fingerprints checked) and a
        private staging directory."""
        base = _relocate(ctx.base, None, self.node_ip)
        experts = [_relocate(e, base, self.node_ip) for e in ctx.experts]
        staging = self.scratch / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        if ctx.plan_digest:  # the private staging claims the same plan, so the engine's checks pass there
            (staging / STAGING_STATE).write_text(json.dumps({"plan_digest": ctx.plan_digest}))
        return dataclasses.replace(ctx, base=base, experts=experts, staging=staging)

    def run(self, job: Any, box: list, key: str) -> tuple[Any, Any]:
        """Run one job; returns ``(result, shard bytes or None)``."""
        ctx = self._context(box, key)
        if self.hold:
            _hold(self.hold, getattr(job, "filename", ""), self.slot)
        try:
            result = self._run_on_device(job, ctx)
            payload = None
            if isinstance(result, ShardResult):
                result = dataclasses.replace(result, worker=f"{self.slot}@{self.node_ip}")
                if self.storage == "none":
                    payload = self._take_shard(ctx, result)
            return result, payload
        finally:
            _free_device_memory(ctx.device if isinstance(ctx, JobContext) else self.device)

    def _run_on_device(self, job: Any, ctx: Any) -> Any:
        if not (isinstance(ctx, JobContext) and ctx.device.startswith("cuda")):
            return _execute_job(job, ctx)
        import torch

        need = getattr(job, "peak_bytes", 0)
        free, _total = torch.cuda.mem_get_info()
        if need > free:
            log.warning("%s: shard %s needs ≈%.1f GB but the GPU has %.1f GB free; running it on CPU", self.slot,
                        job.filename, need / 1e9, free / 1e9)
            return _execute_job(job, dataclasses.replace(ctx, device="cpu"))
        try:
            return _execute_job(job, ctx)
        except ShardJobError as exc:
            if not isinstance(exc.__cause__, torch.cuda.OutOfMemoryError):
                raise
            _free_device_memory(ctx.device)
            log.warning("%s: CUDA out of memory in shard %s; rerunning it on CPU", self.slot, job.filename)
            return _execute_job(job, dataclasses.replace(ctx, device="cpu"))

    def _take_shard(self, ctx: JobContext, result: ShardResult) -> Any:
        import numpy as np

        path = ctx.staging / result.filename
        data = np.fromfile(path, dtype=np.uint8)
        path.unlink()
        record_path(ctx.staging, result.filename).unlink(missing_ok=True)
        return data

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _hold(spec: str, shard: str, slot: str) -> None:
    """Test hook: before running ``shard`` (or any shard, for ``*``), wait while the hold file exists, after
    announcing ``<hold file>.<slot>.held``. Lets tests kill a driver or remove a node at a known point."""
    target, _, file = spec.partition(":")
    if target not in ("*", shard) or not file or not os.path.exists(file):
        return
    Path(f"{file}.{slot}.held").write_text(f"{shard} pid {os.getpid()}\n")
    deadline = time.monotonic() + _HOLD_MAX_S
    while os.path.exists(file) and time.monotonic() < deadline:
        time.sleep(0.05)


def _free_device_memory(device: str) -> None:
    """Hand a job's CUDA memory back between jobs (cycles first, then torch's cache). Nothing on CPU, where
    reference counting frees a job's tensors: a full ``gc.collect()`` in a worker with torch and Ray loaded took
    ~120 ms here, about 0.1 s of Ray overhead per job on the benchmark."""
    if not device.startswith("cuda"):
        return
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _relocate(src: Any, base: Any, node: str) -> Any:
    """Resolve ``src`` again on this node and check it is the same input the coordinator planned."""
    from omnimerge.engine.sources import SourceSpec, resolve_source

    local = Path(src.spec.source).expanduser()
    is_hub = src.revision is not None and not local.is_dir()
    if is_hub:
        spec = SourceSpec(src.spec.source, revision=src.revision, kind=src.kind)
    else:
        if not src.path.is_dir():
            raise SourceNotFoundError(
                f"Source '{src.label}' is the local directory '{src.path}', which does not exist on node {node}. "
                "Without shared storage (--storage none) every node needs its own copy at the same path; or name "
                "the source by hub id so each node downloads it into its own cache.")
        spec = SourceSpec(str(src.path), kind=src.kind)
    mine = resolve_source(spec, label=src.label, allow_pickle=src.index.pickle, base=base)
    if mine.index.fingerprint(with_mtime=False) != src.index.fingerprint(with_mtime=False):
        raise SourceError(
            f"Source '{src.label}' ('{src.spec.source}') on node {node} differs from the copy the coordinator "
            f"planned with (headers or sizes of its weight files differ). Give every node the same files, or pin "
            "a hub revision in the recipe.")
    return mine


# -- the executor --------------------------------------------------------------------------------------------


@dataclass
class _WorkerState:
    slot: str
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    dead: bool = False
    running: int = 0
    ping: Any = None
    ping_after: float = 0.0
    jobs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    busy_s: float = 0.0
    deaths: int = 0
    ping_failures: int = 0


@dataclass
class _Call:
    job: Any
    worker: int
    attempt: int


class RayExecutor:
    """Runs ShardJobs on long-lived Ray actors (see the module docstring).

    Args:
        workers: number of actors; default one per GPU of the cluster, else one per CPU (at most one per job).
        device: ``auto`` (CUDA where a worker sees a GPU), ``cpu`` or ``cuda``.
        session: the :class:`RaySessionInfo` from :func:`ray_session` (for the report); without one, and
            without a Ray connection, :meth:`run` starts and stops a local instance itself.
        storage: ``shared`` or ``none`` (see the module docstring).
        max_in_flight: jobs submitted and not yet finished; default one per worker, so the next job goes to
            whichever worker frees up first (a job queued behind a long one on a busy worker waits for it,
            which made 2 workers slower than 1 on the benchmark's embedding-heavy layout).
        max_inflight_bytes: ``storage="none"``: shard bytes of the jobs in flight (at least one job runs).
        max_job_attempts: attempts per shard when workers die, before giving up.
        gpus: use GPU actors; default when the cluster has GPUs.
        scratch_dir: ``storage="none"``: where workers make their private directories (default: the node's
            temp dir).
        worker_lost_timeout_s: how long to wait with no live worker before giving up.
        threads: torch intra-op threads of each worker; default: this process's ``torch.get_num_threads()``.
            Several CPU kernels (SVD, used by iso_c, tsv, iso_cts, optmerge) give different bits for different
            thread counts, so the default keeps CPU workers bit-identical to a local run on this machine; fewer
            threads oversubscribe less when many CPU workers share a node.
        worker_env: environment variables of the worker actors (Ray ``runtime_env``; merged with a job-level
            one); default :func:`default_worker_env`. ``{}`` sets none.
        hold: test hook (default: env ``OMNIMERGE_HOLD``): ``"<shard file or *>:<hold file>"`` makes a worker
            about to run that shard wait while the hold file exists (it announces ``<hold file>.<slot>.held``).
    """

    name = "ray"

    def __init__(self, workers: int | None = None, device: str = "auto", session: RaySessionInfo | None = None,
                 storage: str = "shared", max_in_flight: int | None = None, *, max_inflight_bytes: int = 2 << 30,
                 max_job_attempts: int = 4, gpus: bool | None = None, scratch_dir: str | Path | None = None,
                 worker_lost_timeout_s: float = 600.0, hold: str | None = None,
                 threads: int | None = None, worker_env: dict[str, str] | None = None) -> None:
        if storage not in STORAGE_MODES:
            raise PlanError(f"storage {storage!r} is not one of {', '.join(STORAGE_MODES)}.")
        if workers is not None and workers < 1:
            raise PlanError(f"workers must be at least 1, not {workers}.")
        if threads is not None and threads < 1:
            raise PlanError(f"threads per worker must be at least 1, not {threads}.")
        self.workers = workers
        self.device = device
        self.session = session
        self.storage = storage
        self.max_in_flight = max_in_flight
        self.max_inflight_bytes = max_inflight_bytes
        self.max_job_attempts = max_job_attempts
        self.gpus = gpus
        self.scratch_dir = str(scratch_dir) if scratch_dir else None
        self.worker_lost_timeout_s = worker_lost_timeout_s
        self.hold = hold if hold is not None else (os.environ.get(HOLD_ENV) or None)
        self.threads = threads
        self.worker_env = default_worker_env() if worker_env is None else dict(worker_env)
        self._stats: dict[str, Any] = {}

    # -- public ----------------------------------------------------------------------------------------------

    def run(self, jobs: Sequence[Any], ctx: Any, progress: Callable[[str, int], None] | None = None,
            on_result: Callable[[Any], None] | None = None) -> list[Any]:
        """Run ``jobs`` and return their results (completion order). Raises the first job's own error."""
        import ray

        if not jobs:
            return []
        if not ray.is_initialized():
            with ray_session(None) as info:
                self.session = info
                return self.run(jobs, ctx, progress, on_result)
        if isinstance(ctx, JobContext):
            ctx = dataclasses.replace(ctx, staging=Path(ctx.staging).resolve())
        if all(isinstance(j, ShardJob) for j in jobs):
            from .cluster_plan import dispatch_order

            jobs = dispatch_order(jobs)  # longest first, as `omnimerge plan --cluster` schedules them
        return _Dispatch(self, list(jobs), ctx, progress, on_result).run()

    def report_extra(self) -> dict[str, Any]:
        """For the summary and the manifest: the Ray setup, retries and one line per worker."""
        out = {k: v for k, v in self._stats.items() if k != "workers"}
        for slot, w in self._stats.get("workers", {}).items():
            gpus = f" GPU {','.join(w['gpu_ids'])}" if w["gpu_ids"] else ""
            out[f"worker {slot}"] = (
                f"node {w['node']}{gpus}, {w['device']}: {w['jobs']} job(s), read {w['bytes_read'] / 1e6:.1f} MB, "
                f"wrote {w['bytes_written'] / 1e6:.1f} MB, busy {w['busy_s']:.1f} s "
                f"({w['MB_per_s']:.1f} MB/s written), {w['worker_deaths']} worker death(s)")
        return out

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """Per worker of the last run: node, device, GPU ids, scratch dir, jobs, bytes, busy seconds, deaths."""
        return {k: dict(v) for k, v in self._stats.get("workers", {}).items()}

    def stats(self) -> dict[str, Any]:
        """Everything measured in the last run (numbers, for benchmarks and tests)."""
        return json.loads(json.dumps(self._stats))


class _Dispatch:
    """One ``RayExecutor.run``: actors up, jobs out (bounded), results in, retries, actors down."""

    def __init__(self, ex: RayExecutor, jobs: list[Any], ctx: Any, progress: Callable[[str, int], None] | None,
                 on_result: Callable[[Any], None] | None) -> None:
        self.ex, self.jobs, self.ctx, self.progress, self.on_result = ex, jobs, ctx, progress, on_result
        self.label = getattr(ctx, "recipe_label", "recipe")
        self.queue: deque[tuple[Any, int, int | None]] = deque((j, 1, None) for j in jobs)  # job, attempt, avoid
        self.inflight: dict[Any, _Call] = {}
        self.pings: dict[Any, int] = {}
        self.workers: list[_WorkerState] = []
        self.results: list[Any] = []
        self.retried: dict[str, list[str]] = {}
        self.tensors_total = sum(len(getattr(j, "tensors", ())) for j in jobs)
        self.tensors_done = 0
        self.start = time.perf_counter()
        self.options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0, "memory": 0}
        self.max_in_flight = 1
        self.ready_s: float | None = None  # seconds until every worker first answered (actor start-up)

    # -- setup -----------------------------------------------------------------------------------------------

    def _resources(self) -> tuple[int, dict[str, Any]]:
        import ray

        per_job = max((getattr(j, "peak_bytes", 0) for j in self.jobs), default=0)
        memory = int(per_job + RUNTIME_BYTES)
        cluster = ray.cluster_resources()
        use_gpu = self.ex.gpus if self.ex.gpus is not None else cluster.get("GPU", 0) >= 1
        slot_key = "GPU" if use_gpu else "CPU"
        capacity = 0
        biggest = 0.0
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources", {})
            biggest = max(biggest, res.get("memory", 0.0))
            by_mem = int(res.get("memory", 0.0) // memory) if memory else 10**6
            capacity += min(int(res.get(slot_key, 0)), int(res.get("CPU", 0)), by_mem)
        if capacity == 0:
            job = max(self.jobs, key=lambda j: getattr(j, "peak_bytes", 0))
            if biggest < memory:
                raise PlanError(
                    f"Shard '{getattr(job, 'filename', job)}' needs ≈{memory / 1e9:.2f} GB of worker memory (plan "
                    f"estimate + {RUNTIME_BYTES / 1e9:.1f} GB runtime) but the largest Ray node offers "
                    f"{biggest / 1e9:.2f} GB (its 'memory' resource) for recipe {self.label}. Lower shard_size in "
                    "the recipe so shards hold fewer layers, or add a node with more memory.")
            raise PlanError(f"The Ray cluster has no free {slot_key} slot with a CPU for a merge worker "
                            f"({ray.cluster_resources()}). Add nodes, or run with --executor local.")
        wanted = self.ex.workers or capacity
        if self.ex.workers and self.ex.workers > capacity:
            log.warning("asked for %d workers but only %d fit the cluster (%s slots, %.2f GB each); using %d",
                        self.ex.workers, capacity, slot_key, memory / 1e9, capacity)
        n = max(1, min(wanted, capacity, len(self.jobs)))
        options = {"num_cpus": 1, "num_gpus": 1 if use_gpu else 0, "memory": memory}
        return n, options

    def _start_workers(self) -> None:
        import ray

        import torch

        n, options = self._resources()
        threads = self.ex.threads or torch.get_num_threads()
        if not options["num_gpus"] and self.ex.threads is None:
            self._warn_oversubscribed(n, threads)
        env = {"runtime_env": {"env_vars": self.ex.worker_env}} if self.ex.worker_env else {}
        remote = ray.remote(_ShardWorker).options(max_restarts=self.ex.max_job_attempts, max_task_retries=0,
                                                  scheduling_strategy="SPREAD", **options, **env)
        for i in range(n):
            slot = f"w{i}"
            actor = remote.remote(slot, self.ex.device, self.ex.storage, self.ex.scratch_dir, self.ex.hold,
                                  threads)
            state = _WorkerState(slot, actor)
            self.workers.append(state)
            self._ping(i)
        self.options = options
        self.max_in_flight = self.ex.max_in_flight or n
        log.info("started %d Ray worker(s) (%s)", n, ", ".join(f"{k}={v}" for k, v in options.items()))

    def _warn_oversubscribed(self, n: int, threads: int) -> None:
        import ray

        nodes = [nd.get("Resources", {}).get("CPU", 0.0) for nd in ray.nodes() if nd.get("Alive")]
        nodes = [c for c in nodes if c >= 1] or [1.0]
        per_node = -(-n // len(nodes))  # SPREAD: workers spread evenly over the nodes
        cpus = min(nodes)
        if per_node * threads > cpus:
            log.warning(
                "%d CPU worker(s) per node × %d torch threads each on nodes with %g CPUs: oversubscribed: the "
                "workers' threads compete for the same cores. Pass --worker-threads %d for speed; SVD-based methods (iso_c, tsv, iso_cts, optmerge) then differ from "
                "--executor local in the last bits, element-wise ones do not.", per_node, threads, cpus,
                max(1, int(cpus // per_node)))

    def _ping(self, i: int) -> None:
        w = self.workers[i]
        w.ready = False
        w.ping = w.actor.info.remote()
        self.pings[w.ping] = i

    # -- loop ------------------------------------------------------------------------------------------------

    def run(self) -> list[Any]:
        import ray

        self.ctx_ref = ray.put(self.ctx)
        self.box = [self.ctx_ref]  # a list, so Ray hands the worker the ref and it fetches the context once
        self.key = uuid.uuid4().hex
        self._start_workers()
        no_worker_since: float | None = None
        try:
            while self.queue or self.inflight:
                self._submit()
                live = any(w.ready for w in self.workers)
                if not self.inflight and not live:
                    no_worker_since = no_worker_since or time.monotonic()
                    if time.monotonic() - no_worker_since > self.ex.worker_lost_timeout_s:
                        raise ShardJobError(
                            f"No Ray worker has been alive for {self.ex.worker_lost_timeout_s:.0f} s with "
                            f"{len(self.queue)} shard(s) left (recipe {self.label}). The staging directory keeps "
                            "the finished shards: rerun the same command to resume.")
                else:
                    no_worker_since = None
                self._reping()
                waiting = list(self.inflight) + list(self.pings)
                if not waiting:
                    time.sleep(_POLL_S)
                    continue
                ready, _ = ray.wait(waiting, num_returns=1, timeout=_POLL_S)
                for ref in ready:
                    if ref in self.pings:
                        self._pinged(ref)
                    else:
                        self._finished(ref)
        finally:
            self._stop()
        return self.results

    def _submit(self) -> None:
        budget = self.ex.max_inflight_bytes if self.ex.storage == "none" else None
        per_worker = max(1, -(-self.max_in_flight // len(self.workers)))
        while self.queue and len(self.inflight) < self.max_in_flight:
            job, attempt, avoid = self.queue[0]
            if budget is not None and self.inflight:
                held = sum(getattr(c.job, "write_bytes", 0) for c in self.inflight.values())
                if held + getattr(job, "write_bytes", 0) > budget:
                    return
            ready = [i for i, w in enumerate(self.workers) if w.ready and w.running < per_worker]
            if not ready:
                return
            others = [i for i in ready if i != avoid]
            i = min(others or ready, key=lambda k: (self.workers[k].running, k))
            self.queue.popleft()
            w = self.workers[i]
            ref = w.actor.run.remote(job, self.box, self.key)
            w.running += 1
            self.inflight[ref] = _Call(job, i, attempt)

    def _reping(self) -> None:
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            if not w.dead and not w.ready and w.ping is None and now >= w.ping_after:
                self._ping(i)

    def _pinged(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError

        i = self.pings.pop(ref)
        w = self.workers[i]
        w.ping = None
        try:
            w.info = ray.get(ref, timeout=60)
            w.ready, w.ping_failures = True, 0
            if self.ready_s is None and all(x.ready or x.dead for x in self.workers):
                self.ready_s = time.perf_counter() - self.start
        except RayError as exc:  # restarting, unavailable, or dead for good: ask again shortly, then give up
            w.ping_failures += 1
            if w.ping_failures >= _MAX_PING_FAILURES:
                w.dead = True
                log.warning("Ray worker %s is gone: %s", w.slot, str(exc).strip().splitlines()[0])
            else:
                w.ping_after = time.monotonic() + 1.0

    def _finished(self, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        call = self.inflight.pop(ref)
        w = self.workers[call.worker]
        w.running -= 1
        name = getattr(call.job, "filename", str(call.job))
        try:
            result, payload = ray.get(ref, timeout=300)
        except RayTaskError as exc:
            raise self._job_error(call, exc) from None
        except RayError as exc:  # the worker process or its node died: redo the job elsewhere
            self._worker_lost(call, exc)
            return
        del ref
        if payload is not None:
            store_shard_bytes(Path(self.ctx.staging), result, payload, self.label)
            self._stats_add("transferred_bytes", int(payload.nbytes))
            del payload
        w.jobs += 1
        w.bytes_read += getattr(result, "bytes_read", 0)
        w.bytes_written += getattr(result, "size", 0)
        w.busy_s += getattr(result, "seconds", 0.0)
        self.results.append(result)
        self.tensors_done += len(getattr(call.job, "tensors", ()))
        if self.on_result:
            self.on_result(result)
        if self.progress:
            self.progress("remote-job", getattr(result, "size", 0))
            self._postfix()
        log.info("shard %s done on %s (%d/%d)", name, w.slot, len(self.results), len(self.jobs))

    def _worker_lost(self, call: _Call, exc: Exception) -> None:
        w = self.workers[call.worker]
        name = getattr(call.job, "filename", str(call.job))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if w.ready:  # the first failed call of a death; calls queued behind it fail too
            w.deaths += 1
        self.retried.setdefault(name, []).append(w.slot)
        if call.attempt >= self.ex.max_job_attempts:
            raise ShardJobError(
                f"Shard '{name}' lost its Ray worker {call.attempt} time(s) (last: {type(exc).__name__}: {first}) "
                f"for recipe {self.label}. Workers may be running out of memory; lower shard_size or give workers "
                "more memory, then rerun the same command to resume.") from None
        log.warning("shard %s: worker %s died (%s); retrying on another worker (attempt %d)", name, w.slot,
                    type(exc).__name__, call.attempt + 1)
        self.queue.appendleft((call.job, call.attempt + 1, call.worker))
        if w.ready:
            w.ready = False
            w.ping_after = time.monotonic() + 0.5

    def _job_error(self, call: _Call, exc: Any) -> Exception:
        cause = getattr(exc, "cause", None)
        name = getattr(call.job, "filename", str(call.job))
        if isinstance(cause, OmnimergeError):
            if name in str(cause):
                return cause
            try:
                return type(cause)(f"Shard '{name}' failed (recipe {self.label}): {cause}")
            except TypeError:
                return cause
        first = str(cause or exc).strip().splitlines()[-1]
        return ShardJobError(f"Shard '{name}' failed on Ray worker {self.workers[call.worker].slot} "
                             f"(recipe {self.label}): {type(cause or exc).__name__}: {first}")

    def _postfix(self) -> None:
        bar = getattr(self.progress, "bar", None)
        if bar is None or not hasattr(bar, "set_postfix_str"):
            return
        busy = sum(1 for w in self.workers if w.running)
        retries = sum(len(v) for v in self.retried.values())
        bar.set_postfix_str(f"shards {len(self.results)}/{len(self.jobs)}, tensors {self.tensors_done}/"
                            f"{self.tensors_total}, {busy}/{len(self.workers)} workers busy"
                            + (f", {retries} retried" if retries else ""), refresh=False)

    def _stats_add(self, key: str, value: int) -> None:
        self.ex._stats[key] = self.ex._stats.get(key, 0) + value

    # -- teardown --------------------------------------------------------------------------------------------

    def _stop(self) -> None:
        import ray

        for w in self.workers:
            if w.ready and self.ex.storage == "none":
                with contextlib.suppress(Exception):
                    ray.get(w.actor.close.remote(), timeout=10)
            with contextlib.suppress(Exception):
                ray.kill(w.actor, no_restart=True)
        self._remove_partial_shards()
        self._report()

    def _remove_partial_shards(self) -> None:
        """After a failure stopped the workers mid-job: delete the temporary files the jobs still in flight had
        begun in the shared staging directories, so staging holds only verified shards (their records let a
        rerun resume). Waits (briefly) for those calls to end first, so no killed worker creates one after."""
        import ray

        if not self.inflight or self.ex.storage == "none":  # private scratch: the worker's own, gone with it
            return
        with contextlib.suppress(Exception):
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=10)
        for call in self.inflight.values():
            slots = getattr(call.job, "slots", None)
            if slots is not None:  # a sweep job: one shard per run, each in its run's staging
                where = [(Path(s.staging), s.job.filename, s.plan_digest) for s in slots]
            else:
                where = [(Path(self.ctx.staging), call.job.filename, getattr(self.ctx, "plan_digest", ""))]
            for staging, filename, digest in where:
                pattern = temp_shard_name(filename, digest, "*")
                for tmp in staging.glob(pattern):
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    def _report(self) -> None:
        wall = time.perf_counter() - self.start
        nodes = {w.info.get("node_ip") for w in self.workers if w.info}
        unit = "GPU" if self.options.get("num_gpus") else "CPU"
        where = self.ex.session.describe() if self.ex.session else "existing Ray connection"
        stats = self.ex._stats
        stats.update({
            "ray": (f"{len(self.workers)} worker(s) (1 {unit}, {self.options['memory'] / 1e9:.2f} GB each) on "
                    f"{len(nodes)} node(s), storage {self.ex.storage}, ≤{self.max_in_flight} job(s) in flight; "
                    f"{where}"),
            "retries": sum(len(v) for v in self.retried.values()),
            "workers_ready_s": round(self.ready_s, 3) if self.ready_s is not None else None,
        })
        if self.retried:
            stats["retried_shards"] = {k: v for k, v in sorted(self.retried.items())}
        workers = {}
        for w in self.workers:
            rate = w.bytes_written / w.busy_s / 1e6 if w.busy_s else 0.0
            workers[w.slot] = {
                "node": w.info.get("node_ip"), "device": w.info.get("device"), "gpu_ids": w.info.get("gpu_ids"),
                "scratch": w.info.get("scratch"), "threads": w.info.get("threads"),
                "cuda_visible_devices": w.info.get("cuda_visible_devices"),
                "omp_wait_policy": w.info.get("omp_wait_policy"), "nice": w.info.get("nice"), "jobs": w.jobs, "bytes_read": w.bytes_read,
                "bytes_written": w.bytes_written, "busy_s": round(w.busy_s, 3), "MB_per_s": round(rate, 2),
                "worker_deaths": w.deaths}
        stats["workers"] = workers
        stats["wall_s"] = round(wall, 3)
