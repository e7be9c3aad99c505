"""Evaluation of the reduced models: the lmms-eval plugin (`lmms_plugin`, loaded by lmms-eval through the
`lmms_eval.models` entry point below), the batched runner it uses (`batching`), loading with load-time
overrides (`loading`) and the accuracy-vs-tokens summary (`summary`). What they need to know about each method
comes from the method registry, `llava_token_reduction.methods`: nothing here names a method.

Only `lmms_plugin` imports lmms_eval; the rest works without it.
"""

PLUGIN_MODULE = "llava_token_reduction.evaluation.lmms_plugin"


def lmms_eval_manifests():
    """The `lmms_eval.models` entry point: one manifest for `llava_token_reduction` and one per method
    of the registry (`llava_visionzip`, `llava_trim`, `llava_prumerge`), each with a chat and a simple
    (`--force_simple`) class."""
    from lmms_eval.models.registry_v2 import ModelManifest  # lazily: this runs inside lmms_eval.models' import

    from ..methods import METHODS

    manifests = [ModelManifest(
        model_id="llava_token_reduction",
        chat_class_path=f"{PLUGIN_MODULE}.LlavaTokenReductionChat",
        simple_class_path=f"{PLUGIN_MODULE}.LlavaTokenReductionSimple",
    )]
    for method in METHODS.values():
        prefix = f"{PLUGIN_MODULE}.Llava{method.name.title()}"
        manifests.append(ModelManifest(
            model_id=f"llava_{method.name}", chat_class_path=f"{prefix}Chat", simple_class_path=f"{prefix}Simple",
        ))
    return manifests
