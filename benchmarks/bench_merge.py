"""Task arithmetic on a Qwen2-0.5B-layout set: omnimerge against mergekit, wall time and peak RSS side by side.

The set (a base and ``--experts`` experts, bf16, sharded; see ``make_synthetic.py``) is generated into
``--cache-dir`` unless it is there already. The benchmark then writes one omnimerge recipe and the
equivalent mergekit YAML (task arithmetic, every expert with weight ``--weight``, λ = ``--scale``, bf16 out)
and runs each tool as a separate process, ``--repeat`` times, interleaved:

- ``omnimerge merge RECIPE -o OUT --executor local`` (and ``--executor ray`` with ``--executors local,ray``),
- ``mergekit-yaml CONFIG OUT --no-cuda --no-copy-tokenizer ...`` from ``--mergekit PATH`` (a mergekit executable,
  e.g. one installed in a separate virtualenv; without it only omnimerge is timed).

Measured per run: wall time of the whole process (start-up and imports included), user+system CPU time,
and peak memory: ``peak_rss`` is the larger of the kernel's exact high-water mark of the largest single process
(``wait4`` ru_maxrss) and the largest sum of RSS over the process tree sampled every ``--poll`` seconds
(Ray starts a GCS, a raylet and workers; the tree sum counts them all, and ``peak_tree_pss`` splits the pages
they share). File pages of mmap-read inputs count towards RSS, as the kernel counts them. CPU time covers the
whole tree too (Ray's workers are not reaped by the driver, so ``wait4`` alone would miss them).

Afterwards the two outputs are compared tensor by tensor (and a sample against a float32 reference computed
here from the inputs): mergekit computes in its ``dtype`` (bf16), omnimerge in float32, so they agree up to
bf16 rounding; the report gives the largest difference in bf16 ulps. A table is printed and everything is
written as JSON (``--out``).

    python benchmarks/bench_merge.py --mergekit /tmp/mk-venv/bin/mergekit-yaml --repeat 3 --out bench_merge.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.make_synthetic import make_qwen2_05b_set, parse_size  # noqa: E402

__all__ = ["RunResult", "measure_command", "write_recipes", "compare_outputs", "main"]

RSS_TARGET_BYTES = 1.5e9
WALL_TARGET_RATIO = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------- measuring
@dataclass
class RunResult:
    """One timed process (tree)."""

    tool: str
    repeat: int
    command: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user+system of the whole tree: max(wait4's, summed samples of every process seen)
    peak_rss: int  # bytes: max(maxrss_wait4, peak_tree_rss)
    maxrss_wait4: int  # bytes: largest single process of the tree that was waited for (exact)
    peak_tree_rss: int  # bytes: largest sampled sum of RSS over the tree
    peak_tree_pss: int  # bytes: largest sampled sum of PSS over the tree (sampled only when >1 process)
    max_processes: int
    samples: int
    loadavg_before: float
    loadavg_after: float
    output_bytes: int = 0
    error_tail: str = ""


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." — comm may contain spaces and parentheses: split after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (its own, not its children's)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15 of stat
    except (OSError, ValueError, IndexError):
        return 0.0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class _TreeSampler(threading.Thread):
    """Samples the summed RSS (and PSS when several processes) of a process and all its descendants.

    Processes seen once stay tracked while alive, so daemons that get re-parented (Ray's) still count.
    """

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.peak_rss = self.peak_pss = self.samples = 0
        self.max_procs = 1
        self.tracked: set[int] = {root}
        self.cpu: dict[int, float] = {}  # last CPU time seen per process of the tree

    def run(self) -> None:
        tick = 0
        while not self.stop_event.is_set():
            slow = tick % 10 == 0  # tree walk (every /proc/*/stat) and PSS (smaps_rollup, takes the target's
            if slow:               # mmap lock) only every 10th sample: cheap for the measured processes
                kids = _children_map()
                frontier = list(self.tracked)
                while frontier:
                    for child in kids.get(frontier.pop(), ()):
                        if child not in self.tracked:
                            self.tracked.add(child)
                            frontier.append(child)
            tick += 1
            alive = [p for p in self.tracked if os.path.exists(f"/proc/{p}")]
            self.tracked = set(alive) | {self.root}
            self.max_procs = max(self.max_procs, len(alive))
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in alive))
            if slow:  # a process's CPU time after its last slow sample is missed (wait4 has the reaped ones)
                for p in alive:
                    self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu_seconds(p))
                if len(alive) > 1:
                    self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in alive))
            self.samples += 1
            self.stop_event.wait(self.interval)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def measure_command(tool: str, repeat: int, command: Sequence[str], *, out_dir: Path, log_path: Path,
                    poll: float = 0.05, env: dict[str, str] | None = None) -> RunResult:
    """Run ``command`` once (``out_dir`` removed first, dirty pages flushed) and measure it."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.sync()  # earlier runs' dirty pages must not be written back on this run's clock
    load_before = _loadavg()
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = _TreeSampler(proc.pid, poll)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop_event.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss = usage.ru_maxrss * 1024  # Linux reports KiB
    tail = ""
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
    return RunResult(tool=tool, repeat=repeat, command=list(command), returncode=proc.returncode, wall_s=wall,
                     cpu_s=max(usage.ru_utime + usage.ru_stime, sum(sampler.cpu.values())),
                     peak_rss=max(maxrss, sampler.peak_rss),
                     maxrss_wait4=maxrss, peak_tree_rss=sampler.peak_rss, peak_tree_pss=sampler.peak_pss,
                     max_processes=sampler.max_procs, samples=sampler.samples, loadavg_before=load_before,
                     loadavg_after=_loadavg(), output_bytes=_dir_bytes(out_dir), error_tail=tail)


# --------------------------------------------------------------------------------------------- recipes
def write_recipes(work: Path, base: str, experts: Sequence[str], *, weight: float, scale: float,
                  shard_size: int) -> tuple[Path, Path]:
    """The omnimerge recipe and the equivalent mergekit config (JSON is valid YAML: no YAML writer needed)."""
    omni = {
        "name": "bench-task-arithmetic",
        "base": base,
        "experts": {f"expert_{i}": {"source": path, "weight": weight} for i, path in enumerate(experts)},
        "method": "task_arithmetic",
        "parameters": {"scale": scale},
        "dtype": "bfloat16",
        "shard_size": shard_size,
    }
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": path, "parameters": {"weight": weight}} for path in experts],
        "parameters": {"lambda": scale, "normalize": False},
        "dtype": "bfloat16",
    }
    work.mkdir(parents=True, exist_ok=True)
    omni_path, mk_path = work / "omnimerge_recipe.yaml", work / "mergekit_config.yaml"
    omni_path.write_text(json.dumps(omni, indent=2) + "\n")
    mk_path.write_text(json.dumps(mk, indent=2) + "\n")
    return omni_path, mk_path


