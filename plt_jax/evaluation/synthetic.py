"""Exact-match accuracy on a synthetic task's fixed held-out set (`plt_jax.tasks`).

Each held-out prompt (ending in the ANSWER token) is greedy-decoded until EOS or for
len(answer) + 1 tokens; a prediction is right iff it is the answer followed by EOS
(`tasks.is_correct`), so a model that never stops, or stops early, scores 0 on that instance.
The held-out set of a training run is `plt_jax.data.heldout_set(config.data)`: the instances
its training stream excluded and its validation loss was measured on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from plt_jax import data as data_lib
from plt_jax.data import tasks
from plt_jax.infer.generate import Generator, SamplingParams


def predict(generator, prompts: Sequence[np.ndarray], answer_lens: Sequence[int], *,
            batch_size: int = 64, eos_id: int = tasks.EOS_ID) -> list[list[int]]:
  """Greedy continuations of `prompts` (EOS excluded), in batches of `batch_size`.

  generator: a `plt_jax.infer.generate.Generator` (anything with its `generate`). Each batch decodes
  for the longest answer in it plus one token, the room for the closing EOS.
  """
  out: list[list[int]] = []
  for start in range(0, len(prompts), batch_size):
    chunk = [np.asarray(p, np.int32) for p in prompts[start:start + batch_size]]
    new = max(int(n) for n in answer_lens[start:start + batch_size]) + 1
    res = generator.generate(chunk, max_new_tokens=new, sampling=SamplingParams(),
                             stop_tokens=[eos_id])
    out.extend([int(t) for t in toks] for toks in res.tokens)
  return out


def accuracy(model, instances: Sequence[tasks.Instance], *, batch_size: int = 64,
             generator=None, eos_id: int = tasks.EOS_ID) -> dict[str, Any]:
  """Exact-match accuracy of `model` on (prompt, answer) `instances` by greedy decoding.

  Returns accuracy, correct, total and per-instance `correct_mask`. generator: defaults to
  `plt_jax.infer.generate.Generator(model)`; pass one to reuse its compiled functions.
  """
  if not instances:
    raise ValueError('no held-out instances to score')
  if generator is None:
    generator = Generator(model)
  prompts = [p for p, _ in instances]
  answers = [a for _, a in instances]
  preds = predict(generator, prompts, [len(a) for a in answers], batch_size=batch_size,
                  eos_id=eos_id)
  # tasks.is_correct cuts at EOS; the generator already dropped it, so a prediction that ran to
  # the token limit without EOS keeps its extra token and fails.
  mask = [tasks.is_correct(p, a, eos_id) for p, a in zip(preds, answers)]
  correct = int(sum(mask))
  return dict(accuracy=tasks.exact_match(preds, answers, eos_id), correct=correct,
              total=len(answers), correct_mask=mask)


def evaluate_run(model, data_cfg, *, batch_size: int = 64, limit: int = 0,
                 generator=None) -> dict[str, Any]:
  """`accuracy` on the held-out set of a run whose data config is `data_cfg` (synthetic source).

  limit: score only the first `limit` held-out instances (0: all of them).
  """
  if data_cfg.source != 'synthetic':
    raise ValueError(f'data.source={data_cfg.source!r}: the synthetic suite needs a run '
                     "trained with data.source='synthetic'")
  spec = data_lib.task_spec(data_cfg)
  held = data_lib.heldout_set(data_cfg)
  if limit:
    held = held[:int(limit)]
  out = accuracy(model, held, batch_size=batch_size, generator=generator)
  out.pop('correct_mask')
  return dict(task=spec.name, task_params=dataclasses.asdict(spec),
              heldout_seed=int(data_cfg.split_seed), **out)


def format_summary(s: dict) -> str:
  return (f'synthetic ({s["task"]} {s["task_params"]}): exact match {s["accuracy"]:.4f} '
          f'({s["correct"]}/{s["total"]})' + (f'\n  results: {s["out_path"]}'
                                              if 'out_path' in s else ''))
