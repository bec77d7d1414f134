"""Planning a merge for a cluster you may not have: schedule, memory per worker, FLOPs, bytes and wall time.

``omnimerge plan RECIPE --cluster nodes=8,gpus_per_node=8,gpu_mem=80GB[,gpu_tflops=40,disk_gbps=2]`` prints
what the Ray executor would do on that cluster, from the plan alone (``config.json`` and safetensors headers;
sources without weights are indexed from their config, see :mod:`omnimerge.engine.config_index`).

Cost model (per ShardJob, on one GPU worker)::

    t_job = read_bytes / (disk_bw / gpus_per_node) + flops / gpu_flops + write_bytes / (disk_bw / gpus_per_node)

The GPUs of a node share its storage bandwidth evenly. ``gpu_tflops`` is the *effective* float32 throughput
of the merge math (the engine upcasts to float32; PyTorch does not use TF32 for fp32 matmuls by default): the
default 40 TFLOP/s is ~60 % of an H100 SXM's 67 TFLOP/s fp32 peak. ``disk_gbps`` is gigaBYTES per second
read per node (default 2 GB/s: a local NVMe or a good share of a parallel filesystem).

Jobs go longest first onto the least-loaded worker (LPT, within 4/3 of the optimal makespan); the Ray executor
dispatches in the same order (:func:`dispatch_order`). The wall-time estimate adds the driver's streaming
prepasses (model-wide statistics) and a fixed start-up allowance.
"""

from __future__ import annotations

import heapq
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from omnimerge.engine.errors import PlanError

__all__ = ["ClusterSpec", "ClusterSchedule", "WorkerLoad", "parse_cluster_spec", "plan_cluster",
           "plan_cluster_from_recipe", "render_cluster_plan", "dispatch_order", "job_seconds",
           "DEFAULT_GPU_TFLOPS", "DEFAULT_DISK_GBPS"]