# --------------------------------------------------------------------------------------------- agreement
def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (float32 in, float32 out): 2^(⌊log2|x|⌋ − 7)."""
    import torch

    power_of_two = (x.abs().clamp_min(2.0 ** -126).view(torch.int32) & 0x7F800000).view(torch.float32)
    return power_of_two * 2.0 ** -7


def _open_output(path: Path) -> dict[str, Any]:
    """tensor name -> open safe_open handle of the shard holding it."""
    from safetensors import safe_open

    handles: dict[str, Any] = {}
    for file in sorted(path.glob("*.safetensors")):
        h = safe_open(str(file), framework="pt", device="cpu")
        for name in h.keys():
            handles[name] = h
    return handles


def compare_outputs(omni_dir: Path, mk_dir: Path, base: str, experts: Sequence[str], *, weight: float,
                    scale: float, reference_tensors: int = 8, tol_ulps: float = 4.0) -> dict[str, Any]:
    """Compare every common tensor of the two outputs, and a sample of each against a float32 reference.

    A difference is measured in bf16 ulps of the operands' scale, per element: max(|a|, |b|, |θ₀|,
    Σ|wᵢ(θᵢ − θ₀)|). A bf16 computation (mergekit with ``dtype: bfloat16``) rounds the task vectors and each
    partial sum, so its error scales with them, not with a result that may cancel to ~0. The reference is
    θ₀ + λ·Σ wᵢ(θᵢ − θ₀) in float32 rounded to bf16 once (what an exact engine writes).
    """
    import torch

    omni, mk, base_h = _open_output(omni_dir), _open_output(mk_dir), _open_model(base)
    expert_h = [_open_model(e) for e in experts]
    common = sorted(set(omni) & set(mk))

    def operand_scale(name: str, *outs: torch.Tensor) -> torch.Tensor:
        b0 = base_h[name].get_tensor(name).float()
        scale_ = b0.abs()
        partial = torch.zeros_like(b0)
        for h in expert_h:
            partial += (weight * (h[name].get_tensor(name).float() - b0)).abs()
        scale_ = torch.maximum(scale_, partial)
        for out in outs:
            scale_ = torch.maximum(scale_, out.abs())
        return scale_

    worst_ulps, worst_name, worst_abs, equal, total = 0.0, "", 0.0, 0, 0
    for name in common:
        a = omni[name].get_tensor(name).float()
        b = mk[name].get_tensor(name).float()
        if a.shape != b.shape:
            return {"ok": False, "error": f"tensor {name}: shape {list(a.shape)} vs {list(b.shape)}"}
        diff = (a - b).abs()
        ulps = float((diff / _bf16_ulp(operand_scale(name, a, b))).max())
        if ulps > worst_ulps:
            worst_ulps, worst_name = ulps, name
        worst_abs = max(worst_abs, float(diff.max()))
        equal += int((a == b).sum())
        total += a.numel()
        del a, b, diff

    ref_report: dict[str, Any] = {}
    for name in _reference_sample(common, reference_tensors):
        b0 = base_h[name].get_tensor(name).float()
        acc = torch.zeros_like(b0)
        for h in expert_h:
            acc += weight * (h[name].get_tensor(name).float() - b0)
        ref = (b0 + scale * acc).to(torch.bfloat16).float()
        ulp = _bf16_ulp(operand_scale(name, ref))
        row = {}
        for tool, handles in (("omnimerge", omni), ("mergekit", mk)):
            d = (handles[name].get_tensor(name).float() - ref).abs()
            row[tool] = {"exact_fraction": float((d == 0).float().mean()), "max_ulps": float((d / ulp).max()),
                         "max_abs": float(d.max())}
        ref_report[name] = row
    return {
        "ok": worst_ulps <= tol_ulps and set(omni) == set(mk),
        "tensors_compared": len(common),
        "only_in_omnimerge": sorted(set(omni) - set(mk)),
        "only_in_mergekit": sorted(set(mk) - set(omni)),
        "max_abs_diff": worst_abs,
        "max_ulps_diff": worst_ulps,
        "worst_tensor": worst_name,
        "equal_fraction": equal / total if total else 0.0,
        "tolerance_ulps": tol_ulps,
        "vs_float32_reference": ref_report,
    }


def _output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every shard of an omnimerge output (from its manifest; empty when there is none)."""
    manifest = out / "omnimerge_manifest.json"
    if not manifest.exists():
        return {}
    return {name: s["sha256"] for name, s in json.loads(manifest.read_text()).get("shards", {}).items()}



