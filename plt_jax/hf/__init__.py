"""Hugging Face / PyTorch interop: export a plt_jax model as an HF directory, and import one back.

  export_model(model, tokenizer, out_dir, dtype=..., max_shard_size=..., overwrite=...)
  export_workdir(workdir, out_dir, step=None, ...)        a training run's checkpoint
  load_hf_checkpoint(directory, mesh=None, dtype=...)     -> (PLT, Tokenizer | None)
  adopt (experiments.adopt_release)                      the LoopCoder-V2 release layout, as is
Nothing here imports torch at import time. The PyTorch timing of exported models is a benchmark:
experiments/bench/torch_timing.py.
"""
from plt_jax.hf.convert import (expected_hf_shapes, hf_config_dict, jax_to_hf_name,
                                jax_to_hf_tensors, model_config_from_hf)
from plt_jax.hf.export import export_model, export_workdir
from plt_jax.hf.importer import (hf_tensors_to_state, load_hf_checkpoint, read_hf_config,
                                 save_as_workdir)

__all__ = [
    'export_model', 'export_workdir', 'load_hf_checkpoint',
    'expected_hf_shapes', 'hf_config_dict', 'jax_to_hf_name', 'jax_to_hf_tensors',
    'model_config_from_hf', 'hf_tensors_to_state', 'read_hf_config', 'save_as_workdir',
]
