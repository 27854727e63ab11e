import json

import pytest

from d2d.data import SPLITS, lm_windows, load_corpus
from d2d.errors import D2DError


def test_folder_of_class_folders_gives_labels(text_dir):
    c = load_corpus(text_dir)
    assert len(c.texts) == 60 and c.label_names == ["money", "sport"]
    assert sorted(set(c.labels)) == [0, 1]


def test_splits_are_disjoint_reproducible_and_cover_everything(text_dir):
    c = load_corpus(text_dir)
    parts = {s: c.split(s, seed=3).texts for s in SPLITS}
    assert sum(len(p) for p in parts.values()) == len(c.texts)
    assert not (set(parts["train"]) & set(parts["heldout"]))
    assert not (set(parts["calib"]) & set(parts["heldout"]))
    assert c.split("heldout", seed=3).texts == parts["heldout"]
    assert c.split("heldout", seed=4).texts != parts["heldout"]


def test_bundled_bbc_news_drops_exact_duplicates():
    c = load_corpus("bbc-news")
    assert len(c.texts) == 2225 - 98 and len(c.label_names) == 5


def test_jsonl_and_csv_tables(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        "\n".join(json.dumps({"text": f"doc {i} " * 5, "label": i % 2}) for i in range(10))
    )
    c = load_corpus(str(p))
    assert len(c.texts) == 10 and c.label_names == ["0", "1"]
    q = tmp_path / "d.csv"
    q.write_text("content,other\nhello world,1\nsecond doc,2\n")
    assert load_corpus(str(q)).texts == ["hello world", "second doc"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("d.jsonl", '{"text": "  "}\n{"text": ""}\n', "empty"),
        ("d.csv", "title,other\na,b\n", "no text column"),
        ("d.csv", "text\n", "could not read"),
    ],
)
def test_bad_tables_get_clear_errors(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(D2DError, match=match):
        load_corpus(str(p))


def test_missing_data_path():
    with pytest.raises(D2DError, match="does not exist"):
        load_corpus("/no/such/data")


def test_too_short_for_one_window(tmp_path, tokenizer):
    p = tmp_path / "a.txt"
    p.write_text("just a few words")
    with pytest.raises(D2DError, match="too short"):
        lm_windows(tokenizer, load_corpus(str(p)), 512, None)


def test_windows_shape(text_dir, tokenizer):
    w = lm_windows(tokenizer, load_corpus(text_dir), 32, 5)
    assert tuple(w.shape) == (5, 32)


def test_one_text_a_line_file_is_many_documents(tmp_path):
    """A .txt of tweets, one a line, is read as one document a line (it used to be one
    document, which every training stage refused)."""
    f = tmp_path / "tweets.txt"
    f.write_text("\n".join(f"tweet number {i} about the weather today" for i in range(4000)))
    c = load_corpus(str(f))
    assert len(c.texts) == 4000 and c.texts[7] == "tweet number 7 about the weather today"
    assert all(len(c.split(s).texts) > 300 for s in SPLITS)
    assert len(load_corpus(str(f), "file").texts) == 1


def test_a_book_is_read_by_paragraphs(tmp_path):
    paras = [
        "\n".join(f"line {j} of paragraph {i}, wrapped as books are" for j in range(4))
        for i in range(50)
    ]
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras) + "\n")
    c = load_corpus(str(f))
    assert len(c.texts) == 50 and c.texts[0].count("\n") == 3
    assert len(load_corpus(str(f), "line").texts) == 200
    assert len(load_corpus(str(f), "paragraph").texts) == 50


def test_doc_split_in_a_labelled_folder_keeps_labels(text_dir):
    assert len(load_corpus(text_dir).texts) == 60  # a folder of files: one document a file
    lines = load_corpus(text_dir, "line")
    assert lines.label_names == ["money", "sport"] and len(lines.labels) == len(lines.texts)


def test_bad_doc_split_is_refused():
    from d2d.stages import make_config

    with pytest.raises(D2DError, match="doc-split must be one of"):
        make_config("eval", {"doc_split": "sentences"})


def test_gguf_reader_bar_is_silenced_and_restored():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from d2d.models import _quiet_gguf_reader

    bar = gguf_utils.tqdm
    undo = _quiet_gguf_reader()
    assert gguf_utils.tqdm.keywords == {"disable": True}
    undo()
    assert gguf_utils.tqdm is bar


def test_bf16_only_where_the_hardware_runs_it(monkeypatch):
    """bf16 products without native support are ~200x slower than fp32 on a CPU: asked-for
    bf16 autocast is used only where AVX512-BF16 / AMX (or a bf16 GPU) is present."""
    import torch

    from d2d import device

    device.bf16_native.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not device.use_bf16(True, "cpu") and not device.use_bf16(False, "cpu")
    device.bf16_native.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert device.use_bf16(True, "cpu") and not device.use_bf16(False, "cpu")
    device.bf16_native.cache_clear()