def code_variants(also_code: Sequence[str], env: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """``[("", env)]`` plus, for each ``LABEL=DIR`` of ``--also-code``, ``("@LABEL", env with PYTHONPATH=DIR)``:
    the omnimerge code importable from DIR (``DIR/omnimerge/{engine,algorithms,cluster,benchmarks}``, e.g. a copy
    of another commit), timed beside this checkout's.

    Raises:
        ValueError: an item is not ``LABEL=DIR`` or DIR holds no ``omnimerge/engine``.
    """
    codes = [("", env)]
    for item in also_code:
        label, sep, path = item.partition("=")
        if not sep or not label or not (Path(path) / "omnimerge" / "engine").is_dir():
            raise ValueError(f"--also-code wants LABEL=DIR with DIR/omnimerge/engine, got {item!r}")
        pythonpath = os.pathsep.join(x for x in (str(Path(path).resolve()), env.get("PYTHONPATH", "")) if x)
        codes.append((f"@{label}", {**env, "PYTHONPATH": pythonpath}))
    return codes

def _open_model(path: str) -> dict[str, Any]:
    return _open_output(Path(path))


def _reference_sample(names: Sequence[str], k: int) -> list[str]:
    """The embedding, the final norm, then tensors spread evenly over the rest, ``k`` in all."""
    picks = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n in names]
    rest = [n for n in names if n not in picks]
    want = max(0, k - len(picks))
    if want and rest:
        picks += [rest[round(i * (len(rest) - 1) / max(1, want - 1))] for i in range(min(want, len(rest)))]
    return list(dict.fromkeys(picks))