DEFAULT_GPU_TFLOPS = 40.0  # effective fp32 TFLOP/s per GPU (~60 % of an H100 SXM's 67 TFLOP/s fp32 peak)
DEFAULT_DISK_GBPS = 2.0  # GB/s of storage read (and write) bandwidth per node
RUNTIME_BYTES = 512 * 1024**2  # per worker, beside the job's own estimate (as the executor requests)
STARTUP_S = 30.0  # Ray start or join, actors up, CUDA init: a fixed allowance


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster described by its shape.

    Attributes:
        nodes: machines.
        gpus_per_node: GPUs per machine (one worker each).
        gpu_mem: bytes of memory per GPU.
        gpu_tflops: effective float32 TFLOP/s of one GPU on the merge math.
        disk_gbps: GB/s each node reads (and writes) from storage, shared by its GPUs.
    """

    nodes: int
    gpus_per_node: int
    gpu_mem: int
    gpu_tflops: float = DEFAULT_GPU_TFLOPS
    disk_gbps: float = DEFAULT_DISK_GBPS

    @property
    def workers(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (f"{self.nodes} node(s) × {self.gpus_per_node} GPU(s) ({_fmt_bytes(self.gpu_mem)}, "
                f"{self.gpu_tflops:g} TFLOP/s fp32 effective each), storage {self.disk_gbps:g} GB/s per node")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
          "ti": 2**40, "tib": 2**40}
_KEYS = ("nodes", "gpus_per_node", "gpu_mem", "gpu_tflops", "disk_gbps")


def _parse_size(text: str) -> int | None:
    m = _SIZE.match(text)
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_cluster_spec(text: str) -> ClusterSpec:
    """Parse ``nodes=8,gpus_per_node=8,gpu_mem=80GB[,gpu_tflops=40,disk_gbps=2]``.

    Sizes take decimal (``GB``) or binary (``GiB``) units. Every problem is reported at once.

    Raises:
        PlanError: unknown or missing keys, values that are not positive numbers.
    """
    values: dict[str, str] = {}
    problems: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or key not in _KEYS:
            problems.append(f"'{part}' is not one of {', '.join(k + '=…' for k in _KEYS)}")
            continue
        values[key] = value.strip()
    for key in ("nodes", "gpus_per_node", "gpu_mem"):
        if key not in values:
            problems.append(f"{key}= is required")
    parsed: dict[str, Any] = {}
    for key, value in values.items():
        if key == "gpu_mem":
            number: float | None = _parse_size(value)
        else:
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or number <= 0 or (key in ("nodes", "gpus_per_node") and number != int(number)):
            kind = "a size such as 80GB" if key == "gpu_mem" else (
                "a positive whole number" if key in ("nodes", "gpus_per_node") else "a positive number")
            problems.append(f"{key}={value!r} is not {kind}")
            continue
        parsed[key] = int(number) if key in ("nodes", "gpus_per_node", "gpu_mem") else number
    if problems:
        raise PlanError(f"Cluster description '{text}' has {len(problems)} problem(s): " + "; ".join(problems)
                        + ". Example: nodes=8,gpus_per_node=8,gpu_mem=80GB,gpu_tflops=40,disk_gbps=2")
    return ClusterSpec(**parsed)


def job_seconds(job: Any, spec: ClusterSpec) -> float:
    """Estimated seconds of one ShardJob on one GPU of ``spec`` (see the module docstring)."""
    bw = spec.disk_gbps * 1e9 / spec.gpus_per_node
    return (job.read_bytes + job.write_bytes) / bw + job.flops / (spec.gpu_tflops * 1e12)


def dispatch_order(jobs: Sequence[Any], spec: ClusterSpec | None = None) -> list[Any]:
    """Jobs longest first (estimated on ``spec``, default: one 80 GB GPU per node), ties in plan order."""
    spec = spec or ClusterSpec(1, 1, 80 * 10**9)
    return sorted(jobs, key=lambda j: (-job_seconds(j, spec), j.index))


@dataclass
class WorkerLoad:
    """What one worker (a GPU of a node) gets."""

    node: int
    gpu: int
    jobs: list[str] = field(default_factory=list)
    seconds: float = 0.0
    read_bytes: int = 0
    peak_bytes: int = 0  # largest job estimate + runtime
    flops: float = 0.0

    @property
    def name(self) -> str:
        return f"node{self.node}/gpu{self.gpu}"


@dataclass
class ClusterSchedule:
    spec: ClusterSpec
    workers: list[WorkerLoad]
    flops_by_method: dict[str, float]
    read_by_node: list[int]
    too_big: list[tuple[str, int]]  # (shard, peak bytes incl. runtime) that exceed gpu_mem
    prepass_s: float
    makespan_s: float
    lower_bound_s: float
    jobs: int
    read_bytes: int
    write_bytes: int
    tensors: int
    recipe: str = ""
    base: str = ""
    experts: list[str] = field(default_factory=list)
    config_only: list[str] = field(default_factory=list)  # sources planned from config.json alone

    @property
    def wall_s(self) -> float:
        return STARTUP_S + self.prepass_s + self.makespan_s

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["spec"] = asdict(self.spec)
        doc["workers"] = [{"worker": w.name, **asdict(w)} for w in self.workers]
        doc["wall_s"] = self.wall_s
        doc["startup_s"] = STARTUP_S
        return doc


def _flops_by_method(plan: Any) -> dict[str, float]:
    from omnimerge.engine.plan import _task_cost  # the plan's own per-tensor cost model

    n = len(plan.experts)
    out: dict[str, float] = {}
    for task in plan.tensors:
        key = task.method if task.action == "merge" else "keep"
        out[key] = out.get(key, 0.0) + _task_cost(task, n)[1]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def plan_cluster(plan: Any, spec: ClusterSpec) -> ClusterSchedule:
    """Schedule ``plan``'s ShardJobs on ``spec`` (LPT) and estimate memory, bytes per node and wall time."""
    workers = [WorkerLoad(node, gpu) for node in range(spec.nodes) for gpu in range(spec.gpus_per_node)]
    # Ties go GPU-major (gpu0 of every node first), as Ray's SPREAD placement does: work and bytes spread
    # over the nodes when there are fewer jobs than workers.
    heap = [(0.0, gpu * spec.nodes + node, node * spec.gpus_per_node + gpu)
            for node in range(spec.nodes) for gpu in range(spec.gpus_per_node)]
    heapq.heapify(heap)
    too_big: list[tuple[str, int]] = []
    for job in dispatch_order(plan.jobs, spec):
        seconds = job_seconds(job, spec)
        load, rank, i = heapq.heappop(heap)
        w = workers[i]
        w.jobs.append(job.filename)
        w.seconds += seconds
        w.read_bytes += job.read_bytes
        w.flops += job.flops
        need = job.peak_bytes + RUNTIME_BYTES
        w.peak_bytes = max(w.peak_bytes, need)
        if need > spec.gpu_mem:
            too_big.append((job.filename, need))
        heapq.heappush(heap, (load + seconds, rank, i))
    read_by_node = [0] * spec.nodes
    for w in workers:
        read_by_node[w.node] += w.read_bytes
    prepass_read = sum(p.read_bytes for p in plan.prepasses)
    read_by_node[0] += prepass_read  # the driver streams prepasses on its own node
    prepass_s = prepass_read / (spec.disk_gbps * 1e9)
    total = sum(job_seconds(j, spec) for j in plan.jobs)
    longest = max((job_seconds(j, spec) for j in plan.jobs), default=0.0)
    config_only = [s.label for s in [plan.base, *plan.experts] if getattr(s.index, "config_only", False)]
    return ClusterSchedule(
        spec=spec, workers=workers, flops_by_method=_flops_by_method(plan), read_by_node=read_by_node,
        too_big=too_big, prepass_s=prepass_s, makespan_s=max(w.seconds for w in workers),
        lower_bound_s=max(total / len(workers), longest), jobs=len(plan.jobs), read_bytes=plan.read_bytes,
        write_bytes=plan.write_bytes, tensors=len(plan.tensors),
        recipe=str(plan.recipe.path) if plan.recipe.path else (plan.recipe.name or "recipe"),
        base=plan.base.spec.source, experts=[f"{e.label} ({e.kind})" for e in plan.experts],
        config_only=config_only)


