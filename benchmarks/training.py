"""Training throughput and peak memory: dkan's batch strategy against the reference's, side by side.

Synthetic her2st-sized inputs built in memory (5 sections, 900 spots on square grids, 250 genes, frozen 1280-d spot
and 5 x 5 region features, 384-d gene embeddings), one DKAN module (``dkan.train.fitted.build_module``), Adam, the
training loop's autocast / gradient scaling / clipping, and two strategies that differ only in batching and loss form:

- ``ours``: :func:`dkan.train.data.plan_batches` (every batch comes from one section, so the slide encoder runs once
  per step) and :class:`dkan.nn.losses.DKANLoss` (streamed NT-Xent, linear memory in ``B*G``);
- ``reference``: random batches over the spots of all sections (``DataLoader(shuffle=True)``, last batch kept); the
  slide encoder runs on the full spot set of every distinct section present in the batch and the batch rows are
  gathered (reference section 1.5); the contrastive term is the dense ``(B*G) x (B*G)`` matrix
  (:func:`dkan.nn.losses.nt_xent_dense`), weighted as in the reference's ``compute_loss``.

An epoch is one pass over all training spots (no validation pass in either). Each (preset, batch size, strategy) cell
runs in a fresh subprocess: peak memory is the process's ``ru_maxrss`` on CPU and ``torch.cuda.max_memory_allocated``
on CUDA (both also as the increase over the state after setup). ``her2st`` uses the trainable ResNet18 patch branch
with random weights on 224 px crops taken from random 256 px uint8 tiles held on the device.

Usage::

    python benchmarks/training.py --quick               # smoke test, < 1 min on 2 CPU cores
    python benchmarks/training.py --threads 1           # CPU: small preset at batch 32 and 128
    python benchmarks/training.py --device cuda         # GPU: small at 32 and 128, her2st at 128
    python benchmarks/training.py --device cuda --cells her2st:128:1 --spots '600*30'  # stnet-sized data
    python benchmarks/training.py --her2st-cpu --cells her2st:8 --max-steps 2   # her2st path on CPU, extrapolated
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _training_report import device_name, parse_cells, parse_spots, table

N_GENES, GENE_DIM, FEATURE_DIM, REGION = 250, 384, 1280, 5
SPOTS = (170, 175, 180, 185, 190)  # her2st-sized: 5 sections, 900 spots
QUICK_SPOTS = (36, 40, 44)
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------- inputs
def make_samples(spots: tuple[int, ...], *, n_genes: int = N_GENES, seed: int, device):
    """Per-section :class:`~dkan.train.data.SampleInputs` on square grids, plus gene embeddings ``(G, Dt)``."""
    import torch

    from dkan.train.data import SampleInputs

    g = torch.Generator().manual_seed(seed)
    samples, offset = [], 0
    for i, n in enumerate(spots):
        side = int(np.ceil(np.sqrt(n)))
        ij = torch.as_tensor(np.stack(np.unravel_index(np.arange(n), (side, side)), axis=1))
        d = torch.arange(-(REGION // 2), REGION // 2 + 1)
        rr = ij[:, None, None, 0] + d[None, :, None]
        cc = ij[:, None, None, 1] + d[None, None, :]
        mask = ((rr >= -1) & (rr <= side) & (cc >= -1) & (cc <= side)).reshape(n, -1)  # tiles off the image: invalid
        spot = torch.randn(n, FEATURE_DIM, generator=g)
        region = torch.randn(n, REGION * REGION, FEATURE_DIM, generator=g) * 0.5 + spot[:, None] * 0.5
        target = torch.log1p(torch.poisson(torch.rand(n, n_genes, generator=g) * 4, generator=g))
        samples.append(SampleInputs(f"s{i}", spot, region, mask, ij, target, crop_offset=offset).to(device))
        offset += n
    genes = torch.randn(n_genes, GENE_DIM, generator=g).to(device)
    return samples, genes


class PatchBank:
    """Random uint8 tiles (one per spot) on the device; ``read`` returns normalised random 224 px crops."""

    def __init__(self, n: int, *, device, seed: int, tile: int = 256, size: int = 224) -> None:
        import torch

        g = torch.Generator(device=device).manual_seed(seed)
        self.tiles = torch.randint(0, 256, (n, 3, tile, tile), dtype=torch.uint8, generator=g, device=device)
        self.size, self.rng = size, np.random.default_rng(seed)
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=device)[:, None, None]
        self.std = torch.tensor([0.229, 0.224, 0.225], device=device)[:, None, None]

    def read(self, rows: np.ndarray):
        import torch

        y, x = self.rng.integers(0, self.tiles.shape[-1] - self.size + 1, size=2)
        crop = self.tiles[torch.as_tensor(rows, device=self.tiles.device), :, y : y + self.size, x : x + self.size]
        return (crop.float() / 255 - self.mean) / self.std


# ---------------------------------------------------------------------------------------------------- strategies
def reference_loss(config) -> Callable:
    """The reference's ``compute_loss``: supervised + distillation, dense NT-Xent, adaptive weights."""
    from dkan.nn.losses import adaptive_weights, nt_xent_dense, supervised_loss

    def loss(out, target):
        sup = supervised_loss(out, target, distill=config.distill)
        con = nt_xent_dense(out["z_img"], out["z_exp"], temperature=config.temperature)
        w_sup, w_con = adaptive_weights(sup.detach(), con.detach(), contrastive_factor=config.contrastive_factor)
        return {"loss": w_sup * sup + w_con * con}

    return loss