# --------------------------------------------------------------------------------------------- report
def _summarise(runs: list[RunResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for tool in dict.fromkeys(r.tool for r in runs):
        ok = [r for r in runs if r.tool == tool and r.returncode == 0]
        if not ok:
            out[tool] = {"ok": False, "runs": 0}
            continue
        walls = [r.wall_s for r in ok]
        out[tool] = {
            "ok": True,
            "runs": len(ok),
            "best_wall_s": min(walls),
            "median_wall_s": statistics.median(walls),
            "best_cpu_s": min(r.cpu_s for r in ok),
            "peak_rss_bytes": max(r.peak_rss for r in ok),
            "min_peak_rss_bytes": min(r.peak_rss for r in ok),
            "peak_tree_pss_bytes": max(r.peak_tree_pss for r in ok),
            "max_processes": max(r.max_processes for r in ok),
            "output_bytes": ok[-1].output_bytes,
        }
    return out


def _table(summary: dict[str, dict[str, Any]], reference: str | None) -> str:
    w = max([22, *(len(t) for t in summary)])
    head = f"{'tool':<{w}s} {'runs':>4s} {'best wall s':>11s} {'median s':>9s} {'cpu s':>8s} " \
           f"{'peak RSS MB':>11s} {'procs':>5s} {'vs mergekit':>11s}"
    lines = [head, "-" * len(head)]
    ref = summary.get(reference or "", {})
    for tool, s in summary.items():
        if not s.get("ok"):
            lines.append(f"{tool:<{w}s} {'FAILED':>4s}")
            continue
        ratio = f"{s['best_wall_s'] / ref['best_wall_s']:.2f}x" if ref.get("ok") and tool != reference else ""
        lines.append(f"{tool:<{w}s} {s['runs']:4d} {s['best_wall_s']:11.1f} {s['median_wall_s']:9.1f} "
                     f"{s['best_cpu_s']:8.1f} {s['peak_rss_bytes'] / 1e6:11.0f} {s['max_processes']:5d} "
                     f"{ratio:>11s}")
    return "\n".join(lines)


def _versions(mergekit: str | None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        info["mem_total_bytes"] = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        repo = Path(__file__).resolve().parent.parent
        info["omnimerge_commit"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                                  text=True, check=False).stdout.strip()
    except OSError:
        pass
    if mergekit:
        py = Path(mergekit).parent / "python"
        if py.exists():
            res = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                                  "m.version('torch'), m.version('transformers'))"],
                                 capture_output=True, text=True, check=False)
            if res.returncode == 0:
                mkv, tv, trv = res.stdout.split()
                info["mergekit"] = {"version": mkv, "torch": tv, "transformers": trv}
    return info


def _omnimerge_command(executor: str, recipe: Path, out: Path, workers: int | None) -> list[str]:
    exe = shutil.which("omnimerge")
    cmd = [exe] if exe else [sys.executable, "-m", "omnimerge.cluster.cli"]
    cmd += ["merge", str(recipe), "-o", str(out), "--executor", executor, "--no-progress"]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd


def _mergekit_command(exe: str, config: Path, out: Path, shard_size: int, threads: int | None) -> list[str]:
    cmd = [exe, str(config), str(out), "--no-cuda", "--no-copy-tokenizer", "--lazy-unpickle", "--quiet", "--out-shard-size", str(max(1, shard_size // 2)), "--no-write-model-card"]
    if threads:
        cmd += ["--num-threads", str(threads)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time task arithmetic with omnimerge (and mergekit) on a synthetic "
                                            "Qwen2-0.5B-layout set.")
    p.add_argument("--mergekit", default=None, help="path of a mergekit-yaml executable (e.g. in its own venv)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "omnimerge" / "bench"),
                   help="where the synthetic set is generated/reused")
    p.add_argument("--work-dir", default=None, help="recipes, logs and outputs (default: CACHE_DIR/merge-runs)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--layers", type=int, default=24, help="decoder layers of the set (24 = the real model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight", type=float, default=1.0, help="per-expert weight (both tools)")
    p.add_argument("--scale", type=float, default=0.5, help="λ (omnimerge 'scale', mergekit 'lambda')")
    p.add_argument("--shard-size", default="5GB",
                   help="output shard size, both tools (mergekit gets it as a parameter count, bytes / 2); "
                        "default 5GB = both tools' defaults")
    p.add_argument("--executors", default="local", help="omnimerge executors to time, comma-separated: local,ray")
    p.add_argument("--workers", type=int, default=None, help="omnimerge --workers (default: its own)")
    p.add_argument("--omnimerge-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the omnimerge runs (repeatable), e.g. RAY_worker_niceness=0")
    p.add_argument("--also-code", action="append", default=[], metavar="LABEL=DIR",
                   help="also time the omnimerge code importable from DIR (a copy of another commit laid out as "
                        "DIR/omnimerge/{engine,algorithms,cluster,benchmarks}), with PYTHONPATH=DIR, as 'omnimerge@LABEL "
                        "(executor)', interleaved with the others (repeatable): before/after in one run")
    p.add_argument("--mergekit-threads", type=int, default=None, help="mergekit --num-threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=2, help="runs per tool (interleaved); best wall time is reported")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between process-tree memory samples")
    p.add_argument("--tol-ulps", type=float, default=4.0, help="agreement tolerance in bf16 ulps")
    p.add_argument("--no-compare", action="store_true", help="skip the numerical comparison of the outputs")
    p.add_argument("--keep-outputs", action="store_true", help="keep the merged outputs in WORK_DIR")
    p.add_argument("--out", default="bench_merge.json", help="JSON report path")
    args = p.parse_args(argv)

    if args.mergekit and not os.access(args.mergekit, os.X_OK):
        p.error(f"--mergekit {args.mergekit!r} is not an executable file; pass the path of mergekit-yaml, "
                f"e.g. /tmp/mk-venv/bin/mergekit-yaml")
    shard_size = parse_size(args.shard_size)
    cache = Path(args.cache_dir).expanduser()
    set_dir = cache / f"qwen2_05b-L{args.layers}-E{args.experts}-s{args.seed}"
    work = Path(args.work_dir).expanduser() if args.work_dir else cache / "merge-runs"
    work.mkdir(parents=True, exist_ok=True)

    print(f"synthetic set: {set_dir}", flush=True)
    info = make_qwen2_05b_set(set_dir, n_experts=args.experts, layers=args.layers, seed=args.seed)
    if info["written"]:
        print(f"  generated {', '.join(info['written'])} in {info['seconds']:.0f} s", flush=True)
    omni_recipe, mk_config = write_recipes(work, info["base"], info["experts"], weight=args.weight,
                                           scale=args.scale, shard_size=shard_size)

    omni_env = dict(os.environ)
    for item in args.omnimerge_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--omnimerge-env wants KEY=VALUE, got {item!r}")
        omni_env[key] = value
    try:
        codes = code_variants(args.also_code, omni_env)
    except ValueError as error:
        p.error(str(error))
    tools: list[tuple[str, Path, list[str], dict[str, str] | None]] = []
    for executor in [e.strip() for e in args.executors.split(",") if e.strip()]:
        for label, env in codes:
            out = work / f"out-omnimerge{label.replace('@', '-')}-{executor}"
            tools.append((f"omnimerge{label} ({executor})", out,
                          _omnimerge_command(executor, omni_recipe, out, args.workers), env))
    if args.mergekit:
        out = work / "out-mergekit"
        tools.append(("mergekit", out, _mergekit_command(args.mergekit, mk_config, out, shard_size,
                                                         args.mergekit_threads), None))

    runs: list[RunResult] = []
    for rep in range(args.repeat):
        for tool, out, cmd, env in tools:
            log_path = work / f"{out.name}-{rep}.log"
            r = measure_command(tool, rep, cmd, out_dir=out, log_path=log_path, poll=args.poll, env=env)
            runs.append(r)
            status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode} (log {log_path})"
            print(f"  [{rep + 1}/{args.repeat}] {tool:<26s} {r.wall_s:7.1f} s  cpu {r.cpu_s:6.1f} s  "
                  f"peak RSS {r.peak_rss / 1e6:6.0f} MB  load {r.loadavg_before:.1f}->{r.loadavg_after:.1f}  "
                  f"{status}", flush=True)

    summary = _summarise(runs)
    report: dict[str, Any] = {
        "benchmark": "bench_merge",
        "machine": _versions(args.mergekit),
        "set": {k: v for k, v in info.items() if k != "config"} | {"dir": str(set_dir), "layers": args.layers},
        "config": {"method": "task_arithmetic", "weight": args.weight, "scale": args.scale,
                   "shard_size": shard_size, "repeat": args.repeat, "executors": args.executors,
                   "workers": args.workers, "omnimerge_env": args.omnimerge_env},
        "commands": {tool: cmd for tool, _, cmd, _ in tools},
        "also_code": args.also_code,
        "runs": [asdict(r) for r in runs],
        "summary": summary,
    }
    omni_local = summary.get("omnimerge (local)", {})
    mk = summary.get("mergekit", {})
    targets: dict[str, Any] = {"rss_target_bytes": RSS_TARGET_BYTES, "wall_target_ratio": WALL_TARGET_RATIO}
    for tool, s in summary.items():
        if tool.startswith("omnimerge") and s.get("ok"):
            entry = {"peak_rss_bytes": s["peak_rss_bytes"], "rss_met": s["peak_rss_bytes"] < RSS_TARGET_BYTES}
            if mk.get("ok"):
                entry["wall_ratio"] = s["best_wall_s"] / mk["best_wall_s"]
                entry["wall_met"] = entry["wall_ratio"] <= WALL_TARGET_RATIO
            targets[tool] = entry
    report["targets"] = targets

    if not args.no_compare and omni_local.get("ok") and mk.get("ok"):
        print("comparing outputs ...", flush=True)
        report["agreement"] = compare_outputs(work / "out-omnimerge-local", work / "out-mergekit", info["base"],
                                              info["experts"], weight=args.weight, scale=args.scale,
                                              tol_ulps=args.tol_ulps)
    hashes = {tool: _output_hashes(out) for tool, out, _, _ in tools if tool.startswith("omnimerge")}
    report["output_sha256"] = hashes
    report["omnimerge_outputs_identical"] = len({json.dumps(h, sort_keys=True) for h in hashes.values() if h}) <= 1
    if not args.keep_outputs:
        for _, out, _, _ in tools:
            shutil.rmtree(out, ignore_errors=True)

    print()
    print(f"task arithmetic, {args.experts} experts, {args.layers} layers "
          f"({info['bytes_per_model'] / 1e9:.2f} GB per model, bf16), best of {args.repeat}:")
    print(_table(summary, "mergekit" if mk.get("ok") else None))
    for tool, entry in targets.items():
        if isinstance(entry, dict):
            line = f"  {tool}: peak RSS {entry['peak_rss_bytes'] / 1e9:.2f} GB " \
                   f"({'<' if entry['rss_met'] else '>='} {RSS_TARGET_BYTES / 1e9:.1f} GB target)"
            if "wall_ratio" in entry:
                line += f"; wall {entry['wall_ratio']:.2f}x mergekit " \
                        f"({'meets' if entry['wall_met'] else 'misses'} the <= {WALL_TARGET_RATIO}x target)"
            print(line)
    print(f"  omnimerge outputs byte-identical across codes and executors: {report['omnimerge_outputs_identical']}")
    agreement = report.get("agreement")
    if agreement:
        print(f"  outputs agree: {agreement['ok']} ({agreement['tensors_compared']} tensors, max diff "
              f"{agreement['max_ulps_diff']:.1f} bf16 ulp at {agreement['worst_tensor'] or '-'}, "
              f"{agreement['equal_fraction'] * 100:.2f}% of values bit-equal)")
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"JSON: {args.out}")
    failed = [t for t, s in summary.items() if not s.get("ok")]
    return 1 if failed or (agreement and not agreement["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