def plan_cluster_from_recipe(recipe: Any, spec: str | ClusterSpec, as_json: bool = False) -> str:
    """Resolve ``recipe``'s sources for planning (config-only sources allowed), schedule, and render."""
    from omnimerge.engine.plan import plan_merge
    from omnimerge.engine.sources import resolve_source

    spec = parse_cluster_spec(spec) if isinstance(spec, str) else spec
    base = resolve_source(recipe.base, label="base", allow_pickle=recipe.allow_pickle, plan_only=True)
    experts = [resolve_source(e.source, label=e.name, allow_pickle=recipe.allow_pickle, base=base, plan_only=True)
               for e in recipe.experts]
    schedule = plan_cluster(plan_merge(recipe, base, experts), spec)
    if as_json:
        return json.dumps(schedule.to_json(), indent=2, default=str)
    return render_cluster_plan(schedule)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def _fmt_s(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {sec:02d} s" if m else f"{sec} s")


def _fmt_flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if f >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f / 1e6:.2f} MFLOP"


def render_cluster_plan(s: ClusterSchedule) -> str:
    spec = s.spec
    out = [f"Cluster plan for {s.recipe}",
           f"  cluster: {spec.describe()}",
           f"  base: {s.base}; experts: {', '.join(s.experts)}"]
    if s.config_only:
        out.append(f"  planned from config.json alone (no weights yet): {', '.join(s.config_only)}")
    out += [f"  {s.tensors} tensors in {s.jobs} shard job(s); read {_fmt_bytes(s.read_bytes)}, "
            f"write {_fmt_bytes(s.write_bytes)}", "", "Merge math by method (float32):"]
    for method, flops in s.flops_by_method.items():
        out.append(f"  {method:<20s} {_fmt_flops(flops):>14s}  ≈ {_fmt_s(flops / (spec.gpu_tflops * 1e12))} "
                   "on one GPU")
    out += ["", f"Schedule: longest job first onto the least-loaded of {spec.workers} worker(s) "
                f"(one per GPU):",
            f"  {'worker':<16s} {'jobs':>5s} {'read':>10s} {'peak mem':>10s} {'busy':>12s}"]
    for w in s.workers:
        flag = "  > gpu_mem!" if w.peak_bytes > spec.gpu_mem else ""
        out.append(f"  {w.name:<16s} {len(w.jobs):5d} {_fmt_bytes(w.read_bytes):>10s} "
                   f"{_fmt_bytes(w.peak_bytes):>10s} {_fmt_s(w.seconds):>12s}{flag}")
    idle = sum(1 for w in s.workers if not w.jobs)
    if idle:
        out.append(f"  ({idle} worker(s) get no job: there are only {s.jobs} shard(s); a smaller shard_size "
                   "gives more, smaller jobs)")
    out += ["", "Bytes read per node (shared storage or each node's own cache):"]
    for node, nbytes in enumerate(s.read_by_node):
        out.append(f"  node{node:<4d} {_fmt_bytes(nbytes):>10s}" + ("  (incl. the driver's prepass)"
                                                                   if node == 0 and s.prepass_s else ""))
    out.append("")
    if s.too_big:
        shown = ", ".join(f"{name} ({_fmt_bytes(b)})" for name, b in s.too_big[:6])
        out.append(f"WARNING: {len(s.too_big)} job(s) need more than one GPU's {_fmt_bytes(spec.gpu_mem)} "
                   f"(estimate + {_fmt_bytes(RUNTIME_BYTES)} runtime): {shown}. Workers run such jobs on CPU "
                   "(slow); lower shard_size so each shard holds fewer layers, or use GPUs with more memory.")
    else:
        peak = max(w.peak_bytes for w in s.workers)
        out.append(f"Memory: every job fits one GPU (largest {_fmt_bytes(peak)} of {_fmt_bytes(spec.gpu_mem)}, "
                   "estimate incl. runtime).")
    out.append(f"Estimated wall time: {_fmt_s(s.wall_s)} = slowest worker {_fmt_s(s.makespan_s)} "
               f"+ driver prepass {_fmt_s(s.prepass_s)} + start-up {_fmt_s(STARTUP_S)} "
               f"(perfect balance would give {_fmt_s(s.lower_bound_s)} of work per worker).")
    return "\n".join(out)
