"""What `demo` adds when it runs the bundled toy (its default): the checkpoint, scene and question it uses, the
VisionZip budget that fits a toy image, and the lines printed after the timing table (the right answer and the
toy's held-out accuracy table). The toy itself is `toy/` (docs/toy_model.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


# The toy VisionZip checkpoint's budget: a toy image has 17 tokens (16 patches + CLS), fewer than the published
# default 54+10 that a TRIM checkpoint's VisionZip twin would otherwise get.
TOY_VISIONZIP_BUDGET = {"dominant_tokens": 13, "contextual_tokens": 3}


@dataclass(frozen=True)
class ToyDemo:
    checkpoint: Path  # the shipped TRIM checkpoint (VisionZip and PruMerge run on its weights)
    image: Path  # the bundled held-out scene
    question: str  # the question about it (`toy.ship.demo_question`)
    answer: str  # its right answer, from the scene's description
    accuracy_table: str  # assets/toy/accuracy.md: every setting on the 500 held-out questions

    @classmethod
    def bundled(cls) -> ToyDemo:
        from .toy import toy_checkpoint
        from .toy.ship import ACCURACY_FILE, SCENE_FILE, demo_question

        asked = demo_question()
        return cls(toy_checkpoint("trim"), toy_checkpoint(SCENE_FILE), asked.text, asked.answer,
                   toy_checkpoint(ACCURACY_FILE).read_text().strip())

    def overrides_for(self, chosen, given: dict) -> dict:
        """Settings the toy needs that the user did not give: VisionZip's budget (when it runs and neither
        `--dominant-tokens` nor `--contextual-tokens` was given)."""
        if any(entry.name == "visionzip" for entry in chosen) and not set(TOY_VISIONZIP_BUDGET) & set(given):
            return dict(TOY_VISIONZIP_BUDGET)
        return {}

    def epilogue(self, asked_bundled: bool) -> str:
        """The lines after the timing table: the right answer (for the bundled scene and question) and the
        held-out accuracy table."""
        lines = [""]
        if asked_bundled:
            lines.append(f"The right answer: {self.answer} (from the scene's description; one of the 500 held-out "
                         "questions, which the toy never saw in training).")
        lines += ["", "The toy's held-out accuracy (500 questions; greedy, exact match; `llava-token-reduction toy "
                      "eval` measures it again):", "", self.accuracy_table,
                  "", "This is a toy trained on synthetic shapes (docs/toy_model.md); `demo --random` times a "
                      "LLaVA-1.5-sized image (576 patches) with random weights instead."]
        return "\n".join(lines)
