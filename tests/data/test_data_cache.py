"""A dataset built again from the same files and settings reuses the samples this process loaded (dataset.py's
docstring), and loads again when anything they depend on differs."""

import pytest

from lightning_moe.data import dataset as ds
from lightning_moe.data.dataset import LlavaDataset, clear_sample_cache
from lightning_moe.tokens import load_tokenizer
from tests.data.data_helpers import SHIPPED_TOKENIZER, record, write_image, write_jsonl


@pytest.fixture
def counted_loads(monkeypatch):
    """The number of records each built dataset parsed and tokenized (0: it reused loaded samples)."""
    clear_sample_cache()
    made = []
    original = LlavaDataset._make_sample

    def counting(self, *args, **kwargs):
        made.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlavaDataset, "_make_sample", counting)

    def build(*args, **kwargs) -> tuple[LlavaDataset, int]:
        before = len(made)
        dataset = LlavaDataset(*args, **kwargs)
        return dataset, len(made) - before

    yield build
    clear_sample_cache()


def _write(root, rows):
    write_image(root / "img.png")
    return write_jsonl(root / "d.jsonl", rows)


def test_same_files_and_settings_reuse_the_samples_and_copy_the_report(tmp_path, tokenizer, counted_loads):
    path = _write(tmp_path, [record("a"), record("b", answer="three"), "{not json"])
    first, parsed = counted_loads(path, tmp_path, tokenizer, skip_bad_records=True)
    assert parsed == 3
    second, parsed = counted_loads(path, tmp_path, tokenizer, skip_bad_records=True)
    assert parsed == 0
    assert [s.id for s in second.samples] == ["a", "b"] and second.samples[1] is first.samples[1]
    assert second.report.as_dict() == first.report.as_dict() == {**first.report.as_dict(), "kept": 2, "records": 3}
    assert [r.line for r in second.report.skipped_records] == [3]
    # each dataset owns its report and its list: changing one leaves the next one as loaded
    second.report.kept = 99
    second.samples.pop()
    third, parsed = counted_loads(path, tmp_path, tokenizer, skip_bad_records=True)
    assert parsed == 0 and third.report.kept == 2 and len(third.samples) == 2


@pytest.mark.parametrize("change", ["file contents", "max_length", "max_samples", "decode_media", "skip_bad_records",
                                    "chat template", "root"])
def test_anything_the_samples_depend_on_loads_them_again(tmp_path, tokenizer, counted_loads, change):
    rows = [record("a", question="How many shapes are there in the picture?"), record("b")]
    path = _write(tmp_path, rows)
    kwargs = dict(max_length=2048, max_samples=None, decode_media=True, skip_bad_records=False)
    original, parsed = counted_loads(path, tmp_path, tokenizer, **kwargs)
    assert parsed == 2
    used_tokenizer, root = tokenizer, tmp_path
    if change == "file contents":  # the same size, written at once: the modification time may not move
        write_jsonl(path, [record("c", question="How many shapes are there in the image?!"), record("b")])
    elif change == "max_length":
        kwargs["max_length"] = 14
    elif change == "max_samples":
        kwargs["max_samples"] = 1
    elif change in ("decode_media", "skip_bad_records"):
        kwargs[change] = not kwargs[change]
    elif change == "chat template":
        used_tokenizer = load_tokenizer(SHIPPED_TOKENIZER, chat_template=tokenizer.chat_template + " ")
    else:  # the same records under another root: other image files
        root = tmp_path / "copy"
        path = _write(root, rows)
    again, parsed = counted_loads(path, root, used_tokenizer, **kwargs)
    assert parsed > 0, change
    if change == "file contents":
        assert [s.id for s in again.samples] == ["c", "b"]
    if change == "max_length":
        assert max(len(s.input_ids) for s in again.samples) <= 14 < max(len(s.input_ids) for s in original.samples)


def test_a_subclass_can_refuse_reuse_and_the_cache_keeps_its_bound(tmp_path, tokenizer, counted_loads, monkeypatch):
    path = _write(tmp_path, [record("a"), record("b")])

    class AlwaysLoads(LlavaDataset):
        def sample_cache_key(self, tokenizer, max_samples):
            return None

    counted_loads(path, tmp_path, tokenizer)
    before = len(ds._LOADED)
    for _ in range(2):
        assert len(AlwaysLoads(path, tmp_path, tokenizer)) == 2
    assert len(ds._LOADED) == before
    # a corpus over the bound is not kept; the least recently used goes first when the total passes it
    monkeypatch.setattr(ds, "MAX_CACHED_SAMPLES", 1)
    assert [counted_loads(path, tmp_path, tokenizer, max_length=100)[1] for _ in range(2)] == [2, 2]
    clear_sample_cache()
    monkeypatch.setattr(ds, "MAX_CACHED_SAMPLES", 3)
    parsed = [counted_loads(path, tmp_path, tokenizer, max_length=n)[1] for n in (100, 200, 200, 100)]
    assert parsed == [2, 2, 0, 2]
