"""transformers' own loading of the embedded GGUF: the independent reference the runner and
the GGUF source are checked against (shared by test_runner.py and test_sources.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def transformers_gguf_model(path: Path):
    """from_pretrained needs `accelerate` for GGUF; without it the same transformers code
    (load_gguf_checkpoint) fills a model built from the GGUF config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()
