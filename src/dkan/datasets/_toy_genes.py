"""Short descriptions of the toy panel's genes, written for dkan (one factual sentence per gene).

They give the text branch something to read on the toy data, so the demo and the quick start run the method as
designed (gene text + image) without a network or a RefSeq table. For real data, pass RefSeq summaries or
``"ncbi"`` to ``descriptions=`` instead.
"""

from __future__ import annotations

_TEXT = {
    "FN1": "Fibronectin 1, an extracellular matrix glycoprotein that binds integrins and collagen and supports cell "
    "adhesion, migration and wound healing.",
    "ERBB2": "HER2, a receptor tyrosine kinase of the EGF receptor family that is amplified and overexpressed in a "
    "subset of breast cancers and targeted by trastuzumab.",
    "KRT5": "Keratin 5, a type II keratin of basal epithelial and myoepithelial cells in stratified and glandular "
    "epithelia.",
    "KRT14": "Keratin 14, a type I keratin that pairs with keratin 5 in basal keratinocytes and myoepithelial cells.",
    "KRT17": "Keratin 17, a type I keratin induced in basal and wounded epithelia and expressed in basal-like breast "
    "tumours.",
    "KRT8": "Keratin 8, a type II keratin of simple and luminal epithelia that pairs with keratin 18.",
    "KRT18": "Keratin 18, a type I keratin of simple epithelia that pairs with keratin 8 in luminal and glandular "
    "cells.",
    "KRT19": "Keratin 19, a type I keratin of luminal epithelial cells, widely used as an epithelial and carcinoma "
    "marker.",
    "EPCAM": "Epithelial cell adhesion molecule, a transmembrane glycoprotein highly expressed on epithelial cells "
    "and most carcinomas.",
    "CDH1": "E-cadherin, a calcium-dependent adhesion protein of epithelial adherens junctions whose loss marks "
    "lobular breast cancer and epithelial-mesenchymal transition.",
    "VIM": "Vimentin, an intermediate filament protein of mesenchymal cells such as fibroblasts, endothelial cells "
    "and leukocytes.",
    "COL1A1": "The alpha-1 chain of type I collagen, the main fibrillar collagen that fibroblasts deposit in stroma, "
    "skin and bone.",
    "COL1A2": "The alpha-2 chain of type I collagen, made by fibroblasts together with the alpha-1 chain.",
    "COL3A1": "The alpha-1 chain of type III collagen, a fibrillar collagen of extensible connective tissue such as "
    "vessel walls and tumour stroma.",
    "SPARC": "Osteonectin, a secreted matricellular glycoprotein that binds collagen and regulates matrix assembly "
    "and cell-matrix interactions, abundant in tumour stroma.",
    "ACTA2": "Smooth muscle alpha-actin, a contractile protein of vascular smooth muscle cells, myofibroblasts and "
    "myoepithelial cells.",
    "MYH11": "Smooth muscle myosin heavy chain, a marker of mature smooth muscle cells in vessel walls.",
    "PTPRC": "CD45, a receptor-type tyrosine phosphatase on all nucleated blood cells that tunes T- and B-cell "
    "receptor signalling.",
    "CD74": "The invariant chain that guides MHC class II molecules in antigen-presenting cells and also serves as "
    "a receptor for the cytokine MIF.",
    "CD3E": "The epsilon subunit of the CD3 complex that signals with the T-cell receptor, a pan-T-cell marker.",
    "CD8A": "The alpha chain of the CD8 co-receptor of cytotoxic T cells, which binds MHC class I.",
    "MS4A1": "CD20, a membrane protein of B cells and the target of rituximab.",
    "IGKC": "The constant region of the immunoglobulin kappa light chain, expressed at high levels by "
    "antibody-secreting plasma cells.",
    "IGHG1": "The constant region of the immunoglobulin gamma-1 heavy chain of IgG1 antibodies, made by plasma cells.",
    "JCHAIN": "The joining chain that links IgA and IgM monomers into polymers, expressed by plasma cells.",
    "LYZ": "Lysozyme, an antibacterial enzyme that breaks down bacterial cell walls, expressed by monocytes, "
    "macrophages and neutrophils.",
    "CD68": "A lysosomal glycoprotein highly expressed by macrophages and monocytes, used as a macrophage marker.",
    "C1QA": "The A chain of complement component C1q, which starts the classical complement pathway and is made by "
    "tissue macrophages.",
    "PECAM1": "CD31, an adhesion molecule at endothelial cell junctions (also on platelets and leukocytes), a marker "
    "of blood vessels.",
    "VWF": "Von Willebrand factor, a large multimeric glycoprotein of endothelial cells and megakaryocytes that "
    "makes platelets adhere at sites of vessel injury.",
    "MKI67": "Ki-67, a nuclear protein present in all active phases of the cell cycle, a marker of proliferating "
    "cells.",
    "TOP2A": "DNA topoisomerase II alpha, an enzyme that untangles DNA during replication and mitosis, expressed in "
    "proliferating cells and targeted by anthracyclines.",
    "ESR1": "Estrogen receptor alpha, a hormone-activated transcription factor that defines hormone "
    "receptor-positive breast cancer.",
    "PGR": "The progesterone receptor, a nuclear hormone receptor induced by estrogen signalling and used to classify "
    "breast cancer.",
    "GATA3": "A transcription factor that drives luminal differentiation of mammary epithelium and T-helper 2 cell "
    "development.",
    "TFF1": "Trefoil factor 1, a small secreted protein of the stomach lining that estrogen induces in breast "
    "cancer cells.",
    "SCGB2A2": "Mammaglobin-A, a small secreted protein made mainly by mammary epithelium and breast carcinomas.",
    "MGP": "Matrix Gla protein, a vitamin K-dependent extracellular protein that prevents calcification of soft "
    "tissue and arteries.",
    "DCN": "Decorin, a small leucine-rich proteoglycan of the stroma that binds collagen fibrils and dampens "
    "TGF-beta signalling.",
    "LUM": "Lumican, a small leucine-rich proteoglycan that spaces and organises collagen fibrils in connective "
    "tissue.",
    "POSTN": "Periostin, a secreted matrix protein of activated fibroblasts in tissue repair and fibrosis, rich in "
    "tumour stroma.",
    "SFRP2": "Secreted frizzled-related protein 2, a soluble modulator of Wnt signalling made by fibroblasts.",
    "AEBP1": "Adipocyte enhancer-binding protein 1, a fibroblast protein that promotes collagen fibre assembly.",
    "IGFBP7": "Insulin-like growth factor binding protein 7, a secreted protein abundant in vascular endothelium "
    "and stroma.",
    "S100A8": "Calgranulin A, a calcium-binding protein that pairs with S100A9 as calprotectin in neutrophils and "
    "monocytes during inflammation.",
    "S100A9": "Calgranulin B, a calcium-binding protein that forms calprotectin with S100A8, a marker of neutrophils "
    "and inflammation.",
    "HLA-DRA": "The alpha chain of the HLA-DR MHC class II molecule that presents peptides to CD4 T cells on "
    "antigen-presenting cells.",
    "B2M": "Beta-2-microglobulin, the light chain of MHC class I molecules, expressed by nearly all nucleated cells.",
    "TMSB10": "Thymosin beta-10, a small actin-sequestering protein that shapes the cytoskeleton and cell migration.",
    "MUCL1": "Mucin-like 1, a small secreted glycoprotein made mainly in breast and skin and often high in breast "
    "cancer.",
}


def toy_gene_descriptions() -> dict[str, str]:
    """Return one short description per gene that :func:`dkan.datasets.toy` can use, for ``descriptions=``.

    Written for dkan (one factual sentence each), so the toy data, the demo and the quick start give the text
    branch real gene text with no network access and no warning.

    Returns
    -------
    A new ``{symbol: text}`` dict covering every toy gene.

    Examples
    --------
    >>> import dkan
    >>> sdata = dkan.datasets.toy()
    >>> texts = dkan.datasets.toy_gene_descriptions()
    >>> model = dkan.tl.train(sdata, config="small", descriptions=texts)  # doctest: +SKIP
    """
    return dict(_TEXT)
