"""Which transformers class builds a model from its config: the class the config names in
`architectures` (so an encoder saved as `BertModel` comes back as `BertModel`, a task head
with its head), else a causal LM where the type has one, else the bare model class. Used by
every loader (io/load.py for sources, io/checkpoint.py for quantkit checkpoints).
"""
from __future__ import annotations

from ..errors import SourceError


def model_class(cfg: dict, where: str):
    """The transformers class that loads this config: a causal LM if it is one, else its own class."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise SourceError(f"{where}: unsupported model_type {model_type!r}; the model must be a transformers "
                          "causal LM (or encoder) architecture")
    archs = cfg.get("architectures") or []
    causal = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update(v if isinstance(v, (tuple, list)) else [v])
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (not archs or archs[0] in causal):
        return transformers.AutoModelForCausalLM
    if archs and isinstance(getattr(transformers, archs[0], None), type):
        return getattr(transformers, archs[0])
    if model_type in MODEL_MAPPING_NAMES:
        return transformers.AutoModel
    raise SourceError(f"{where}: model_type {model_type!r} has no model class in transformers; the model must be "
                      "a transformers causal LM (or encoder) architecture")
