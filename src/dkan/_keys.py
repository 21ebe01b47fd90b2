"""Every storage key dkan reads or writes, in one place.

No other module spells these strings; import them from here.
"""

from __future__ import annotations

# --- table.var / layers / varm / obsm -------------------------------------------------------------
PANEL = "dkan_panel"  #: ``var`` flag of the genes in the model panel
TARGET = "dkan_target"  #: ``layers`` key of the normalised training target
PRED = "dkan_pred"  #: ``layers`` key of predictions
STD_SUFFIX = "_std"  #: ``layers`` key ``f"{pred_key}{suffix}"`` of the per-spot standard deviation of a prediction
GENE_EMBEDDING = "dkan_gene_embedding"  #: ``varm`` key of gene-semantic embeddings
SPOT_FEATURES = "dkan_spot_features"  #: ``obsm`` key of frozen spot (patch) features, (n, d)
SPOT_COLOUR = "dkan_spot_colour"  #: ``obsm`` key of each spot patch's mean optical density per R, G, B channel, (n, 3)
REGION_FEATURES = "dkan_region_features"  #: ``obsm`` key of frozen region features, (n, 25, d) (spot by spot)
REGION_MASK = "dkan_region_mask"  #: ``obsm`` key of the region validity mask, (n, 25) bool
REGION_TILES = "dkan_region_tiles"  #: ``uns`` key of shared-tile region features, (n_tiles, d) float32
REGION_INDEX = "dkan_region_index"  #: ``obsm`` key of each region tile's row in them, (n, 25) int32, -1 = none
SPOT_PX = "dkan_spot_px"  #: ``obsm`` key of spot centres (x, y) in pixels of the tiled pyramid level
GRID = "dkan_grid"  #: ``obsm`` key of integer spot-grid positions (row, col) for the slide encoder

# --- table.obs --------------------------------------------------------------------------------------
SAMPLE = "sample"  #: ``obs`` column: sample (section) name
PATIENT = "patient"  #: ``obs`` column: patient / donor
ARRAY_ROW = "array_row"  #: ``obs`` column: spot-grid row (legacy ST: y; Visium: array_row)
ARRAY_COL = "array_col"  #: ``obs`` column: spot-grid column (legacy ST: x; Visium: array_col)
LIBRARY_ID = "library_id"  #: ``obs`` column: the ``uns["spatial"]`` library of each row (scanpy / squidpy plots)
REGION = "region"  #: default region_key for tables dkan creates
INSTANCE = "spot_id"  #: default instance_key for tables dkan creates

# --- table.uns ---------------------------------------------------------------------------------------
UNS = "dkan"  #: ``uns`` entry holding run parameters, one sub-dict per step
UNS_PANEL = "panel"
UNS_NORMALIZE = "normalize"
UNS_TILE = "tile"
UNS_FEATURES = "features"
UNS_GENE_EMBEDDING = "gene_embedding"
UNS_PREDICT = "predict"
UNS_READER = "reader"  #: per-sample reader metadata (um per pixel, spot pitch)
UNS_SOURCE = "source"  #: the slide file a prediction store was made from (``dkan predict SLIDE``)
UNS_SPATIAL = "spatial"  #: scverse ``uns`` entry: per library ``images`` and ``scalefactors`` (results tables)
UNS_RESULTS_OF = "results_of"  #: marker of a results table: the name of the count table whose spots it annotates

# --- element names that dkan creates ---------------------------------------------------------------
PSEUDO_SPOTS_SUFFIX = "_dkan_spots"  #: shapes element of pseudo-spots: ``f"{image_key}{suffix}"``
RESULTS_SUFFIX = "_dkan"  #: panel-sized results table of count table ``t``: ``f"{t}{suffix}"`` (see dkan._results)
IMAGE_SUFFIX = "_image"  #: readers name images ``f"{sample}{suffix}"``
SPOTS_SUFFIX = "_spots"  #: readers name spot circles ``f"{sample}{suffix}"``
TABLE = "table"  #: default table name written by readers
MICRONS_SUFFIX = "_um"  #: coordinate system ``f"{sample}{suffix}"`` in µm; its scale records a slide's µm/px

# --- tiling / pseudo-spots (dkan.tl.tile, dkan.tl.make_spots) ------------------------------------------
SPATIAL = "spatial"  #: ``obsm`` key of spot centres in pixels (scverse convention), written by make_spots

# --- trust signals (dkan.tl.predict with a calibrated model; see docs/method.md "Can I trust this map?") ---
LOWER_SUFFIX = "_lower"  #: ``layers`` key ``f"{pred_key}{suffix}"`` of the lower end of a prediction interval
UPPER_SUFFIX = "_upper"  #: ``layers`` key ``f"{pred_key}{suffix}"`` of the upper end of a prediction interval
VAL_PCC = "dkan_val_pcc"  #: ``var`` column: the model's per-gene Pearson r on its validation data
NOVELTY = "dkan_novelty"  #: ``obs`` column: novelty of a spot's frozen features against the training spots
COLOUR_NOVELTY = "dkan_colour_novelty"  #: ``obs`` column: colour distance to the training spots over its threshold
NOVEL = "dkan_novel"  #: ``obs`` column: the feature or the colour novelty is above the model's threshold (bool)
UNS_TRUST = "trust"  #: ``model.meta`` entry of the trust signals' settings
