"""Wall-clock timing of an exported model's PyTorch `generate()`: the baseline users would run."""
from __future__ import annotations

import time
from typing import Optional, Sequence


def torch_generate_timing(hf_dir: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int, *,
                          repeats: int = 3, threads: Optional[int] = None,
                          dtype: Optional[str] = None, model_class: str = 'auto') -> dict:
  """Times greedy `model.generate` of an HF directory.

  model_class: 'auto' loads the exported modeling file (trust_remote_code); 'llama' loads an R = 1
  export as transformers' own `LlamaForCausalLM`, the baseline a PLT should cost about as much as.

  prompt_ids: [batch][prompt_len] token ids (equal lengths; no padding). Exactly `new_tokens` are
  generated (eos does not stop early). Returns the median over `repeats` runs, after one warm-up:
    prefill_s            prompt forward + first token (generate with 1 new token)
    total_s              generate with `new_tokens` new tokens
    decode_s_per_token   (total_s - prefill_s) / (new_tokens - 1)
    tokens_per_s         batch * (new_tokens - 1) / (total_s - prefill_s)
  and the setup (batch, prompt_len, new_tokens, torch_threads, dtype, device).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  if model_class not in ('auto', 'llama'):
    raise ValueError(f"model_class must be 'auto' or 'llama', got {model_class!r}")
  if new_tokens < 2:
    raise ValueError('new_tokens must be >= 2 to separate prefill from decode')
  if threads is not None:
    torch.set_num_threads(int(threads))
  kwargs = {}
  if dtype is not None:
    kwargs['dtype'] = getattr(torch, dtype)
  if model_class == 'llama':
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, **kwargs).eval()
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, **kwargs).eval()
  ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64))
  if ids.ndim != 2:
    raise ValueError(f'prompt_ids must be [batch][prompt_len], got shape {tuple(ids.shape)}')
  mask = torch.ones_like(ids)

  def run(n):
    with torch.inference_mode():
      t0 = time.perf_counter()
      out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=model.generation_config.pad_token_id)
      dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n
    return dt

  run(2)  # warm-up
  prefill = float(np.median([run(1) for _ in range(repeats)]))
  total = float(np.median([run(new_tokens) for _ in range(repeats)]))
  decode = max(total - prefill, 1e-12)
  return {
      'prefill_s': prefill,
      'total_s': total,
      'decode_s_per_token': decode / (new_tokens - 1),
      'tokens_per_s': ids.shape[0] * (new_tokens - 1) / decode,
      'batch': int(ids.shape[0]),
      'prompt_len': int(ids.shape[1]),
      'new_tokens': int(new_tokens),
      'torch_threads': torch.get_num_threads(),
      'dtype': str(next(model.parameters()).dtype),
      'device': str(model.device),
      'model_class': type(model).__name__,
      'transformers': transformers.__version__,
  }
