"""Tools: tiling, features, gene embeddings, training, prediction, evaluation."""

from dkan._lazy import lazy_module

__getattr__, __dir__, __all__ = lazy_module(
    __name__,
    {
        "tile": "dkan._features.tile",
        "make_spots": "dkan._features.make_spots",
        "SpotCrops": "dkan._features.crops",
        "BatchBySample": "dkan._features.crops",
        "extract_features": "dkan._features.extract",
        "region_features": "dkan._features.region",
        "describe_genes": "dkan._genetext.describe",
        "embed_genes": "dkan._genetext.embed",
        "train": "_train",
        "predict": "_predict",
        "reliable_genes": "_trust",
        "predict_slides": "_slides",
        "evaluate": "dkan._evaluation.evaluate",
        "combine_folds": "dkan._evaluation.combine",
        "fit_mean": "dkan._evaluation.baselines",
        "fit_ridge": "dkan._evaluation.baselines",
        "cross_validate": "_cv",
        # objects the tools return (documented on the API page; not built by users)
        "EvalResult": "dkan._evaluation.evaluate",
        "CVResult": "_cv",
        "CVSummary": "dkan._evaluation.combine",
        "MeanPredictor": "dkan._evaluation.baselines",
        "RidgePredictor": "dkan._evaluation.baselines",
        "NCBIClient": "dkan._genetext.ncbi",
        "LLMClient": "dkan._genetext.llm",
        "SlideError": "_slide_errors",
    },
)
