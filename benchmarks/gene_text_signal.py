"""Do the gene texts carry information about her2st expression? A check of DKAN's premise, without training.

DKAN's gene queries are the text embeddings of gene descriptions; they can only help if genes that read alike
behave alike. On the panel, targets and text embeddings of ``accuracy_her2st.py`` (read from its ``--cache`` h5ad;
the descriptions are rebuilt from the offline RefSeq files and embedded with the chosen text encoder) this prints:

1. how alike the embeddings are (cosine similarity between genes);
2. whether the embedding predicts a gene's mean and spread of expression: ridge from embedding to the statistic,
   R² by 5-fold cross-validation over genes, against the same fit with the embeddings shuffled across genes;
3. whether genes with similar texts are co-expressed: Spearman correlation, over all gene pairs, of the text cosine
   similarity and the Pearson correlation of the two genes across spots, with a permutation (Mantel) test.

Nothing here feeds back into the model or the presets.

Usage::

    python benchmarks/accuracy_her2st.py --preset small --cache /tmp/her2st_small.h5ad   # writes the cache
    python benchmarks/gene_text_signal.py --cache /tmp/her2st_small.h5ad [--text-encoder minilm]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_her2st import DEFAULT_DATA, load_prepared, machine

N_SHUFFLES = 200


def cv_r2(x: np.ndarray, y: np.ndarray, *, seed: int) -> float:
    """R² of ridge (alpha chosen by leave-one-out inside each training split) by 5-fold CV over genes."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    model = RidgeCV(alphas=np.logspace(-3, 3, 13))
    pred = cross_val_predict(model, x, y, cv=KFold(5, shuffle=True, random_state=seed))
    return float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def statistic_rows(emb: np.ndarray, stats: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    rows = []
    for name, y in stats.items():
        real = cv_r2(emb, y, seed=0)
        null = np.array([cv_r2(emb[rng.permutation(len(emb))], y, seed=0) for _ in range(N_SHUFFLES)])
        p = (1 + np.sum(null >= real)) / (1 + len(null))
        rows.append(f"| {name} | {real:.3f} | {np.mean(null):.3f} (95th pct {np.quantile(null, 0.95):.3f}) | {p:.3f} |")
    return rows


def mantel(text_sim: np.ndarray, expr_corr: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """Spearman r between the upper triangles of two gene x gene matrices, and its permutation p-value."""
    from scipy.stats import rankdata

    iu = np.triu_indices_from(text_sim, k=1)
    a = rankdata(text_sim[iu])

    def corr(m: np.ndarray) -> float:
        return float(np.corrcoef(a, rankdata(m[iu]))[0, 1])

    real = corr(expr_corr)
    null = []
    for _ in range(N_SHUFFLES):
        perm = rng.permutation(len(expr_corr))
        null.append(corr(expr_corr[np.ix_(perm, perm)]))
    return real, (1 + np.sum(np.abs(null) >= abs(real))) / (1 + len(null))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True, help="h5ad written by accuracy_her2st.py --cache")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--text-encoder", default="minilm")
    args = p.parse_args(argv)

    from dkan import _keys as K
    from dkan._data.prepare import gene_embeddings

    sdata, key, table, desc, genes = load_prepared(args.data, args.cache, 250)
    y = np.asarray(table[:, genes].layers[K.TARGET], dtype=np.float64)
    emb, _ = gene_embeddings(sdata, genes, table_key=key, text_encoder=args.text_encoder, descriptions=desc)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    off = sim[np.triu_indices_from(sim, k=1)]
    rng = np.random.default_rng(0)
    expr_corr = np.corrcoef(y.T)
    r, p_mantel = mantel(sim, expr_corr, rng)

    print(f"# Gene texts vs her2st expression ({args.text_encoder}, {len(genes)} genes, {len(y)} spots)\n")
    print("Machine: " + "; ".join(f"{k}: {v}" for k, v in machine().items()) + "\n")
    print(
        f"Cosine similarity between the genes' text embeddings: mean {off.mean():.3f}, "
        f"5th-95th percentile {np.quantile(off, 0.05):.3f}-{np.quantile(off, 0.95):.3f}.\n"
    )
    print("| predicted from the text embedding | CV R² | shuffled texts: mean R² | p (shuffles) |")
    print("|---|---|---|---|")
    stats = {"mean expression of the gene": y.mean(0), "std of the gene across spots": y.std(0)}
    print("\n".join(statistic_rows(emb, stats, rng)))
    print(
        f"\nText similarity vs co-expression over {len(off)} gene pairs: Spearman r = {r:.3f} "
        f"(permutation p = {p_mantel:.3f}, {N_SHUFFLES} shuffles)."
    )


if __name__ == "__main__":
    main()
