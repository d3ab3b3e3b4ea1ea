"""Hugging Face / PyTorch interop: export a plt_jax model as an HF directory, and import one back.

  export_model(model, tokenizer, out_dir, dtype=..., max_shard_size=..., overwrite=...)
  export_workdir(workdir, out_dir, step=None, ...)        a training run's checkpoint
  load_hf_checkpoint(directory, mesh=None, dtype=...)     -> (PLT, Tokenizer | None)
  torch_generate_timing(hf_dir, prompt_ids, new_tokens)   the exported PyTorch model's generate()
  torch_generate_timings({name: (hf_dir, 'auto'|'llama')}, ...)   several of them, interleaved
Nothing here imports torch except the timing functions.
"""
from plt_jax.hf.convert import (expected_hf_shapes, hf_config_dict, jax_to_hf_name,
                                jax_to_hf_tensors, model_config_from_hf)
from plt_jax.hf.export import export_model, export_workdir
from plt_jax.hf.importer import (hf_tensors_to_state, load_hf_checkpoint, read_hf_config,
                                 save_as_workdir)
from plt_jax.hf.timing import torch_generate_timing, torch_generate_timings

__all__ = [
    'export_model', 'export_workdir', 'load_hf_checkpoint', 'torch_generate_timing',
    'torch_generate_timings',
    'expected_hf_shapes', 'hf_config_dict', 'jax_to_hf_name', 'jax_to_hf_tensors',
    'model_config_from_hf', 'hf_tensors_to_state', 'read_hf_config', 'save_as_workdir',
]
