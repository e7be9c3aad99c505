"""Model cards: metadata, content, published numbers, and the usage snippets, run as written (repository id
and image URL swapped for a local converted checkpoint and image) in a clean process with `HF_HUB_OFFLINE=1`
where `llava_token_reduction` cannot be imported."""

import json
import textwrap

import numpy as np
import pytest
from huggingface_hub import ModelCard
from PIL import Image

from conversion_inputs import save_clip, save_stock, vision_state_of
from llava_token_reduction import LlavaTrimConfig, LlavaVisionZipConfig
from llava_token_reduction.conversion import convert_trim, convert_visionzip, extract_python_snippets, render_model_card
from llava_token_reduction.conversion.model_card import EXAMPLE_IMAGE_URL
from llava_token_reduction.tiny import TinyShape, llava_config_kwargs, method_config_kwargs


# LLaVA-1.5's 336 px / patch 14 geometry (576 patches), so the published budgets are valid; tiny widths.
CARD_SHAPE = TinyShape(image_size=336, patch_size=14, vision_hidden=32, vision_layers=3, vision_heads=4,
                       projection_dim=16, text_hidden=32, text_layers=2, text_heads=4, text_kv_heads=2)


def _visionzip_config(**kw):
    return LlavaVisionZipConfig(**llava_config_kwargs(CARD_SHAPE), **kw)


def _trim_config(**kw):
    return LlavaTrimConfig(**method_config_kwargs("trim", CARD_SHAPE), **kw)


@pytest.mark.parametrize("make", [_visionzip_config, _trim_config])
def test_metadata(make):
    card = render_model_card(make(), repo_id="acme/model", base_models=["llava-hf/llava-1.5-7b-hf"], license="llama2")
    data = ModelCard(card).data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "llama2" and data["base_model"] == ["llava-hf/llava-1.5-7b-hf"]
    assert {"llava", "visual-token-reduction", "custom_code"} <= set(data["tags"])
    assert "$" not in card  # every placeholder filled
    snippets = extract_python_snippets(card)
    assert any("AutoModelForImageTextToText" in s and "AutoProcessor" in s and ".generate(" in s for s in snippets)
    assert any('pipeline("image-text-to-text"' in s for s in snippets)
    assert all("trust_remote_code=True" in s for s in snippets)


def test_metadata_without_base_model_is_valid_yaml():
    card = render_model_card(_visionzip_config(), repo_id="acme/model")
    data = ModelCard(card).data.to_dict()
    assert "base_model" not in data and data["license"] == "other"


def test_visionzip_card_budget_and_published_numbers():
    card = render_model_card(_visionzip_config(dominant_tokens=108, contextual_tokens=20), repo_id="acme/vz128")
    assert "| 108 | 20 | 128 | 576 |" in card
    assert 'rows "VisionZip 128"' in card
    # Rows of docs/visionzip.md §7, with their source.
    assert "| VisionZip 128 | 57.6 | 62.0 | 1761.7 | 83.2 | 68.9 | 75.6 | 56.8 | 37.9 | 54.9 | 32.6 | 97.6% |" in card
    assert "| vanilla 576 | 61.9 | 64.7 | 1862 | 85.9 | 69.5 | 78.5 | 58.2 | 36.3 | 58.6 | 31.1 | 100% |" in card
    assert "arXiv 2412.04467" in card
    other = render_model_card(_visionzip_config(dominant_tokens=40, contextual_tokens=8), repo_id="acme/vz48")
    assert "not among the published budgets" in other


def test_trim_card_numbers_and_training_note():
    trained = render_model_card(_trim_config(), repo_id="acme/trim", source_is_trim_trained=True)
    assert "79% fewer" in trained and "67% less processing time" in trained and "30% less memory" in trained
    published_row = ("| LLaVA-1.5-7B | 78.5 | 62.0 | 50.0 | 66.8 | 58.2 | 85.9 | 1510.7 | 64.3 | 58.3 | 58.6 | 65.4 | "
                     "31.1 |")
    assert published_row in trained
    assert "95.2%" in trained and "arXiv 2409.10994" in trained
    assert "not trained with TRIM" not in trained
    untrained = render_model_card(_trim_config(trim_max_tokens=100), repo_id="acme/trim")
    assert "not trained with TRIM" in untrained and "at most 100" in untrained


def test_unknown_model_type_is_refused():
    from transformers import LlavaConfig

    with pytest.raises(ValueError, match="no model card template"):
        render_model_card(LlavaConfig(), repo_id="acme/x")


# Running the snippets ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def card_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    model = save_stock(root / "stock", CARD_SHAPE)
    save_clip(root / "clip", vision_state_of(model), CARD_SHAPE)
    convert_visionzip(root / "stock", root / "visionzip", repo_id="acme/tiny-visionzip", progress=False)
    convert_trim(root / "stock", root / "trim", clip=str(root / "clip"), repo_id="acme/tiny-trim", progress=False)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 120, 3)) * 255).astype("uint8")).save(root / "cats.png")
    return root


_RUNNER = """
import json
snippets = json.load(open("snippets.json"))
for index, source in enumerate(snippets):
    print(f"--- snippet {{index}}", flush=True)
    exec(compile(source, f"snippet_{{index}}", "exec"), {{"__name__": "__main__"}})
print("ALL SNIPPETS RAN")
"""


@pytest.mark.parametrize("method, repo_id", [("visionzip", "acme/tiny-visionzip"), ("trim", "acme/tiny-trim")])
def test_card_snippets_run(card_checkpoints, run_isolated_python, tmp_path, method, repo_id):
    checkpoint = card_checkpoints / method
    card = (checkpoint / "README.md").read_text()
    snippets = extract_python_snippets(card)
    assert len(snippets) >= 2
    local = []
    for snippet in snippets:
        assert repo_id in snippet and EXAMPLE_IMAGE_URL in snippet
        local.append(snippet.replace(repo_id, str(checkpoint))
                     .replace(EXAMPLE_IMAGE_URL, str(card_checkpoints / "cats.png")))
    (tmp_path / "snippets.json").write_text(json.dumps(local))
    result = run_isolated_python(textwrap.dedent(_RUNNER.format()), tmp_path, timeout=300)
    assert "ALL SNIPPETS RAN" in result.stdout
    assert result.stdout.count("--- snippet") == len(snippets)


def test_shipped_text_cites_specifications_that_exist():
    """Code, converter messages and model cards cite docs/visionzip.md and docs/trim.md (in the repository),
    never a file the repository does not have; every `docs/<name>.md §N` names an existing section."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shipped = [p for folder in ("modeling", "configuration", "conversion", "llava_token_reduction", "model_cards")
               for p in (root / folder).rglob("*") if p.suffix in (".py", ".md")]
    assert len(shipped) > 20
    citations = []
    for path in shipped:
        text = path.read_text(encoding="utf-8")
        assert "ALGORITHMS.md" not in text, path
        citations += [(path, *m) for m in re.findall(r"docs/(\w+)\.md §(\d+)(?:-§(\d+))?", text)]
    assert {name for _, name, _, _ in citations} >= {"visionzip", "trim"}
    for path, name, first, last in citations:
        doc = (root / "docs" / f"{name}.md").read_text(encoding="utf-8")
        for section in filter(None, (first, last)):
            assert re.search(rf"^## {section}\. ", doc, flags=re.MULTILINE), (path, name, section)
    for name in ("visionzip", "trim"):
        card = (root / "model_cards" / f"{name}.md").read_text(encoding="utf-8")
        assert f"docs/{name}.md" in card
