"""Two CPU processes under DDP (gloo) train to the same weights as one process averaging the same batches."""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dkan._config import DKANConfig
from dkan.train.data import SampleInputs, split_validation
from dkan.train.fitted import build_module
from dkan.train.loop import fit

CFG = DKANConfig.resolve(
    "small",
    max_epochs=3,
    lr=1e-2,
    batch_size=16,
    **{f"{m}_dropout": 0.0 for m in ("fusion", "slide", "region", "img_cross", "exp_cross", "text")},
    dropout_expr=0.0,
    amp=False,
)


def _data():
    g = torch.Generator().manual_seed(0)
    samples = []
    for name in ("a", "b"):
        n = 40
        grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
        spot = torch.randn(n, 12, generator=g)
        samples.append(
            SampleInputs(
                name,
                spot,
                torch.randn(n, 25, 12, generator=g),
                torch.rand(n, 25, generator=g) > 0.2,
                grid,
                torch.randn(n, 6, generator=g),
            )
        )
    genes = torch.randn(6, 10, generator=g)
    return samples, genes


def _train(accumulate: int = 1):
    samples, genes = _data()
    train_rows, val_rows = split_validation([len(s) for s in samples], 0.1, seed=0)
    torch.manual_seed(CFG.seed)
    module = build_module(CFG, n_genes=6, gene_dim=10, feature_dim=12)
    fit(
        module,
        samples,
        train_rows,
        val_rows,
        genes,
        CFG,
        device=torch.device("cpu"),
        progress=False,
        accumulate=accumulate,
    )
    return module.state_dict()


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        state = _train()
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = _train(accumulate=2)
    for k in single:  # every rank holds identical weights
        np.testing.assert_array_equal(r0[k].numpy(), r1[k].numpy(), err_msg=k)
    # Same batches, averaged gradients: DDP differs from one process only by float summation order. Compare
    # predictions (weights with an exactly-zero true gradient, such as the query projection of the reference's
    # single-key gene attention, get Adam steps from rounding noise that do not change any output).
    p_ddp, p_one, p_init = _predict(r0), _predict(single), _predict(_initial())
    moved = float(np.abs(p_one - p_init).max())
    gap = float(np.abs(p_ddp - p_one).max())
    assert moved > 0.1
    print(f"DDP vs one process: max prediction gap {gap:.2e}, training moved predictions by {moved:.3f}")
    assert gap < 1e-3 * moved, (gap, moved)


def _predict(state):
    from dkan.train.loop import predict_rows

    samples, genes = _data()
    module = build_module(CFG, n_genes=6, gene_dim=10, feature_dim=12)
    module.load_state_dict(state)
    return np.concatenate(
        [predict_rows(module, s, np.arange(len(s)), genes, batch_size=64, device=torch.device("cpu")) for s in samples]
    )


def _initial():
    torch.manual_seed(CFG.seed)
    return build_module(CFG, n_genes=6, gene_dim=10, feature_dim=12).state_dict()
