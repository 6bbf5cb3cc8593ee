"""The report's token maps and ViT overlays: stored in the run, drawn from the store alone."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bbdecoder import AttentionRollout, GradientRollout
from bbdecoder.report import build_report
from bbdecoder.report.overlays import store_overlays
from bbdecoder.report.section_tokens import TOKENS_KIND, store_token_maps, token_table
from bbdecoder.store import open_run
from bbdecoder.store.writer import RunWriter
from tests.test_rollout_mha import MHAViT


def test_token_maps_round_trip_into_the_report_escaped(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    tokens = [["the", "<script>alert(1)</script>", "film"], ["[CLS]", "good", "##ness", "[SEP]"]]
    scores = {
        "IG": torch.tensor([[0.1, -0.5, 2.0, 9.9], [0.0, 1.0, 0.5, -0.25]]),  # 9.9: past the first's end
        "Grad": np.array([[1.0, 1.0, 1.0, 0.0], [0.3, 0.2, 0.1, 0.0]]),
    }
    store_token_maps(writer, "maps", tokens, scores, titles=["one", "two"], caption="two sentences")
    writer.close()
    run = open_run(tmp_path)
    record = run.blobs(kind=TOKENS_KIND).iloc[0]
    array = run.array(int(record.blob_id))
    assert array.shape == (2, 2, 4)
    np.testing.assert_allclose(array[0, 0], [0.1, -0.5, 2.0, 0.0])  # the entry past the sentence is dropped
    assert record.meta["tokens"] == tokens and record.meta["methods"] == ["IG", "Grad"]
    run.close()
    page = build_report(tmp_path).read_text()
    assert "Token attributions" in page and "two sentences" in page
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # WordPiece pieces are joined: "goodness" with the summed score 1.5
    assert re.search(r'title="\+1\.5">goodness</span>', page)
    assert page.count('class="bbd-tokens"') == 4


def test_bad_token_maps_are_refused(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    with pytest.raises(ValueError, match="at least one"):
        store_token_maps(writer, "x", [["a"]], {})
    with pytest.raises(ValueError, match="cover 1 sentences"):
        store_token_maps(writer, "x", [["a"], ["b"]], {"m": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="only 1"):
        store_token_maps(writer, "x", [["a", "b"]], {"m": torch.zeros(1, 1)})
    writer.close()
    with pytest.raises(ValueError, match="does not match"):
        token_table(np.zeros((1, 2, 3)), {"methods": ["m"], "tokens": [["a"]]})


def test_vit_rollout_overlays_in_the_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MHAViT().eval()
    images = torch.rand(2, 3, 16, 16)
    maps = {"attention rollout": AttentionRollout(model).attribute(images)}  # (2, 1, 4, 4) patch grids
    maps["gradient rollout"] = GradientRollout(model).attribute(images, 1)
    writer = RunWriter(tmp_path)
    store_overlays(writer, "vit overlays", images, maps, caption="rollout on a toy ViT")
    with pytest.raises(ValueError, match=r"\(N, 1, h, w\)"):
        store_overlays(writer, "bad", images, {"x": torch.zeros(2, 4, 4)})
    writer.close()
    run = open_run(tmp_path)
    names = list(run.blobs(kind="saliency").name)
    assert names == ["vit overlays: attention rollout", "vit overlays: gradient rollout"]
    stored = run.array(int(run.blobs(kind="saliency").iloc[0].blob_id))
    np.testing.assert_allclose(stored, maps["attention rollout"].numpy())
    run.close()
    page = build_report(tmp_path).read_text()
    section = page[page.index("Saliency maps") :]
    assert "rollout on a toy ViT" in section and "data:image/png;base64," in section
