"""``omnimerge merge``, ``omnimerge plan`` and ``omnimerge methods``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a recipe into a Hugging Face checkpoint",
                       description="Merge the experts of RECIPE into OUT. Output appears only when complete; "
                                   "rerunning an interrupted merge resumes from the shards already verified.")
    p.add_argument("recipe", help="recipe YAML (omnimerge or mergekit format)")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--executor", choices=("ray", "local"), default="ray",
                   help="ray (default): Ray actors, a local Ray instance unless --address; local: threads in "
                        "this process, no Ray")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: 'auto' or 'ray://host:port' (default: start a local instance and stop "
                        "it afterwards)")
    p.add_argument("--workers", type=int, default=None,
                   help="workers (local: threads, default 1; ray: actors, default one per GPU of the cluster, else "
                        "one per CPU, as many as fit in memory)")
    p.add_argument("--storage", choices=("shared", "none"), default="shared",
                   help="ray only. shared (default): every node sees the sources and the output's parent directory "
                        "(one machine, NFS/Lustre/...); workers read and write there. none: each node resolves the "
                        "sources itself (hub ids into its own cache) and workers send shard bytes back through the "
                        "object store for this process to write")
    p.add_argument("--worker-threads", type=int, default=None,
                   help="ray only: torch threads per worker (default: this process's count, which keeps SVD-based "
                        "methods bit-identical to --executor local; on a CPU-only node, CPUs / workers avoids "
                        "oversubscription and was 2x faster for optmerge with 2 workers on 2 cores)")
    p.add_argument("--device", default="auto", help="auto (cuda when a worker sees a GPU), cpu, cuda")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new merge is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_merge)

    p = sub.add_parser("plan", help="print what a recipe would do, without reading weights",
                       description="Validate RECIPE and print the rule each tensor got, the shard layout, bytes "
                                   "to read and write and the peak-memory estimate. Exit code 1 on any problem.")
    p.add_argument("recipe")
    p.add_argument("--tensors", action="store_true", help="list every tensor with its rule and method")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cluster", default=None,
                   help="schedule on a described cluster, e.g. nodes=8,gpus_per_node=8,gpu_mem=80GB"
                        "[,gpu_tflops=...,disk_gbps=...]")
    p.set_defaults(func=_plan)

    p = sub.add_parser("methods", help="list merge methods, their parameters, defaults and references")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_methods)


def _merge(args: argparse.Namespace) -> int:
    from omnimerge.engine.merge import run_merge
    from omnimerge.engine.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    progress = not args.no_progress
    # Fault injection for recovery tests ("<tensor>:<marker file>", see engine.execute.JobContext.fault).
    fault = os.environ.get("OMNIMERGE_FAULT") or None
    if args.executor == "local":
        from omnimerge.engine.execute import LocalExecutor

        report = run_merge(recipe, args.output, executor=LocalExecutor(args.workers or 1),
                           overwrite=args.overwrite, device=args.device, progress=progress, fault=fault)
    else:
        from .ray_executor import RayExecutor, ray_session

        with ray_session(args.address) as info:
            executor = RayExecutor(workers=args.workers, device=args.device, session=info, storage=args.storage,
                                   threads=args.worker_threads)
            report = run_merge(recipe, args.output, executor=executor, overwrite=args.overwrite,
                               device=args.device, progress=progress, fault=fault)
    print(report.summary(), file=sys.stderr)
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _plan(args: argparse.Namespace) -> int:
    from omnimerge.engine.plan import plan_merge
    from omnimerge.engine.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.cluster:
        from .cluster_plan import plan_cluster_from_recipe

        print(plan_cluster_from_recipe(recipe, args.cluster, as_json=args.json))
        return 0
    plan = plan_merge(recipe)
    doc = plan_document(plan)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    print(render_plan(plan, doc, tensors=args.tensors))
    return 0


def plan_document(plan: Any) -> dict[str, Any]:
    by_rule: dict[tuple, int] = {}
    for t in plan.tensors:
        key = (t.rule, t.action, t.method or "", t.requested or "")
        by_rule[key] = by_rule.get(key, 0) + 1
    for _, rule in plan.dropped:
        by_rule[(rule, "drop", "", "")] = by_rule.get((rule, "drop", "", ""), 0) + 1
    return {
        "recipe": str(plan.recipe.path) if plan.recipe.path else None,
        "base": plan.base.spec.source,
        "experts": [{"label": e.label, "source": e.spec.source, "kind": e.kind} for e in plan.experts],
        "rules": [{"rule": r, "action": a, "method": m or None, "fallback_for": q or None, "tensors": n}
                  for (r, a, m, q), n in by_rule.items()],
        "tensors": [{"name": t.name, "action": t.action, "method": t.method, "rule": t.rule,
                     "shape": list(t.shape), "dtype": t.out_dtype} for t in plan.tensors]
                   + [{"name": n, "action": "drop", "rule": r} for n, r in plan.dropped],
        "shards": [{"file": j.filename, "tensors": len(j.tensors), "write_bytes": j.write_bytes,
                    "read_bytes": j.read_bytes, "peak_bytes": j.peak_bytes, "flops": j.flops} for j in plan.jobs],
        "prepasses": [{"method": p.method, "parameters": dict(p.params), "tensors": len(p.tensors),
                       "read_bytes": p.read_bytes} for p in plan.prepasses],
        "read_bytes": plan.read_bytes,
        "write_bytes": plan.write_bytes,
        "peak_bytes": plan.peak_bytes,
        "flops": plan.flops,
    }


def render_plan(plan: Any, doc: dict[str, Any], *, tensors: bool = False) -> str:
    out = [f"Plan for {doc['recipe'] or 'recipe'}",
           f"  base: {doc['base']}",
           "  experts: " + ", ".join(f"{e['label']} ({e['kind']}: {e['source']})" for e in doc["experts"]),
           "", "Rules applied (first match wins):"]
    for r in doc["rules"]:
        what = r["action"] if r["action"] != "merge" else f"merge with {r['method']}"
        if r["fallback_for"]:
            what += f" (fallback: {r['fallback_for']} handles only 2-D tensors)"
        out.append(f"  {r['tensors']:6d} tensors  {what:<40s}  [{r['rule']}]")
    if tensors:
        out += ["", "Tensors:"]
        for t in doc["tensors"]:
            what = t["action"] if t["action"] != "merge" else f"merge:{t['method']}"
            out.append(f"  {t['name']:<60s} {what:<22s} {t.get('shape', '')}")
    out += ["", f"Output shards ({len(doc['shards'])}):"]
    for s in doc["shards"]:
        out.append(f"  {s['file']:<36s} {s['tensors']:5d} tensors  write {_fmt_bytes(s['write_bytes']):>10s}  "
                   f"read {_fmt_bytes(s['read_bytes']):>10s}  peak {_fmt_bytes(s['peak_bytes']):>10s}")
    for p in doc["prepasses"]:
        out.append(f"Extra streaming pass for {p['method']} {p['parameters']}: {p['tensors']} tensors, "
                   f"reads {_fmt_bytes(p['read_bytes'])}")
    out += ["", f"Total: read {_fmt_bytes(doc['read_bytes'])}, write {_fmt_bytes(doc['write_bytes'])}, "
                f"peak memory per worker ≈ {_fmt_bytes(doc['peak_bytes'])} (+ ~0.5 GB runtime), "
                f"merge math ≈ {doc['flops'] / 1e9:.1f} GFLOP"]
    return "\n".join(out)


def _methods(args: argparse.Namespace) -> int:
    from omnimerge.algorithms import all_methods

    specs = all_methods()
    if args.json:
        print(json.dumps([{
            "name": s.name, "summary": s.summary, "handles": s.handles, "fallback": s.fallback,
            "accepts_lowrank": s.accepts_lowrank, "random": s.random, "symmetric": s.symmetric,
            "experts": [s.min_experts, s.max_experts], "reference": s.reference,
            "parameters": {p.name: {"default": p.default, "type": p.annotation} for p in s.params},
        } for s in specs], indent=2, default=str))
        return 0
    for s in specs:
        tensors = "any tensor" if s.handles == "any" else f"2-D tensors (others: {s.fallback})"
        flags = [f for f, on in (("random, seeded", s.random), ("LoRA factors", s.accepts_lowrank),
                                 ("order-dependent", not s.symmetric)) if on]
        n = f"{s.min_experts}+" if s.max_experts is None else (
            str(s.min_experts) if s.min_experts == s.max_experts else f"{s.min_experts}-{s.max_experts}")
        print(f"{s.name}: {s.summary}")
        print(f"    handles {tensors}; experts {n}" + (f"; {', '.join(flags)}" if flags else ""))
        for p in s.params:
            print(f"    {p.name} = {p.default!r}")
        if s.reference:
            print(f"    ref: {s.reference}")
    return 0
