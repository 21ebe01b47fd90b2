"""Tools: tiling, features, gene embeddings, training, prediction, evaluation."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "tile": "_tile",
        "make_spots": "_make_spots",
        "SpotCrops": "_crops",
        "BatchBySample": "_crops",
        "extract_features": "_features",
        "describe_genes": "_describe",
        "embed_genes": "_embed_genes",
        "train": "_train",
        "predict": "_predict",
        "predict_slides": "_slides",
        "evaluate": "_evaluate",
        "combine_folds": "_combine",
        "fit_mean": "_baselines",
        "fit_ridge": "_baselines",
        "cross_validate": "_cv",
        # objects the tools return (documented on the API page; not built by users)
        "EvalResult": "_evaluate",
        "CVResult": "_cv",
        "CVSummary": "_combine",
        "MeanPredictor": "_baselines",
        "RidgePredictor": "_baselines",
        "NCBIClient": "_ncbi",
        "LLMClient": "_llm",
    },
)