def plan_ours(samples, batch_size: int, *, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """Batches of one section each (dkan's plan)."""
    from dkan.train.data import plan_batches

    return plan_batches([np.arange(len(s)) for s in samples], batch_size, seed=seed, epoch=epoch)


def plan_reference(samples, batch_size: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled global spot indices cut into batches (last batch kept, as ``DataLoader(shuffle=True)``)."""
    n = sum(len(s) for s in samples)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def ours_batch(module, samples, genes, item, bank):
    """dkan's batch: rows of one section; the module encodes that section's slide inside its forward."""
    import torch

    from dkan.train.data import batch_inputs

    s, rows = item
    sample = samples[s]
    patch = bank.read(rows + sample.crop_offset) if bank is not None else None
    batch = batch_inputs(sample, torch.as_tensor(rows, device=sample.spot.device), genes, patch=patch)
    return batch, 1, len(sample)


def reference_batch(module, samples, genes, global_rows, bank):
    """The reference's batch: spots of any sections; the slide encoder runs on every present section's full spot set
    and the rows of the batch spots are gathered."""
    import torch

    starts = np.cumsum([0] + [len(s) for s in samples])
    sid = np.searchsorted(starts, global_rows, side="right") - 1
    local = global_rows - starts[sid]
    tokens, offset, encoded = [], np.zeros(len(samples), dtype=np.int64), 0
    for p in np.unique(sid):
        offset[p] = encoded
        tokens.append(module.encode_slide(samples[p].spot, samples[p].grid))
        encoded += len(samples[p])
    device = samples[0].spot.device

    def gather(name: str):
        parts = [getattr(samples[p], name)[torch.as_tensor(local[sid == p], device=device)] for p in np.unique(sid)]
        order = np.argsort(np.argsort(sid, kind="stable"), kind="stable")  # back from grouped to batch order
        return torch.cat(parts)[torch.as_tensor(order, device=device)]

    batch = {
        "slide_tokens": torch.cat(tokens),
        "slide_index": torch.as_tensor(offset[sid] + local, device=device),
        "genes": genes,
        "region": gather("region"),
        "region_mask": gather("mask"),
        "target": gather("target"),
    }
    if bank is not None:
        batch["patch"] = bank.read(global_rows)
    else:
        batch["patch_tokens"] = gather("spot")[:, None, :]
    return batch, len(tokens), encoded


STRATEGIES = {"ours": (plan_ours, ours_batch), "reference": (plan_reference, reference_batch)}


# ---------------------------------------------------------------------------------------------------- worker
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(spec: dict) -> dict:
    """Train one strategy for ``warmup`` steps and ``epochs`` timed epochs; return timings and memory."""
    import torch

    from dkan._config import DKANConfig
    from dkan.nn.losses import DKANLoss
    from dkan.train.fitted import build_module
    from dkan.train.loop import _autocast, _step

    device = torch.device(spec["device"])
    extra = {} if spec.get("contrastive_genes") == "preset" else {"contrastive_genes": spec["contrastive_genes"]}
    if "amp" in spec:  # gpu_check.py: the same cell with mixed precision on or off
        extra["amp"] = bool(spec["amp"])
    cfg = DKANConfig.from_preset(spec["preset"], batch_size=spec["batch"], n_genes=spec["genes"], **extra)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    samples, genes = make_samples(tuple(spec["spots"]), n_genes=spec["genes"], seed=0, device=device)
    bank = PatchBank(sum(spec["spots"]), device=device, seed=1) if cfg.patch_trainable else None
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, n_genes=spec["genes"], gene_dim=GENE_DIM, feature_dim=FEATURE_DIM, pretrained=False)
    module.to(device).train()
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported()
    )
    loss_fn = DKANLoss.from_config(cfg) if spec["strategy"] == "ours" else reference_loss(cfg)
    plan, make_batch = STRATEGIES[spec["strategy"]]

    def step(item) -> tuple[int, int, int]:
        with _autocast(device, cfg.amp):
            batch, runs, encoded = make_batch(module, samples, genes, item, bank)
            loss = loss_fn(module(batch), batch["target"])
        scaler.scale(loss["loss"]).backward()
        _step(module, opt, scaler, cfg.grad_clip)
        return runs, encoded, len(batch["target"])

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    setup = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else _memory_gib(device)
    for item in plan(samples, cfg.batch_size, seed=cfg.seed, epoch=0)[: spec["warmup"]]:
        step(item)
    times, counts = [], None
    for epoch in range(1, spec["epochs"] + 1):
        items = plan(samples, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        done = items[: spec["max_steps"]] if spec["max_steps"] else items
        _sync(device)
        t0 = time.perf_counter()
        stats = np.array([step(item) for item in done])
        _sync(device)
        times.append((time.perf_counter() - t0) * len(items) / len(done))  # extrapolated when steps are capped
        counts = counts if counts is not None else (len(items), *(stats.sum(0) * len(items) / len(done)))
    n_steps, runs, encoded, spots = counts
    return {
        "times": times,
        "steps": int(n_steps),
        "mean_batch": spots / n_steps,
        "slide_runs": runs,
        "slide_spots": encoded,
        "peak_gib": _memory_gib(device),
        "setup_gib": setup,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "extrapolated": bool(spec["max_steps"]) and spec["max_steps"] < n_steps,
    }


# ---------------------------------------------------------------------------------------------------- driver
def mem_available_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def cpu_estimate_gib(preset: str, batch: int, strategy: str, n_genes: int = N_GENES) -> float:
    """Rough CPU peak: the dense similarity matrix (three fp32 copies alive in its backward) plus the activations."""
    width = 1024 if preset != "small" else 64
    layers = 7 if preset != "small" else 2
    acts = batch * n_genes * width * 4 * 16 * layers / 2**30
    dense = 3 * (batch * n_genes) ** 2 * 4 / 2**30 if strategy == "reference" else 0.0
    weights = 4.5 if preset != "small" else 0.0  # ~270 M parameters: weights, gradients, two Adam moments
    return 1.5 + weights + acts + dense


def run_cell(spec: dict, *, timeout: float) -> dict:
    """Run one worker in a fresh subprocess (CPU: under an RLIMIT_DATA so a blow-up fails instead of swapping)."""
    if spec["device"] == "cpu":
        need, avail = (
            cpu_estimate_gib(spec["preset"], spec["batch"], spec["strategy"], spec["genes"]),
            mem_available_gib(),
        )
        if need > 0.8 * avail:
            return {"error": f"skipped: needs ~{need:.0f} GiB, {avail:.0f} GiB available"}
        spec = {**spec, "rlimit_gib": 0.9 * avail}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"failed (rc {proc.returncode}): {tail[:160]}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cells", default=None, help="preset:batch[:epochs],... (default depends on the device)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per cell (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per cell")
    p.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch; s/epoch is then extrapolated")
    p.add_argument("--spots", default=None, help="spots per section, e.g. '600*30' or '170,180' (default her2st)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: torch's default)")
    p.add_argument("--her2st-cpu", action="store_true", help="allow the her2st preset on CPU")
    p.add_argument(
        "--quick", action="store_true", help="3 small sections, 64 genes, batch 32, one epoch, 1 thread (smoke test)"
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per cell")
    p.add_argument("--output", default=None, help="markdown file (default benchmarks/results/training_<device>.md)")
    p.add_argument(
        "--contrastive-genes", default="preset", help="genes per step in dkan's NT-Xent: N, 'all' or 'preset'"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        spec = json.loads(args.worker)
        if "rlimit_gib" in spec:
            limit = int(spec["rlimit_gib"] * 2**30)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        print(json.dumps({**spec, **worker(spec)}))
        return

    cuda = args.device.startswith("cuda")
    default = "small:32,small:128,her2st:128" if cuda else "small:32,small:128:1"
    cells = parse_cells(args.cells or ("small:32:1" if args.quick else default), args.epochs)
    if not cuda and any(c[0] != "small" for c in cells) and not args.her2st_cpu:
        raise ValueError("Presets other than `small` on CPU need `--her2st-cpu` (and probably `--max-steps`).")
    spots = QUICK_SPOTS if args.quick else parse_spots(args.spots) if args.spots else SPOTS
    warmup, n_genes = (1, 64) if args.quick else (args.warmup, N_GENES)
    if args.quick and not args.threads:
        args.threads = 1  # two threads on a shared 2-core box oversubscribe badly (3x slower under load)
    load0, started = os.getloadavg(), time.perf_counter()
    rows = []
    for preset, batch, epochs in cells:
        for strategy in ("ours", "reference"):
            spec = {
                "device": args.device,
                "preset": preset,
                "batch": batch,
                "strategy": strategy,
                "spots": spots,
                "genes": n_genes,
                "threads": args.threads,
                "epochs": epochs,
                "warmup": warmup,
                "max_steps": args.max_steps,
                "contrastive_genes": None  # the reference contrasts all genes (its dense loss needs them all)
                if strategy == "reference"
                else {"all": None, "preset": "preset"}.get(
                    args.contrastive_genes, int(args.contrastive_genes) if args.contrastive_genes.isdigit() else 0
                ),
            }
            t0 = time.perf_counter()
            rows.append({**spec, "result": run_cell(spec, timeout=args.timeout)})
            print(f"{preset} batch {batch} {strategy}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    import torch

    head = [
        f"## Training strategy benchmark ({datetime.date.today().isoformat()})",
        "",
        f"- device: {device_name(args.device, args.threads)}; torch {torch.__version__}; "
        f"Python {platform.python_version()}",
        f"- data: {len(spots)} sections, {sum(spots)} spots, {n_genes} genes, features {FEATURE_DIM}-d "
        f"(spot + {REGION}x{REGION} region), gene embeddings {GENE_DIM}-d; one epoch = all spots, no validation; "
        f"genes per step in dkan's NT-Xent: {args.contrastive_genes} (the reference contrasts all genes)",
        f"- load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
        + "/".join(f"{x:.2f}" for x in os.getloadavg())
        + f"; total wall time {time.perf_counter() - started:.0f} s",
        f"- command: `python benchmarks/training.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- warm-up steps {warmup}; s/epoch = median over the timed epochs (min-max)",
        "",
    ]
    text = "\n".join(head) + "\n" + table(rows, args.device) + "\n"
    print(text)
    if args.output or not args.quick:
        out = Path(args.output) if args.output else RESULTS / f"training_{'cuda' if cuda else 'cpu'}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
