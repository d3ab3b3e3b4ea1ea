"""Wall-clock timing of PyTorch `generate()` on HF directories: the baselines users would run."""
from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence


def torch_generate_timings(models: Mapping[str, tuple[str, str]],
                           prompt_ids: Sequence[Sequence[int]], new_tokens: int, *,
                           repeats: int = 3, threads: Optional[int] = None,
                           dtype: Optional[str] = None,
                           count_ops: bool = False) -> dict[str, dict]:
  """Times greedy `model.generate` of several HF directories, interleaved.

  models: name -> (hf_dir, model_class). model_class 'auto' loads the exported modeling file
  (trust_remote_code); 'llama' loads an R = 1 export as transformers' own `LlamaForCausalLM`, the
  baseline a PLT should cost about as much as. Every repeat runs each model in turn, so load from
  other processes hits them alike.
  prompt_ids: [batch][prompt_len] token ids (equal lengths; no padding). Exactly `new_tokens` are
  generated (eos does not stop early). Returns, per name, the medians over `repeats` after one
  warm-up:
    prefill_s            prompt forward + first token (generate with 1 new token)
    total_s              generate with `new_tokens` new tokens
    decode_s_per_token   (total_s - prefill_s) / (new_tokens - 1)
    tokens_per_s         batch * (new_tokens - 1) / (total_s - prefill_s)
  and the setup (batch, prompt_len, new_tokens, torch_threads, dtype, device, model_class).
  count_ops: also decode_step_ops / decode_step_ops_total, the torch ops of one decode step
  (`decode_step_ops`, counted with the torch profiler after the timings).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  if new_tokens < 2:
    raise ValueError('new_tokens must be >= 2 to separate prefill from decode')
  for name, (_, model_class) in models.items():
    if model_class not in ('auto', 'llama'):
      raise ValueError(f"{name}: model_class must be 'auto' or 'llama', got {model_class!r}")
  if threads is not None:
    torch.set_num_threads(int(threads))
  ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64))
  if ids.ndim != 2:
    raise ValueError(f'prompt_ids must be [batch][prompt_len], got shape {tuple(ids.shape)}')
  mask = torch.ones_like(ids)
  kwargs = {} if dtype is None else {'dtype': getattr(torch, dtype)}
  loaded = {}
  for name, (hf_dir, model_class) in models.items():
    if model_class == 'llama':
      loaded[name] = transformers.LlamaForCausalLM.from_pretrained(hf_dir, **kwargs).eval()
    else:
      loaded[name] = transformers.AutoModelForCausalLM.from_pretrained(
          hf_dir, trust_remote_code=True, **kwargs).eval()

  def run(model, n):
    with torch.inference_mode():
      t0 = time.perf_counter()
      out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=model.generation_config.pad_token_id)
      dt = time.perf_counter() - t0
    if out.shape[1] != ids.shape[1] + n:
      raise RuntimeError(f'generate returned {out.shape[1] - ids.shape[1]} tokens, asked for {n}')
    return dt

  times = {name: {'prefill': [], 'total': []} for name in loaded}
  for model in loaded.values():
    run(model, 2)  # warm-up
  for _ in range(repeats):
    for name, model in loaded.items():
      times[name]['prefill'].append(run(model, 1))
      times[name]['total'].append(run(model, new_tokens))
  results = {}
  for name, model in loaded.items():
    prefill = float(np.median(times[name]['prefill']))
    total = float(np.median(times[name]['total']))
    decode = max(total - prefill, 1e-12)
    results[name] = {
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
    if count_ops:
      ops = decode_step_ops(model, ids)
      results[name].update(decode_step_ops=ops['top_level'], decode_step_ops_total=ops['total'])
  return results


def torch_generate_timing(hf_dir: str, prompt_ids: Sequence[Sequence[int]], new_tokens: int, *,
                          repeats: int = 3, threads: Optional[int] = None,
                          dtype: Optional[str] = None, model_class: str = 'auto') -> dict:
  """`torch_generate_timings` of one directory."""
  return torch_generate_timings({'model': (hf_dir, model_class)}, prompt_ids, new_tokens,
                                repeats=repeats, threads=threads, dtype=dtype)['model']


def decode_step_ops(model, prompt_ids) -> dict:
  """Torch ops one greedy decode step issues, counted with the torch profiler.

  The step is what `generate` runs per token: the forward of one new token against the cache of
  `prompt_ids` ([batch, prompt_len], no padding; all-ones mask, the next position) and the argmax.
  Returns top_level (aten ops called from Python: each one pays the dispatch and, with several
  threads, a thread-pool barrier) and total (those plus the aten ops they call).
  """
  import torch  # pylint: disable=g-import-not-at-top

  ids = torch.as_tensor(prompt_ids, dtype=torch.long)
  with torch.inference_mode():
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    field = 'cache' if 'cache' in type(out).__dataclass_fields__ else 'past_key_values'
    cache, tok = getattr(out, field), out.logits[:, -1:].argmax(-1)

    def step(cache, tok):
      n = cache.get_seq_length()
      o = model(input_ids=tok, attention_mask=torch.ones(ids.shape[0], n + 1, dtype=torch.long),
                position_ids=torch.full_like(tok, n), use_cache=True, logits_to_keep=1,
                **{field: cache})
      return getattr(o, field), o.logits[:, -1:].argmax(-1)

    cache, tok = step(cache, tok)  # warm-up: first-step allocations are not per-token work
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      step(cache, tok)
  aten = [e for e in prof.events() if e.name.startswith('aten::')]

  def nested(e):
    p = e.cpu_parent
    while p is not None:
      if p.name.startswith('aten::'):
        return True
      p = p.cpu_parent
    return False
  return {'top_level': sum(not nested(e) for e in aten), 'total': len(aten)}
