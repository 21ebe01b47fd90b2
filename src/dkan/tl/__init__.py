"""Tools: tiling, features, gene embeddings, training, prediction, evaluation."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "tile": "_tiling.tile",
        "make_spots": "_tiling.make_spots",
        "SpotCrops": "_tiling.crops",
        "BatchBySample": "_tiling.crops",
        "extract_features": "_features",
        "region_features": "_region",
        "describe_genes": "_genes.describe",
        "embed_genes": "_genes.embed",
        "train": "_train",
        "predict": "_predict",
        "reliable_genes": "_trust",
        "predict_slides": "_slides",
        "evaluate": "_evaluation.evaluate",
        "combine_folds": "_evaluation.combine",
        "fit_mean": "_evaluation.baselines",
        "fit_ridge": "_evaluation.baselines",
        "cross_validate": "_evaluation.cv",
        # objects the tools return (documented on the API page; not built by users)
        "EvalResult": "_evaluation.evaluate",
        "CVResult": "_evaluation.cv",
        "CVSummary": "_evaluation.combine",
        "MeanPredictor": "_evaluation.baselines",
        "RidgePredictor": "_evaluation.baselines",
        "NCBIClient": "_genes.ncbi",
        "LLMClient": "_genes.llm",
        "SlideError": "_slide_errors",
    },
)
